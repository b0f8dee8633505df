"""Verbs that judge stored results: ``report``, ``index``, ``compare``, ``check``, ``baseline``,
``aa`` and ``power``. Parsing only; each handler lives with the code it runs."""
from __future__ import annotations

import argparse
from typing import Any

from bench.cli.args import float_in, int_in
from bench.regression.aa import cmd_aa
from bench.regression.baseline import cmd_check, cmd_compare, cmd_record, cmd_update
from bench.regression.power import SLOWDOWNS, cmd_power
from bench.reports.report import cmd_index, cmd_report

# Bounds of the numeric options: nan, inf and counts that could never finish are refused at once.
FACTOR = float_in(1, 100)  # a ratio of medians; 1 would flag every difference
PER_GROUP = int_in(1, 1000)  # runs a side
SPLITS = int_in(1, 100_000)  # random draws; each judges a comparison


def add_report(subparsers: Any) -> None:
    """Add ``report DIR`` and ``index RESULTS_DIR`` to the trickbench command line."""
    report = subparsers.add_parser("report", help="write DIR/report.md and DIR/figures/ from DIR/cells.jsonl")
    report.add_argument("dir", metavar="DIR", help="a run's output folder (holds cells.jsonl)")
    report.set_defaults(func=cmd_report)
    index = subparsers.add_parser("index", help="write RESULTS_DIR/README.md indexing every run folder")
    index.add_argument("results_dir", metavar="RESULTS_DIR", help="folder whose subfolders hold cells.jsonl")
    index.set_defaults(func=cmd_index)


def _add_judging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strict", action="store_true",
                        help="timing regressions fail too (a dedicated machine); default: warn only")
    parser.add_argument("--factor", type=FACTOR, default=1.10,
                        help="timing: smallest ratio of run medians that counts (default 1.10)")


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    _add_judging(parser)
    parser.add_argument("--markdown", metavar="FILE", help="also write the markdown table here")
    parser.add_argument("--json", metavar="FILE", help="write every verdict as JSON here")


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    parser.add_argument("--out", help="results folder for the runs (default: a new temporary folder)")


def _add_instructions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instructions", action="store_true",
                        help="also count the instructions of one training step per cell under valgrind "
                             "(gated when torch, Python, CPU and valgrind match). Opt-in and off in the "
                             "project's CI: about 2.5 minutes per cell on a 2-core machine (torch is imported under "
                             "valgrind), against a 3-minute CI budget. "
                             "Without valgrind the tier is skipped with a note")
    parser.add_argument("--instruction-repeats", type=int_in(1, 100), default=3, metavar="R",
                        help="counts per cell; their spread sets the margin (default 3)")


def add_regression_check(subparsers: Any) -> None:
    """Add ``compare``, ``baseline record|update`` and ``check`` to the trickbench command line."""
    compare = subparsers.add_parser("compare", help="verdicts per (cell, metric): BASE vs NEW results")
    compare.add_argument("base", metavar="BASE", help="results folder, cells.jsonl, baseline .json, or "
                         "pytest-benchmark JSON (a file, or a folder of them: one file = one run)")
    compare.add_argument("new", metavar="NEW", nargs="?",
                         help="results folder or cells.jsonl (or pytest-benchmark JSON)")
    compare.add_argument("--against", metavar="REV", help="A/B in this job: run MATRIX (given as BASE) with the "
                         "git revision REV and with this tree, interleaved, and compare them")
    compare.add_argument("--runs-per-side", type=int_in(1, 1000), metavar="N",
                         help="with --against: seeds 0..N-1 instead of the matrix's (timing needs 3)")
    _add_run(compare)
    _add_outputs(compare)
    compare.set_defaults(func=cmd_compare)

    check = subparsers.add_parser("check", help="run a matrix and compare it with a baseline file")
    check.add_argument("matrix", metavar="MATRIX", help="ablation YAML file (or a results folder)")
    check.add_argument("--baseline", required=True, help="baseline .json (from `baseline record`)")
    _add_run(check)
    _add_instructions(check)
    _add_outputs(check)
    check.set_defaults(func=cmd_check)

    baseline = subparsers.add_parser("baseline", help="record or update a baseline file")
    actions = baseline.add_subparsers(dest="action", required=True)
    record = actions.add_parser("record", help="run MATRIX and store its numbers as a baseline")
    record.add_argument("matrix", metavar="MATRIX", help="ablation YAML file")
    record.add_argument("-o", "--output", required=True, help="baseline .json to write, e.g. baselines/ci-cpu.json")
    _add_run(record)
    _add_instructions(record)
    record.set_defaults(func=cmd_record)
    update = actions.add_parser("update", help="rewrite only the entries that moved beyond their margin")
    update.add_argument("baseline", metavar="FILE", help="baseline .json to update in place")
    update.add_argument("source", metavar="SOURCE", help="results folder, or a matrix YAML to run now")
    _add_run(update)
    _add_instructions(update)
    _add_judging(update)
    update.set_defaults(func=cmd_update)


def add_aa(subparsers: Any) -> None:
    """Add ``aa`` to the trickbench command line."""
    aa = subparsers.add_parser("aa", help="A/A check: false-positive rate of the report's marks on this machine")
    aa.add_argument("matrix", nargs="?", help="matrix YAML whose baseline cell is run (default: a ~5 s tiny_cnn run)")
    aa.add_argument("--profile", help="a profile of the matrix file")
    aa.add_argument("--out", default="results/aa", help="folder for cells.jsonl, aa.json and aa.md")
    aa.add_argument("--runs", type=int_in(2, 10_000), default=90, help="independent runs in all (default 90)")
    aa.add_argument("--per-group", type=PER_GROUP, default=3, help="runs per 'cell' in one comparison (default 3)")
    aa.add_argument("--splits", type=SPLITS, default=1000, help="random (dependent) splits (default 1000)")
    aa.set_defaults(func=cmd_aa)


def add_power(subparsers: Any) -> None:
    """Add ``power`` to the trickbench command line."""
    power = subparsers.add_parser("power", help="false alarms and power of compare's timing tier on A/A runs")
    power.add_argument("results", metavar="RESULTS", help="A/A results folder (from `trickbench aa`) or cells.jsonl")
    power.add_argument("--per-group", type=PER_GROUP, nargs="+", default=[3, 5], help="runs a side (default 3 5)")
    power.add_argument("--slowdowns", type=float_in(0, 10), nargs="+", default=list(SLOWDOWNS),
                       help="injected slowdowns, 0.1 = 10%% slower (default 0.05 0.1 0.15 0.2 0.3 0.5)")
    power.add_argument("--splits", type=SPLITS, default=1000, help="random (dependent) draws (default 1000)")
    power.add_argument("--factor", type=FACTOR, default=1.10, help="the timing tier's factor (default 1.10)")
    power.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    power.set_defaults(func=cmd_power)
