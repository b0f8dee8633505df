"""Every `trickbench` command in the README and docs/ still works: `run` commands expand their
matrix (--dry-run), `list` runs as written, every other verb parses its arguments (--help).
Commands that need a GPU or a SLURM cluster may instead be refused in one clean line here."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from bench.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(?:\$ )?(?:trickbench|python -m bench|\.venv/bin/python -m bench)\s+(.*)$")
NEEDS_HARDWARE = re.compile(r"cuda|GPU|sbatch|slurm", re.IGNORECASE)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        in_block = False
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            while line.endswith("\\") and number < len(lines):  # a command continued on the next line
                line = line[:-1] + " " + lines[number].strip()
                number += 1
            if in_block and (match := COMMAND.match(line.strip())):
                text = match.group(1).split(" #")[0]
                for part in re.split(r"\s*\|\s*(?:trickbench\s+)?", text):  # `a | b` alternatives or pipes
                    words = shlex.split(part)
                    if len(words) == 1 and found and found[-1][1][0] == "list":
                        words = ["list", *words]  # `list tricks | models | datasets`
                    found.append((f"{page.name}:{number}", words))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_commands_of_every_main_verb():
    verbs = {words[0] for _, words in COMMANDS}
    assert {"run", "list", "report", "check", "compare", "baseline", "diagnose", "status", "collect"} <= verbs


@pytest.mark.parametrize("where,words", COMMANDS, ids=[f"{w} {' '.join(c)}" for w, c in COMMANDS])
def test_documented_command_works(where, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    verb = words[0]
    if verb == "run" and Path(words[1]).is_file():
        argv = [*words, "--dry-run", "--out", str(tmp_path / "out")]
    elif verb == "list":
        argv = words
    else:
        argv = [*words, "--help"]
    code = main(argv)
    err = capsys.readouterr().err
    if code == 2 and not torch.cuda.is_available() and NEEDS_HARDWARE.search(err):
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        return  # a GPU or cluster command, refused cleanly on this machine
    assert code == 0, f"{where}: trickbench {' '.join(argv)}: {err}"
