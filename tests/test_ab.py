"""`trickbench compare --against REV MATRIX`: the other revision in a git worktree, runs interleaved."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from bench.regression import ab
from bench.regression.cells import BadInput

MATRIX = """
name: ab
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 3, warmup_steps: 0}
axes: {precision: [fp32]}
"""


def test_schedule_runs_both_sides_of_a_run_back_to_back_each_first_in_half_the_pairs():
    order = ab.schedule(["c1", "c2"], [0, 1])
    assert [(side, cell, seed) for side, cell, seed in order] == [
        ("base", "c1", 0), ("new", "c1", 0), ("new", "c2", 0), ("base", "c2", 0),
        ("base", "c1", 1), ("new", "c1", 1), ("new", "c2", 1), ("base", "c2", 1)]


def test_cells_are_paired_by_axes_whatever_their_hash():
    base = {"cells": [{"cell_id": "old1", "axes": {"a": 1}}, {"cell_id": "old2", "axes": {"a": 2}}]}
    new = {"cells": [{"cell_id": "new2", "axes": {"a": 2}}, {"cell_id": "new1", "axes": {"a": 1}}]}
    assert [(b["cell_id"], n["cell_id"]) for b, n in ab.paired_cells(base, new)] == [("old2", "new2"), ("old1", "new1")]
    with pytest.raises(BadInput, match="different cells"):
        ab.paired_cells(base, {"cells": [{"cell_id": "x", "axes": {"a": 3}}]})


def git(root, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository holding a copy of bench/ and the matrix, one commit; the working tree then
    gets a harmless edit, so its rows say git_dirty and the committed revision's do not."""
    root = tmp_path / "repo"
    shutil.copytree(Path(bench.__file__).parent, root / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "ab.yaml").write_text(MATRIX)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "scratch")
    with open(root / "bench" / "training" / "train.py", "a") as f:
        f.write("# an edit that changes nothing\n")
    return root


def trickbench(root, *args):
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_against_head_runs_each_tree_interleaved_and_passes(repo):
    done = trickbench(repo, "compare", "--against", "HEAD", "ab.yaml", "--runs-per-side", "2",
                      "--out", "abrows", "--json", "v.json")
    assert done.returncode == 0, done.stdout + done.stderr
    verdicts = json.loads((repo / "v.json").read_text())["verdicts"]
    assert not [v for v in verdicts if v["verdict"] in ("REGRESSED", "MISSING", "NOT COMPARABLE")], verdicts
    assert {v["verdict"] for v in verdicts if v["tier"] == "exact"} == {"PASS"}
    assert [l.split("]")[1].split()[0] for l in done.stderr.splitlines() if l.startswith("[")] == ["base", "new", "new", "base"]
    head = git(repo, "rev-parse", "HEAD")
    rows = {side: [json.loads(l) for l in (repo / "abrows" / side / "cells.jsonl").read_text().splitlines()]
            for side in ("base", "new")}
    assert [r["env"]["git_dirty"] for r in rows["base"]] == [False, False]  # trained by the worktree's code
    assert [r["env"]["git_dirty"] for r in rows["new"]] == [True, True]  # trained by the edited tree
    assert {r["env"]["git_commit"] for side in rows.values() for r in side} == {head}
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1  # the temporary one is gone


def test_an_unknown_revision_is_one_line_exit_2_and_writes_nothing(repo):
    done = trickbench(repo, "compare", "--against", "no-such-rev", "ab.yaml", "--out", "abrows")
    assert done.returncode == 2 and "no-such-rev" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (repo / "abrows").exists()


@pytest.mark.slow
def test_an_extra_matmul_in_the_working_tree_fails_against_head(repo):
    train = repo / "bench" / "training" / "train.py"
    old = "                    loss = F.cross_entropy(model(inputs), targets) / len(micro_batches)"
    assert train.read_text().count(old) == 1
    train.write_text(train.read_text().replace(
        old, old + "\n                    loss = loss + 0 * (inputs.flatten(1) @ inputs.flatten(1).T).sum()"))
    done = trickbench(repo, "compare", "--against", "HEAD", "ab.yaml", "--runs-per-side", "1")
    assert done.returncode == 1
    assert any("flops_per_step" in l and "REGRESSED" in l for l in done.stdout.split("<details>")[0].splitlines())
