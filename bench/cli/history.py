"""Verbs over commits: ``history record | backfill | show`` and ``bisect``. Parsing only; the
handlers live with the code they run (bench/regression/history.py, history_show.py, bisect.py)."""
from __future__ import annotations

from typing import Any

from bench.cli.args import positive_int
from bench.regression.bisect import cmd_bisect
from bench.regression.history import DEFAULT_STORE, cmd_backfill, cmd_record
from bench.regression.history_show import cmd_show
from bench.reports.stats import MIN_RUNS

STORE_HELP = f"history store folder (default {DEFAULT_STORE}/): one JSON file per (machine, commit)"
MACHINE_HELP = ("file the runs under this machine name instead of this machine's fingerprint "
                "(e.g. a pool of CI runners); a change of CPU, GPU or torch then shows as a break")


def add_history(subparsers: Any) -> None:
    """Add ``history record | backfill | show`` to the trickbench command line."""
    history = subparsers.add_parser("history", help="performance history across commits: record, backfill, show")
    actions = history.add_subparsers(dest="action", required=True)

    record = actions.add_parser("record", help="measure a commit (default: HEAD of a clean tree) into the store")
    record.add_argument("matrix", metavar="MATRIX", help="ablation YAML file")
    record.add_argument("--rev", metavar="REV", help="measure this commit in a temporary git worktree instead")
    record.add_argument("--store", default=DEFAULT_STORE, help=STORE_HELP)
    record.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    record.add_argument("--machine", metavar="NAME", help=MACHINE_HELP)
    record.set_defaults(func=cmd_record)

    backfill = actions.add_parser("backfill", help="measure past commits A..B oldest first (resumable)")
    backfill.add_argument("matrix", metavar="MATRIX", help="ablation YAML file")
    backfill.add_argument("--revs", required=True, metavar="A..B",
                          help="commits after A up to B on B's first-parent line (as git log A..B)")
    backfill.add_argument("--every", type=positive_int, default=1, metavar="N",
                          help="every N-th commit counted from B, which is always measured (default 1)")
    backfill.add_argument("--store", default=DEFAULT_STORE, help=STORE_HELP)
    backfill.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    backfill.add_argument("--machine", metavar="NAME", help=MACHINE_HELP)
    backfill.set_defaults(func=cmd_backfill)

    show = actions.add_parser("show", help="figures and a markdown table of one machine's history")
    show.add_argument("--store", default=DEFAULT_STORE, help=STORE_HELP)
    show.add_argument("--machine", metavar="NAME", help="the machine to show (default: this one)")
    show.add_argument("--metric", action="append", metavar="M",
                      help="a metric to judge and draw (repeatable; default: judge every metric, draw FLOPs, "
                           "peak memory, step time, accuracy and any metric with a marked step or a break)")
    show.add_argument("--cell", metavar="C", help="one cell, by its axes (e.g. checkpointing=true)")
    show.add_argument("--since", metavar="REV", help="start at this commit of HEAD's history")
    show.add_argument("--out", metavar="DIR", help="folder for history.md, steps.json and the figures "
                      "(default results/history/<machine>/)")
    show.add_argument("--factor", type=float, default=1.10,
                      help="timing: smallest ratio of run medians that counts (default 1.10, as compare)")
    show.set_defaults(func=cmd_show)


def add_bisect(subparsers: Any) -> None:
    """Add ``bisect`` to the trickbench command line."""
    bisect = subparsers.add_parser("bisect", help="the first commit that moved a metric, by compare's tiers")
    bisect.add_argument("matrix", metavar="MATRIX", help="ablation YAML file (small: every step runs it)")
    bisect.add_argument("--good", required=True, metavar="REV", help="a commit before the change")
    bisect.add_argument("--bad", required=True, metavar="REV", help="a commit after it")
    bisect.add_argument("--metric", required=True, metavar="M", help="e.g. flops_per_step, "
                        "memory_breakdown.activations, step_time_ms_median")
    bisect.add_argument("--cell", metavar="C", help="judge this cell only (default: a step is bad when any cell moved)")
    bisect.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    bisect.add_argument("--repeats", type=positive_int, default=MIN_RUNS, metavar="R",
                        help=f"timing: interleaved runs a side per step (default {MIN_RUNS})")
    bisect.add_argument("--factor", type=float, default=1.10,
                        help="timing: smallest ratio of run medians that counts (default 1.10, as compare)")
    bisect.add_argument("--store", metavar="DIR", help="exact metrics: reuse and add to this history store")
    bisect.set_defaults(func=cmd_bisect)
