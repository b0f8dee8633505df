"""Cluster verbs and options: ``run --executor slurm|local``, ``collect`` and ``status``."""
from __future__ import annotations

import argparse
from typing import Any

from bench.cli.args import positive_int
from bench.execution.cluster import EXECUTORS
from bench.execution.submit import cmd_collect, cmd_status


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--executor", choices=EXECUTORS, default="sequential",
                     help="sequential (default): here, one run at a time; slurm: one SLURM job array "
                          "(submitit); local: submitit's local executor")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting of the matrix's slurm: section, e.g. partition=gpu")
    run.add_argument("--wait", action="store_true",
                     help="--executor slurm: wait until every run is done or lost, then collect")
    run.add_argument("--timeout", type=positive_int, metavar="SECONDS",
                     help="with --wait: stop waiting after this long (the runs go on)")


def add_collect_status(sub: Any) -> None:
    collect = sub.add_parser("collect", help="merge the per-run files of a cluster run into cells.jsonl")
    collect.add_argument("dir", help="output folder of `run --executor slurm|local`")
    collect.set_defaults(func=cmd_collect)
    status = sub.add_parser("status", help="queued / running / done / failed runs of an output folder")
    status.add_argument("dir", help="output folder")
    status.set_defaults(func=cmd_status)
