"""Performance history across commits: ``trickbench history record | backfill``, and the store.

The store is a folder (default ``history/``) of small JSON files, one per (machine, commit):
``history/<machine>/<commit>.json``. A file holds, per cell of the matrix (paired across commits
by matrix name and axes, as ``compare --against`` pairs them), every run measured of that commit on
that machine: its judged metrics (:data:`bench.regression.cells.METRICS`) and the environment
fingerprint the tiers check. Recording a commit again adds its new runs as replicates to the same
file; a run already there (same content, same ``run_id``) is never added twice. Files are written
whole (temporary file + rename) with one key per line, so a store kept in git diffs cleanly.

``<machine>`` is the machine's fingerprint (:mod:`bench.execution.machine`) unless ``--machine NAME``
names it, e.g. a pool of CI runners whose CPU model may change from one job to the next: the files
keep each run's environment, and ``history show`` draws such a change as a break in the line.

A commit is measured like the base side of ``compare --against`` (:mod:`bench.regression.ab`): in
a temporary git worktree, the matrix expanded by that commit's code, each run a fresh worker
process of that commit. ``record`` without ``--rev`` measures the working tree itself, which must
then be clean (its runs are filed under HEAD).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from bench.execution import machine
from bench.execution.runner import Terminated, termination_as_exception
from bench.regression.ab import TREE, expand, git, run_side, worktree
from bench.regression.cells import ENV_KEYS, METRICS, BadInput, CellRecord, lookup
from bench.regression.sides import cells_from_rows
from bench.store.results import write_atomic

FORMAT = "trickbench-history"
FORMAT_VERSION = 1
DEFAULT_STORE = "history"
# What a stored run keeps of its row's env: what the tiers and the machine fingerprint read.
RUN_ENV_KEYS = tuple(dict.fromkeys((*ENV_KEYS, *machine.FINGERPRINT_FIELDS, "python", "cuda", "git_commit",
                                    "git_dirty", "hostname")))
RUN_METRICS = tuple(m.name for m in METRICS if m.tier in ("exact", "timing", "accuracy"))


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- git ---------------------------------------------------------------------------------------

def require_repository() -> None:
    """A one-line BadInput when the code does not run from a git checkout."""
    try:
        git("rev-parse", "--show-toplevel")
    except BadInput:
        raise BadInput(f"{TREE}: not a git repository (history and bisect measure its commits)") from None


def commit_of(rev: str, option: str) -> str:
    """REV's full commit hash, or a one-line BadInput naming the option."""
    try:
        return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BadInput:
        raise BadInput(f"{option} {rev}: not a commit of the repository at {TREE}") from None


def subject(commit: str) -> str:
    return git("show", "-s", "--format=%s", commit)


def commit_date(commit: str) -> str:
    return git("show", "-s", "--format=%cI", commit)


def refuse_dirty_tree() -> None:
    """Tracked files edited or staged (the definition of a row's ``git_dirty``): the runs would
    not measure HEAD. Untracked files (a results or history folder) do not count."""
    if git("status", "--porcelain", "--untracked-files=no"):
        raise BadInput(f"{TREE}: the working tree has uncommitted changes, so its runs would not measure HEAD; "
                       "commit or stash them, or measure a commit in a temporary worktree with --rev REV")


def first_parent_range(spec: str, option: str) -> list[str]:
    """The commits of ``A..B`` (git's meaning: B's first-parent history after A), oldest first."""
    if spec.count("..") != 1 or "..." in spec:
        raise BadInput(f"{option} {spec}: expected A..B (two revisions)")
    start, end = spec.split("..")
    start, end = commit_of(start or "HEAD", option), commit_of(end or "HEAD", option)
    commits = git("rev-list", "--reverse", "--first-parent", f"{start}..{end}").split()
    if not commits:
        raise BadInput(f"{option} {spec}: no commit after {start[:12]} up to {end[:12]}")
    return commits


def git_order(since: str | None = None) -> list[str]:
    """HEAD's history, oldest first (topological: a commit after its parents), from ``since`` on."""
    order = git("rev-list", "--reverse", "--topo-order", "HEAD").split()
    if since is None:
        return order
    start = commit_of(since, "--since")
    if start not in order:
        raise BadInput(f"--since {since}: not in the history of HEAD")
    return order[order.index(start):]


# ---- measuring a commit ------------------------------------------------------------------------

def matrix_digest(matrix: Path, profile: str | None) -> str:
    """Names the matrix text and profile that produced a run: runs of an edited matrix are another series."""
    return hashlib.sha256(matrix.read_bytes() + b"\0" + (profile or "").encode()).hexdigest()[:12]


def check_matrix_file(path: str) -> Path:
    matrix = Path(path)
    if matrix.suffix not in (".yaml", ".yml") or not matrix.is_file():
        raise BadInput(f"{path}: expected a matrix YAML file")
    return matrix.resolve()


@dataclass
class Measured:
    """A commit's runs of a matrix, and under which names they are filed."""

    commit: str
    matrix: str  # the matrix's name
    digest: str  # matrix_digest
    rows: list[dict[str, Any]]


def run_expansion(tree: Path, expansion: dict[str, Any], seeds: Iterable[int], work: Path,
                  tag: str) -> list[dict[str, Any]]:
    """Every (cell, seed) of an expanded matrix, trained by ``tree``'s worker, seed-major."""
    rows = []
    runs = [(cell, seed) for seed in seeds for cell in expansion["cells"]]
    for index, (cell, seed) in enumerate(runs, 1):
        row = run_side(tree, cell, expansion["name"], seed, work, tag)
        rows.append(row)
        log(f"  [{index}/{len(runs)}] {tag} {cell_label(cell['axes'])} seed={seed}: {row['status']}")
    return rows


def measure(commit: str, matrix: Path, profile: str | None, one_seed: bool = False,
            tree: Path | None = None) -> Measured:
    """Run the matrix as ``commit``'s code expands and trains it (every seed, or its first only):
    in ``tree`` when given (the working tree, checked clean), else in a temporary worktree."""
    with contextlib.ExitStack() as stack:
        if tree is None:
            tree = stack.enter_context(worktree(commit))
        expansion = expand(tree, matrix, profile, f"commit {commit[:12]}")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trickbench-history-work-")))
        seeds = expansion["seeds"][:1] if one_seed else expansion["seeds"]
        rows = run_expansion(tree, expansion, seeds, work, commit[:12])
    return Measured(commit, expansion["name"], matrix_digest(matrix, profile), rows)


def refuse_failed_runs(measured: Measured) -> None:
    failed = [r for r in measured.rows if r.get("status") != "ok"]
    if failed:
        raise BadInput(f"commit {measured.commit[:12]}: {len(failed)} of {len(measured.rows)} runs failed "
                       f"({failed[0].get('status')}: {failed[0].get('error')}); nothing stored for it")


# ---- the store ---------------------------------------------------------------------------------

def cell_label(axes: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in axes.items()) or "(no axes)"


def cell_key(matrix_name: str, axes: dict[str, Any]) -> str:
    """How a cell is named in the store and paired across commits: matrix name and axes."""
    return f"{matrix_name} {cell_label(axes)}"


def run_entry(row: dict[str, Any], digest: str) -> dict[str, Any]:
    """What the store keeps of a row: judged metrics (dotted names), env fingerprint, load."""
    metrics = {}
    for name in RUN_METRICS:
        value = lookup(row, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[name] = value
    env = row.get("env") or {}
    entry = {"seed": row["seed"], "finished_at": row.get("finished_at"), "matrix_digest": digest,
             "cell_id": row["cell_id"], "schema_version": row.get("schema_version"),
             "load_avg_1m": [row.get("load_avg_1m_start"), row.get("load_avg_1m_end")],
             "env": {k: env[k] for k in RUN_ENV_KEYS if k in env}, "metrics": metrics}
    blob = json.dumps(entry, sort_keys=True, default=str).encode()
    return {"run_id": hashlib.sha256(blob).hexdigest()[:16], **entry}


def check_machine_name(name: str | None) -> str | None:
    """``--machine NAME`` is a folder of the store: a plain name, never a path."""
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise BadInput(f"--machine {name!r}: use letters, digits, '.', '_' and '-' (a folder name, at most 64)")
    return name


def file_of(store: Path, machine_name: str, commit: str) -> Path:
    return store / machine_name / f"{commit}.json"


def read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BadInput(f"{path}: unreadable history file ({err})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(
            document.get("cells"), dict):
        raise BadInput(f"{path}: not a trickbench history file (format '{FORMAT}')")
    return document


def add_runs(document: dict[str, Any], measured: Measured) -> int:
    """Add ``measured``'s runs to ``document`` (in place); how many were new."""
    added = 0
    for row in measured.rows:
        cell = document["cells"].setdefault(cell_key(measured.matrix, row["axes"]),
                                            {"matrix": measured.matrix, "axes": row["axes"], "runs": []})
        entry = run_entry(row, measured.digest)
        if all(run["run_id"] != entry["run_id"] for run in cell["runs"]):
            cell["runs"].append(entry)
            added += 1
    return added


def store_measured(store: Path, machine_name: str | None, measured: Measured) -> list[tuple[Path, int]]:
    """File the runs under (machine, commit): (file, runs added) per machine (a matrix of CPU and
    GPU cells measures two). The machine is ``machine_name`` or each row's fingerprint."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in measured.rows:
        groups.setdefault(machine_name or machine.row_machine(row), []).append(row)
    written = []
    for name, rows in groups.items():
        path = file_of(store, name, measured.commit)
        document = read_document(path) if path.exists() else {
            "format": FORMAT, "format_version": FORMAT_VERSION, "machine": name,
            "machine_description": machine.describe(rows[0].get("env")), "commit": measured.commit,
            "date": commit_date(measured.commit), "subject": subject(measured.commit), "cells": {}}
        added = add_runs(document, Measured(measured.commit, measured.matrix, measured.digest, rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(document, indent=1) + "\n")
        written.append((path, added))
    return written


def machines_in(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir()) if store.is_dir() else []


def this_machine() -> list[str]:
    """This machine's fingerprints: as its CPU runs record it, then as each GPU's runs do."""
    gpus = range(torch.cuda.device_count()) if torch.cuda.is_available() else []
    envs = machine.environments_here({"cpu", "cuda"} if gpus else {"cpu"}, gpus)
    return list(dict.fromkeys(machine.fingerprint(env) for env in envs.values()))


def documents(store: Path, machine_name: str) -> dict[str, dict[str, Any]]:
    """commit → document of every file of one machine."""
    folder = store / machine_name
    return {path.stem: read_document(path) for path in sorted(folder.glob("*.json"))}


def stored_rows(document: dict[str, Any], digest: str | None = None) -> list[dict[str, Any]]:
    """The document's runs as results rows (cell_id = the store's cell key), for
    :func:`bench.regression.sides.cells_from_rows`. A replicate of a seed gets its own seed key
    ("0", "0.2", "0.3", ...): timing and accuracy count every run; exact compares seed by seed."""
    rows = []
    for key, cell in document["cells"].items():
        replicates: dict[str, int] = {}
        for run in cell["runs"]:
            if digest is not None and run.get("matrix_digest") != digest:
                continue
            seed = str(run["seed"])
            replicates[seed] = replicates.get(seed, 0) + 1
            row: dict[str, Any] = {"cell_id": key, "axes": cell["axes"], "status": "ok",
                                   "seed": seed if replicates[seed] == 1 else f"{seed}.{replicates[seed]}",
                                   "schema_version": run.get("schema_version"), "env": run.get("env") or {},
                                   "load_avg_1m_start": run["load_avg_1m"][0], "load_avg_1m_end": run["load_avg_1m"][1]}
            for name, value in run["metrics"].items():
                *parents, leaf = name.split(".")
                target = row
                for part in parents:
                    target = target.setdefault(part, {})
                target[leaf] = value
            rows.append(row)
    return rows


def stored_cells(document: dict[str, Any], digest: str | None = None) -> dict[str, CellRecord]:
    return cells_from_rows(stored_rows(document, digest), str(document.get("commit")))


# ---- commands ----------------------------------------------------------------------------------

def one_line_failures(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Every failure as one ``error:`` line, exit 2: bad input, and Ctrl-C/SIGTERM/SIGHUP (whose
    unwinding has removed the temporary worktrees and stopped the worker by then)."""

    @functools.wraps(command)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            with termination_as_exception():
                return command(args)
        except BadInput as err:
            print(f"error: {err}", file=sys.stderr)
        except (KeyboardInterrupt, Terminated) as stopped:
            name = stopped if isinstance(stopped, Terminated) else signal.SIGINT.name
            print(f"error: stopped by {name}; temporary worktrees removed, commits finished before are stored",
                  file=sys.stderr)
        return 2
    return wrapped


def print_stored(written: list[tuple[Path, int]], commit: str) -> None:
    for path, added in written:
        print(f"{commit[:12]}: {added} runs added to {path}")


@one_line_failures
def cmd_record(args: argparse.Namespace) -> int:
    """``history record MATRIX``: measure HEAD (clean tree) or ``--rev REV`` into the store."""
    require_repository()
    matrix, machine_name = check_matrix_file(args.matrix), check_machine_name(args.machine)
    if args.rev:
        commit, tree = commit_of(args.rev, "--rev"), None
    else:
        refuse_dirty_tree()
        commit, tree = commit_of("HEAD", "HEAD"), TREE
    measured = measure(commit, matrix, args.profile, tree=tree)
    refuse_failed_runs(measured)
    print_stored(store_measured(Path(args.store), machine_name, measured), commit)
    return 0


def holds(store: Path, machine_name: str | None, commit: str, digest: str) -> bool:
    """Whether the store already has runs of this matrix for ``commit`` (on this machine)."""
    for name in [machine_name] if machine_name else this_machine():
        path = file_of(store, name, commit)
        if path.exists():
            if any(run.get("matrix_digest") == digest for cell in read_document(path)["cells"].values()
                   for run in cell["runs"]):
                return True
    return False


def every_nth(commits: list[str], every: int) -> list[str]:
    """Every ``every``-th commit counted from the newest, which is always kept; oldest first."""
    return commits[::-1][::every][::-1]


@one_line_failures
def cmd_backfill(args: argparse.Namespace) -> int:
    """``history backfill MATRIX --revs A..B``: measure past commits oldest first; a rerun skips
    the commits already stored, so a killed backfill resumes where it stopped."""
    require_repository()
    matrix = check_matrix_file(args.matrix)
    check_machine_name(args.machine)
    commits = every_nth(first_parent_range(args.revs, "--revs"), args.every)
    store, digest = Path(args.store), matrix_digest(matrix, args.profile)
    todo = [c for c in commits if not holds(store, args.machine, c, digest)]
    log(f"history backfill: {len(commits)} commits, {len(commits) - len(todo)} already in {store}, {len(todo)} to measure")
    failures = []
    for index, commit in enumerate(todo, 1):
        log(f"[{index}/{len(todo)}] {commit[:12]} {subject(commit)}")
        try:
            measured = measure(commit, matrix, args.profile)
            refuse_failed_runs(measured)
        except BadInput as err:  # the next commits may build again: go on, report at the end
            log(f"  skipped: {err}")
            failures.append(f"{commit[:12]} ({err})")
            continue
        print_stored(store_measured(store, args.machine, measured), commit)
    if failures:
        raise BadInput(f"{len(failures)} of {len(todo)} commits could not be measured: {'; '.join(failures)}")
    return 0
