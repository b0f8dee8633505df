"""Hostile input: every malformed matrix, value, argument or environment variable is refused on
one short line starting with ``error:``, exit code 2, no traceback, and nothing is written.

Table-driven and in-process (``bench.cli.main.main``) so the corpus runs in seconds; a few cases go
through the real command line in a subprocess to show that no traceback escapes there either.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli.main import main

BASE_FIELDS = {"model": "tiny_cnn", "dataset": "digits", "image_size": "16", "batch_size": "64", "epochs": "1"}
TINY_FIELDS = {"model": "tiny_cnn", "dataset": "synthetic", "num_samples": "64", "image_size": "8",
               "batch_size": "16", "steps": "6"}


def b(fields: dict[str, str] = BASE_FIELDS, **changes: str | None) -> str:
    """A base section: ``fields`` with ``changes`` applied (None removes a field)."""
    merged = {k: v for k, v in {**fields, **changes}.items() if v is not None}
    return "base: {" + ", ".join(f"{k}: {v}" for k, v in merged.items()) + "}"


BASE = b()
TINY = b(TINY_FIELDS)
OK = f"name: m\n{BASE}\naxes: {{ema: [null, 0.9]}}\n"  # valid: each case breaks one thing


def m(axes: str = "{ema: [null, 0.9]}", base: str = BASE, extra: str = "") -> str:
    return f"name: m\n{base}\naxes: {axes}\n{extra}"


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
ALL_AXES = ", ".join(f"f{i}: [0, 1, 2, 3]" for i in range(10))
RANGE45 = "[" + ", ".join(map(str, range(45))) + "]"

# (id, matrix text or bytes, extra CLI args after `run MATRIX`, environment, what the error must say)
CASES: list[tuple[str, str | bytes | None, list[str], dict[str, str], str]] = [
    # --- file level ---
    ("not-utf8", b"name: m\n\xff\xfe base: x\n", [], {}, "not UTF-8 text (byte 8, line 2)"),
    ("latin1", "name: caf\u00e9\naxes: {ema: [null]}\n".encode("latin-1"), [], {}, "not UTF-8"),
    ("alias-bomb", BILLION_LAUGHS + OK, [], {}, "counting each alias (*name) as expanded"),
    ("recursive-alias", "name: m\nbase: &a {x: *a}\naxes: {ema: [null]}\n", [], {}, "refers to a value that contains it"),
    ("too-large", OK + "# " + "x" * (1 << 20) + "\n", [], {}, "larger than 1024 KiB"),
    ("deep-nesting", OK + "description: " + "[" * 3000 + "]" * 3000 + "\n", [], {}, "nested too deeply"),
    ("bad-syntax", "name: m\naxes: {ema: [null\n", [], {}, "not valid YAML at line 3"),
    ("python-tag", OK + "x: !!python/object/apply:os.system ['echo hi']\n", [], {}, "could not determine a constructor"),
    ("empty-file", "", [], {}, "name: missing"),
    ("top-level-list", "- name\n- axes\n", [], {}, "expected a mapping"),
    ("top-level-scalar", "hello\n", [], {}, "expected a mapping"),
    ("duplicate-top-key", OK + "seeds: [0]\nseeds: [1, 2]\n", [], {}, "line 5: duplicate key 'seeds' (first at line 4)"),
    ("duplicate-nested-key", m(base="base: {model: tiny_cnn, dataset: digits, epochs: 1, epochs: 2}"), [], {},
     "duplicate key 'epochs'"),
    ("duplicate-axis", "name: m\n" + BASE + "\naxes:\n  ema: [null]\n  ema: [0.9]\n", [], {},
     "line 5: duplicate key 'ema' (first at line 4)"),
    ("int-key", m(axes="{1: [a]}"), [], {}, "key 1 is not a string"),
    ("bool-key-on", m(axes="{on: [1]}"), [], {}, "key True is not a string"),
    ("null-key", m(axes="{null: [1]}"), [], {}, "key None is not a string"),
    ("list-key", m(axes="{[a, b]: [1]}"), [], {}, "is not a string"),
    ("int-profile-name", OK + "profiles: {1: {seeds: [0]}}\n", [], {}, "key 1 is not a string"),
    ("long-unknown-key", "name: m\nbase:\n  ? " + "k" * 5000 + "\n  : 1\naxes: {ema: [null]}\n", [], {}, "unknown key"),
    ("long-string-value", m(base=b(model="r" * 5000)), [], {}, "unknown model 'rrrr"),
    # --- sections of the wrong type ---
    ("base-string", "name: m\nbase: resnet\naxes: {ema: [null]}\n", [], {}, "base: expected a mapping"),
    ("base-list", "name: m\nbase: [1, 2]\naxes: {ema: [null]}\n", [], {}, "base: expected a mapping"),
    ("axes-list", m(axes="[precision, ema]"), [], {}, "axes: expected a mapping"),
    ("axes-empty", m(axes="{}"), [], {}, "axes: expected a mapping"),
    ("axes-null", m(axes="null"), [], {}, "axes: expected a mapping"),
    ("axis-values-scalar", m(axes="{ema: 0.9}"), [], {}, "axes.ema: expected a non-empty list"),
    ("axis-values-empty", m(axes="{ema: []}"), [], {}, "axes.ema: expected a non-empty list"),
    ("name-list", OK.replace("name: m", "name: [m]"), [], {}, "name: expected a name"),
    ("name-path", OK.replace("name: m", "name: ../etc"), [], {}, "is not a name of letters"),
    ("name-unicode", OK.replace("name: m", "name: r\u00e9sultat"), [], {}, "is not a name of letters"),
    ("name-missing", OK.replace("name: m\n", ""), [], {}, "name: missing"),
    ("design-list", OK + "design: [full_factorial]\n", [], {}, "design: expected one of"),
    ("description-mapping", OK + "description: {a: 1}\n", [], {}, "description: expected a string"),
    ("profiles-list", OK + "profiles: [cpu]\n", ["--profile", "cpu"], {}, "profiles: expected a mapping"),
    ("profile-is-list", OK + "profiles: {cpu: [1]}\n", ["--profile", "cpu"], {}, "profiles.cpu: expected a mapping"),
    ("profile-base-string", OK + "profiles: {cpu: {base: tiny}}\n", ["--profile", "cpu"], {},
     "profiles.cpu.base: expected a mapping"),
    ("profile-axes-list", OK + "profiles: {cpu: {axes: [ema]}}\n", ["--profile", "cpu"], {},
     "profiles.cpu.axes: expected a mapping"),
    ("profile-unknown-key", OK + "profiles: {cpu: {name: x}}\n", ["--profile", "cpu"], {}, "profiles.cpu.name: unknown key"),
    ("profile-missing", OK + "profiles: {cpu: {}}\n", ["--profile", "gpu"], {}, "no profile 'gpu'"),
    # --- seeds ---
    ("seeds-string", OK + "seeds: abc\n", [], {}, "seeds: expected a non-empty list"),
    ("seeds-float", OK + "seeds: [1.5]\n", [], {}, "not a non-empty list of distinct integers"),
    ("seeds-bool", OK + "seeds: [true]\n", [], {}, "not a non-empty list of distinct integers"),
    ("seeds-negative", OK + "seeds: [-1]\n", [], {}, "seeds[0]: -1 is outside numpy's seed range"),
    ("seeds-too-large", OK + "seeds: [4294967296]\n", [], {}, "outside numpy's seed range"),
    ("seeds-huge", OK + "seeds: [" + "9" * 400 + "]\n", [], {}, "outside numpy's seed range"),
    ("seeds-duplicate", OK + "seeds: [1, 1]\n", [], {}, "distinct integers"),
    ("seeds-empty", OK + "seeds: []\n", [], {}, "non-empty list"),
    ("seed-plus-rank", m(axes="{world_size: [1, 2]}") + "seeds: [4294967295]\n", [], {}, "+ rank 1 is outside"),
    # --- exclude ---
    ("exclude-mapping", OK + "exclude: {ema: 0.9}\n", [], {}, "exclude: expected a list"),
    ("exclude-empty-rule", OK + "exclude: [{}]\n", [], {}, "exclude[0]: empty rule"),
    ("exclude-null-rule", OK + "exclude: [null]\n", [], {}, "exclude[0]: expected a mapping"),
    ("exclude-string-rule", OK + "exclude: [ema]\n", [], {}, "exclude[0]: expected a mapping"),
    ("exclude-unknown-value", OK + "exclude: [{ema: 0.5}]\n", [], {}, "0.5 is not a value of axis ema"),
    ("exclude-unknown-axis", OK + "exclude: [{sam: 0.05}]\n", [], {}, "exclude[0].sam: unknown key"),
    ("exclude-everything", m(axes="{ema: [null]}", extra="exclude: [{ema: null}]\n"), [], {},
     "remove every one of the 1 cells"),
    # --- values ---
    ("nesterov-without-momentum", m(base=b(optimizer="{name: sgd, momentum: 0, nesterov: true}")), [], {},
     "optimizer.nesterov: true needs momentum > 0"),
    ("optimizer-unknown-key", m(base=b(optimizer="{name: adamw, betas2: 0.9}")), [], {},
     "adamw takes: name, lr, weight_decay"),
    ("optimizer-string", m(base=b(optimizer="sgd")), [], {}, "base.optimizer: expected a mapping"),
    ("optimizer-axis-bad", m(axes="{optimizer: [{lr: 0.01}, {lr: -1}]}"), [], {}, "axes.optimizer[1].lr: -1 is out of range"),
    ("port-zero", m(base=b(launcher="{rdzv_endpoint: 'node0:0'}")), [], {}, "port in 1-65535"),
    ("port-too-large", m(base=b(launcher="{rdzv_endpoint: 'node0:70000'}")), [], {}, "port in 1-65535"),
    ("endpoint-no-host", m(base=b(launcher="{rdzv_endpoint: ':29400'}")), [], {}, "is not host:port"),
    ("launcher-string", m(base=b(launcher="node0")), [], {}, "base.launcher: expected a mapping"),
    ("batch-larger-than-data", m(base=b(batch_size="2000")), [], {}, "exceeds the 1437 training samples of digits"),
    ("batch-absurd", m(base=b(batch_size="100000000000")), [], {}, "batch_size: 100000000000 is out of range"),
    ("per-rank-batch-larger", m(base=b(TINY_FIELDS, num_samples="20", batch_scaling="per_rank"),
                               axes="{world_size: [1, 2]}"), [], {}, "axes (world_size=2): per-rank batch size 16"),
    ("steps-too-few", m(base=b(epochs=None, steps="5", warmup_steps="3")), [], {},
     "base.steps: 5 steps leave nothing to time: a run needs at least 6"),
    ("epochs-too-few", m(base=b(batch_size="512")), [], {}, "base.epochs: 1 epochs of 2 batches leave nothing to time"),
    ("warmup-axis-too-long", m(base=TINY, axes="{warmup_steps: [1, 5]}"), [], {}, "axes (warmup_steps=5)"),
    ("imagefolder-no-data-dir", m(base=b(dataset="imagefolder")), [], {}, "imagefolder needs data_dir"),
    ("model-too-small-input", m(base=b(model="alexnet", image_size="8")), [], {}, "alexnet cannot train on batches of 64x3x8x8"),
    ("model-tuple-output", m(base=b(model="googlenet", image_size="64")), [], {}, "output is"),
    ("model-fixed-size", m(base=b(model="vit_b_16")), [], {}, "vit_b_16 cannot train"),
    ("model-batch-of-one-bn", m(base=b(model="resnet18", batch_size="1", epochs="10")), [], {},
     "Expected more than 1 value per channel"),
    ("num-samples-absurd", m(base=b(TINY_FIELDS, num_samples="90000000")), [], {}, "GiB of synthetic data"),
    ("num-samples-range", m(base=b(TINY_FIELDS, num_samples="10000000000")), [], {}, "out of range"),
    ("time-limit-inf", m(base=b(time_limit_s=".inf")), [], {}, "time_limit_s: inf is out of range"),
    ("lr-nan", m(base=b(optimizer="{lr: .nan}")), [], {}, "lr: nan is out of range"),
    ("warmup-negative", m(base=b(warmup_steps="-1")), [], {}, "warmup_steps: -1 is out of range"),
    ("device-axis-unknown", m(axes="{device: [cpu, tpu]}"), [], {}, "axes.device[1]: 'tpu' is not one of"),
    ("ema-warmup-not-bool", m(axes="{ema: [null, {decay: 0.9, warmup: maybe}]}"), [], {}, "axes.ema[1]"),
    ("ema-typo-key", m(axes="{ema: [null, {decy: 0.9}]}"), [], {}, "is not {decay: d, warmup: true|false}"),
    ("ema-decay-out-of-range", m(axes="{ema: [null, {decay: 1.0, warmup: true}]}"), [], {}, "decay in (0, 1)"),
    ("million-cells", m(axes="{" + ALL_AXES + "}", extra="design: full_factorial\n"), [], {},
     "makes 1,048,576 cells, more than 1,000 (pass --yes"),
    ("million-cells-with-yes", m(axes="{" + ALL_AXES + ", f10: [0, 1, 2, 3]}", extra="design: full_factorial\n"),
     ["--yes"], {}, "makes 4,194,304 cells, more than 1,000,000"),
    ("two-thousand-cells", m(axes=f"{{lr_warmup_steps: {RANGE45}, warmup_steps: {RANGE45}}}",
                             extra="design: full_factorial\n"), [], {}, "2,025 cells"),
    ("sam-infinite", m(axes="{sam: [null, .inf]}"), [], {}, "axes.sam[1]: inf is not null or a finite radius"),
    ("sam-nan", m(axes="{sam: [null, .nan]}"), [], {}, "axes.sam[1]: nan is not null or a finite radius"),
    ("cifar-not-there", m(base=b(dataset="cifar10", data_dir="'/nonexistent'")), [], {},
     "dataset cifar10 not found: no folder '/nonexistent/cifar-10-batches-py'"),
    ("name-too-long-for-results", OK.replace("name: m", "name: " + "n" * 300), [], {}, "a name of 300 bytes"),
    # --- command line ---
    ("out-is-file", OK, ["--out", "{tmp}/afile"], {}, "exists and is not a folder"),
    ("out-under-file", OK, ["--out", "{tmp}/afile/sub"], {}, "afile' is a file, not a folder"),
    ("out-name-too-long", OK, ["--out", "{tmp}/" + "n" * 300], {}, "a name of 300 bytes is longer"),
    ("out-path-too-long", OK, ["--out", "{tmp}/" + "/".join(["p" * 200] * 25)], {}, "path is longer"),
    ("out-on-procfs", OK, ["--out", "/proc/trickbench-out"], {}, "/proc/trickbench-out: No such file"),
    ("device-flag-unknown", OK, ["--device", "tpu"], {}, "argument --device: invalid choice"),
    ("unknown-flag", OK, ["--fast"], {}, "unrecognized arguments: --fast"),
    ("matrix-missing", None, [], {}, "cannot read file: No such file"),
    ("matrix-is-directory", "DIR", [], {}, "cannot read file: Is a directory"),
    # --- environment ---
    ("fault-junk", OK, [], {"TRICKBENCH_FAULT": "junk"}, "TRICKBENCH_FAULT: 'junk' is not raise@RANK"),
    ("fault-rank-not-int", OK, [], {"TRICKBENCH_FAULT": "raise@x"}, "TRICKBENCH_FAULT"),
    ("fault-unknown-kind", OK, [], {"TRICKBENCH_FAULT": "explode@1"}, "TRICKBENCH_FAULT"),
]
if not torch.cuda.is_available():
    CASES.append(("device-axis-cuda-missing", m(axes="{device: [cpu, cuda]}"), [], {}, "axes.device[1]: cuda is not"))
    CASES.append(("device-flag-cuda-missing", OK, ["--device", "cuda"], {}, "--device: cuda is not available"))

DIAGNOSE_CASES: list[tuple[str, str, list[str], str]] = [
    ("steps-zero", OK, ["--steps", "0"], "--steps: '0' is not an integer >= 1"),
    ("steps-negative", OK, ["--steps", "-5"], "is not an integer >= 1"),
    ("steps-not-int", OK, ["--steps", "ten"], "is not an integer >= 1"),
    ("out-is-file", OK, ["--out", "{tmp}/afile"], "exists and is not a folder"),
    ("world-size-2", m(axes="{world_size: [2]}"), [], "world_size 2: diagnose runs one process"),
    ("unknown-cell", OK, ["--cell", "abc123"], "no cell 'abc123'"),
]


def snapshot(root: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A working directory holding a plain file (for --out cases); default results/ would go here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    return tmp_path


def prepare(sandbox: Path, text: str | bytes | None) -> str:
    path = sandbox / "matrix.yaml"
    if text == "DIR":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    return str(path)


def assert_refused(code: int, out: str, err: str, before: set, sandbox: Path, says: str) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err[:2000]
    assert len(lines[0]) < 300, lines[0]
    assert "Traceback" not in err and out == ""
    assert says in lines[0], lines[0]  # refused for the reason the case is about
    assert snapshot(sandbox) == before  # nothing written: no results/, no --out folder


@pytest.mark.parametrize("case_id,text,args,env,says", CASES, ids=[c[0] for c in CASES])
def test_run_refuses(sandbox, capsys, monkeypatch, case_id, text, args, env, says):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    code = main(["run", matrix, *[a.format(tmp=sandbox) for a in args]])
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, sandbox, says)


@pytest.mark.parametrize("case_id,text,args,says", DIAGNOSE_CASES, ids=[c[0] for c in DIAGNOSE_CASES])
def test_diagnose_refuses(sandbox, capsys, case_id, text, args, says):
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    code = main(["diagnose", matrix, *[a.format(tmp=sandbox) for a in args]])
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, sandbox, says)


def test_corpus_is_large_enough():
    assert len(CASES) + len(DIAGNOSE_CASES) >= 60


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; permission bits do not apply")
def test_run_refuses_unwritable_out(sandbox, capsys):
    locked = sandbox / "locked"
    locked.mkdir(mode=0o500)
    matrix = prepare(sandbox, OK)
    before = snapshot(sandbox)
    code = main(["run", matrix, "--out", str(locked / "out")])
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, sandbox, "not writable")


@pytest.mark.parametrize("case_id", ["alias-bomb", "out-under-file"])
def test_real_command_line_prints_one_line(sandbox, case_id):
    _, text, args, env, says = next(c for c in CASES if c[0] == case_id)
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    result = subprocess.run([sys.executable, "-m", "bench", "run", matrix, *[a.format(tmp=sandbox) for a in args]],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env})
    assert_refused(result.returncode, result.stdout, result.stderr, before, sandbox, says)


def test_error_names_line_of_duplicate_key(sandbox, capsys):
    matrix = prepare(sandbox, OK + "seeds: [0]\nseeds: [1, 2]\n")
    assert main(["run", matrix, "--dry-run"]) == 2
    assert "line 5: duplicate key 'seeds' (first at line 4)" in capsys.readouterr().err


def test_inherited_torchrun_variables_are_ignored_and_not_inherited(sandbox, capsys, monkeypatch):
    """Not under trickbench's torchrun, RANK/WORLD_SIZE/LOCAL_RANK are leftovers: dropped with a
    warning, so the run's child (a plain process for world_size 1) never sees them."""
    for name, value in {"WORLD_SIZE": "4", "LOCAL_RANK": "junk", "RANK": "-3"}.items():
        monkeypatch.setenv(name, value)
    matrix = prepare(sandbox, f"name: m\n{TINY}\nseeds: [0]\naxes: {{accumulation: [1]}}\n")
    code = main(["run", matrix, "--out", str(sandbox / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: ignoring inherited RANK, LOCAL_RANK, WORLD_SIZE" in captured.err
    assert not {"WORLD_SIZE", "LOCAL_RANK", "RANK"} & set(os.environ)
    assert '"status": "ok"' in (sandbox / "out" / "cells.jsonl").read_text()
