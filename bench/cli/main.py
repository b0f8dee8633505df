"""Command line: ``trickbench run | list`` (also ``python -m bench``). Thin: parsing and printing.

Every refusal is one line on stderr starting with ``error:``, exit code 2, before anything is
run or written: argument errors, environment variables, the matrix, and the output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from bench.base.errors import ConfigError
from bench.base.safeyaml import shorten
from bench.cli.args import OneLineParser, device_list, int_in
from bench.cli.cluster import add_collect_status, add_run_arguments
from bench.cli.diagnostics import add_attention_memory, add_diagnose, add_selfcheck
from bench.cli.history import add_bisect, add_history
from bench.cli.judging import add_aa, add_power, add_regression_check, add_report
from bench.config.matrix import MAX_CELLS, Matrix
from bench.execution.cluster import check_fits, check_with_scheduler, compute_node_view, settings_for
from bench.execution.runner import Terminated, default_devices, run_matrix, termination_as_exception
from bench.execution.slots import LocalDevices, request_for, too_wide
from bench.execution.submit import check_cluster_folders, run_matrix_on_cluster
from bench.parts.data import DATASETS
from bench.parts.distributed import drop_inherited_rank_variables
from bench.parts.models import MODELS, torchvision_names
from bench.reports.stats import scaling_efficiency
from bench.store.paths import check_out_dir
from bench.store.results import Row, StoreError
from bench.training.feasibility import load_runnable_matrix
from bench.tricks import TRICKS

FAULT_VALUE = re.compile(r"(raise|hang)@\d{1,6}")  # bench.training.worker.injected_fault's format


def check_environment() -> None:
    """Refuse junk in trickbench's own variables; drop inherited torchrun rank variables.

    Those (RANK, WORLD_SIZE, ...) are ignored rather than refused: trickbench launches its own
    ranks (torchrun sets them afresh for each), so values left over in the shell, e.g. on the
    login node of a distributed job, say nothing about this run, and a child must not inherit them.
    """
    fault = os.environ.get("TRICKBENCH_FAULT", "")
    if fault and not FAULT_VALUE.fullmatch(fault):
        raise ConfigError("environment", "TRICKBENCH_FAULT", f"{shorten(fault)} is not raise@RANK or hang@RANK "
                          "(test-only fault injection; unset it)")

    dropped = drop_inherited_rank_variables()
    if dropped:
        print(f"warning: ignoring inherited {', '.join(dropped)} (trickbench starts its own ranks with torchrun)",
              file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    with compute_node_view(args.executor):  # slurm: checked for the GPU nodes, not for this login node
        matrix = load_runnable_matrix(args.matrix, profile=args.profile, device=None if args.device == "auto" else args.device,
                             max_cells=None if args.yes else MAX_CELLS)
    out_dir = Path(args.out) if args.out else Path("results") / matrix.name
    check_out_dir(out_dir)
    # Local placement only; a cluster executor's tasks each get their own node's GPUs.
    devices = local_devices(args, matrix) if args.executor == "sequential" else None
    settings = cluster_settings(args, matrix)  # --executor slurm|local: checked before anything is written
    if settings is not None:
        check_cluster_folders(out_dir)
    if args.executor == "slurm" and not args.dry_run:
        check_with_scheduler(settings, matrix)  # sbatch --test-only: its refusal, before anything is written
    if not args.dry_run:  # the first write, so a folder the checks could not foresee fails before any output
        out_dir.mkdir(parents=True, exist_ok=True)
    for warning in matrix.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    runs = matrix.runs()
    print(f"{matrix.name}: {len(matrix.cells)} cells x {len(matrix.seeds)} seeds = {len(runs)} runs "
          f"({matrix.design}) on {matrix.cells[0].config.device} -> {out_dir}")
    if devices and (len(devices.gpus) > 1 or devices.cpu_slots > 1):
        print("side by side: " + (f"one run per GPU on cuda:{','.join(map(str, devices.gpus))}"
                                    if devices.gpus else "")
              + (f"{'; ' if devices.gpus else ''}up to {devices.cpu_slots} CPU runs at once (shared timing: "
                 "marked in the rows, speed not compared)" if devices.cpu_slots > 1 else ""))
    if args.dry_run:
        for cell in matrix.cells:
            print(f"  {cell.cell_id}  {cell.label()}")
        return 0
    if args.executor != "sequential":  # a job array through submitit (bench/execution/submit.py)
        return run_on_cluster(args, matrix, out_dir, settings)
    try:
        outcome = run_matrix(matrix, out_dir, fresh=args.fresh, retry_failed=args.retry_failed, devices=devices,
                             timings=args.timings)
    except Terminated as stopped:
        print(f"stopped by {stopped}: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 128 + stopped.signum
    print_scaling(matrix, outcome.standing)
    return summarize(outcome, out_dir)


def local_devices(args: argparse.Namespace, matrix):
    """What the runs may use here, from --devices, --parallel and --shared-timing; ConfigError
    (one line, exit 2, before anything runs) for a choice that cannot work or would corrupt timing."""

    if args.parallel > 1 and not args.shared_timing:
        raise ConfigError("arguments", f"--parallel {args.parallel}", "CPU runs side by side share the cores and "
                          "disturb each other's timing; add --shared-timing to run them anyway (their rows are "
                          "marked and their timing is never compared)")
    if args.shared_timing and args.parallel == 1:
        raise ConfigError("arguments", "--shared-timing", "needs --parallel N with N > 1 (CPU runs at once)")
    devices = default_devices(matrix)
    if args.devices is not None:
        if not any(c.config.device == "cuda" for c in matrix.cells):
            raise ConfigError("arguments", "--devices", f"picks GPUs, and no cell of {matrix.name} runs on cuda "
                              "(CPU runs side by side: --parallel N --shared-timing)")
        if max(args.devices) >= len(devices.gpus):
            raise ConfigError("arguments", "--devices", f"GPU {max(args.devices)} does not exist; "
                              f"{len(devices.gpus)} visible (0-{len(devices.gpus) - 1})")
        devices = LocalDevices(gpus=args.devices)
    devices = LocalDevices(devices.gpus, args.parallel, args.shared_timing)
    requests = {f"cell {c.label()}": request_for(c.config, args.shared_timing) for c in matrix.cells}
    if problem := too_wide(requests, devices.gpus):
        raise ConfigError("arguments", "--devices", problem)
    return devices


def cluster_settings(args: argparse.Namespace, matrix):
    """The validated slurm: settings with --slurm overrides, for --executor slurm|local; else None."""
    if args.executor == "sequential":
        if args.slurm or args.wait or args.timeout:
            raise ConfigError("arguments", "--slurm/--wait/--timeout", "apply to --executor slurm or local only")
        return None
    if args.timeout is not None and not args.wait:
        raise ConfigError("arguments", "--timeout", "limits --wait; add --wait")
    if args.devices is not None or args.parallel > 1 or args.shared_timing:
        raise ConfigError("arguments", "--devices/--parallel/--shared-timing", "place runs on this machine "
                          "(the default sequential executor); with --executor the scheduler places them")

    settings = settings_for(matrix, args.slurm)
    check_fits(settings, matrix, matrix.file)
    return settings


def run_on_cluster(args: argparse.Namespace, matrix, out_dir: Path, settings) -> int:
    try:
        outcome = run_matrix_on_cluster(matrix, out_dir, args.executor, settings, fresh=args.fresh,
                                        retry_failed=args.retry_failed, wait=args.wait, timeout_s=args.timeout)
    except Terminated as stopped:
        print(f"stopped by {stopped}: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 128 + stopped.signum
    return 0 if outcome is None else summarize(outcome, out_dir)


def summarize(outcome, out_dir: Path) -> int:
    """Print the state of the whole matrix, not only of this invocation; 1 if any run stands failed."""
    failed = outcome.failed
    ok = len(outcome.standing) - len(failed)
    missing = outcome.total - len(outcome.standing)
    print(f"done: {ok} ok, {len(failed)} failed" + (f", {missing} not run" if missing else "")
          + f" of {outcome.total} runs in the matrix ({len(outcome.written)} run now); rows in {out_dir / 'cells.jsonl'}")
    for row in failed:
        print(f"  {row['status']}: cell {row['cell_id']} seed {row['seed']}: {row['error']}")
    return 1 if failed or missing else 0


def off_help(default: object) -> str:
    """What ``null`` means for a trick: off, i.e. its default (shown as YAML writes it)."""
    if default is None:
        return "null: off"
    return f"null: off (the same as {json.dumps(default) if not isinstance(default, str) else default})"


def format_tricks() -> str:
    """Every registered trick: name and description, then its values under them, each line of a
    multi-line ``values_help`` aligned under the first, and last what ``null`` means (off)."""

    width = max(len(name) for name in TRICKS.names())
    lines = []
    for entry in TRICKS:
        first, *rest = entry.obj.values_help.strip().splitlines()
        lines.append(f"{entry.name:<{width}}  {entry.description}")
        lines.append(f"{'':<{width}}  values: {first.strip()}")
        lines += [f"{'':<{width}}          {line.strip()}" for line in [*rest, off_help(entry.obj.default)]]
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "tricks":
        print(format_tricks())
    elif args.what == "models":
        for entry in MODELS:
            print(f"{entry.name:<20} {entry.description}")
        print(f"{'<torchvision name>':<20} any torchvision classification model: {', '.join(torchvision_names())}")
    else:
        for entry in DATASETS:
            print(f"{entry.name:<15} {entry.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trickbench", description="Measure training tricks: speed, memory, accuracy.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an ablation matrix")
    run.add_argument("matrix", help="ablation YAML file")
    run.add_argument("--out", help="output folder (default results/<matrix name>/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--profile", help="a profile of the matrix file, e.g. cpu; several merge in order: gpu1,offline")
    run.add_argument("--dry-run", action="store_true", help="print the expanded cells, run nothing")
    run.add_argument("--fresh", action="store_true", help="start over; previous rows are moved aside, not deleted")
    run.add_argument("--yes", action="store_true", help=f"run a matrix of more than {MAX_CELLS} cells")
    run.add_argument("--retry-failed", action="store_true",
                     help="run failed runs again (new rows; the newest row of a run counts)")
    run.add_argument("--devices", type=device_list, metavar="0,1,...",
                     help="GPUs to run on, one run per GPU at a time (default: every visible GPU)")
    run.add_argument("--parallel", type=int_in(1, 1024), default=1, metavar="N",
                     help="CPU runs at once (needs --shared-timing; default 1)")
    run.add_argument("--timings", action="store_true",
                     help="after each run, where its wall time went: start (fork), data, model, warm-up, "
                          "memory and FLOP steps, timed steps, evaluation, the rest")
    run.add_argument("--shared-timing", action="store_true",
                     help="allow --parallel CPU runs; their rows are marked and their timing not compared")
    add_run_arguments(run)  # --executor, --slurm KEY=VALUE, --wait
    run.set_defaults(func=cmd_run)
    lister = sub.add_parser("list", help="list registered tricks, models or datasets")
    lister.add_argument("what", choices=["tricks", "models", "datasets"])
    lister.set_defaults(func=cmd_list)
    add_report(sub)  # report DIR, index RESULTS_DIR
    add_diagnose(sub)
    add_aa(sub)
    add_regression_check(sub)  # compare BASE NEW, check MATRIX --baseline FILE, baseline record|update
    add_power(sub)  # power A/A-RESULTS: the timing tier's false alarms and detection rates
    add_history(sub)  # history record|backfill|show: performance across commits
    add_bisect(sub)  # bisect MATRIX --good --bad --metric: the first commit that moved it
    add_collect_status(sub)  # collect DIR, status DIR (cluster runs)
    add_selfcheck(sub)  # selfcheck --device cuda|cpu: GPU readiness
    add_attention_memory(sub)  # attention-memory: memory vs sequence length per attention kernel
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (one line, code 2) and --help (code 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        check_environment()
        with termination_as_exception():  # every verb stops on SIGTERM/SIGHUP as `run` does
            return args.func(args)
    except Terminated as stopped:  # `run` says more itself; files are written whole or not at all
        print(f"stopped by {stopped}: trickbench {args.command} ended before it finished; no file was left "
              "half-written", file=sys.stderr)
        return 128 + stopped.signum
    except (ConfigError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. an --out the checks could not foresee (procfs), a missing dataset
        where = f"{shorten(str(err.filename), 120)[1:-1]}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130


def print_scaling(matrix: Matrix, rows: list[Row]) -> None:
    efficiencies = scaling_efficiency(rows)
    for cell in matrix.cells:
        world, efficiency = efficiencies.get(cell.cell_id, (1, None))
        if world > 1:
            print(f"scaling efficiency {efficiency:.2f} (throughput / {world} x world_size 1's): {cell.label()}")
