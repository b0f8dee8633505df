"""``trickbench bisect MATRIX --good REV --bad REV --metric M``: the first commit that moved M.

A binary search over the first-parent history from ``--good`` (excluded) to ``--bad``, each step
decided by the rule of the metric's tier (:func:`bench.regression.compare.judge_metric`, the code
``compare`` runs). Every commit is measured in a temporary git worktree: the user's checkout, branch
and index are never touched, and a failure or Ctrl-C removes the worktrees it made.

- ``exact`` metrics (FLOPs, bytes, the seeded loss …) do not vary between runs: one run of the
  matrix's first seed per commit decides. A commit is bad when its value differs from ``--good``'s
  beyond the metric's tolerance. ``--bad`` is measured only if the search reaches it, so n commits
  after ``--good`` take at most ⌈log2(n + 1)⌉ + 1 measurements (``--good`` and the probes). With
  ``--store`` the measurements are read from and added to the history store (same machine, same
  matrix text), so a bisect over recorded history runs nothing.
- ``timing`` metrics vary: each step is an A/B in this job (as ``compare --against``), the commit
  and ``--good`` run ``--repeats`` times each, interleaved, and judged by the timing rule (ratio
  beyond ``--factor`` and Welch's t on the logs). First ``--good`` against ``--bad``: when the rule
  cannot call that, the bisect stops with "cannot tell" (exit code 1) and the number of runs a
  side that the observed spread says would be needed, instead of naming a commit.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.regression.ab import expand, git, paired_cells, run_side, schedule, worktree
from bench.regression.cells import METRICS, BadInput, CellRecord, Metric
from bench.regression.compare import IMPROVED, NOT_COMPARABLE, PASS, REGRESSED, Policy, Verdict, judge_metric
from bench.regression.history import (
    Measured,
    cell_key,
    cell_label,
    check_matrix_file,
    commit_of,
    file_of,
    log,
    matrix_digest,
    measure,
    one_line_failures,
    read_document,
    refuse_failed_runs,
    require_repository,
    store_measured,
    stored_cells,
    subject,
    this_machine,
)
from bench.regression.sides import cells_from_rows
from bench.reports.stats import ALPHA, MIN_RUNS

BISECTABLE = {m.name: m for m in METRICS if m.tier == "exact" or m.name in ("step_time_ms_median",
                                                                            "throughput_samples_per_s")}
CANNOT_TELL = 1  # exit code: the timing rule cannot call the change (not an error, not a result)
POWER = 0.8  # the chance to detect the observed change that the suggested repeats aim for
MAX_REPEATS = 1000


class CannotTell(Exception):
    """The timing rule cannot decide a step; the message says what it would take."""


def search(lo: int, hi: int, is_bad: Callable[[int], bool]) -> int:
    """The smallest position in (lo, hi] that is bad, given lo good and hi bad (hi may stand past
    the last real position, for a bad end that is assumed, not measured): binary search."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if is_bad(mid):
            hi = mid
        else:
            lo = mid
    return hi


def runs_needed(base: list[float], new: list[float], alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Runs a side for Welch's t on the logs to detect the observed ratio with ``power``, from the
    observed spread (pooled variance of the log values); None when no change is seen at all or it
    would take more than MAX_REPEATS."""
    # lazy: scipy costs ~0.3 s and only this estimate needs it
    from scipy import stats

    lb, ln = np.log(base), np.log(new)
    effect = abs(float(ln.mean() - lb.mean()))
    variance = (float(lb.var(ddof=1)) + float(ln.var(ddof=1))) / 2
    if effect == 0:
        return None
    for n in range(MIN_RUNS, MAX_REPEATS + 1):
        quantiles = stats.t.ppf(1 - alpha / 2, 2 * n - 2) + stats.t.ppf(power, 2 * n - 2)
        if n >= 2 * variance * quantiles ** 2 / effect ** 2:
            return n
    return None


def advice(metric: Metric, base: list[float], new: list[float], policy: Policy) -> str:
    """Why the rule cannot call it and what would: the runs a side, and the factor."""
    repeats = min(len(base), len(new))
    ratio = math.exp(float(np.mean(np.log(new)) - np.mean(np.log(base))))
    worse = ratio if metric.better == "lower" else 1 / ratio
    needed = runs_needed(base, new, policy.alpha)
    spread = math.sqrt((np.var(np.log(base), ddof=1) + np.var(np.log(new), ddof=1)) / 2)
    text = (f"{metric.name} moved {ratio:.3f}× (ratio of geometric means, which Welch's t on the logs tests) with "
            f"{repeats} runs a side; the timing rule counts a change only "
            f"beyond {policy.factor:g}× and at p < {policy.alpha:g}. ")
    if needed is None:
        return text + (f"From the observed spread (σ of log {spread:.3f}) no number of runs up to {MAX_REPEATS} a side "
                       "would tell this change apart from noise")
    text += (f"From the observed spread (σ of log {spread:.3f}) about {needed} runs a side would tell a "
             f"{ratio:.3f}× change (power {POWER:.0%}): --repeats {needed}")
    if max(worse, 1 / worse) < policy.factor:
        factor = math.floor(max(worse, 1 / worse) * 1000) / 1000
        text += f" and --factor {factor:g} (below the change)" if factor > 1 else \
            ", but a change this small passes every --factor above 1"
    return text


@dataclass
class Judged:
    """One step of the bisect: a commit's verdicts against --good, and the two sides judged."""

    commit: str
    verdicts: list[Verdict]
    bad: bool
    how: str  # "measured", "from the store", "A/B"
    sides: tuple[dict[str, CellRecord], dict[str, CellRecord]] = ({}, {})

    def runs(self, verdict: Verdict) -> tuple[list[float], list[float]]:
        base, new = self.sides
        return (list(base[verdict.cell_id].values[verdict.metric].values()),
                list(new[verdict.cell_id].values[verdict.metric].values()))


@dataclass
class Bisect:
    """What both kinds of bisect share: the range, the rule, the steps taken."""

    matrix: Path
    profile: str | None
    metric: Metric
    cell: str | None
    policy: Policy
    good: str
    commits: list[str]  # after --good, oldest first; the last is --bad
    steps: list[Judged] = field(default_factory=list)

    def keys(self, cells: dict[str, CellRecord]) -> list[str]:
        chosen = [k for k, c in cells.items() if self.cell is None or self.cell in (k, c.label, c.cell_id, axes_text(c))]
        if not chosen:
            raise BadInput(f"--cell {self.cell}: no such cell (cells: {', '.join(axes_text(c) for c in cells.values())})")
        return chosen

    def judge(self, commit: str, base: dict[str, CellRecord], new: dict[str, CellRecord], how: str) -> Judged:
        """Compare's verdict per chosen cell; bad when any cell moved beyond the tier's rule."""
        verdicts = []
        for key in self.keys(base):
            if key not in new:
                raise BadInput(f"commit {commit[:12]}: the matrix has no cell {key} there")
            verdict = judge_metric(self.metric, base[key], new[key], self.policy)
            if verdict is None:
                raise BadInput(f"{self.metric.name}: neither --good nor {commit[:12]} measures it")
            verdict.cell_id, verdict.label = key, axes_text(base[key])  # every axis: one cell of a history
            verdicts.append(verdict)
        judged = Judged(commit, verdicts, any(v.verdict in (REGRESSED, IMPROVED) for v in verdicts), how, (base, new))
        self.steps.append(judged)
        undecided = [v for v in verdicts if v.verdict not in (PASS, REGRESSED, IMPROVED)]
        if undecided:
            v = undecided[0]
            text = f"commit {commit[:12]}: {v.metric} {v.verdict} ({v.note}) in cell {v.label}"
            if self.metric.tier == "timing" and v.verdict == NOT_COMPARABLE:
                raise CannotTell(f"{text}. The timing rule does not judge runs timed beside other work: run the "
                                 f"bisect again when the machine is quiet. On these runs: "
                                 f"{advice(self.metric, *judged.runs(v), self.policy)}")
            if self.metric.tier == "timing":
                raise CannotTell(f"{text}. {advice(self.metric, *judged.runs(v), self.policy)}")
            raise BadInput(text)
        position = self.commits.index(commit) + 1
        moved = "; ".join(f"{v.verdict} {v.base} → {v.new} ({v.change})" for v in verdicts)
        log(f"step {len(self.steps)}: [{position}/{len(self.commits)}] {commit[:12]} ({how}): {moved} "
            f"→ {'bad' if judged.bad else 'good'}")
        return judged


@dataclass
class ExactBisect(Bisect):
    """One run per commit (the first seed); --good is the reference every commit is judged against."""

    store: Path | None = None
    measured_now: int = 0

    def cells(self, commit: str) -> tuple[dict[str, CellRecord], str]:
        digest = matrix_digest(self.matrix, self.profile)
        if self.store is not None:
            for name in this_machine():
                path = file_of(self.store, name, commit)
                if path.exists() and (cells := stored_cells(read_document(path), digest)):
                    return cells, "from the store"
        measured = measure(commit, self.matrix, self.profile, one_seed=True)
        refuse_failed_runs(measured)
        self.measured_now += 1
        if self.store is not None:
            store_measured(self.store, None, measured)
        return keyed_cells(measured), "measured"

    def run(self) -> tuple[str | None, Judged | None]:
        reference, how = self.cells(self.good)
        self.steps.append(Judged(self.good, [], False, how))
        log(f"step 1: --good {self.good[:12]} ({how}): the reference")
        found: dict[int, Judged] = {}

        def is_bad(position: int) -> bool:
            commit = self.commits[position - 1]
            found[position] = self.judge(commit, reference, *self.cells(commit))
            return found[position].bad

        first = search(0, len(self.commits) + 1, is_bad)  # --bad assumed bad until measured
        if first > len(self.commits):
            return None, None
        return self.commits[first - 1], found[first]


def keyed_cells(measured: Measured) -> dict[str, CellRecord]:
    """A measurement's cells under the store's names (matrix and axes), so commits pair by axes."""
    rows = [{**row, "cell_id": cell_key(measured.matrix, row["axes"])} for row in measured.rows]
    return cells_from_rows(rows, measured.commit[:12])


@dataclass
class TimingBisect(Bisect):
    """Each step an interleaved A/B of a commit against --good, ``repeats`` runs a side."""

    repeats: int = MIN_RUNS
    runs: int = 0

    def ab(self, good_tree: Path, good_expansion: dict[str, Any], commit: str) -> Judged:
        with worktree(commit) as tree, tempfile.TemporaryDirectory(prefix="trickbench-bisect-work-") as work:
            expansion = expand(tree, self.matrix, self.profile, f"commit {commit[:12]}")
            pairs = [(b, n) for b, n in paired_cells(good_expansion, expansion) if self.cell is None
                     or self.cell in (cell_key(expansion["name"], n["axes"]), cell_label(n["axes"]), n["cell_id"])]
            if not pairs:
                raise BadInput(f"--cell {self.cell}: no such cell in {self.matrix.name}")
            rows: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
            order = schedule(pairs, list(range(self.repeats)))
            for index, (side, (b, n), seed) in enumerate(order, 1):
                row = run_side(good_tree if side == "base" else tree, b if side == "base" else n,
                               expansion["name"], seed, Path(work), side)
                rows[side].append({**row, "cell_id": cell_key(expansion["name"], n["axes"])})
                self.runs += 1
                log(f"  [{index}/{len(order)}] {'--good' if side == 'base' else commit[:12]} {cell_label(n['axes'])} "
                    f"seed={seed}: {row['status']}")
        failed = [r for side in rows.values() for r in side if r.get("status") != "ok"]
        if failed:
            raise BadInput(f"A/B of {commit[:12]}: {len(failed)} runs failed ({failed[0].get('status')}: "
                           f"{failed[0].get('error')})")
        return self.judge(commit, cells_from_rows(rows["base"]), cells_from_rows(rows["new"]), "A/B")

    def run(self) -> tuple[str | None, Judged | None]:
        with worktree(self.good) as good_tree:
            good_expansion = expand(good_tree, self.matrix, self.profile, f"--good {self.good[:12]}")
            whole = self.ab(good_tree, good_expansion, self.commits[-1])
            if not whole.bad:
                v = whole.verdicts[0]
                raise CannotTell(f"--good → --bad: {v.verdict} {v.change} ({v.note or 'within the factor'}) in cell "
                                 f"{v.label}. {advice(self.metric, *whole.runs(v), self.policy)}")
            direction = {v.verdict for v in whole.verdicts} - {PASS}
            found = {len(self.commits): whole}

            def is_bad(position: int) -> bool:
                judged = self.ab(good_tree, good_expansion, self.commits[position - 1])
                found[position] = judged
                moved = {v.verdict for v in judged.verdicts} - {PASS}
                if moved - direction:
                    raise CannotTell(f"commit {judged.commit[:12]} moved {self.metric.name} the other way "
                                     f"({', '.join(sorted(moved))}) than --bad did ({', '.join(sorted(direction))})")
                return bool(moved)

            first = search(0, len(self.commits), is_bad)
        return self.commits[first - 1], found[first]


def first_parent_commits(good: str, bad: str) -> list[str]:
    """The commits after ``good`` up to ``bad`` on bad's first-parent line, oldest first."""
    if good == bad:
        raise BadInput("--good and --bad are the same commit: nothing to bisect")
    try:
        git("merge-base", "--is-ancestor", good, bad)
    except BadInput:
        raise BadInput(f"--good {good[:12]} is not an ancestor of --bad {bad[:12]}") from None
    commits = git("rev-list", "--reverse", "--first-parent", f"{good}..{bad}").split()
    if git("rev-parse", f"{commits[0]}^") != good:
        raise BadInput(f"--good {good[:12]} is not on the first-parent line of --bad (pick a commit of the main line)")
    return commits


def pick_metric(name: str) -> Metric:
    if name not in BISECTABLE:
        raise BadInput(f"--metric {name}: bisect judges exact and timing metrics of a run: {', '.join(BISECTABLE)}")
    return BISECTABLE[name]


def axes_text(cell: CellRecord) -> str:
    """A cell named by all its axis values (``checkpointing=true``): bisect follows one cell through
    commits, where "the axes that differ from the baseline" would name the baseline cell "baseline"."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in cell.axes.items()) or cell.cell_id


def report(bisect: Bisect, first: str, judged: Judged, count: str) -> None:
    """The first bad commit, the metric before and after it, the steps taken."""
    print(f"first bad commit: {first} {subject(first)}")
    last_good = max((s.commit for s in bisect.steps if not s.bad and s.commit != bisect.good),
                    key=bisect.commits.index, default=bisect.good)
    print(f"  last good: {last_good} {subject(last_good)}")
    for v in judged.verdicts:
        if v.verdict != PASS:
            print(f"  {v.metric} in cell {v.label}: {v.base} at --good → {v.new} ({v.change}, {v.verdict}"
                  + (f"; {v.note}" if v.note else "") + ")")
    print(count)
    for number, step in enumerate(bisect.steps, 1):
        moved = "; ".join(f"{v.verdict} {v.base} → {v.new} ({v.change})" for v in step.verdicts) or "the reference"
        where = f"{bisect.commits.index(step.commit) + 1}/{len(bisect.commits)}" if step.commit in bisect.commits \
            else "--good"
        print(f"  step {number} [{where}] {step.commit[:12]} ({step.how}): {moved}"
              + ("" if not step.verdicts else " → bad" if step.bad else " → good"))


@one_line_failures
def cmd_bisect(args: argparse.Namespace) -> int:
    require_repository()
    matrix = check_matrix_file(args.matrix)
    metric = pick_metric(args.metric)
    if args.factor <= 1:
        raise BadInput(f"--factor: {args.factor:g} must be above 1 (e.g. 1.10)")
    if args.repeats < MIN_RUNS:
        raise BadInput(f"--repeats {args.repeats}: the timing rule needs {MIN_RUNS} runs a side")
    good, bad = commit_of(args.good, "--good"), commit_of(args.bad, "--bad")
    commits = first_parent_commits(good, bad)
    policy = Policy(factor=args.factor)
    common = (matrix, args.profile, metric, args.cell, policy, good, commits)
    bound = math.ceil(math.log2(len(commits) + 1)) + 1
    if metric.tier == "exact":
        log(f"bisect {metric.name} (exact tier: one run per commit) over {len(commits)} commits after --good "
            f"{good[:12]}: at most {bound} measurements")
        exact = ExactBisect(*common, store=Path(args.store) if args.store else None)
        first, judged = exact.run()
        if first is None:
            raise BadInput(f"--bad {args.bad}: {metric.name} is the same as at --good {args.good} "
                           f"(compare's exact rule); nothing to bisect")
        count = (f"steps: {len(exact.steps)} commits judged ({exact.measured_now} measured now, "
                 f"{len(exact.steps) - exact.measured_now} from the store); at most ⌈log2({len(commits)} + 1)⌉ + 1 = {bound}")
        report(exact, first, judged, count)
        return 0
    log(f"bisect {metric.name} (timing tier: A/B, {args.repeats} interleaved runs a side per step) over "
        f"{len(commits)} commits after --good {good[:12]}")
    timing = TimingBisect(*common, repeats=args.repeats)
    try:
        first, judged = timing.run()
    except CannotTell as err:
        print(f"cannot tell: {err}")
        print(f"steps: {len(timing.steps)} A/B comparison{'s' * (len(timing.steps) != 1)}, {timing.runs} runs")
        return CANNOT_TELL
    report(timing, first, judged, f"steps: {len(timing.steps)} A/B comparisons against --good, {timing.runs} runs")
    return 0
