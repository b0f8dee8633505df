import json

import numpy as np
import torch
from matplotlib.image import imread

from bench.config.matrix import load_matrix
from bench.diagnostics.diagnose import diagnose, gradient_flow, inspect_training
from tests.conftest import TINY_MATRIX


def test_diagnose_writes_lr_gradient_flow_and_layer_statistics(write_matrix, tmp_path):
    matrix = load_matrix(write_matrix(TINY_MATRIX))
    paths = diagnose(matrix, None, steps=3, out_dir=tmp_path / "diag")
    cell = matrix.cells[0].cell_id
    assert [p.name for p in paths] == ["lr_schedules.png", f"grad_flow_{cell}.png", f"layer_stats_{cell}.png",
                                       f"layer_stats_{cell}.md"]
    table = paths[-1].read_text()
    assert table.count("| Conv2d |") == 6 and table.count("| ReLU |") == 6  # tiny_cnn's leaf modules
    for path in paths[:-1]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.asarray(imread(path)).std() > 0.01  # not blank


def test_gradient_flow_has_one_entry_per_weight(write_matrix):
    config = load_matrix(write_matrix(TINY_MATRIX)).cells[0].config
    layers = gradient_flow(config, seed=0, steps=2)
    assert len(layers) == 7  # tiny_cnn: six convolutions and the classifier
    assert all(l["max_abs_grad"] >= l["mean_abs_grad"] > 0 for l in layers)


def test_profile_trace_is_a_chrome_trace_and_ranks_a_convolution(write_matrix, tmp_path):
    matrix = load_matrix(write_matrix(TINY_MATRIX))
    cell = matrix.cells[0].cell_id
    paths = diagnose(matrix, None, steps=2, out_dir=tmp_path / "diag", profile_trace=True)
    trace, table = paths[-2:]
    assert (trace.name, table.name) == (f"trace_{cell}.json", f"top_ops_{cell}.md")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") and e.get("ph") == "X" for e in events)
    text = table.read_text()
    assert "by self CPU time" in text
    ops = [line.split("`")[1] for line in text.splitlines() if line.startswith("| `")]
    assert len(ops) == 20 and any("conv" in op for op in ops), ops


def test_top_operators_are_sorted_by_self_time_on_the_device():
    from bench.training.profiling import profile_steps, top_operators

    x = torch.randn(64, 64)
    prof = profile_steps(lambda: (x @ x).relu(), 3, torch.device("cpu"))
    rows = top_operators(prof, torch.device("cpu"), limit=50)
    assert [r["self_cpu_ms"] for r in rows] == sorted((r["self_cpu_ms"] for r in rows), reverse=True)
    mm = next(r for r in rows if r["operator"] == "aten::mm")
    assert mm["calls"] == 3


def test_layer_statistics_of_a_relu_cnn(write_matrix):
    config = load_matrix(write_matrix(TINY_MATRIX)).cells[0].config
    rows = inspect_training(config, seed=0, steps=2).layer_statistics
    relus = [r for r in rows if r["kind"] == "ReLU"]
    assert len(relus) == 6 and all(0 < r["activation_zero_fraction"] < 1 for r in relus)
    batchnorms = [r for r in rows if r["kind"] == "BatchNorm2d"]  # train mode: normalised per channel
    assert all(abs(r["activation_mean"]) < 0.1 and 0.9 < r["activation_std"] < 1.1 for r in batchnorms)


def test_diagnose_cli_with_profile_trace(write_matrix, tmp_path, capsys):
    from bench.cli.main import main

    out = tmp_path / "d"
    assert main(["diagnose", str(write_matrix(TINY_MATRIX)), "--steps", "2", "--profile-trace", "--out", str(out)]) == 0
    assert any(p.name.startswith("trace_") for p in out.iterdir())
