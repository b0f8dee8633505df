"""Results that know their machine: resume measures this machine, reports and compare never pool
machines, and settings that do not change a run's computation keep its identity."""
from __future__ import annotations

import json

from bench.cli.main import main
from bench.config.matrix import load_matrix
from bench.execution import machine
from bench.regression.sides import load_side
from bench.reports.report import build_report, load_results, write_index
from bench.store.results import read_rows
from tests.conftest import TINY_MATRIX
from tests.test_report import BASE, ENV, ok_row, write_rows
from tests.test_results import fake_worker  # noqa: F401 - fixture

OTHER = {**ENV, "cpu_model": "Other CPU", "device_name": "Other CPU", "cpu_cores": 64, "hostname": "elsewhere"}


def test_the_fingerprint_covers_what_sets_speed_and_nothing_else():
    same = {**ENV, "hostname": "clone", "torch_threads": 1, "git_commit": "f" * 16, "python": "3.11.9",
            "driver": "x", "harness_version": "9"}
    assert machine.fingerprint(same) == machine.fingerprint(ENV)
    for field, value in (("cpu_model", "Other"), ("cpu_cores", 4), ("cpu_capability", "AVX512"),
                         ("torch", "2.6.0"), ("python", "3.12.1"), ("device", "cuda"), ("device_name", "GPU")):
        assert machine.fingerprint({**ENV, field: value}) != machine.fingerprint(ENV), field
    assert machine.fingerprint(None) == machine.UNKNOWN
    assert "Test CPU (2 cores, AVX2)" in machine.describe(ENV)


def move_rows_to_another_machine(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "env": {**r["env"], "cpu_model": "Other CPU"}}) + "\n" for r in rows))
    return len(rows)


def test_rows_of_another_machine_are_kept_but_not_resumed(write_matrix, tmp_path, fake_worker, capsys):
    path = write_matrix(TINY_MATRIX)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    runs = move_rows_to_another_machine(out / "cells.jsonl")
    capsys.readouterr()

    assert main(["run", str(path), "--out", str(out)]) == 0  # this machine measures its own
    text = capsys.readouterr().out
    assert f"({runs} run now)" in text and "measured on another machine" in text
    rows = read_rows(out / "cells.jsonl")
    assert len(rows) == 2 * runs  # the other machine's rows stay as reference
    assert sum(r["env"]["cpu_model"] == "Other CPU" for r in rows) == runs

    assert main(["run", str(path), "--out", str(out)]) == 0
    assert "(0 run now)" in capsys.readouterr().out  # now resumed: they are this machine's rows


def two_machine_rows():
    """The baseline and bf16 on two machines: 'Other CPU' first, 10x slower; then this one."""
    bf16 = {**BASE, "precision": "bf16"}
    rows = []
    for env, scale in ((OTHER, 0.1), (ENV, 1.0)):
        for seed in range(3):
            rows.append(ok_row("base", BASE, seed, 1000 * scale + seed, 100, 0.9, 10.0, env=env))
            rows.append(ok_row("bf16", bf16, seed, 2000 * scale + seed, 50, 0.9, 5.0, env=env))
    return rows


def test_a_report_over_two_machines_keeps_them_apart(tmp_path, monkeypatch):
    monkeypatch.setattr("bench.reports.report.write_figures", lambda stats, design, folder: ([], []))
    folder = write_rows(tmp_path / "results" / "toy", two_machine_rows())
    results = load_results(folder)
    assert {r["env"]["cpu_model"] for r in results.rows} == {"Test CPU"}  # the latest machine
    assert list(results.others) == [machine.fingerprint(OTHER)]
    text = build_report(folder).read_text()
    mine, others = text.split("## Results on other machines")
    assert f"Measured on machine `{machine.fingerprint(ENV)}`" in mine
    assert "| **baseline** | 3/3 | 1001" in mine and "| **baseline** | 3/3 | 101" not in mine
    assert f"### Machine `{machine.fingerprint(OTHER)}`" in others and "| **baseline** | 3/3 | 101" in others
    index = write_index(tmp_path / "results").read_text()
    assert "+ 1 other machine, reported apart" in index and "Other CPU" in index


def test_compare_takes_one_machine_of_a_folder(tmp_path, capsys):
    folder = write_rows(tmp_path / "toy", two_machine_rows())
    cells = load_side(folder)
    assert sorted(cells["base"].values["throughput_samples_per_s"].values()) == [1000, 1001, 1002]
    assert "other machine(s) left out" in capsys.readouterr().err


def test_run_settings_do_not_change_a_cell(write_matrix, tmp_path, fake_worker, capsys):
    path = write_matrix(TINY_MATRIX)
    ids = [c.cell_id for c in load_matrix(path).cells]
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    edited = TINY_MATRIX.replace("warmup_steps: 1}", "warmup_steps: 1, time_limit_s: 77, data_dir: elsewhere, "
                                 "download: true, memory_limit_mb: 4000, launcher: {nnodes: 1}}")
    edited_path = write_matrix(edited, "edited.yaml")
    assert [c.cell_id for c in load_matrix(edited_path).cells] == ids
    capsys.readouterr()
    assert main(["run", str(edited_path), "--out", str(out)]) == 0  # not an edited matrix: all resumed
    assert "(0 run now)" in capsys.readouterr().out
    # What a run computes does change it; and a run setting swept as an axis tells cells apart.
    assert load_matrix(write_matrix(TINY_MATRIX.replace("steps: 6", "steps: 7"), "s.yaml")).cells[0].cell_id != ids[0]
    sweep = load_matrix(write_matrix(TINY_MATRIX.replace("accumulation: [1, 2]", "memory_limit_mb: [100, 200]"), "c.yaml"))
    assert len({c.cell_id for c in sweep.cells}) == 2
