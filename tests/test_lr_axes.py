"""lr_schedule and lr_warmup_steps are config fields that work as axes: validated per value, run,
recorded in the rows, and named in the report's cell labels and per-axis tables like tricks."""
from __future__ import annotations

import pytest

from bench.cli.main import main
from bench.parts.schedules import SCHEDULES
from bench.reports.report import build_report
from bench.store.results import read_rows

MATRIX = """
name: lr
base: {{model: tiny_cnn, dataset: digits, image_size: 8, batch_size: 256, steps: 8, warmup_steps: 1,
       optimizer: {{lr: 0.5}}}}
seeds: [0]
axes:
  lr_schedule: [constant, {schedule}]
  lr_warmup_steps: [0, {warmup}]
"""


def test_schedule_axes_run_are_recorded_and_labelled(write_matrix, tmp_path, monkeypatch, capsys):
    path = write_matrix(MATRIX.format(schedule="cosine", warmup=4))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    rows = read_rows(out / "cells.jsonl")
    assert all(r["status"] == "ok" for r in rows)
    runs = {(r["config"]["lr_schedule"], r["config"]["lr_warmup_steps"]): r for r in rows}
    assert set(runs) == {("constant", 0), ("cosine", 0), ("constant", 4)}
    # Same seed, same data order: only the learning rates differ, so the losses must too.
    losses = {key: r["final_train_loss"] for key, r in runs.items()}
    assert len(set(losses.values())) == 3, losses

    monkeypatch.setattr("bench.reports.report.write_figures", lambda stats, design, folder: ([], []))
    text = build_report(out).read_text()
    assert "### lr_schedule" in text and "### lr_warmup_steps" in text
    assert '| lr_schedule="cosine" |' in text and "| lr_warmup_steps=4 |" in text


@pytest.mark.parametrize("schedule, warmup, message", [
    ("cosin", 4, "axes.lr_schedule[1]: 'cosin' is not one of " + ", ".join(SCHEDULES) + " (did you mean 'cosine'?)"),
    ("cosine", -1, "axes.lr_warmup_steps[1]: -1 is out of range [0, 1e+09]"),
])
def test_bad_schedule_values_are_one_line_exit_2_nothing_written(write_matrix, tmp_path, capsys,
                                                                 schedule, warmup, message):
    path = write_matrix(MATRIX.format(schedule=schedule, warmup=warmup))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and message in err
    assert not out.exists()
