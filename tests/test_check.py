"""`trickbench check` end to end on a scratch copy of the package whose code we break on purpose.

A baseline is recorded once from an untouched copy; each test then edits the copy (checkpointing
made a no-op, SAM doing a third pass, an extra matmul in every step) and runs `check` with
PYTHONPATH on the copy, so the worker children train the broken code. The check must exit 1 and
name the cell and the metric; the untouched copy must pass.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench

MATRIX = """
name: mut
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 3, warmup_steps: 0}
seeds: [0]
axes:
  checkpointing: [false, true]
  sam: [null, 0.05]
"""
PACKAGE = Path(bench.__file__).parent


def trickbench(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """(root of an untouched copy of bench/, its baseline file, the results it was recorded from)."""
    root = tmp_path_factory.mktemp("scratch")
    shutil.copytree(PACKAGE, root / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mut.yaml").write_text(MATRIX)
    done = trickbench(root, "baseline", "record", "mut.yaml", "-o", "base.json", "--out", "recorded")
    assert done.returncode == 0, done.stderr
    return root, root / "base.json", root / "recorded"


@pytest.fixture
def broken(scratch):
    """Edit one file of the copy; every edit is undone afterwards."""
    root, _, _ = scratch
    originals = {}

    def edit(relative: str, old: str, new: str) -> None:
        path = root / "bench" / relative
        originals.setdefault(path, path.read_text())
        assert path.read_text().count(old) == 1, f"{relative}: the code to mutate moved: {old!r}"
        path.write_text(path.read_text().replace(old, new))

    yield edit
    for path, text in originals.items():
        path.write_text(text)


def check(scratch, *extra):
    root, baseline, _ = scratch
    return trickbench(root, "check", "mut.yaml", "--baseline", str(baseline), *extra)


def regressed_lines(stdout: str) -> list[str]:
    table = stdout.split("<details>")[0]  # the table of verdicts that are not PASS
    return [line for line in table.splitlines() if "✗" in line]


def test_unchanged_tree_passes(scratch):
    done = check(scratch)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trickbench compare: PASS" in done.stdout


def test_checkpointing_turned_into_a_no_op_fails_on_activation_memory(scratch, broken):
    broken("tricks/checkpointing.py", "return checkpoint(run, *inputs, use_reentrant=False)",
           "return run(*inputs)")
    done = check(scratch)
    assert done.returncode == 1, done.stdout + done.stderr
    failing = regressed_lines(done.stdout)
    assert any("checkpointing=true" in l and "memory_breakdown.activations" in l and "REGRESSED" in l
               for l in failing), failing
    assert all("checkpointing=true" in l for l in failing)  # the other cells did not change


@pytest.mark.slow
def test_sam_doing_an_extra_pass_fails_on_flops(scratch, broken):
    broken("tricks/sam.py", "                step.compute_grads()  # replaces the gradient",
           "                step.compute_grads()\n                step.compute_grads()  # replaces the gradient")
    done = check(scratch)
    assert done.returncode == 1
    assert any("sam=0.05" in l and "flops_per_step" in l and "REGRESSED" in l for l in regressed_lines(done.stdout))


@pytest.mark.slow
def test_an_extra_matmul_in_the_step_fails_on_flops_in_every_cell(scratch, broken):
    broken("train.py", "                    loss = F.cross_entropy(model(inputs), targets) / len(micro_batches)",
           "                    loss = F.cross_entropy(model(inputs), targets) / len(micro_batches)\n"
           "                    loss = loss + 0 * (inputs.flatten(1) @ inputs.flatten(1).T).sum()")
    done = check(scratch)
    assert done.returncode == 1
    flops = [l for l in regressed_lines(done.stdout) if "flops_per_step" in l and "REGRESSED" in l]
    assert len(flops) == 3, flops


def test_results_copied_from_another_machine_are_not_timing_comparable_but_exact_still_gates(scratch, tmp_path):
    """A recorded result edited to look like another CPU (and with one counter changed)."""
    root, baseline, recorded = scratch
    rows = [json.loads(l) for l in (recorded / "cells.jsonl").read_text().splitlines()]
    for row in rows:
        row["env"].update(cpu_model="Other CPU 9000", device_name="Other CPU 9000")
        row["memory_breakdown"]["activations"] += 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = trickbench(root, "compare", str(baseline), str(tmp_path / "other"), "--json", str(tmp_path / "v.json"))
    assert done.returncode == 1, done.stderr
    verdicts = json.loads((tmp_path / "v.json").read_text())["verdicts"]
    timing = {v["verdict"] for v in verdicts if v["tier"] == "timing"}
    assert timing == {"NOT COMPARABLE"}
    activations = [v for v in verdicts if v["metric"] == "memory_breakdown.activations"]
    assert {v["verdict"] for v in activations} == {"REGRESSED"} and all(v["fails"] for v in activations)
