"""Validation at the boundary: every bad input names the file, the key and what is allowed."""
import pytest

from bench.config import ConfigError, load_matrix
from tests.conftest import TINY_MATRIX

GOOD_BASE = "base: {model: tiny_cnn, dataset: digits, epochs: 1}"

# (yaml text, key the error must name, fragments the message must contain)
BAD_INPUTS = [
    ("name: m\n" + GOOD_BASE + "\naxes: {precision: [fp32, bf17]}",
     "axes.precision[1]", ["'bf17' is not one of fp32, tf32, fp16, bf16", "did you mean 'bf16'"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {precison: [fp32]}",
     "axes.precison", ["unknown key", "did you mean 'precision'"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1, bach_size: 3}\naxes: {ema: [null]}",
     "base.bach_size", ["unknown key", "did you mean 'batch_size'"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1, batch_size: big}\naxes: {ema: [null]}",
     "base.batch_size", ["'big' is not an integer"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 0}\naxes: {ema: [null]}",
     "base.epochs", ["out of range"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1, optimizer: {name: adam}}\naxes: {ema: [null]}",
     "base.optimizer.name", ["'adam' is not one of sgd, adamw", "did you mean 'adamw'"]),
    ("name: m\nbase: {model: resnet181, dataset: digits, epochs: 1}\naxes: {ema: [null]}",
     "base.model", ["unknown model 'resnet181'", "trickbench list models"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: cifar11, epochs: 1}\naxes: {ema: [null]}",
     "base.dataset", ["unknown dataset 'cifar11'", "did you mean 'cifar10'"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits}\naxes: {ema: [null]}",
     "base", ["exactly one of epochs or steps"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {ema: [null, 1.5]}",
     "axes.ema[1]", ["not null, a decay in (0, 1) or {decay: d, warmup: true}"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {accumulation: [1, 3]}",
     "axes (accumulation=3)", ["does not divide the per-rank batch size 128"]),
    ("name: m\n" + GOOD_BASE + "\ndesign: full_factorial\naxes: {precision: [fp32, fp16], sam: [null, 0.05]}",
     "axes (precision=fp16, sam=0.05)", ["sam cannot run with precision fp16", "exclude"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {world_size: [1, 3]}",
     "axes (world_size=3)", ["world_size 3 does not divide the global batch size 128", "batch_scaling"]),
    ("name: m\n" + GOOD_BASE + "\ndesign: factorial\naxes: {ema: [null]}",
     "design", ["'factorial' is not one of one_at_a_time, full_factorial", "did you mean 'full_factorial'"]),
    ("name: m\n" + GOOD_BASE + "\nseeds: 3\naxes: {ema: [null]}",
     "seeds", ["a non-empty list of distinct integers"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {ema: 0.9}",
     "axes.ema", ["expected a non-empty list"]),
    ("name: m\n" + GOOD_BASE + "\naxis: {ema: [null]}",
     "axis", ["unknown key", "did you mean 'axes'"]),
    (GOOD_BASE + "\naxes: {ema: [null]}",
     "name", ["missing"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {ema: [null]}\nexclude: [{sam: 0.05}]",
     "exclude[0].sam", ["unknown key"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {precision: [fp32\n",
     "", ["not valid YAML at line"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {ema: [null]}\ncmd: !!python/object/apply:os.system ['echo hi']",
     "", ["not valid YAML"]),
]


@pytest.mark.parametrize("text,key,fragments", BAD_INPUTS, ids=[b[1] or b[2][0] for b in BAD_INPUTS])
def test_bad_input_names_file_key_and_allowed(write_matrix, text, key, fragments):
    path = write_matrix(text)
    with pytest.raises(ConfigError) as caught:
        load_matrix(path)
    error = caught.value
    assert error.file == str(path)
    assert error.key == key
    for fragment in fragments:
        assert fragment in error.message


def test_profile_unknown_is_an_error(write_matrix):
    path = write_matrix(TINY_MATRIX)
    with pytest.raises(ConfigError, match="no profile 'gpu'"):
        load_matrix(path, profile="gpu")


def test_missing_cuda_device_is_rejected(write_matrix):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ConfigError, match="cuda is not available"):
        load_matrix(write_matrix(TINY_MATRIX), device="cuda")


def test_one_at_a_time_is_baseline_plus_each_value_alone(write_matrix):
    path = write_matrix("name: m\n" + GOOD_BASE + "\naxes: {precision: [fp32, bf16, fp16], ema: [null, 0.9]}")
    cells = load_matrix(path).cells
    assert [c.axes for c in cells] == [
        {"precision": "fp32", "ema": None},
        {"precision": "bf16", "ema": None},
        {"precision": "fp16", "ema": None},
        {"precision": "fp32", "ema": 0.9},
    ]


def test_full_factorial_with_exclude(write_matrix):
    path = write_matrix("name: m\n" + GOOD_BASE + "\ndesign: full_factorial\n"
                        "axes: {precision: [fp32, bf16], ema: [null, 0.9], accumulation: [1, 2]}\n"
                        "exclude: [{precision: bf16, ema: 0.9}]")
    matrix = load_matrix(path)
    assert len(matrix.cells) == 8 - 2
    assert not any(c.axes["precision"] == "bf16" and c.axes["ema"] == 0.9 for c in matrix.cells)


def test_profile_overrides_base_and_axes(write_matrix):
    path = write_matrix("name: m\nbase: {model: resnet18_cifar, dataset: cifar10, epochs: 10, "
                        "optimizer: {lr: 0.1, momentum: 0.8}}\naxes: {ema: [null, 0.999]}\n"
                        "profiles: {cpu: {base: {model: tiny_cnn, dataset: digits, epochs: 1, optimizer: {lr: 0.05}},"
                        " axes: {ema: [null, 0.9]}}}")
    cells = load_matrix(path, profile="cpu").cells
    config = cells[0].config
    assert (config.model, config.dataset, config.epochs) == ("tiny_cnn", "digits", 1)
    assert (config.optimizer.lr, config.optimizer.momentum) == (0.05, 0.8)  # merged, not replaced
    assert cells[1].config.tricks["ema"] == 0.9


def test_cell_id_is_stable_and_config_sensitive(write_matrix):
    first = load_matrix(write_matrix(TINY_MATRIX)).cells
    again = load_matrix(write_matrix(TINY_MATRIX)).cells
    assert [c.cell_id for c in first] == [c.cell_id for c in again]
    assert len({c.cell_id for c in first}) == len(first)
    changed = load_matrix(write_matrix(TINY_MATRIX.replace("steps: 6", "steps: 7"))).cells
    assert changed[0].cell_id != first[0].cell_id


def test_runs_are_round_robin_over_cells(write_matrix):
    matrix = load_matrix(write_matrix(TINY_MATRIX))
    assert [(c.axes["accumulation"], s) for c, s in matrix.runs()] == [(1, 0), (2, 0), (1, 1), (2, 1)]


def test_repo_matrices_are_valid():
    from pathlib import Path

    for path in sorted(Path("ablations").glob("*.yaml")):
        load_matrix(path, device="cpu")
        load_matrix(path, profile="cpu", device="cpu")
