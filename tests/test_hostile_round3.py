"""Hostile input, round 3 (issue 19): the JSON files trickbench reads, the files it writes, the
numbers and signals its verbs take, and combinations that cannot train.

Every case is refused on one ``error:`` line with exit code 2 (a SIGTERM: one ``stopped by`` line,
exit 128+15), no traceback, and nothing written outside what was asked. In-process
(``bench.cli.main.main``) for speed, with guards: work a refusal must come before (running a
matrix, training, A/A runs, the self-check) raises instead, a FIFO that blocks is cut by an
alarm and /dev/zero by a memory cap, so the corpus also runs, and fails fast, against the code
before its fixes. Two SIGTERM cases use a real process to observe the signal and stderr.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import bench
from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.regression.baseline import baseline_document
from bench.regression.sides import cells_from_rows
from bench.store.results import matrix_record
from tests.conftest import TINY_MATRIX
from tests.test_hostile_inputs import sandbox  # noqa: F401 - a fixture: a working folder holding afile

BENCH_ROOT = Path(bench.__file__).resolve().parents[1]  # the bench under test (PYTHONPATH may pick another)


def snapshot(root: Path) -> set[tuple[str, int]]:
    """Every name under ``root`` with its size, links and FIFOs as themselves (lstat)."""
    return {(str(p.relative_to(root)), os.lstat(p).st_size) for p in root.rglob("*")}


def assert_refused(code: int, out: str, err: str, before: set, root: Path, says: str) -> None:
    """Round 1's rule (tests/test_hostile_inputs.py): one short error line naming the reason, exit
    2, no traceback, nothing on stdout, nothing written."""
    lines = err.splitlines()
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    assert len(lines[0]) < 300, lines[0]
    assert "Traceback" not in err and out == "", out[-2000:]
    assert says in lines[0], lines[0]
    assert snapshot(root) == before


class Ran(AssertionError):
    """A guard fired: the verb started work that a refusal must come before."""


class Blocked(BaseException):
    """The alarm: the verb blocked (a FIFO opened); not an OSError, so no verb can catch it."""


class Escaped(BaseException):
    """SIGTERM reached the test's own handler: the verb did not handle it."""


def guard(what: str):
    def refuse(*args, **kwargs):
        raise Ran(f"{what} ran before the refusal")
    return refuse


GUARDED = {  # module -> function: work that no case may reach
    "bench.regression.baseline": ["run_matrix"], "bench.cli.main": ["run_matrix"],
    "bench.regression.aa": ["run_in_child"], "bench.diagnostics.selfcheck": ["run_checks"],
    "bench.execution.submit": ["run_local", "submit_arrays"],
    "bench.execution.queue": ["slurm_queue", "local_queue"], "bench.regression.ab": ["expand"],
    "bench.diagnostics.attention_memory": ["measure"], "bench.regression.power": ["timing_power"],
    "bench.diagnostics.diagnose": ["diagnose", "lr_finder"],
}


@pytest.fixture
def world(sandbox, monkeypatch):
    """The sandbox with valid inputs (each case breaks one), guards on every long verb's work,
    an alarm against blocking reads, and SIGTERM turned into an exception the verbs must catch."""
    for module, names in GUARDED.items():
        for name in names:
            monkeypatch.setattr(f"{module}.{name}", guard(f"{module}.{name}"))
    t = sandbox
    write_rows(t / "res", [row(c, s) for s in (0, 1, 2) for c in ("c1", "c2")])
    write_rows(t / "seeds0", [row(c, 0, flops_per_step=2000) for c in ("c1", "c2")])
    (t / "base.json").write_text(json.dumps(baseline_doc(t / "res"), indent=1))
    (t / "pb").mkdir()
    for run in range(3):
        (t / "pb" / f"run{run}.json").write_text(json.dumps(pytest_benchmark("test_add", 0.001 + run / 1e5)))
    (t / "pb1.json").write_text((t / "pb" / "run0.json").read_text())
    (t / "matrix.yaml").write_text(textwrap.dedent(TINY_MATRIX).replace("seeds: [0, 1]", "seeds: [0]"))
    (t / "st").mkdir()
    (t / "st" / "matrix.json").write_text(json.dumps(matrix_record(load_matrix(t / "matrix.yaml"))))
    previous = signal.signal(signal.SIGALRM, blocked)
    term = signal.signal(signal.SIGTERM, escaped)
    signal.alarm(20)
    yield t
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    signal.signal(signal.SIGTERM, term)


def blocked(signum, frame):
    raise Blocked("the verb blocked (a FIFO opened?)")


def escaped(signum, frame):
    raise Escaped("SIGTERM reached the test: the verb did not handle it")


def row(cell: str, seed: int, **changes) -> dict:
    r = {"schema_version": 2, "matrix": "toy", "cell_id": cell, "seed": seed, "axes": {"sam": None if cell == "c1" else 0.05},
         "config": {}, "status": "ok", "error": None, "flops_per_step": 1000, "peak_memory_bytes": 5000, "steps": 8,
         "final_train_loss": 1.5, "step_time_ms_median": 20.0 + seed, "throughput_samples_per_s": 1600.0 - seed,
         "env": {"torch": "2.14.1", "device": "cpu", "device_name": "CPU A"}}
    return {**r, **changes}


def write_rows(folder: Path, rows: list[dict]) -> None:
    folder.mkdir()
    (folder / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def baseline_doc(results: Path) -> dict:
    rows = [json.loads(line) for line in (results / "cells.jsonl").read_text().splitlines()]
    return baseline_document(cells_from_rows(rows), "toy", "trickbench baseline record m.yaml -o base.json")


def pytest_benchmark(name: str, median: float) -> dict:
    return {"machine_info": {"cpu": {"brand_raw": "CPU A", "count": 2, "arch": "X86_64"}, "python_version": "3.11"},
            "benchmarks": [{"name": name, "fullname": f"tests/test_x.py::{name}", "stats": {"median": median}}],
            "version": "4.0.0"}


# ---- files to break: each setup writes into the sandbox t --------------------------------------------

def bad_baseline(mutate=None, text=None):
    """A copy of the valid baseline as t/bad.json, its JSON text or its document changed."""
    def setup(t: Path) -> None:
        doc = json.loads((t / "base.json").read_text())
        if mutate:
            mutate(doc)
        body = text(json.dumps(doc)) if text else json.dumps(doc)
        (t / "bad.json").write_bytes(body if isinstance(body, bytes) else body.encode())
    return setup


def cell(doc: dict) -> dict:
    return doc["cells"]["c1"]


def fifo(name: str):
    return lambda t: os.mkfifo(t / name)


def link(name: str, target: str):
    return lambda t: (t / name).symlink_to(target if target.startswith("/") else t / target)


def sparse(name: str, size: int):
    def setup(t: Path) -> None:
        with open(t / name, "wb") as f:
            f.write(b'{"format": "trickbench-baseline", "format_version": 1, "cells": {"c1": "')
            f.truncate(size)
    return setup


def setups(*steps):
    return lambda t: [step(t) for step in steps]


def mkdir(name: str):
    return lambda t: (t / name).mkdir(parents=True)


def write(name: str, text: str | bytes):
    def setup(t: Path) -> None:
        (t / name).parent.mkdir(parents=True, exist_ok=True)
        (t / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def status_matrix(change):
    def setup(t: Path) -> None:
        record = json.loads((t / "st" / "matrix.json").read_text())
        (t / "st" / "matrix.json").write_text(change(record))
    return setup


def status_jobs(runs):
    def setup(t: Path) -> None:
        record = json.loads((t / "st" / "matrix.json").read_text())
        key = f"{record['cells'][0]['cell_id']}-0"
        body = {"executor": "slurm", "folder": str(t), "runs": runs(key)}
        write("st/cluster/jobs.json", json.dumps(body))(t)
    return setup


def matrix_with(axes: str, base: str = "") -> str:
    return ("name: m\nbase: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16, "
            f"steps: 8{base}}}\nseeds: [0]\naxes: {axes}\n")


def other_cells_baseline(t: Path) -> None:
    """base.json with the tiny matrix's cells (seeds 0, 1, 2) instead of c1, c2."""
    doc = json.loads((t / "base.json").read_text())
    ids = [c.cell_id for c in load_matrix(t / "matrix.yaml").cells]
    doc["cells"] = dict(zip(ids, doc["cells"].values()))
    (t / "base.json").write_text(json.dumps(doc))


def aa_other_matrix(t: Path) -> None:
    """aa/ holding the matrix.json of the tiny matrix (two cells), not of the A/A cell."""
    (t / "aa").mkdir()
    (t / "aa" / "matrix.json").write_text((t / "st" / "matrix.json").read_text())


NEST = "[" * 100_000 + "]" * 100_000
SHALLOW_70 = "[" * 70 + "]" * 70
CMP = ["compare", "{t}/bad.json", "{t}/res"]
OUT = ["compare", "{t}/res", "{t}/res"]
CHECK = ["check", "{t}/matrix.yaml", "--baseline", "{t}/base.json", "--out", "{t}/runs"]
RECORD = ["baseline", "record", "{t}/matrix.yaml", "--out", "{t}/runs", "-o"]
SLURM = ["run", "{t}/matrix.yaml", "--executor", "slurm", "--dry-run", "--slurm"]
AA = ["aa", "--runs", "2", "--per-group", "1", "--out", "{t}/aa"]

# (id, setup or None, argv ({t}: the sandbox), what the error line must say)
CASES = [
    # --- the JSON reader: baselines -------------------------------------------------------------------
    ("baseline-fifo", fifo("bad.json"), CMP, "is a named pipe (FIFO), not a"),
    ("baseline-dev-zero", None, ["compare", "/dev/zero", "{t}/res"], "is a character device"),
    ("baseline-link-to-dev-zero", link("bad.json", "/dev/zero"), CMP, "is a character device"),
    ("results-fifo", setups(mkdir("f"), fifo("f/cells.jsonl")), ["compare", "{t}/f", "{t}/res"], "named pipe"),
    ("check-baseline-fifo", fifo("bad.json"), [*CHECK[:3], "{t}/bad.json"], "named pipe"),
    ("check-baseline-dev-zero", None, [*CHECK[:3], "/dev/zero"], "is a character device"),
    ("baseline-too-large", sparse("bad.json", 65 << 20), CMP, "larger than 64 MiB"),
    ("baseline-nan", bad_baseline(text=lambda s: s.replace('"flops_per_step": 1000', '"flops_per_step": NaN')), CMP,
     "holds NaN, which is not a finite number"),
    ("baseline-infinity", bad_baseline(text=lambda s: s.replace('"steps": 8', '"steps": Infinity')), CMP,
     "holds Infinity"),
    ("baseline-minus-infinity", bad_baseline(text=lambda s: s.replace('"steps": 8', '"steps": -Infinity')), CMP,
     "holds -Infinity"),
    ("baseline-overflowing-float", bad_baseline(text=lambda s: s.replace('"steps": 8', '"steps": 1e999')), CMP,
     "holds 1e999"),
    ("baseline-huge-integer", bad_baseline(text=lambda s: s.replace('"steps": 8', '"steps": ' + "9" * 5000)), CMP,
     "Exceeds the limit"),
    ("baseline-format-version-999", bad_baseline(lambda d: d.update(format_version=999)), CMP,
     "format_version: 999 is not a version this trickbench reads (1)"),
    ("baseline-format-version-missing", bad_baseline(lambda d: d.pop("format_version")), CMP,
     "format_version: None is not a version"),
    ("baseline-format-version-string", bad_baseline(lambda d: d.update(format_version="1")), CMP,
     "format_version: '1' is not a version"),
    ("baseline-format-version-bool", bad_baseline(lambda d: d.update(format_version=True)), CMP,
     "format_version: True is not a version"),
    ("baseline-deep-nesting", bad_baseline(text=lambda s: s[:-1] + ', "x": ' + NEST + "}"), CMP, "nested too deeply"),
    ("baseline-nesting-70", bad_baseline(text=lambda s: s[:-1] + ', "x": ' + SHALLOW_70 + "}"), CMP,
     "nested too deeply (more than 64 levels)"),
    ("baseline-not-utf8", bad_baseline(text=lambda s: s.encode().replace(b"toy", b"to\xff", 1)), CMP, "not UTF-8 text"),
    ("baseline-truncated", bad_baseline(text=lambda s: s[: len(s) // 2]), CMP, "not valid JSON (line 1"),
    ("baseline-duplicate-cell", bad_baseline(text=lambda s: s.replace('"c2": {', '"c1": {')), CMP,
     "duplicate key 'c1' in one object"),
    ("baseline-cells-empty", bad_baseline(lambda d: d.update(cells={})), CMP, "cells: missing, empty"),
    ("baseline-seeds-missing", bad_baseline(lambda d: cell(d).pop("seeds")), CMP, "cells.c1.seeds: expected"),
    ("baseline-seeds-bool", bad_baseline(lambda d: cell(d).update(seeds=[True])), CMP, "cells.c1.seeds: expected"),
    ("baseline-seeds-duplicate", bad_baseline(lambda d: cell(d).update(seeds=[0, 0])), CMP, "distinct seeds"),
    ("baseline-metric-string", bad_baseline(lambda d: cell(d)["metrics"].update(steps="8")), CMP,
     "cells.c1.metrics.steps: expected a finite number"),
    ("baseline-metric-bool", bad_baseline(lambda d: cell(d)["metrics"].update(steps=True)), CMP,
     "cells.c1.metrics.steps: expected a finite number"),
    ("baseline-metric-unknown", bad_baseline(lambda d: cell(d)["metrics"].update(stepz=8)), CMP,
     "cells.c1.metrics.stepz: not a metric trickbench judges"),
    ("baseline-metric-foreign-seed", bad_baseline(lambda d: cell(d)["metrics"].update(steps={"7": 8})), CMP,
     "values of seeds ['7'] not in its seeds"),
    ("baseline-spread-negative", bad_baseline(lambda d: cell(d).update(spreads={"steps": -1})), CMP,
     "cells.c1.spreads.steps: expected a finite spread >= 0"),
    ("baseline-env-list", bad_baseline(lambda d: cell(d).update(env=[])), CMP, "cells.c1.env: missing or not a mapping"),
    ("baseline-entry-list", bad_baseline(lambda d: d["cells"].update(c1=[])), CMP, "cells.c1: expected a mapping"),
    # --- the JSON reader: pytest-benchmark ------------------------------------------------------------
    ("pytest-nan-median", write("bad.json", json.dumps(pytest_benchmark("a", 0.1)).replace("0.1", "NaN")), CMP,
     "holds NaN"),
    ("pytest-folder-with-fifo", fifo("pb/run9.json"), ["compare", "{t}/pb", "{t}/pb"], "named pipe"),
    ("pytest-folder-with-folder", mkdir("pb/run9.json"), ["compare", "{t}/pb", "{t}/pb"], "is a folder, not a"),
    ("pytest-data-strings", write("bad.json", json.dumps({**pytest_benchmark("a", 1), "benchmarks": [
        {"fullname": "a", "stats": {"data": ["x", "y"]}}]})), CMP, "positive stats.median"),
    ("pytest-median-bool", write("bad.json", json.dumps(pytest_benchmark("a", True))), CMP, "positive stats.median"),
    # --- outputs: checked before any work, never through a link -------------------------------------------
    ("markdown-link", link("out.md", "afile"), [*OUT, "--markdown", "{t}/out.md"], "is a symbolic link"),
    ("markdown-folder", mkdir("out.md"), [*OUT, "--markdown", "{t}/out.md"], "is a folder; give a file name"),
    ("json-link-dangling", link("v.json", "nowhere.json"), [*OUT, "--json", "{t}/v.json"], "is a symbolic link"),
    ("json-fifo", fifo("v.json"), [*OUT, "--json", "{t}/v.json"], "is not a regular file"),
    ("json-same-as-markdown", None, [*OUT, "--json", "{t}/v", "--markdown", "{t}/v"], "is also --markdown's file"),
    ("json-name-too-long", None, [*OUT, "--json", "{t}/" + "n" * 300], "longer than the filesystem allows"),
    ("json-on-procfs", None, [*OUT, "--json", "/proc/verdicts.json"], "its folder does not take a new file"),
    ("check-json-link", link("v.json", "afile"), [*CHECK, "--json", "{t}/v.json"], "is a symbolic link"),
    ("check-markdown-folder", mkdir("v.md"), [*CHECK, "--markdown", "{t}/v.md"], "is a folder"),
    ("check-json-on-sysfs", None, [*CHECK, "--json", "/sys/verdicts.json"], "its folder does not take a new file"),
    ("check-out-is-file", None, [*CHECK[:5], "{t}/afile"], "exists and is not a folder"),
    ("record-output-folder", mkdir("new.json"), [*RECORD, "{t}/new.json"], "is a folder"),
    ("record-output-link", link("new.json", "afile"), [*RECORD, "{t}/new.json"], "is a symbolic link"),
    ("update-file-link", link("lnk.json", "base.json"), ["baseline", "update", "{t}/lnk.json", "{t}/res"],
     "is a symbolic link"),
    ("power-json-folder", mkdir("p.json"), ["power", "{t}/res", "--json", "{t}/p.json"], "is a folder"),
    ("power-json-link", link("p.json", "afile"), ["power", "{t}/res", "--json", "{t}/p.json"], "is a symbolic link"),
    ("selfcheck-out-file", None, ["selfcheck", "--device", "cpu", "--out", "{t}/afile"], "exists and is not a folder"),
    ("selfcheck-out-under-file", None, ["selfcheck", "--device", "cpu", "--out", "{t}/afile/x"], "is a file, not a folder"),
    ("aa-out-file", None, ["aa", "--out", "{t}/afile"], "exists and is not a folder"),
    ("against-out-file", None, ["compare", "{t}/matrix.yaml", "--against", "HEAD", "--out", "{t}/afile"],
     "exists and is not a folder"),
    ("cluster-runs-link", setups(mkdir("o"), mkdir("elsewhere"), link("o/runs", "elsewhere")),
     ["run", "{t}/matrix.yaml", "--executor", "local", "--out", "{t}/o"], "o/runs is a symbolic link"),
    ("cluster-dir-link", setups(mkdir("o"), mkdir("elsewhere"), link("o/cluster", "elsewhere")),
     ["run", "{t}/matrix.yaml", "--executor", "local", "--out", "{t}/o"], "o/cluster is a symbolic link"),
    # --- numeric options: finite and bounded ---------------------------------------------------------
    ("factor-nan", None, [*OUT, "--factor", "nan"], "--factor: 'nan' is not a finite number in (1, 100]"),
    ("factor-inf", None, [*OUT, "--factor", "inf"], "'inf' is not a finite number in (1, 100]"),
    ("check-factor-inf", None, [*CHECK, "--factor", "inf"], "'inf' is not a finite number"),
    ("update-factor-nan", None, ["baseline", "update", "{t}/base.json", "{t}/res", "--factor", "nan"],
     "'nan' is not a finite number"),
    ("power-factor-inf", None, ["power", "{t}/res", "--factor", "inf"], "'inf' is not a finite number"),
    ("slowdowns-inf", None, ["power", "{t}/res", "--slowdowns", "inf"], "'inf' is not a finite number in (0, 10]"),
    ("power-splits-huge", None, ["power", "{t}/res", "--splits", str(10**12)], "is not an integer >= 1 and <= 100,000"),
    ("power-per-group-huge", None, ["power", "{t}/res", "--per-group", str(10**9)], "<= 1,000"),
    ("aa-splits-huge", None, [*AA, "--splits", str(10**12)], "is not an integer >= 1 and <= 100,000"),
    ("aa-runs-huge", None, ["aa", "--runs", str(10**12), "--out", "{t}/aa"], "is not an integer >= 2 and <= 10,000"),
    ("max-lr-inf", None, ["diagnose", "{t}/matrix.yaml", "--lr-finder", "--max-lr", "inf"],
     "'inf' is not a finite number in (0, 1e+06]"),
    ("diagnose-steps-huge", None, ["diagnose", "{t}/matrix.yaml", "--steps", str(10**12)], "<= 100,000"),
    ("finder-steps-huge", None, ["diagnose", "{t}/matrix.yaml", "--lr-finder", "--finder-steps", str(10**12)],
     "<= 100,000"),
    ("parallel-huge", None, ["run", "{t}/matrix.yaml", "--parallel", str(10**12), "--shared-timing"], "<= 1,024"),
    ("runs-per-side-huge", None, ["compare", "{t}/matrix.yaml", "--against", "HEAD", "--runs-per-side", str(10**9)],
     "<= 1,000"),
    ("instruction-repeats-huge", None, [*CHECK, "--instructions", "--instruction-repeats", str(10**9)], "<= 100"),
    ("attention-batch-huge", None, ["attention-memory", "--out", "{t}/am", "--batch-size", str(10**9)], "<= 65,536"),
    ("attention-size-huge", None, ["attention-memory", "--out", "{t}/am", "--image-sizes", "4096"], "<= 1,024"),
    ("attention-unallocatable", None, ["attention-memory", "--out", "{t}/am", "--image-sizes", "1024",
                                       "--batch-size", "4096"], "GiB of attention weights"),
    # --- combinations that fail in every run: refused before anything runs ------------------------------
    ("resizing-vit-tiny", write("m.yaml", matrix_with("{progressive_resizing: [null, {start: 0.5}]}").replace(
        "tiny_cnn", "vit_tiny").replace("image_size: 8", "image_size: 16")), ["run", "{t}/m.yaml"],
     "progressive_resizing reaches 8x8 images, which vit_tiny cannot take"),
    ("mixup-tiny-alpha", write("m.yaml", matrix_with("{mixup: [null, 0.00001]}")), ["run", "{t}/m.yaml"],
     "alpha 1e-05 is outside [0.01, 1e+06]"),
    ("mixup-borderline-alpha", write("m.yaml", matrix_with("{mixup: [null, 0.005]}")), ["run", "{t}/m.yaml"],
     "alpha 0.005 is outside"),
    ("cutmix-subnormal-alpha", write("m.yaml", matrix_with("{cutmix: [null, 1.0e-50]}")), ["run", "{t}/m.yaml"],
     "alpha 1e-50 is outside"),
    ("cutmix-huge-alpha", write("m.yaml", matrix_with("{cutmix: [null, 1.0e+39]}")), ["run", "{t}/m.yaml"],
     "alpha 1e+39 is outside"),
    ("compile-input-grad-penalty", write("m.yaml", matrix_with("{compile: [false, default]}", ", input_grad_penalty: 0.01")),
     ["run", "{t}/m.yaml"], "does not run through a compiled graph"),
    # --- aa: never into another matrix's folder ------------------------------------------------------
    ("aa-into-other-matrix", aa_other_matrix, AA, "holds the results of another matrix ("),
    ("aa-into-other-rows", setups(mkdir("aa"), lambda t: (t / "aa" / "cells.jsonl").write_text(
        (t / "res" / "cells.jsonl").read_text())), AA, "holds the results of another matrix (2 other cells"),
    ("aa-matrix-json-fifo", setups(mkdir("aa"), fifo("aa/matrix.json")), AA, "matrix.json: is a named pipe"),
    # --- status: matrix.json, jobs.json, cells.jsonl --------------------------------------------------
    ("status-matrix-fifo", setups(lambda t: (t / "st" / "matrix.json").unlink(), fifo("st/matrix.json")),
     ["status", "{t}/st"], "matrix.json: is a named pipe"),
    ("status-matrix-nan", status_matrix(lambda r: json.dumps({**r, "seeds": [0]}).replace("[0]", "[NaN]")),
     ["status", "{t}/st"], "holds NaN"),
    ("status-matrix-version-999", status_matrix(lambda r: json.dumps({**r, "schema_version": 999})),
     ["status", "{t}/st"], "unknown schema_version 999"),
    ("status-matrix-cells-number", status_matrix(lambda r: json.dumps({**r, "cells": 5})), ["status", "{t}/st"],
     "'cells' is not a non-empty list"),
    ("status-jobs-fifo", setups(mkdir("st/cluster"), fifo("st/cluster/jobs.json")), ["status", "{t}/st"],
     "jobs.json: is a named pipe"),
    ("status-jobs-deep", write("st/cluster/jobs.json", '{"runs": {}, "x": ' + NEST + "}"), ["status", "{t}/st"],
     "nested too deeply"),
    ("status-jobs-nan", write("st/cluster/jobs.json", '{"runs": {}, "executor": null, "folder": NaN}'),
     ["status", "{t}/st"], "holds NaN"),
    ("status-jobs-entry-number", status_jobs(lambda key: {key: 5}), ["status", "{t}/st"], "expected {job_id: string"),
    ("status-rows-fifo", fifo("st/cells.jsonl"), ["status", "{t}/st"], "cells.jsonl: is a named pipe"),
    # --- baselines and pytest-benchmark -------------------------------------------------------------
    ("check-pytest-baseline", None, [*CHECK[:3], "{t}/pb1.json"], "cannot be the baseline of a check"),
    ("update-from-pytest", None, ["baseline", "update", "{t}/base.json", "{t}/pb"], "merged into a trickbench baseline"),
    ("update-pytest-file", None, ["baseline", "update", "{t}/pb1.json", "{t}/res"], "format: not a trickbench baseline"),
    ("update-fewer-seeds", None, ["baseline", "update", "{t}/base.json", "{t}/seeds0"],
     "has no successful run of seeds 1, 2"),
    ("update-matrix-fewer-seeds", other_cells_baseline,
     ["baseline", "update", "{t}/base.json", "{t}/matrix.yaml", "--out", "{t}/runs"], "no successful run of seeds 1, 2"),
    # --- slurm values -------------------------------------------------------------------------------
    ("slurm-newline-partition", None, [*SLURM, "partition=gpu\n#SBATCH --array=0-9999"], "control character"),
    ("slurm-newline-sbatch", None, [*SLURM, "sbatch.account=x\ny"], "control character"),
    ("slurm-carriage-return", None, [*SLURM, "partition=gpu\r"], "control character"),
    ("slurm-abbreviated-array", None, [*SLURM, "sbatch.arr=0-99"], "sbatch reads it as --array"),
    ("slurm-abbreviated-output", None, [*SLURM, "sbatch.outp=/tmp/x"], "sbatch reads it as --output"),
    ("slurm-abbreviated-signal", None, [*SLURM, "sbatch.sig=USR1"], "sbatch reads it as --signal"),
    ("slurm-setup-newline", write("m.yaml", textwrap.dedent(TINY_MATRIX) + 'slurm: {setup: ["module load x\\nrm -rf ~"]}\n'),
     ["run", "{t}/m.yaml", "--executor", "slurm", "--dry-run"], "each item is one shell line"),
]


DEVICES = {"baseline-dev-zero", "check-baseline-dev-zero", "baseline-link-to-dev-zero"}


def expand(argv: list[str], t: Path) -> list[str]:
    return [a.replace("{t}", str(t)) for a in argv]


def memory_cap(extra: int) -> tuple[int, int]:
    """Cap this process's data at its current size + ``extra``: a read of /dev/zero (the code before
    the fix) ends in MemoryError instead of taking the machine's memory. Returns the old limit."""
    data_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmData:"))
    old = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (data_kib * 1024 + extra, old[1]))
    return old


@pytest.mark.parametrize("case_id,setup,argv,says", CASES, ids=[c[0] for c in CASES])
def test_refused(world, capsys, case_id, setup, argv, says):
    if setup:
        setup(world)
    before = snapshot(world)
    afile = (world / "afile").read_text()
    old = memory_cap(1 << 30) if case_id in DEVICES else None
    try:
        code = main(expand(argv, world))
    finally:
        if old:
            resource.setrlimit(resource.RLIMIT_DATA, old)
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, before, world, says)
    assert (world / "afile").read_text() == afile  # never written through a link


def test_corpus_is_large_enough():
    assert len(CASES) + len(TERM_CASES) + len(TERM_PROCESS_CASES) >= 80


# ---- SIGTERM: every long verb stops like `run` ---------------------------------------------------------

def terminate_self(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    raise AssertionError("SIGTERM was not delivered")


# (id, argv, the function that is running when the signal comes, files it may leave)
TERM_CASES = [
    ("check", [*CHECK, "--json", "{t}/v.json"], "bench.regression.baseline.run_matrix", ()),
    ("baseline-record", [*RECORD, "{t}/new.json"], "bench.regression.baseline.run_matrix", ()),
    ("baseline-update", ["baseline", "update", "{t}/base.json", "{t}/matrix.yaml", "--out", "{t}/runs"],
     "bench.regression.baseline.run_matrix", ()),
    ("aa", [*AA, "{t}/matrix.yaml"], "bench.regression.aa.run_in_child", ("aa",)),  # its resumable rows folder
    ("compare-against", ["compare", "{t}/matrix.yaml", "--against", "HEAD"], "bench.regression.ab.resolve", ()),
    ("collect", ["collect", "{t}/st"], "bench.execution.cluster.collect", ("st/.lock",)),
    ("status", ["status", "{t}/st"], "bench.execution.queue.run_states", ()),
    ("power", ["power", "{t}/res", "--json", "{t}/p.json"], "bench.regression.power.timing_power", ()),
    ("selfcheck", ["selfcheck", "--device", "cpu", "--out", "{t}/sc"], "bench.diagnostics.selfcheck.run_checks", ()),
    ("attention-memory", ["attention-memory", "--out", "{t}/am", "--image-sizes", "16", "--batch-size", "2"],
     "bench.diagnostics.attention_memory.measure", ()),
    ("report", ["report", "{t}/res"], "bench.reports.report.build_report", ()),
]


def assert_stopped(code: int, err: str, before: set, root: Path, allowed: tuple[str, ...]) -> None:
    lines = err.splitlines()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM"), err[-2000:]
    assert "Traceback" not in err
    new = {name for name, _ in snapshot(root) - before}
    assert all(any(name == a or name.startswith(a + "/") for a in allowed) for name in new), new
    assert not [name for name in new if name.endswith(".tmp")]  # nothing half-written


@pytest.mark.parametrize("case_id,argv,target,allowed", TERM_CASES, ids=[c[0] for c in TERM_CASES])
def test_sigterm_stops_on_one_line(world, capsys, monkeypatch, case_id, argv, target, allowed):
    monkeypatch.setattr(target, terminate_self)
    before = snapshot(world)
    code = main(expand(argv, world))
    assert_stopped(code, capsys.readouterr().err, before, world, allowed)


# A real process: the signal from outside, the one line on the real stderr.
TERM_PROCESS_CASES = [("status", ["status", "{t}/st"], "bench.execution.queue", "run_states"),
                      ("check", [*CHECK, "--json", "{t}/v.json"], "bench.regression.baseline", "run_matrix")]
WAITING = """import sys, time
import {module} as target
def wait(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(120)
target.{name} = wait
from bench.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("case_id,argv,module,name", TERM_PROCESS_CASES, ids=[c[0] for c in TERM_PROCESS_CASES])
def test_sigterm_in_a_real_process(world, case_id, argv, module, name):
    before = snapshot(world)
    proc = subprocess.Popen([sys.executable, "-c", WAITING.format(module=module, name=name), *expand(argv, world)],
                            cwd=world, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(BENCH_ROOT)})
    try:
        while (line := proc.stdout.readline()) and line.strip() != "ready":
            pass
        assert line.strip() == "ready", proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert_stopped(proc.returncode, err, before, world, ())


# ---- what is not a refusal: read without blocking, written whole ---------------------------------------

def test_collect_skips_a_fifo_among_run_files_without_blocking(world, capsys):
    (world / "st" / "runs").mkdir()
    os.mkfifo(world / "st" / "runs" / "c-0.json")
    assert main(["collect", str(world / "st")]) == 0
    assert "c-0.json: not a results row; skipped" in capsys.readouterr().err


def test_a_pipe_in_a_benchmark_name_stays_in_its_cell(world, capsys):
    for run in range(3):
        (world / "pb" / f"run{run}.json").write_text(json.dumps(pytest_benchmark("test[a|b]", 0.001 + run / 1e5)))
    assert main(["compare", str(world / "pb"), str(world / "pb"), "--markdown", str(world / "v.md")]) == 0
    table = [line for line in (world / "v.md").read_text().splitlines() if "test[a" in line]
    assert table and all(line.replace("\\|", "").count("|") == 9 for line in table)  # 8 cells, none split
