"""LR range test: where it stops on a problem whose divergent learning rate is known, and the CLI."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from bench.cli.main import main
from bench.diagnostics.lr_finder import exponential_lrs, lr_range_test

MATRIX = """
name: finder
base: {model: tiny_cnn, dataset: digits, image_size: 8, batch_size: 64, steps: 10, warmup_steps: 1}
seeds: [0]
axes:
  accumulation: [1]
"""


def test_exponential_lrs_span_min_to_max_in_equal_log_steps():
    lrs = exponential_lrs(1e-4, 10.0, 11)
    assert lrs[0] == 1e-4 and lrs[-1] == pytest.approx(10.0)
    assert np.allclose(np.diff(np.log10(lrs)), 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stops_just_past_the_edge_of_stability_of_sgd_on_a_quadratic(seed):
    """Least squares with minibatch SGD: the loss is quadratic with Hessian H = 2 XᵀX / n, and SGD
    diverges for lr > 2/λ_max(H). The finder must not stop before that edge (the loss still
    falls there), must stop soon after it (the EMA lags by ~1/(1-β) = 50 of the 300 steps, a
    factor 1.5 in lr at this ramp), and its suggestion must be a stable lr."""
    g = torch.Generator().manual_seed(seed)
    n, d, batch = 512, 8, 32
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    edge = 2 / torch.linalg.eigvalsh(2 * x.T @ x / n).max().item()
    w = torch.zeros(d, dtype=torch.float64)

    def sgd_step(lr: float) -> float:
        nonlocal w
        idx = torch.randint(0, n, (batch,), generator=g)
        residual = x[idx] @ w - y[idx]
        w = w - lr * 2 * x[idx].T @ residual / batch
        return (residual**2).mean().item()

    result = lr_range_test(sgd_step, min_lr=1e-4, max_lr=10.0, steps=300)
    assert result.stopped_early
    assert edge <= result.lrs[-1] <= 2.5 * edge, (result.lrs[-1], edge)
    assert edge / 100 < result.suggested_lr < edge
    assert result.suggested_lr == pytest.approx(result.min_loss_lr / 10)


def test_a_non_finite_first_loss_is_an_error():
    with pytest.raises(ValueError, match="lower --min-lr"):
        lr_range_test(lambda lr: float("nan"), 1.0, 10.0, 5)


def test_cli_writes_the_figure_and_prints_a_suggestion(write_matrix, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(["diagnose", str(write_matrix(MATRIX)), "--lr-finder", "--finder-steps", "40", "--min-lr", "1e-4",
                 "--max-lr", "100", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    suggested = float(re.search(r"suggested lr (\S+) \(lowest/10\)", printed).group(1))
    assert 1e-5 <= suggested <= 10  # the lowest smoothed loss lies within [min, max]
    assert "diverged at lr" in printed  # SGD with momentum 0.9 cannot train tiny_cnn at lr 100
    (figure,) = out.glob("lr_finder_*.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and np.asarray(imread(figure)).std() > 0.01


def test_cli_refuses_a_bad_range(write_matrix, tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", str(write_matrix(MATRIX)), "--lr-finder", "--min-lr", "1", "--max-lr", "0.1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-lr/--max-lr: need 0 < min < max" in err and not out.exists()
