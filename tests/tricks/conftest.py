"""Shared settings for the trick tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny tensors: intra-op threading only adds synchronisation (seconds per step on a busy
    2-core machine instead of milliseconds). Restored afterwards for the rest of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
