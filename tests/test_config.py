"""Validation at the boundary: every bad input names the file, the key and what is allowed."""
import pytest
import torch

from bench.base.errors import ConfigError
from bench.config.matrix import load_matrix
from bench.config.train_config import TrainConfig
from bench.training.feasibility import load_runnable_matrix
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
    ("name: m\n" + GOOD_BASE + "\naxes: {persistent_workers: [false, true]}",
     "axes.persistent_workers[1]", ["true needs num_workers > 0"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {prefetch_factor: [null, 4]}",
     "axes.prefetch_factor[1]", ["4 needs num_workers > 0", "use null"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {prefetch_factor: [0]}",
     "axes.prefetch_factor[0]", ["out of range [1, 1024]"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {compile: [false, defualt]}",
     "axes.compile[1]", ["is not one of false, default, reduce-overhead, max-autotune", "did you mean 'default'"]),
    ("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1, warmup_steps: 0}\naxes: {compile: [false, default]}",
     "axes (compile=default)", ["compile needs warmup_steps >= 1"]),
    ("name: m\n" + GOOD_BASE + "\ndesign: full_factorial\naxes: {compile: [false, default], checkpointing: [false, true]}",
     "axes (compile=default, checkpointing=True)", ["compile with checkpointing compiles no graph"]),
    ("name: m\n" + GOOD_BASE + "\naxes: {zero_grad: [none, zero]}",
     "axes.zero_grad[1]", ["'zero' is not one of none, zeros"]),
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


# ---- silent-wrong cases and up-front checks (issue 10) ----

NESTED = """
name: m
base: {model: tiny_cnn, dataset: digits, epochs: 1,
       optimizer: {name: adamw, lr: 0.05, weight_decay: 0.05}}
axes:
  optimizer: [{lr: 0.001}, {lr: 0.002}]
"""


def test_axis_over_a_nested_field_merges_into_the_base(write_matrix):
    """The defect: each axis value replaced the whole optimizer (SGD, weight decay 0)."""
    from bench.training.train import build_optimizer

    cells = load_matrix(write_matrix(NESTED)).cells
    assert [c.config.to_dict()["optimizer"] for c in cells] == [
        {"name": "adamw", "lr": lr, "weight_decay": 0.05} for lr in (0.001, 0.002)]
    assert cells[0].axes == {"optimizer": {"lr": 0.001}}  # the label is what the axis says
    optimizer = build_optimizer(cells[1].config, torch.nn.Linear(2, 2))  # what would run
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 0.002 and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_duplicate_key_is_refused_with_both_lines(write_matrix):
    path = write_matrix("name: m\nseeds: [0, 1, 2]\nbase: {model: tiny_cnn, dataset: digits, epochs: 1}\n"
                        "axes: {ema: [null]}\nseeds: [7]\n")
    with pytest.raises(ConfigError, match=r"line 5: duplicate key 'seeds' \(first at line 2\)"):
        load_matrix(path)


def test_yaml_merge_keys_may_repeat_what_they_merge(write_matrix):
    path = write_matrix("name: m\nshared: &shared {model: tiny_cnn, dataset: digits, epochs: 1}\n"
                        .replace("shared: &shared", "description: x\nbase: &shared") +
                        "axes: {ema: [null]}\nprofiles: {cpu: {base: {<<: *shared, epochs: 2}}}\n")
    assert load_matrix(path, profile="cpu").cells[0].config.epochs == 2


def test_option_of_another_optimizer_is_dropped_with_a_warning(write_matrix):
    path = write_matrix("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1,"
                        " optimizer: {name: sgd, lr: 0.1, momentum: 0.8, nesterov: true}}\n"
                        "axes: {optimizer: [{name: sgd}, {name: adamw, lr: 0.001}]}\n")
    matrix = load_matrix(path)
    assert matrix.cells[0].config.optimizer.momentum == 0.8
    assert matrix.cells[1].config.to_dict()["optimizer"] == {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}
    assert [w.split(": ", 1)[1] for w in matrix.warnings] == [  # from the axis, once for the cell
        "optimizer.momentum: adamw does not use momentum; ignored (not recorded in the rows)",
        "optimizer.nesterov: adamw does not use nesterov; ignored (not recorded in the rows)"]


def test_warnings_go_to_stderr_once_and_the_run_goes_on(write_matrix, capsys, tmp_path):
    from bench.cli.main import main

    path = write_matrix("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1, optimizer: {name: adamw,"
                        " momentum: 0.9}}\naxes: {ema: [null, 0.999, {decay: 0.999, warmup: true}]}\n")
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    assert "adamw does not use momentum" in err[0]
    # 1437 digits / batch 128 = 11 steps, far fewer than the ~1000 that decay 0.999 averages over;
    # the warmed-up EMA is not warned about.
    assert "ema: decay 0.999 averages over ~1000 steps but the run has 11" in err[1]
    assert not (tmp_path / "out").exists()


def test_max_cells_counts_before_expanding_and_yes_lifts_it(write_matrix, capsys, monkeypatch):
    import bench.cli.main

    path = write_matrix("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1}\ndesign: full_factorial\n"
                        "axes: {ema: [null, 0.9], accumulation: [1, 2]}\n")
    with pytest.raises(ConfigError, match="makes 4 cells, more than 3"):
        load_matrix(path, max_cells=3)
    monkeypatch.setattr(bench.cli.main, "MAX_CELLS", 3)
    assert bench.cli.main.main(["run", str(path), "--dry-run"]) == 2
    assert bench.cli.main.main(["run", str(path), "--dry-run", "--yes"]) == 0
    assert "4 cells x 1 seeds" in capsys.readouterr().out


def test_minimum_run_length_is_one_named_rule(write_matrix):
    from bench.parts.clock import MEASUREMENT_STEPS, min_total_steps

    assert min_total_steps(3) == 3 + MEASUREMENT_STEPS + 1
    fits = TINY_MATRIX.replace("steps: 6", f"steps: {min_total_steps(1)}")
    load_matrix(write_matrix(fits))
    with pytest.raises(ConfigError, match=f"at least {min_total_steps(1)} optimizer steps"):
        load_runnable_matrix(write_matrix(fits.replace(f"steps: {min_total_steps(1)}", f"steps: {min_total_steps(1) - 1}")))


@pytest.mark.parametrize("dataset,extra", [("digits", {}), ("synthetic", {"num_samples": 100, "num_classes": 7}),
                                           ("digits", {"image_size": 12})])
def test_dataset_facts_match_the_built_dataset(dataset, extra):
    from bench.parts.data import build_dataset, dataset_facts

    config = TrainConfig.from_dict({"dataset": dataset, "epochs": 1, **extra})
    facts, splits = dataset_facts(config), build_dataset(config)
    assert (facts.train_size, facts.num_classes, facts.input_shape) == \
        (len(splits.train), splits.num_classes, splits.input_shape)


def test_model_input_check_accepts_what_trains_and_refuses_what_cannot(write_matrix):
    """resnet18 (ImageNet stem) at 32x32 works; alexnet at 32x32 does not (its feature map shrinks
    to nothing): decided by a forward on the meta device, the same verdict as a real forward."""
    from bench.parts.models import build_model, meta_forward_problem

    assert meta_forward_problem("resnet18", 10, (3, 32, 32), 4) is None
    assert "too small" in meta_forward_problem("alexnet", 10, (3, 32, 32), 4)
    with pytest.raises(RuntimeError, match="too small"):  # the real forward agrees
        build_model("alexnet", 10)(torch.zeros(4, 3, 32, 32))
