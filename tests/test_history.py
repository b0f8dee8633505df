"""Performance history across commits (`trickbench history record | backfill | show`) and
`trickbench bisect`, on scratch git repositories holding a copy of bench/ with injected changes."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import bench
from bench.regression import bisect, history
from bench.regression.compare import Policy

ROOT = Path(bench.__file__).resolve().parent.parent

# One cell with checkpointing, so that both injected changes show: a no-op matmul adds FLOPs, and
# checkpointing made a no-op raises the activations held at the peak (and drops the recompute FLOPs).
EXACT_MATRIX = """
name: hist
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 6, warmup_steps: 1}
seeds: [0]
axes: {checkpointing: [true]}
"""
# Timing: more timed steps of a bigger batch, so that a step is a few ms and its median steady.
TIMING_MATRIX = """
name: slow
base: {model: tiny_cnn, dataset: synthetic, num_samples: 256, image_size: 16, batch_size: 64,
       steps: 14, warmup_steps: 2}
seeds: [0]
axes: {precision: [fp32]}
"""
TRAIN = "bench/training/train.py"
LOSS_LINE = "                    loss = loss_fn(inputs, targets) / len(micro_batches)\n"
MATMUL = LOSS_LINE + "                    loss = loss + 0 * (inputs.flatten(1) @ inputs.flatten(1).T).sum()\n"
CHECKPOINTING = "bench/tricks/checkpointing.py"
WRAP_LINE = "    for parent, name in find_blocks(model):\n"
STEP_LINE = "    step = make_step(model, optimizer, tricks, batch, instrument)\n"
RETURN_LINE = "        trick.after_step()\n    return loss\n"


def git(root, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()


def edit(root, path, old, new):
    text = (root / path).read_text()
    assert text.count(old) == 1, (path, old)
    (root / path).write_text(text.replace(old, new))


def commit(root, message, change=None):
    """One commit: ``change(root)`` or, by default, a harmless comment."""
    if change is None:
        with open(root / "bench" / "parts" / "clock.py", "a") as f:
            f.write(f"# {message}\n")
    else:
        change(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


def scratch(root, matrix, name="m.yaml"):
    """A git repository holding a copy of bench/ and a matrix: the first commit."""
    shutil.copytree(ROOT / "bench", root / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (root / name).write_text(matrix)
    (root / ".gitignore").write_text("history/\nresults/\n")
    git(root, "init", "-q", "-b", "main")
    return commit(root, "base", change=lambda r: None)


def slowdown(factor):
    """A wait at the end of the training step of ``factor`` times the step's own duration (spun, not
    slept: ``time.sleep`` overshoots by tens of microseconds, which would turn 3% into 10%)."""
    def change(root):
        edit(root, TRAIN, STEP_LINE, "    clock = __import__('time').perf_counter\n    started = clock()\n" + STEP_LINE)
        edit(root, TRAIN, RETURN_LINE, "        trick.after_step()\n    until = clock() + "
             f"{factor} * (clock() - started)\n    while clock() < until:\n        pass\n    return loss\n")
    return change


def trickbench(root, *args, tmp=None, timeout=600):
    """``python -m bench`` in ``root`` with ``root``'s bench first; temporary folders under ``tmp``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("GITHUB_STEP_SUMMARY", None)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def first_bad(done):
    found = re.search(r"^first bad commit: ([0-9a-f]{40})", done.stdout, re.M)
    return found and found.group(1)


def judged_count(done):
    found = re.search(r"^steps: (\d+) commits judged \((\d+) measured now", done.stdout, re.M)
    return int(found.group(1)), int(found.group(2))


def assert_clean_failure(done, root, head, branch, tmp):
    """One `error:` line, exit 2, no traceback; checkout, branch and worktrees as before; no temp folders."""
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if head is not None:
        assert git(root, "rev-parse", "HEAD") == head
        assert git(root, "symbolic-ref", "--short", "HEAD") == branch
        assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not [p for p in tmp.iterdir() if p.name.startswith("trickbench")]  # (torch keeps its own caches there)


# ---- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 40))
def test_the_search_finds_every_position_within_the_bound(n):
    """Positions 1..n after a good one, --bad (n) assumed bad until measured: every first-bad
    position is found with at most ceil(log2(n + 1)) probes, plus the reference measurement."""
    for answer in range(1, n + 1):
        probed: list[int] = []
        found = bisect.search(0, n + 1, lambda p, probed=probed, answer=answer: probed.append(p) or p >= answer)
        assert found == answer
        assert len(probed) + 1 <= math.ceil(math.log2(n + 1)) + 1
    probed = []
    assert bisect.search(0, n + 1, lambda p: probed.append(p) or False) == n + 1  # no change at all
    assert probed[-1] == n  # --bad was measured before saying so


def test_runs_needed_grows_as_the_effect_shrinks_against_the_spread():
    rng = np.random.default_rng(0)
    base = list(np.exp(rng.normal(0, 0.05, 5)))
    assert bisect.runs_needed(base, [v * 2 for v in base]) == 3  # a 2x change: the minimum
    small, smaller = bisect.runs_needed(base, [v * 1.05 for v in base]), bisect.runs_needed(base, [v * 1.03 for v in base])
    assert 3 < small < smaller
    assert bisect.runs_needed(base, list(base)) is None  # no change seen: no number of runs


def test_adding_the_same_runs_again_adds_nothing_and_new_runs_become_replicates():
    row = {"cell_id": "c1", "seed": 0, "axes": {"checkpointing": True}, "status": "ok", "schema_version": 2,
           "flops_per_step": 10, "memory_breakdown": {"activations": 5}, "step_time_ms_median": 2.0,
           "finished_at": "t1", "env": {"torch": "2", "device": "cpu", "cpu_cores": 2}}
    document = {"cells": {}}
    measured = history.Measured("abc", "hist", "d1", [row])
    assert history.add_runs(document, measured) == 1
    assert history.add_runs(document, measured) == 0  # the same run: never twice
    again = history.Measured("abc", "hist", "d1", [{**row, "finished_at": "t2", "step_time_ms_median": 2.2}])
    assert history.add_runs(document, again) == 1
    [cell] = document["cells"].values()
    assert [r["metrics"]["memory_breakdown.activations"] for r in cell["runs"]] == [5, 5]
    cells = history.stored_cells(document)
    assert cells["hist checkpointing=true"].values["step_time_ms_median"] == {"0": 2.0, "0.2": 2.2}


def test_every_nth_keeps_the_newest():
    assert history.every_nth(list("abcdefg"), 3) == ["a", "d", "g"]
    assert history.every_nth(list("abcdef"), 4) == ["b", "f"]


def test_show_judges_steps_with_compares_rules_and_breaks_at_a_torch_change(tmp_path):
    """Three commits; the second moves FLOPs, the third has another torch: one step, one break."""
    def document(commit, flops, torch):
        return {"commit": commit, "cells": {"m a=1": {"matrix": "m", "axes": {"a": 1}, "runs": [
            {"run_id": commit, "seed": 0, "matrix_digest": "d", "schema_version": 2, "load_avg_1m": [None, None],
             "env": {"torch": torch, "device": "cpu", "cpu_model": "x"}, "metrics": {"flops_per_step": flops}}]}}}
    from bench.regression import history_show
    docs = {"c1": document("c1", 100, "2.4"), "c2": document("c2", 120, "2.4"), "c3": document("c3", 120, "2.5")}
    points = history_show.collect(docs, ["c1", "c2", "c3"], None)
    steps = history_show.judge_steps(points, [history_show.pick_metrics(["flops_per_step"])[0]], Policy())
    assert [(s.point.commit, s.verdict.verdict if s.verdict else "break") for s in steps] == [
        ("c2", "REGRESSED"), ("c3", "break")]
    assert steps[1].change == "torch 2.4 → 2.5"
    assert history_show.plot_metric("flops_per_step", points, steps, ["c1", "c2", "c3"], "m", tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000


# ---- exact tier: 8 commits, a no-op matmul at c2, checkpointing made a no-op at c5 ----------------

@pytest.fixture(scope="module")
def exact_history(tmp_path_factory):
    """The scratch repository, both bisects (sharing a store), a backfill of the commits they did
    not measure, `history record` of HEAD (stored by the backfill), and `history show`."""
    base = tmp_path_factory.mktemp("exact")
    root, tmp = base / "repo", base / "tmp"
    tmp.mkdir()
    shas = [scratch(root, EXACT_MATRIX)]
    changes = {2: lambda r: edit(r, TRAIN, LOSS_LINE, MATMUL),
               5: lambda r: edit(r, CHECKPOINTING, WRAP_LINE, "    return model  # checkpointing made a no-op\n"
                                 + WRAP_LINE)}
    for k in range(1, 8):
        shas.append(commit(root, f"c{k}", changes.get(k)))
    run = {}
    started = time.monotonic()
    for metric in ("flops_per_step", "memory_breakdown.activations"):
        run[metric] = trickbench(root, "bisect", "m.yaml", "--good", shas[0], "--bad", "HEAD", "--metric", metric,
                                 "--store", "history", tmp=tmp)
    run["backfill"] = trickbench(root, "history", "backfill", "m.yaml", "--revs", f"{shas[0]}..HEAD", tmp=tmp)
    run["record"] = trickbench(root, "history", "record", "m.yaml", tmp=tmp)  # HEAD again: a replicate
    run["show"] = trickbench(root, "history", "show", "--out", "report", tmp=tmp)
    print(f"exact history: {time.monotonic() - started:.0f} s")
    return root, tmp, shas, run


def test_bisect_names_the_matmul_commit_on_flops_within_the_bound(exact_history):
    root, tmp, shas, run = exact_history
    done = run["flops_per_step"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert first_bad(done) == shas[2]
    judged, measured = judged_count(done)
    n = len(shas) - 1  # commits after --good
    assert judged == measured <= math.ceil(math.log2(n)) + 1  # a cold store: every one measured now
    assert re.search(r"flops_per_step in cell checkpointing=true: ([\d,]+) at --good → ([\d,]+) \(\+[\d,]+, REGRESSED",
                     done.stdout)
    assert git(root, "rev-parse", "HEAD") == shas[-1]
    assert git(root, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not [p for p in tmp.iterdir() if p.name.startswith("trickbench")]


def test_bisect_names_the_checkpointing_commit_on_activations(exact_history):
    root, tmp, shas, run = exact_history
    done = run["memory_breakdown.activations"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert first_bad(done) == shas[5]
    judged, measured = judged_count(done)
    assert judged <= math.ceil(math.log2(len(shas) - 1)) + 1
    assert measured < judged  # commits the first bisect measured came from the store
    before, after = re.search(r"activations in cell checkpointing=true: ([\d,]+) at --good → ([\d,]+)",
                              done.stdout).groups()
    assert int(after.replace(",", "")) > int(before.replace(",", ""))


def test_record_twice_adds_replicates_to_one_file_per_machine_and_commit(exact_history):
    root, tmp, shas, run = exact_history
    for name in ("backfill", "record"):
        assert run[name].returncode == 0, run[name].stdout + run[name].stderr
    [machine] = [p for p in (root / "history").iterdir()]
    files = sorted(p.stem for p in machine.glob("*.json"))
    assert files == sorted(shas)  # every commit once: the backfill skipped those already stored
    head = json.loads((machine / f"{shas[-1]}.json").read_text())
    [cell] = head["cells"].values()
    assert len(cell["runs"]) == 2 and len({r["run_id"] for r in cell["runs"]}) == 2
    assert re.search(r"7 commits, [1-6] already in history", run["backfill"].stderr)  # the bisects' commits
    assert list(machine.glob(".*")) == []  # no temporary file left by the atomic writes


def test_show_marks_the_two_steps_and_no_others(exact_history):
    root, tmp, shas, run = exact_history
    done = run["show"]
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((root / "report" / "steps.json").read_text())
    marked = {s["commit"] for s in steps if s["verdict"] in ("REGRESSED", "IMPROVED")}
    assert marked == {shas[2], shas[5]}
    assert {(s["commit"], s["metric"], s["verdict"]) for s in steps} >= {
        (shas[2], "flops_per_step", "REGRESSED"), (shas[5], "memory_breakdown.activations", "REGRESSED")}
    assert not [s for s in steps if s["verdict"] == "break"]
    markdown = (root / "report" / "history.md").read_text()
    assert markdown.count(f"`{shas[2][:12]}`") >= 2 and "## Steps" in markdown
    for metric in ("flops_per_step", "memory_breakdown-activations", "step_time_ms_median"):
        png = root / "report" / f"history-{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---- timing tier: a 2x sleep in the step at c1 (reverted at c3), a 3% one at c4 -------------------

@pytest.fixture(scope="module")
def timing_repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("timing")
    root, tmp = base / "repo", base / "tmp"
    tmp.mkdir()
    shas = [scratch(root, TIMING_MATRIX), commit(root, "twice as slow", slowdown(1.0)), commit(root, "c2")]
    git(root, "revert", "--no-edit", shas[1])
    shas.append(git(root, "rev-parse", "HEAD"))
    shas.append(commit(root, "3% slower", slowdown(0.03)))
    return root, tmp, shas


@pytest.mark.slow  # 12 runs of ~4 s on 2 cores (~1 min quiet, 4 under load); skipped when the machine is busy
def test_timing_bisect_finds_a_2x_slowdown_with_the_ab_rule(timing_repo):
    root, tmp, shas = timing_repo
    done = trickbench(root, "bisect", "m.yaml", "--good", shas[0], "--bad", shas[2], "--metric", "step_time_ms_median",
                      tmp=tmp)
    if done.returncode == bisect.CANNOT_TELL and "under competing load" in done.stdout:
        pytest.skip(f"the machine was busy, so the timing rule (rightly) judged nothing: {done.stdout[:300]}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert first_bad(done) == shas[1]
    assert re.search(r"step_time_ms_median in cell .*: [\d.]+ at --good → [\d.]+ \([\d.]+×, REGRESSED", done.stdout)
    assert "steps: 2 A/B comparisons against --good, 12 runs" in done.stdout


def test_timing_bisect_on_a_3_percent_slowdown_cannot_tell_and_says_what_it_would_take(timing_repo):
    root, tmp, shas = timing_repo
    done = trickbench(root, "bisect", "m.yaml", "--good", shas[3], "--bad", shas[4], "--metric", "step_time_ms_median",
                      tmp=tmp)
    assert done.returncode == bisect.CANNOT_TELL == 1, done.stdout + done.stderr
    assert done.stdout.startswith("cannot tell: ") and first_bad(done) is None
    assert re.search(r"about (\d+) runs a side would tell|no number of runs up to \d+ a side", done.stdout), done.stdout
    assert "Traceback" not in done.stderr
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert not [p for p in tmp.iterdir() if p.name.startswith("trickbench")]


# ---- failures: one line, exit 2, nothing left behind ---------------------------------------------

@pytest.fixture
def small_repo(tmp_path):
    root, tmp = tmp_path / "repo", tmp_path / "tmp"
    tmp.mkdir()
    shas = [scratch(root, EXACT_MATRIX), commit(root, "c1")]
    return root, tmp, shas


def test_outside_a_git_repository(tmp_path):
    root, tmp = tmp_path / "plain", tmp_path / "tmp"
    tmp.mkdir()
    shutil.copytree(ROOT / "bench", root / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "m.yaml").write_text(EXACT_MATRIX)
    done = trickbench(root, "bisect", "m.yaml", "--good", "HEAD~1", "--bad", "HEAD", "--metric", "flops_per_step", tmp=tmp)
    assert_clean_failure(done, root, None, None, tmp)
    assert "not a git repository" in done.stderr


def test_a_dirty_tree_is_refused_and_left_as_it_is(small_repo):
    root, tmp, shas = small_repo
    edit(root, "bench/parts/clock.py", "# c1\n", "# c1, edited\n")
    done = trickbench(root, "history", "record", "m.yaml", tmp=tmp)
    assert_clean_failure(done, root, shas[-1], "main", tmp)
    assert "uncommitted changes" in done.stderr
    assert git(root, "status", "--porcelain") == "M bench/parts/clock.py" and not (root / "history").exists()


@pytest.mark.parametrize("args", [
    ("bisect", "m.yaml", "--good", "no-such-rev", "--bad", "HEAD", "--metric", "flops_per_step"),
    ("history", "record", "m.yaml", "--rev", "no-such-rev"),
    ("history", "backfill", "m.yaml", "--revs", "no-such-rev..HEAD"),
], ids=["bisect", "record", "backfill"])
def test_an_unknown_revision(small_repo, args):
    root, tmp, shas = small_repo
    done = trickbench(root, *args, tmp=tmp)
    assert_clean_failure(done, root, shas[-1], "main", tmp)
    assert "no-such-rev" in done.stderr


def test_a_commit_whose_bench_does_not_import(small_repo):
    root, tmp, shas = small_repo
    broken = commit(root, "broken", lambda r: edit(r, "bench/__init__.py", '__version__ = "0.1.0"\n',
                                                    '__version__ = "0.1.0"\nraise ImportError("broken on purpose")\n'))
    git(root, "revert", "--no-edit", broken)
    head = git(root, "rev-parse", "HEAD")
    done = trickbench(root, "history", "record", "m.yaml", "--rev", broken, tmp=tmp)
    assert_clean_failure(done, root, head, "main", tmp)
    assert "broken on purpose" in done.stderr and broken[:12] in done.stderr


def test_sigterm_during_a_worktree_run_removes_the_worktree(small_repo):
    root, tmp, shas = small_repo
    env = {**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "history", "backfill", "m.yaml", "--revs", f"{shas[0]}..HEAD"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while git(root, "worktree", "list", "--porcelain").count("worktree ") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the expansion or the run in that worktree
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2, out + err
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], err
    assert "SIGTERM" in lines[-1] and "Traceback" not in err
    assert git(root, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert git(root, "rev-parse", "HEAD") == shas[-1] and git(root, "status", "--porcelain") == ""
    assert not [p for p in tmp.iterdir() if p.name.startswith("trickbench")]


# ---- the example CI workflow ------------------------------------------------------------------------

CI_MATRIX = """
name: ci_tiny
base: {model: tiny_cnn, dataset: synthetic, num_samples: 64, image_size: 8, batch_size: 16,
       steps: 6, warmup_steps: 1}
seeds: [0]
axes: {accumulation: [1]}
"""


def holds(expression, context):
    """A workflow ``if:`` of comparisons joined by && / || (all this workflow uses)."""
    if expression is None:
        return True
    text = re.sub(r"\b(?:github|env)\.\w+", lambda m: repr(context.get(m.group(0), "")), expression)
    return eval(text.replace("&&", " and ").replace("||", " or "), {"__builtins__": {}})  # our own workflow file


def run_workflow(workflow, clone, event, env):
    """Every ``run:`` step of every job whose ``if:`` holds for ``event``, in order, as GitHub runs them."""
    ref = "refs/heads/main" if event == "push" else "refs/pull/1/merge"
    env = {**env, "GITHUB_EVENT_NAME": event, "GITHUB_REF": ref}
    context = {"github.event_name": event, "github.ref": ref, **{f"env.{k}": v for k, v in env.items()}}
    ran = []
    for name, job in workflow["jobs"].items():
        if not holds(job.get("if"), context):
            continue
        for step in job["steps"]:
            if "run" not in step or not holds(step.get("if"), context):
                continue
            done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=clone,
                                  env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{name}: {step['name']}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            ran.append(f"{name}: {step['name']}")
    return ran


def test_the_example_ci_workflow_checks_pull_requests_and_records_main(tmp_path):
    workflow = yaml.safe_load((ROOT / "docs" / "ci-workflow.yml").read_text())
    origin, clone, runner = tmp_path / "origin", tmp_path / "clone", tmp_path / "runner"
    runner.mkdir()
    scratch(origin, CI_MATRIX, name="ci.yaml")
    (origin / "baselines").mkdir()
    recorded = trickbench(origin, "baseline", "record", "ci.yaml", "-o", "baselines/ci.json", tmp=runner)
    assert recorded.returncode == 0, recorded.stderr
    head = commit(origin, "baseline", change=lambda r: None)
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    summary = runner / "summary.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    env.update(workflow["env"])
    env.update(MATRIX="ci.yaml", BASELINE="baselines/ci.json", SKIP_INSTALL="true", PYTHONPATH=str(clone),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", RUNNER_TEMP=str(runner),
               TMPDIR=str(runner), GITHUB_SHA=head, GITHUB_STEP_SUMMARY=str(summary))

    ran = run_workflow(workflow, clone, "pull_request", env)
    assert ran == ["check: Regression check against the committed baseline"]
    assert "### trickbench compare: PASS" in summary.read_text()

    ran = run_workflow(workflow, clone, "push", env)
    assert [r.split(": ", 1)[1] for r in ran] == [
        "Check out the history store (a worktree of its own branch, outside the checkout)", "Record this commit",
        "Show the history in the job summary", "Push the history store"]
    stored = json.loads(git(origin, "show", f"perf-history:history/{workflow['env']['HISTORY_MACHINE']}/{head}.json"))
    assert stored["commit"] == head and [len(c["runs"]) for c in stored["cells"].values()] == [1]
    assert "# Performance history: machine github-ubuntu-latest" in summary.read_text()
    assert git(clone, "status", "--porcelain") == ""


def test_a_machine_name_is_a_folder_name_never_a_path():
    assert history.check_machine_name("github-ubuntu-latest") == "github-ubuntu-latest"
    for bad in ("../elsewhere", "a/b", ".hidden", ""):
        with pytest.raises(history.BadInput, match="--machine"):
            history.check_machine_name(bad)
