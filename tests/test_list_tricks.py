"""`trickbench list tricks`: every registered trick, its one-line description and its values."""
from __future__ import annotations

from bench.cli.main import main
from bench.config.train_config import build_train_config
from bench.tricks import TRICKS


def test_every_trick_is_listed_with_description_and_values(capsys):
    assert main(["list", "tricks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Only a trick's own line starts at column 0: continuation lines of its values are indented.
    heads = [line for line in lines if line and not line[0].isspace()]
    assert [line.split()[0] for line in heads] == TRICKS.names()
    text = "\n".join(lines)
    for entry in TRICKS:
        description, values = entry.description.strip(), entry.obj.values_help.strip()
        assert description and "\n" not in description, entry.name
        assert values, entry.name
        assert any(line.split(maxsplit=1) == [entry.name, description] for line in heads), entry.name
        for value_line in values.splitlines():
            assert value_line.strip() in text, (entry.name, value_line)


def test_values_continuation_lines_align_under_the_first(capsys):
    main(["list", "tricks"])
    lines = capsys.readouterr().out.splitlines()
    multi = [i for i, line in enumerate(lines) if "values:" in line and i + 1 < len(lines)
             and not lines[i + 1].lstrip().startswith("values:") and lines[i + 1][:1].isspace()]
    assert multi, "expected at least one trick with multi-line values (augment)"
    for i in multi:
        assert lines[i + 1].index(lines[i + 1].strip()) == lines[i].index("values:") + len("values: ")


def test_null_is_off_for_every_trick_and_the_list_says_so(capsys):
    """``null`` parses to the trick's default ("off") for every registered trick, whatever else
    its values are (stochastic_depth and input_grad_penalty refused it before)."""
    for entry in TRICKS:
        config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "steps": 8, entry.name: None},
                                    "<test>")
        assert config.tricks[entry.name] == entry.obj.default, entry.name
    main(["list", "tricks"])
    blocks = capsys.readouterr().out.split("\n")
    heads = [i for i, line in enumerate(blocks) if line and not line[0].isspace()] + [len(blocks)]
    for start, end in zip(heads, heads[1:]):
        assert any(line.strip().startswith("null: off") for line in blocks[start:end]), blocks[start]
