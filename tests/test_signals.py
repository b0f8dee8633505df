"""Stopping a run from outside: SIGTERM (what timeout, systemd and SLURM send) and SIGKILL of the
parent. Neither may leave a training child behind, hold the lock, damage cells.jsonl or leave
temporary files that accumulate; the same command then resumes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.execution import runner
from bench.store.results import read_rows

# One cell, two seeds. Under TRICKBENCH_FAULT=hang@0 each child hangs after its first step, so it
# is still there when the signal comes and only a kill can end it; the rerun trains normally.
SLOW_MATRIX = """
name: slow
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 6, warmup_steps: 1}
seeds: [0, 1]
axes:
  accumulation: [1]
"""


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (zombies have none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def start_run(path: Path, out: Path) -> tuple[subprocess.Popen, list[int]]:
    """``python -m bench run`` in a subprocess, returned once its training child is running."""
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", str(path), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TRICKBENCH_FAULT": "hang@0"})
    children = wait_for(lambda: processes_mentioning(str(out / ".work")), 120, "the training child")
    return proc, children


def assert_no_child_left(out: Path) -> None:
    wait_for(lambda: not processes_mentioning(str(out / ".work")), 10, "the training child to exit")


def assert_lock_free(out: Path) -> None:
    with runner.exclusive(out):
        pass


@pytest.fixture
def slow_matrix(write_matrix):
    return write_matrix(SLOW_MATRIX)


def test_sigterm_stops_the_child_and_exits_143(slow_matrix, tmp_path):
    out = tmp_path / "out"
    proc, _ = start_run(slow_matrix, out)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert_no_child_left(out)
    assert_lock_free(out)
    assert not (out / ".work").exists()  # cleaned on the way out
    assert read_rows(out / "cells.jsonl") == []  # the run in progress wrote no row
    assert main(["run", str(slow_matrix), "--out", str(out)]) == 0  # resumes
    assert sorted(r["seed"] for r in read_rows(out / "cells.jsonl")) == [0, 1]


def test_sigkill_of_the_parent_takes_the_child_down(slow_matrix, tmp_path):
    out = tmp_path / "out"
    proc, children = start_run(slow_matrix, out)
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone: its child runs in a session of its own
    proc.communicate(timeout=30)
    assert_no_child_left(out)
    assert_lock_free(out)
    assert (out / ".work").exists()  # a killed parent cleans nothing; the next run does
    assert main(["run", str(slow_matrix), "--out", str(out)]) == 0
    assert sorted(r["seed"] for r in read_rows(out / "cells.jsonl")) == [0, 1]
    assert not (out / ".work").exists()


def test_an_orphaned_child_notices_by_polling(tmp_path):
    """Without the kernel's death signal (not Linux, or lost in a race) polling the parent id
    still ends the child: here the parent is a shell that exits at once."""
    started = tmp_path / "started"
    code = (f"import pathlib, time; from bench.parts import lifeline; lifeline.watch_parent(); "
            f"pathlib.Path('{started}').touch(); time.sleep(60)")
    # The shell waits until its child is watching, then exits: the child is orphaned.
    subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{code}" & while [ ! -e {started} ]; do sleep 0.05; done'],
                   check=True, timeout=60)
    wait_for(lambda: not processes_mentioning(str(started)), 15, "the orphan to exit")
