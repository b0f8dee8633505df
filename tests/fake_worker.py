"""A stand-in for bench.worker that trains nothing: writes an ok row in milliseconds, or a failed
one for the cells listed in $FAKE_WORKER_FAIL (comma-separated cell ids). For runner tests
about rows, resume and exit codes, where what a run measures does not matter."""
import json
import os
import sys

from bench.results import RunRecord, write_atomic


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    record = RunRecord.for_job(job)
    record.env = job.get("env")  # the machine as the runner sees it (the real worker measures its own)
    record.start()
    if job["cell_id"] in os.environ.get("FAKE_WORKER_FAIL", "").split(","):
        record.fail("error", "RuntimeError: planted failure")
    else:
        record.metrics = {"throughput_samples_per_s": 100.0 + job["seed"], "peak_memory_bytes": 2 ** 20,
                          "step_time_ms_median": 10.0, "step_times_ms": [10.0, 10.5], "accuracy_top1": None}
    record.finish(0.01)
    write_atomic(job["row_path"], json.dumps(record.to_row()))


if __name__ == "__main__":
    main(sys.argv[1])
