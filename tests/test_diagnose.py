import numpy as np
from matplotlib.image import imread

from bench.config import load_matrix
from bench.diagnose import diagnose, gradient_flow
from tests.conftest import TINY_MATRIX


def test_diagnose_writes_lr_and_gradient_flow_figures(write_matrix, tmp_path):
    matrix = load_matrix(write_matrix(TINY_MATRIX))
    paths = diagnose(matrix, None, steps=3, out_dir=tmp_path / "diag")
    assert [p.name for p in paths] == ["lr_schedules.png", f"grad_flow_{matrix.cells[0].cell_id}.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.asarray(imread(path)).std() > 0.01  # not blank


def test_gradient_flow_has_one_entry_per_weight(write_matrix):
    config = load_matrix(write_matrix(TINY_MATRIX)).cells[0].config
    layers = gradient_flow(config, seed=0, steps=2)
    assert len(layers) == 7  # tiny_cnn: six convolutions and the classifier
    assert all(l["max_abs_grad"] >= l["mean_abs_grad"] > 0 for l in layers)
