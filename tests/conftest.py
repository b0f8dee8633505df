import textwrap
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_cpu_thread():
    """One intra-op thread for in-process training: tiny models only pay synchronisation for more
    threads on a small, busy CPU, and oneDNN's scratch buffers (memory references) do not vary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def write_matrix(tmp_path: Path):
    """Write a matrix YAML into tmp_path and return its path."""

    def write(text: str, name: str = "m.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


# A matrix that trains in about a second per run on CPU.
TINY_MATRIX = """
name: tiny
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 6, warmup_steps: 1}
seeds: [0, 1]
axes:
  accumulation: [1, 2]
"""
