"""Same-job A/B: ``trickbench compare --against REV MATRIX`` — another revision against this tree.

A baseline recorded last week on another runner says little about timing today; the honest
timing comparison on a shared machine runs both versions in the same job, interleaved, so that
both see the same machine state (asv ``continuous``, Bencher's relative mode). Here:

1. REV is checked out in a temporary ``git worktree`` (removed afterwards, also on Ctrl-C).
2. Each tree expands MATRIX with its own code (a default changed by the PR changes its configs).
   Cells are paired by their axes: the same point of the same matrix, whatever its hash.
3. Every (cell, seed) runs once per tree, each run a fresh worker process of that tree, the two
   sides alternating A B, B A, A B, … (each side first in half the pairs, so an order effect such
   as a warm page cache cancels out; slow drift of the machine lands on both sides).
4. The rows are judged by the same engine as ``compare BASE NEW`` (:mod:`bench.regression.compare`), with
   REV as the base; both sides ran on this machine, so timing is comparable. Timing still only
   warns unless ``--strict``: A/B removes drift between jobs, not the noise inside one.

A worker of a tree is ``python -c BOOT`` with PYTHONPATH = that tree, started in the caller's
folder (a relative ``data_dir`` means the same data for both sides); BOOT drops the current folder
from ``sys.path`` first, so a ``bench/`` there cannot shadow the tree's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from bench.execution.children import run_job_file, write_job
from bench.execution.runner import termination_as_exception
from bench.regression.cells import BadInput
from bench.regression.compare import Policy, compare_cells
from bench.regression.sides import cells_from_rows
from bench.store.files import make_folder
from bench.store.paths import check_out_dir
from bench.store.results import append_row

TREE = Path(__file__).resolve().parents[2]  # the tree this code runs from: the "new" side
# ``-c`` puts the current folder first on sys.path (unless -P / PYTHONSAFEPATH, Python 3.11+).
DROP_CWD = "import sys; getattr(sys.flags, 'safe_path', False) or sys.path.pop(0); "
# Either revision may predate the layered package (bench.worker, bench.config before it).
WORKER_BOOT = DROP_CWD + ("import runpy, importlib.util; runpy.run_module('bench.training.worker' if "
                          "importlib.util.find_spec('bench.training') else 'bench.worker', run_name='__main__', "
                          "alter_sys=True)")
# Uses only what every revision's matrix module has: load_matrix, cells, seeds, to_dict.
EXPAND = DROP_CWD + """import json, bench
try:
    from bench.config.matrix import load_matrix
except ModuleNotFoundError:  # a revision before the layered package
    from bench.config import load_matrix
m = load_matrix(sys.argv[1], profile=sys.argv[2] or None)
print(json.dumps({"bench": bench.__file__, "name": m.name, "seeds": list(m.seeds),
                  "cells": [{"cell_id": c.cell_id, "axes": c.axes, "config": c.config.to_dict()} for c in m.cells]}))
"""


def tree_env(tree: Path) -> dict[str, str]:
    paths = [str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def git(*args: str, cwd: Path = TREE) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise BadInput(f"git {' '.join(args[:2])}: {last}")
    return done.stdout.strip()


def resolve(rev: str) -> str:
    """REV's full commit hash; a one-line error when this tree is no git checkout or REV unknown."""
    git("rev-parse", "--show-toplevel")
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BadInput:
        raise BadInput(f"--against {rev}: not a commit of the repository at {TREE}") from None


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """``commit`` checked out in a temporary git worktree, removed on the way out."""
    folder = Path(tempfile.mkdtemp(prefix="trickbench-ab-"))
    path = folder / "tree"
    try:
        git("worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path
    finally:
        with contextlib.suppress(BadInput, subprocess.TimeoutExpired):
            git("worktree", "remove", "--force", str(path))
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(BadInput, subprocess.TimeoutExpired):
            git("worktree", "prune")


def expand(tree: Path, matrix: Path, profile: str | None, who: str) -> dict[str, Any]:
    """The matrix as ``tree``'s code expands it (in a child process of that tree)."""
    done = subprocess.run([sys.executable, "-c", EXPAND, str(matrix), profile or ""], env=tree_env(tree),
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BadInput(f"{matrix}: {who} cannot run this matrix: {last}")
    expansion = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(expansion["bench"]).resolve().is_relative_to(tree.resolve()):
        raise BadInput(f"{who}: imported bench from {expansion['bench']}, not from {tree}")
    single = [c for c in expansion["cells"] if c["config"].get("world_size", 1) != 1]
    if single:
        raise BadInput(f"{matrix}: A/B runs single-process cells only; {single[0]['cell_id']} has world_size "
                       f"{single[0]['config']['world_size']}")
    return expansion


def axes_key(axes: dict[str, Any]) -> str:
    return json.dumps(axes, sort_keys=True)


def paired_cells(base: dict[str, Any], new: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(base cell, new cell) pairs with the same axes, in the new tree's order."""
    by_axes = {axes_key(c["axes"]): c for c in base["cells"]}
    unmatched = [c["axes"] for c in new["cells"] if axes_key(c["axes"]) not in by_axes]
    if unmatched or len(base["cells"]) != len(new["cells"]):
        raise BadInput(f"the two revisions expand the matrix into different cells (e.g. {unmatched[:1]})")
    return [(by_axes[axes_key(c["axes"])], c) for c in new["cells"]]


def schedule(pairs: list[Any], seeds: list[int]) -> list[tuple[str, Any, int]]:
    """(side, pair, seed) in run order: seed-major round-robin over the cells like the runner, the
    two sides of each (cell, seed) back to back, alternately base-first and new-first."""
    order = []
    for index, (pair, seed) in enumerate((p, s) for s in seeds for p in pairs):
        sides = ("base", "new") if index % 2 == 0 else ("new", "base")
        order += [(side, pair, seed) for side in sides]
    return order


def run_side(tree: Path, cell: dict[str, Any], matrix_name: str, seed: int, work: Path, side: str) -> dict[str, Any]:
    """One (cell, seed) trained by ``tree``'s worker in a fresh process; always a row."""

    job = write_job(work, matrix_name, cell["cell_id"], seed, cell["axes"], cell["config"], tag=f"-{side}")
    command = [sys.executable, "-c", WORKER_BOOT, str(job)]
    return run_job_file(job, command, tree_env(tree), cell["config"].get("time_limit_s") or 3600)


def run_ab(rev: str, matrix: Path, profile: str | None, runs_per_side: int | None,
           out: Path | None) -> tuple[list, list, str, Path]:
    """Run both sides interleaved into ``out``/{base,new}/cells.jsonl (default: a new temporary
    folder, kept); rows of the base (REV) side carry the new side's cell ids."""

    commit = resolve(rev)
    new = expand(TREE, matrix, profile, "this tree")
    with termination_as_exception(), worktree(commit) as base_tree, \
            tempfile.TemporaryDirectory(prefix="trickbench-ab-work-") as work:
        base = expand(base_tree, matrix, profile, f"{rev} ({commit[:12]})")
        pairs = paired_cells(base, new)
        for b, n in pairs:
            if b["config"] != n["config"]:
                changed = sorted(k for k in {**b["config"], **n["config"]} if b["config"].get(k) != n["config"].get(k))
                print(f"note: {n['cell_id']}: the revisions resolve its config differently ({', '.join(changed)})",
                      file=sys.stderr)
        seeds = list(range(runs_per_side)) if runs_per_side else new["seeds"]
        out = out or Path(tempfile.mkdtemp(prefix="trickbench-ab-"))
        for side in ("base", "new"):
            make_folder(out / side, root=out)  # never append rows through a linked base/ or new/
        rows: dict[str, list] = {"base": [], "new": []}
        order = schedule(pairs, seeds)
        for index, (side, (b, n), seed) in enumerate(order, 1):
            tree, cell = (base_tree, b) if side == "base" else (TREE, n)
            row = run_side(tree, cell, new["name"], seed, Path(work), side)
            row["cell_id"] = n["cell_id"]  # paired by axes: judged as the same cell
            append_row(out / side / "cells.jsonl", row)
            rows[side].append(row)
            print(f"[{index:>3}/{len(order)}] {side:<4} {' '.join(f'{k}={json.dumps(v)}' for k, v in n['axes'].items())} "
                  f"seed={seed}: {row['status']}", file=sys.stderr, flush=True)
    return rows["base"], rows["new"], commit, out


def cmd_against(args: argparse.Namespace, policy: Policy) -> tuple[list, str, str]:
    """``compare --against REV MATRIX``: (verdicts, base name, new name)."""
    matrix = Path(args.base)
    if args.new is not None:
        raise BadInput(f"--against takes one MATRIX, not two paths (got {args.base} {args.new})")
    if matrix.suffix not in (".yaml", ".yml") or not matrix.is_file():
        raise BadInput(f"{matrix}: expected a matrix YAML file with --against")
    out = Path(args.out) if args.out else None
    if out:
        check_out_dir(out)
    if out and any((out / side / "cells.jsonl").exists() for side in ("base", "new")):
        raise BadInput(f"--out {out}: already holds A/B rows (base/ or new/cells.jsonl); choose an empty folder")
    base_rows, new_rows, commit, out = run_ab(args.against, matrix.resolve(), args.profile, args.runs_per_side, out)
    print(f"rows: {out / 'base'} ({args.against}) and {out / 'new'} (this tree); "
          f"again: trickbench compare {out / 'base'} {out / 'new'}", file=sys.stderr)
    verdicts = compare_cells(cells_from_rows(base_rows, str(out / "base")), cells_from_rows(new_rows, str(out / "new")),
                             policy)
    return verdicts, f"{args.against} ({commit[:12]})", f"this tree ({TREE})"
