"""Verbs that look inside one cell or check a machine: ``diagnose``, ``attention-memory`` and
``selfcheck``. Parsing only; each handler lives with the code it runs."""
from __future__ import annotations

from typing import Any

import torch

from bench.cli.args import float_in, image_size, int_in
from bench.diagnostics.attention_memory import IMAGE_SIZES, cmd_attention_memory
from bench.diagnostics.diagnose import PROFILE_STEPS, cmd_diagnose
from bench.diagnostics.selfcheck import cmd_selfcheck

LR = float_in(0, 1e6)  # learning rates of the LR range test: finite and above 0


def add_diagnose(subparsers: Any) -> None:
    parser = subparsers.add_parser("diagnose", help="LR-schedule, gradient-flow and layer-statistics figures of a "
                                   "cell (and a profiler trace), or an LR range test (--lr-finder)")
    parser.add_argument("matrix", help="ablation YAML file")
    parser.add_argument("--profile", help="a profile of the matrix file, e.g. cpu")
    parser.add_argument("--cell", help="cell id (see run --dry-run); default: the baseline")
    parser.add_argument("--steps", type=int_in(1, 100_000), default=20, help="training steps before reading gradients")
    parser.add_argument("--out", help="output folder (default results/<matrix>/diagnostics/)")
    parser.add_argument("--profile-trace", action="store_true",
                        help=f"also a torch.profiler Chrome trace of {PROFILE_STEPS} more steps and its top operators")
    parser.add_argument("--lr-finder", action="store_true", help="LR range test instead: loss-vs-LR figure and "
                        "a suggested learning rate")
    parser.add_argument("--min-lr", type=LR, default=1e-6, help="lr finder: first learning rate (default 1e-6)")
    parser.add_argument("--max-lr", type=LR, default=10.0, help="lr finder: last learning rate (default 10)")
    parser.add_argument("--finder-steps", type=int_in(1, 100_000), default=100,
                        help="lr finder: optimizer steps from min to max lr (default 100)")
    parser.set_defaults(func=cmd_diagnose)




def add_selfcheck(sub: Any) -> None:
    check = sub.add_parser("selfcheck", help="exercise every device path (GPU readiness), a few minutes, offline")
    check.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    check.add_argument("--out", help="folder for selfcheck.json and report.md (default results/gpu-<device name>)")
    check.set_defaults(func=cmd_selfcheck)


def add_attention_memory(subparsers: Any) -> None:
    parser = subparsers.add_parser("attention-memory", help="memory vs sequence length of each attention kernel")
    parser.add_argument("--out", default="results/attention", help="output folder (default results/attention/)")
    parser.add_argument("--batch-size", type=int_in(1, 65_536), default=32)
    parser.add_argument("--image-sizes", type=image_size, nargs="+", default=list(IMAGE_SIZES),
                        help="square input sides, multiples of 4 (default 16 32 48 64)")
    parser.set_defaults(func=cmd_attention_memory)
