"""`trickbench list tricks` shows every registered trick with its values, in aligned columns."""
from __future__ import annotations

from bench.cli import main
from bench.tricks import TRICKS


def test_list_tricks_shows_every_trick_aligned(capsys):
    assert main(["list", "tricks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(TRICKS.names())
    names, values = lines[0::2], lines[1::2]
    column = len(max(TRICKS.names(), key=len)) + 1  # where descriptions and values start
    for entry, name_line, values_line in zip(TRICKS, names, values):
        assert name_line[:column].rstrip() == entry.name
        assert name_line[column:] == entry.description
        assert values_line[:column].strip() == "" and values_line[column:] == f"values: {entry.obj.values_help}"
