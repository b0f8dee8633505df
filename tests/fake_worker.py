"""A stand-in for bench.training.worker that trains nothing: writes an ok row in milliseconds, or a failed
one for the cells listed in $FAKE_WORKER_FAIL (comma-separated cell ids). For runner tests
about rows, resume and exit codes, where what a run measures does not matter.
$FAKE_WORKER_SLEEP_S keeps each run alive that long, so that runs overlap when the runner starts
several; the row then records where the run was placed and when it ran (``fake_placement``)."""
import json
import os
import sys
import time

from bench.store.results import RunRecord, write_atomic


def main(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    record = RunRecord.for_job(job)
    record.env = job.get("env")  # the machine as the runner sees it (the real worker measures its own)
    record.start()
    started = time.time()
    time.sleep(float(os.environ.get("FAKE_WORKER_SLEEP_S", "0")))
    if job["cell_id"] in os.environ.get("FAKE_WORKER_FAIL", "").split(","):
        record.fail("error", "RuntimeError: planted failure")
    else:
        record.metrics = {"throughput_samples_per_s": 100.0 + job["seed"], "peak_memory_bytes": 2 ** 20,
                          "step_time_ms_median": 10.0, "step_times_ms": [10.0, 10.5], "accuracy_top1": None,
                          "fake_placement": {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                             "cores": os.environ.get("TRICKBENCH_CORES"),
                                             "start": started, "end": time.time()}}
    record.finish(0.01)
    write_atomic(job["row_path"], json.dumps(record.to_row()))


if __name__ == "__main__":
    main(sys.argv[1])
