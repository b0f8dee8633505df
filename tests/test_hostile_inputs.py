"""Hostile input: every malformed matrix, value, argument or environment variable is refused on
one short line starting with ``error:``, exit code 2, no traceback, and nothing is written.

Table-driven and in-process (``bench.cli.main``) so the corpus runs in seconds; a few cases go
through the real command line in a subprocess to show that no traceback escapes there either.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main

BASE = "base: {model: tiny_cnn, dataset: digits, image_size: 16, batch_size: 64, epochs: 1}"
OK = f"name: m\n{BASE}\naxes: {{ema: [null, 0.9]}}\n"  # valid: each case breaks one thing
TINY = "base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16, steps: 6}"


def m(axes: str = "{ema: [null, 0.9]}", base: str = BASE, extra: str = "") -> str:
    return f"name: m\n{base}\naxes: {axes}\n{extra}"


def b(fields: str) -> str:
    """The valid base with ``fields`` added or overriding."""
    return BASE[:-1] + ", " + fields + "}"


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))

# (id, matrix text or bytes, extra CLI args after `run MATRIX`, environment)
CASES: list[tuple[str, str | bytes, list[str], dict[str, str]]] = [
    # --- file level ---
    ("not-utf8", b"name: m\n\xff\xfe base: x\n", [], {}),
    ("latin1", "name: caf\u00e9\naxes: {ema: [null]}\n".encode("latin-1"), [], {}),
    ("alias-bomb", BILLION_LAUGHS + OK, [], {}),
    ("recursive-alias", "name: m\nbase: &a {x: *a}\naxes: {ema: [null]}\n", [], {}),
    ("too-large", OK + "# " + "x" * (1 << 20) + "\n", [], {}),
    ("deep-nesting", OK + "description: " + "[" * 3000 + "]" * 3000 + "\n", [], {}),
    ("bad-syntax", "name: m\naxes: {ema: [null\n", [], {}),
    ("python-tag", OK + "x: !!python/object/apply:os.system ['echo hi']\n", [], {}),
    ("empty-file", "", [], {}),
    ("top-level-list", "- name\n- axes\n", [], {}),
    ("top-level-scalar", "hello\n", [], {}),
    ("duplicate-top-key", OK + "seeds: [0]\nseeds: [1, 2]\n", [], {}),
    ("duplicate-nested-key", m(base="base: {model: tiny_cnn, dataset: digits, epochs: 1, epochs: 2}"), [], {}),
    ("duplicate-axis", "name: m\n" + BASE + "\naxes:\n  ema: [null]\n  ema: [0.9]\n", [], {}),
    ("int-key", m(axes="{1: [a]}"), [], {}),
    ("bool-key-on", m(axes="{on: [1]}"), [], {}),
    ("null-key", m(axes="{null: [1]}"), [], {}),
    ("list-key", m(axes="{[a, b]: [1]}"), [], {}),
    ("int-profile-name", OK + "profiles: {1: {seeds: [0]}}\n", [], {}),
    ("long-unknown-key", m(base=b("k" * 5000 + ": 1")), [], {}),
    ("long-string-value", m(base=b("model: " + "r" * 5000)), [], {}),
    # --- sections of the wrong type ---
    ("base-string", "name: m\nbase: resnet\naxes: {ema: [null]}\n", [], {}),
    ("base-list", "name: m\nbase: [1, 2]\naxes: {ema: [null]}\n", [], {}),
    ("axes-list", m(axes="[precision, ema]"), [], {}),
    ("axes-empty", m(axes="{}"), [], {}),
    ("axes-null", m(axes="null"), [], {}),
    ("axis-values-scalar", m(axes="{ema: 0.9}"), [], {}),
    ("axis-values-empty", m(axes="{ema: []}"), [], {}),
    ("name-list", OK.replace("name: m", "name: [m]"), [], {}),
    ("name-path", OK.replace("name: m", "name: ../etc"), [], {}),
    ("name-unicode", OK.replace("name: m", "name: r\u00e9sultat"), [], {}),
    ("name-missing", OK.replace("name: m\n", ""), [], {}),
    ("design-list", OK + "design: [full_factorial]\n", [], {}),
    ("description-mapping", OK + "description: {a: 1}\n", [], {}),
    ("profiles-list", OK + "profiles: [cpu]\n", ["--profile", "cpu"], {}),
    ("profile-is-list", OK + "profiles: {cpu: [1]}\n", ["--profile", "cpu"], {}),
    ("profile-base-string", OK + "profiles: {cpu: {base: tiny}}\n", ["--profile", "cpu"], {}),
    ("profile-axes-list", OK + "profiles: {cpu: {axes: [ema]}}\n", ["--profile", "cpu"], {}),
    ("profile-unknown-key", OK + "profiles: {cpu: {name: x}}\n", ["--profile", "cpu"], {}),
    ("profile-missing", OK + "profiles: {cpu: {}}\n", ["--profile", "gpu"], {}),
    # --- seeds ---
    ("seeds-string", OK + "seeds: abc\n", [], {}),
    ("seeds-float", OK + "seeds: [1.5]\n", [], {}),
    ("seeds-bool", OK + "seeds: [true]\n", [], {}),
    ("seeds-negative", OK + "seeds: [-1]\n", [], {}),
    ("seeds-too-large", OK + "seeds: [4294967296]\n", [], {}),
    ("seeds-huge", OK + "seeds: [" + "9" * 400 + "]\n", [], {}),
    ("seeds-duplicate", OK + "seeds: [1, 1]\n", [], {}),
    ("seeds-empty", OK + "seeds: []\n", [], {}),
    ("seed-plus-rank", m(axes="{world_size: [1, 2]}") + "seeds: [4294967295]\n", [], {}),
    # --- exclude ---
    ("exclude-mapping", OK + "exclude: {ema: 0.9}\n", [], {}),
    ("exclude-empty-rule", OK + "exclude: [{}]\n", [], {}),
    ("exclude-null-rule", OK + "exclude: [null]\n", [], {}),
    ("exclude-string-rule", OK + "exclude: [ema]\n", [], {}),
    ("exclude-unknown-value", OK + "exclude: [{ema: 0.5}]\n", [], {}),
    ("exclude-unknown-axis", OK + "exclude: [{sam: 0.05}]\n", [], {}),
    ("exclude-everything", m(axes="{ema: [null]}", extra="exclude: [{ema: null}]\n"), [], {}),
    # --- values ---
    ("nesterov-without-momentum", m(base=b("optimizer: {name: sgd, momentum: 0, nesterov: true}")), [], {}),
    ("optimizer-unknown-key", m(base=b("optimizer: {name: adamw, betas2: 0.9}")), [], {}),
    ("optimizer-string", m(base=b("optimizer: sgd")), [], {}),
    ("optimizer-axis-bad", m(axes="{optimizer: [{lr: 0.01}, {lr: -1}]}"), [], {}),
    ("port-zero", m(base=b("launcher: {rdzv_endpoint: 'node0:0'}")), [], {}),
    ("port-too-large", m(base=b("launcher: {rdzv_endpoint: 'node0:70000'}")), [], {}),
    ("endpoint-no-host", m(base=b("launcher: {rdzv_endpoint: ':29400'}")), [], {}),
    ("launcher-string", m(base=b("launcher: node0")), [], {}),
    ("batch-larger-than-data", m(base=b("batch_size: 2000")), [], {}),
    ("batch-absurd", m(base=b("batch_size: 100000000000")), [], {}),
    ("per-rank-batch-larger", m(base=TINY.replace("num_samples: 64", "num_samples: 20, batch_scaling: per_rank"),
                               axes="{world_size: [1, 2]}"), [], {}),
    ("steps-too-few", m(base=b("warmup_steps: 3").replace("epochs: 1", "steps: 5")), [], {}),
    ("epochs-too-few", m(base=b("batch_size: 512")), [], {}),
    ("warmup-axis-too-long", m(base=TINY, axes="{warmup_steps: [1, 5]}"), [], {}),
    ("imagefolder-no-data-dir", m(base=b("dataset: imagefolder")), [], {}),
    ("model-too-small-input", m(base=b("model: alexnet, image_size: 8")), [], {}),
    ("model-tuple-output", m(base=b("model: googlenet, image_size: 64")), [], {}),
    ("model-fixed-size", m(base=b("model: vit_b_16")), [], {}),
    ("num-samples-absurd", m(base=TINY.replace("num_samples: 64", "num_samples: 90000000")), [], {}),
    ("num-samples-range", m(base=TINY.replace("num_samples: 64", "num_samples: 10000000000")), [], {}),
    ("time-limit-inf", m(base=b("time_limit_s: .inf")), [], {}),
    ("lr-nan", m(base=b("optimizer: {lr: .nan}")), [], {}),
    ("warmup-negative", m(base=b("warmup_steps: -1")), [], {}),
    ("device-axis-unknown", m(axes="{device: [cpu, tpu]}"), [], {}),
    ("ema-warmup-not-bool", m(axes="{ema: [null, {decay: 0.9, warmup: maybe}]}"), [], {}),
    ("ema-typo-key", m(axes="{ema: [null, {decy: 0.9}]}"), [], {}),
    ("ema-decay-out-of-range", m(axes="{ema: [null, {decay: 1.0, warmup: true}]}"), [], {}),
    ("million-cells", m(axes="{" + ", ".join(f"f{i}: [0, 1, 2, 3]" for i in range(10)) + "}",
                        extra="design: full_factorial\n"), [], {}),
    ("million-cells-with-yes", m(axes="{" + ", ".join(f"f{i}: [0, 1, 2, 3]" for i in range(11)) + "}",
                                 extra="design: full_factorial\n"), ["--yes"], {}),
    ("two-thousand-cells", m(axes="{lr_warmup_steps: [" + ", ".join(map(str, range(45))) + "], "
                             "warmup_steps: [" + ", ".join(map(str, range(45))) + "]}",
                             extra="design: full_factorial\n"), [], {}),
    # --- command line ---
    ("out-is-file", OK, ["--out", "{tmp}/afile"], {}),
    ("out-under-file", OK, ["--out", "{tmp}/afile/sub"], {}),
    ("out-name-too-long", OK, ["--out", "{tmp}/" + "n" * 300], {}),
    ("out-path-too-long", OK, ["--out", "{tmp}/" + "/".join(["p" * 200] * 25)], {}),
    ("device-flag-unknown", OK, ["--device", "tpu"], {}),
    ("unknown-flag", OK, ["--fast"], {}),
    ("matrix-missing", None, [], {}),
    ("matrix-is-directory", "DIR", [], {}),
    # --- environment ---
    ("fault-junk", OK, [], {"TRICKBENCH_FAULT": "junk"}),
    ("fault-rank-not-int", OK, [], {"TRICKBENCH_FAULT": "raise@x"}),
    ("fault-unknown-kind", OK, [], {"TRICKBENCH_FAULT": "explode@1"}),
]
if not torch.cuda.is_available():
    CASES.append(("device-axis-cuda-missing", m(axes="{device: [cpu, cuda]}"), [], {}))
    CASES.append(("device-flag-cuda-missing", OK, ["--device", "cuda"], {}))

DIAGNOSE_CASES: list[tuple[str, str, list[str]]] = [
    ("steps-zero", OK, ["--steps", "0"]),
    ("steps-negative", OK, ["--steps", "-5"]),
    ("steps-not-int", OK, ["--steps", "ten"]),
    ("out-is-file", OK, ["--out", "{tmp}/afile"]),
    ("world-size-2", m(axes="{world_size: [2]}"), []),
    ("unknown-cell", OK, ["--cell", "abc123"]),
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


def assert_refused(code: int, out: str, err: str, before: set, sandbox: Path) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err[:2000]
    assert len(lines[0]) < 300, lines[0]
    assert "Traceback" not in err and out == ""
    assert snapshot(sandbox) == before  # nothing written: no results/, no --out folder


@pytest.mark.parametrize("case_id,text,args,env", CASES, ids=[c[0] for c in CASES])
def test_run_refuses(sandbox, capsys, monkeypatch, case_id, text, args, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    code = main(["run", matrix, *[a.format(tmp=sandbox) for a in args]])
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, sandbox)


@pytest.mark.parametrize("case_id,text,args", DIAGNOSE_CASES, ids=[c[0] for c in DIAGNOSE_CASES])
def test_diagnose_refuses(sandbox, capsys, case_id, text, args):
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    code = main(["diagnose", matrix, *[a.format(tmp=sandbox) for a in args]])
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, sandbox)


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
    assert_refused(code, captured.out, captured.err, before, sandbox)
    assert "not writable" in captured.err


@pytest.mark.parametrize("case_id", ["alias-bomb", "profile-base-string", "out-under-file", "fault-junk"])
def test_real_command_line_prints_one_line(sandbox, case_id):
    _, text, args, env = next(c for c in CASES if c[0] == case_id)
    matrix = prepare(sandbox, text)
    before = snapshot(sandbox)
    result = subprocess.run([sys.executable, "-m", "bench", "run", matrix, *[a.format(tmp=sandbox) for a in args]],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env})
    assert_refused(result.returncode, result.stdout, result.stderr, before, sandbox)


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
