"""Argument types shared by the verbs: each refuses a bad value in one line (argparse's error)."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn

from bench.base.safeyaml import shorten
from bench.parts.models import VIT_TINY_PATCH


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (its default prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message[:250]} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused with the range otherwise (a count of
    10**12 splits or runs would run for ever or exhaust memory long before it said so)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{shorten(text)} is not an integer >= {low} and <= {high:,}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def float_in(low: float, high: float, low_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number in (low, high] (or [low, high]); nan and inf are refused."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (low < value <= high if low_open else low <= value <= high):  # False for nan
            raise argparse.ArgumentTypeError(f"{shorten(text)} is not a finite number in {interval}")
        return value

    parse.__name__ = "number"
    return parse


MAX_COUNT = 1_000_000  # steps, repeats, splits: beyond this a verb would not finish in a working day
positive_int = int_in(1, MAX_COUNT)


def device_list(text: str) -> tuple[int, ...]:
    """``--devices 0,1,3``: distinct GPU indices."""
    try:
        indices = tuple(int(part) for part in text.split(","))
    except ValueError:
        indices = ()
    if not indices or min(indices) < 0 or len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"{shorten(text)} is not a list of distinct GPU indices such as 0,1,2,3")
    return indices


MAX_IMAGE_SIZE = 1024  # vit_tiny at 1024 px: 65,537 tokens, an attention matrix of 17 GB a head and image


def image_size(text: str) -> int:
    """A side length that vit_tiny's patches tile (the argparse type of --image-sizes)."""
    value = int_in(VIT_TINY_PATCH, MAX_IMAGE_SIZE)(text)
    if value % VIT_TINY_PATCH:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of the patch size {VIT_TINY_PATCH}")
    return value
