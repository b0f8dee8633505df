"""Where each run of a cluster folder stands, from two sources only: its run file (the truth of a
finished run) and the scheduler's queue now (one ``squeue`` call for every array of the folder).

Accounting (``sacct``) is not asked: it needs slurmdbd, and a cluster without one, or a pending
array task cancelled before it started, leaves it with no record, so a run would stay
"unknown" forever. A run with neither a row nor a queue entry is ``lost`` once
:data:`LOST_GRACE_S` have passed since it was submitted (or since it was last seen in the
queue): the next ``trickbench run`` resubmits it. A queue that cannot be read makes nothing lost.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from bench.execution import cluster
from bench.store.files import StoreError
from bench.store.results import MATRIX_FILE, ROWS_FILE, latest_runs, read_matrix_record, read_rows

LOST_GRACE_S = 30.0  # a run neither finished nor in the queue for this long is lost
SQUEUE_TIMEOUT_S = 60
# squeue's long states: waiting for a start (queued) or holding resources (running)
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED", "RESV_DEL_HOLD"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED", "RESIZING"}
# pending reasons that never clear by waiting: said in `status`
STUCK = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail",
         "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "AssocMaxCpuPerJobLimit", "JobHeldAdmin",
         "JobHeldUser", "DependencyNeverSatisfied"}
IN_FLIGHT = ("queued", "running", "unknown")  # states a new submission must leave alone


@dataclass
class RunState:
    state: str  # done, failed, running, queued, lost, unknown, not submitted
    cell_id: str
    seed: int
    detail: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.cell_id, self.seed


def slurm_queue(job_ids: Iterable[str]) -> Optional[dict[str, tuple[str, str]]]:
    """``{task id: (queued|running, reason)}`` for the tasks of these jobs still in the queue, in one
    ``squeue`` call (array tasks one per line: ``123_4``); None when squeue cannot answer."""
    arrays = sorted({str(job_id).split("_")[0] for job_id in job_ids})
    if not arrays:
        return {}
    try:
        done = subprocess.run(["squeue", "--noheader", "--array", "--jobs", ",".join(arrays),
                               "--format", "%i|%T|%r"], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # every id forgotten (ended long ago) reads as an error: an empty queue
        return {} if "Invalid job id" in done.stderr else None
    queue = {}
    for line in done.stdout.splitlines():
        task, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        state = state.split()[0] if state.strip() else ""
        if state in QUEUED or state in RUNNING:
            queue[task] = ("queued" if state in QUEUED else "running", reason.strip())
    return queue


def local_queue(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """The local executor's jobs whose controller (its job id is the controller's pid) still runs."""
    return {job_id: ("running", "") for job_id in job_ids if _local_controller_alive(job_id)}


def _local_controller_alive(job_id: str) -> bool:
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline  # a reused pid is another program


def submitted_s(job: dict[str, Any]) -> float:
    """When a job was submitted, in epoch seconds (records of older trickbench: from the stamp)."""
    if isinstance(job.get("submitted_s"), (int, float)):
        return float(job["submitted_s"])
    try:
        return time.mktime(time.strptime(job.get("submitted_at", ""), "%Y-%m-%dT%H:%M:%S%z"))
    except (TypeError, ValueError):
        return 0.0


def run_states(out_dir: Path, gone_since: Optional[dict[tuple[str, int], float]] = None) -> list[RunState]:
    """The state of every run of the folder's matrix, with one look at the queue.

    ``gone_since``: when each run was first seen neither finished nor queued (a caller that looks
    repeatedly, ``--wait``, passes the same dict each time; a run is lost after the grace period
    counted from there too)."""
    out_dir = Path(out_dir)
    record = cluster.read_jobs(out_dir)
    matrix = read_matrix_record(out_dir)  # the store's reader: file type, size, schema and finiteness checked
    if matrix is None:
        raise StoreError(f"{out_dir}: no {MATRIX_FILE} (not an output folder of `trickbench run`)")
    latest = latest_runs(read_rows(out_dir / ROWS_FILE, warn=False))
    runs = [(cell["cell_id"], seed) for seed in matrix["seeds"] for cell in matrix["cells"]]
    rows = {key: cluster.read_run_file(cluster.run_file(out_dir, *key)) or latest.get(key) for key in runs}
    jobs = {key: record["runs"].get(f"{key[0]}-{key[1]}") for key in runs}
    asked = [job["job_id"] for key, job in jobs.items() if job is not None and _open(rows[key], job)]
    local = record.get("executor") == "local"
    queue = local_queue(asked) if local else slurm_queue(asked)
    grace = 0.0 if local else LOST_GRACE_S  # a local job whose controller has exited is over
    now = time.time()
    states = []
    for key in runs:
        row, job = rows[key], jobs[key]
        if row is not None and row["status"] == "ok":
            states.append(RunState("done", *key))
        elif row is not None and not _open(row, job):
            states.append(RunState("failed", *key, f"{row['status']}: {row['error']}"))
        elif job is None:
            states.append(RunState("not submitted", *key))
        elif queue is None:
            states.append(RunState("unknown", *key, f"job {job['job_id']}: squeue did not answer"))
        elif job["job_id"] in queue:
            state, reason = queue[job["job_id"]]
            stuck = f" ({reason}: it may never start; see `scontrol show job {job['job_id']}`)" \
                if reason in STUCK else ""
            states.append(RunState(state, *key, f"job {job['job_id']}{stuck}"))
            if gone_since is not None:
                gone_since.pop(key, None)
        else:
            since = max(submitted_s(job), gone_since.setdefault(key, now) if gone_since is not None else 0.0)
            if now - since < grace:
                states.append(RunState("queued", *key, f"job {job['job_id']}: not in the queue; lost if it "
                                       f"stays so for {LOST_GRACE_S:g} s"))
            else:
                states.append(RunState("lost", *key, f"job {job['job_id']} left the queue without a row; "
                                       "`trickbench run` again resubmits it"))
    return states


def _open(row: Optional[dict[str, Any]], job: Optional[dict[str, Any]]) -> bool:
    """Whether a run still waits for its job: no row, or a failed row older than the job
    (``--retry-failed`` submitted it again)."""
    if row is None:
        return job is not None
    return job is not None and row["status"] != "ok" and row.get("started_at", "") < job.get("submitted_at", "")
