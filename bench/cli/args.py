"""Argument types shared by the verbs: each refuses a bad value in one line (argparse's error)."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from bench.base.safeyaml import shorten
from bench.parts.models import VIT_TINY_PATCH


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (its default prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message[:250]} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{shorten(text)} is not an integer >= 1")
    return value


def device_list(text: str) -> tuple[int, ...]:
    """``--devices 0,1,3``: distinct GPU indices."""
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        indices = ()
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"{shorten(text)} is not a list of distinct GPU indices such as 0,1,2,3")
    return indices


def image_size(text: str) -> int:
    """A side length that vit_tiny's patches tile (the argparse type of --image-sizes)."""
    value = positive_int(text)
    if value % VIT_TINY_PATCH:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of the patch size {VIT_TINY_PATCH}")
    return value
