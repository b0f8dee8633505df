"""Command line: ``trickbench run | list`` (also ``python -m bench``). Thin: parsing and printing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.config import ConfigError, load_matrix


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import OutputBusy, run_matrix

    matrix = load_matrix(args.matrix, profile=args.profile, device=None if args.device == "auto" else args.device)
    out_dir = Path(args.out) if args.out else Path("results") / matrix.name
    runs = matrix.runs()
    print(f"{matrix.name}: {len(matrix.cells)} cells x {len(matrix.seeds)} seeds = {len(runs)} runs "
          f"({matrix.design}) on {matrix.cells[0].config.device} -> {out_dir}")
    if args.dry_run:
        for cell in matrix.cells:
            print(f"  {cell.cell_id}  {cell.label()}")
        return 0
    try:
        rows = run_matrix(matrix, out_dir, fresh=args.fresh)
    except OutputBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"done: {len(rows) - len(failed)} ok, {len(failed)} failed; rows in {out_dir / 'cells.jsonl'}")
    for row in failed:
        print(f"  {row['status']}: cell {row['cell_id']} seed {row['seed']}: {row['error']}")
    return 1 if failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "tricks":
        from bench.tricks import TRICKS

        for entry in TRICKS:
            print(f"{entry.name:<15} {entry.description}\n{'':<15} values: {entry.obj.values_help}")
    elif args.what == "models":
        from bench.models import MODELS, torchvision_names

        for entry in MODELS:
            print(f"{entry.name:<20} {entry.description}")
        print(f"{'<torchvision name>':<20} any torchvision classification model: {', '.join(torchvision_names())}")
    else:
        from bench.data import DATASETS

        for entry in DATASETS:
            print(f"{entry.name:<15} {entry.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trickbench", description="Measure training tricks: speed, memory, accuracy.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an ablation matrix")
    run.add_argument("matrix", help="ablation YAML file")
    run.add_argument("--out", help="output folder (default results/<matrix name>/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    run.add_argument("--dry-run", action="store_true", help="print the expanded cells, run nothing")
    run.add_argument("--fresh", action="store_true", help="start over; previous rows are moved aside, not deleted")
    run.set_defaults(func=cmd_run)
    lister = sub.add_parser("list", help="list registered tricks, models or datasets")
    lister.add_argument("what", choices=["tricks", "models", "datasets"])
    lister.set_defaults(func=cmd_list)
    from bench import baseline, diagnose, report

    report.add_cli(sub)  # report DIR, index RESULTS_DIR
    diagnose.add_cli(sub)
    baseline.add_cli(sub)  # compare BASE NEW, check MATRIX --baseline FILE, baseline record|update
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
