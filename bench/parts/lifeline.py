"""A child must not outlive the process that started it.

Runs are started in sessions of their own (so a timeout can kill a whole process group), which
also puts them out of reach of a terminal's or a scheduler's signal to the parent's group. When
the parent is SIGKILLed nothing can forward a signal, so each child asks the kernel for one
(``PR_SET_PDEATHSIG`` on Linux) and, as a fallback where that is missing, polls its parent id.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 1.0


def die_with_parent(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux; kept across exec,
    so it can be set in a Popen ``preexec_fn``). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(expected_parent: int | None = None) -> None:
    """Exit at once if the parent is already gone, and as soon as it goes (polled in a daemon thread).

    ``expected_parent``: the pid that must be the parent (the runner, for a run without torchrun);
    None to take whatever the parent is now.
    """
    parent = os.getppid()
    if parent == 1 or (expected_parent is not None and parent != expected_parent):
        os._exit(1)  # the parent died before the death signal was armed

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)  # nothing left to report to; skip interpreter teardown

    threading.Thread(target=poll, name="trickbench-parent-watch", daemon=True).start()
