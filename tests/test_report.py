"""bench.reports.report on a hand-built cells.jsonl whose expected numbers are known in advance."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bench.cli.judging import add_report
from bench.reports.figures import plot_speedup_heatmap
from bench.reports.report import build_report, render_report, write_index
from bench.reports.stats import all_cell_stats
from bench.reports.tables import md_table

MIB = 2 ** 20
FIGURES = ["throughput_vs_memory", "accuracy", "speedup_heatmap", "memory_breakdown", "curves", "step_times"]
ENV = {"harness_version": "0.1.0", "git_commit": "abc123def4567890", "git_dirty": False, "python": "3.11.7",
       "torch": "2.5.0", "torchvision": "0.20.0", "cuda": None, "cudnn": None, "device": "cpu",
       "device_name": "Test CPU", "driver": None, "cpu_model": "Test CPU", "cpu_cores": 2, "torch_threads": 2,
       "cpu_capability": "AVX2", "hostname": "box"}
BASE = {"precision": "fp32", "checkpointing": False}


def ok_row(cell_id, axes, seed, throughput, peak_mib, accuracy, step_ms, loss=0.5, env=None):
    """A successful row; step times scatter ±5% around ``step_ms`` and memory splits into parts."""
    peak = int(peak_mib * MIB)
    parts = {"parameters": peak // 10, "buffers": peak // 100, "optimizer_state": peak // 10,
             "gradients": peak // 10, "other": peak // 20}
    parts["activations"] = peak - sum(parts.values())
    steps = list(step_ms * np.random.default_rng(seed).uniform(0.95, 1.05, 40))
    curve = [{"epoch": e, "step": 10 * e, "train_loss": loss * (4 - e), "elapsed_s": float(e),
              "accuracy_top1": accuracy - 0.1 * (3 - e), "accuracy_top5": 1.0} for e in (1, 2, 3)]
    return {"schema_version": 1, "matrix": "toy", "cell_id": cell_id, "seed": seed, "axes": axes,
            "config": {"batch_size": 64, **axes}, "status": "ok", "error": None, "failed_at_step": None,
            "throughput_samples_per_s": throughput, "step_time_ms_median": float(np.median(steps)),
            "step_time_ms_p10": float(np.percentile(steps, 10)), "step_time_ms_p90": float(np.percentile(steps, 90)),
            "step_times_ms": steps, "data_stall_fraction": 0.01, "warmup_time_s": 0.1, "peak_memory_bytes": peak,
            "memory_breakdown": parts, "flops_per_step": 10 ** 9, "achieved_tflops": 0.05, "peak_rss_bytes": 10 ** 9,
            "accuracy_top1": accuracy, "accuracy_top5": 1.0, "final_train_loss": loss, "curve": curve,
            "wall_time_s": 3.0, "env": dict(env or ENV)}


def failed_row(cell_id, axes, seed, status="oom", error="CUDA out of memory | tried 2 GiB", step=7):
    return {"schema_version": 1, "matrix": "toy", "cell_id": cell_id, "seed": seed, "axes": axes,
            "config": {"batch_size": 64, **axes}, "status": status, "error": error, "failed_at_step": step,
            "wall_time_s": 1.0, "env": dict(ENV)}


def toy_rows():
    """3 cells x 3 seeds, round-robin like the runner: bf16 doubles throughput and halves memory,
    checkpointing saves memory, and its seed 2 ran out of memory."""
    bf16, ckpt = {**BASE, "precision": "bf16"}, {**BASE, "checkpointing": True}
    rows = []
    for seed, jitter in enumerate((-5.0, 0.0, 5.0)):
        rows.append(ok_row("base", BASE, seed, 100 + jitter, 100, 0.90 + 0.01 * seed, 10.0))
        rows.append(ok_row("bf16", bf16, seed, 200 + 2 * jitter, 50, 0.92 + 0.01 * seed, 5.0, loss=0.4))
        rows.append(ok_row("ckpt", ckpt, seed, 80 + jitter, 40, 0.90 + 0.01 * seed, 12.5) if seed < 2
                    else failed_row("ckpt", ckpt, seed))
    return rows


def write_rows(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = write_rows(tmp_path_factory.mktemp("toy"), toy_rows())
    report = build_report(folder)
    return folder, report.read_text()


@pytest.fixture
def no_figures(monkeypatch):
    """For tests about text only: drawing the figures is the slow part of a report."""
    monkeypatch.setattr("bench.reports.report.write_figures", lambda stats, design, folder: ([], []))


def table_line(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {label} |"))


def test_report_shows_speedup_memory_ratio_and_accuracy_change(built):
    _, text = built
    bf16 = table_line(text, 'precision="bf16"')
    assert "2.00× [" in bf16 and "0.50×" in bf16 and "+2.0" in bf16
    assert "200 ± " in bf16  # throughput mean ± CI half-width
    ckpt = table_line(text, "checkpointing=true")
    assert "2/3" in ckpt and "0.40×" in ckpt and "0.78×" in ckpt  # seeds 0 and 1 only: 77.5 / 100


def test_marks_follow_the_gates(built):
    _, text = built
    bf16 = table_line(text, 'precision="bf16"').split(" | ")
    assert bf16[3].endswith("*")  # median step time halved: both gates pass
    assert bf16[8].startswith("2.00× [") and not bf16[8].endswith("*")  # one call per cell, on the step
    assert "Welch's t on the log per-run median step times" in text and "too few runs to call" in text  # the legend
    assert "bootstrap" not in text and "pooled" not in text.split("## Results")[1].split("###")[0].replace(
        "never pooled", "")


def test_too_few_runs_say_so_instead_of_a_mark(no_figures, tmp_path):
    rows = [r for r in toy_rows() if r["seed"] < 2]  # two seeds: bf16 is clearly 2x, but n=2
    text = build_report(write_rows(tmp_path, rows)).read_text()
    bf16 = table_line(text, 'precision="bf16"').split(" | ")
    assert bf16[3].endswith("(n=2: too few runs to call)") and "*" not in bf16[3]
    assert bf16[8] == "2.00×"  # no interval from two values either
    assert "2.00× throughput (n=2: too few runs to call)" in write_index(tmp_path).read_text()


def test_runs_under_load_are_marked_and_counted(no_figures):
    rows = toy_rows()
    for row in rows:
        row.update(load_avg_1m_start=1.0, load_avg_1m_end=2.2)  # the harness alone on 2 cores
    rows[3].update(load_avg_1m_start=4.5, load_avg_1m_end=5.0)  # baseline seed 1: someone else was busy
    del rows[4]["load_avg_1m_start"], rows[4]["load_avg_1m_end"]  # an old row: unknown
    text = render_report(rows, all_cell_stats(rows), [], [])
    assert "3/3, 1 under load" in table_line(text, "**baseline**")
    assert "| 3/3 |" in table_line(text, 'precision="bf16"')
    section = text.split("## Runs under competing load")[1].split("## Failed runs")[0]
    assert "1 of 8 ok runs ran under competing load" in section and "1 rows carry no load average" in section
    assert "| baseline | 1 | 4.50 | 5.00 | 2 |" in section


def test_old_rows_without_load_fields_report_unknown(built):
    _, text = built
    section = text.split("## Runs under competing load")[1].split("## Failed runs")[0]
    assert "0 of 8 ok runs" in section and "8 rows carry no load average" in section


def test_explicit_baseline_cell(no_figures, tmp_path):
    rows = toy_rows()
    folder = write_rows(tmp_path, rows)
    cells = ["bf16"] + [c for c in dict.fromkeys(r["cell_id"] for r in rows) if c != "bf16"]
    axes = {r["cell_id"]: r["axes"] for r in rows}
    record = {"schema_version": 2, "name": "toy", "source_file": "toy.yaml", "design": "one_at_a_time",
              "axes": {}, "seeds": sorted({r["seed"] for r in rows}), "baseline_cell_id": "bf16",
              "cells": [{"cell_id": c, "axes": axes[c]} for c in cells]}
    (folder / "matrix.json").write_text(json.dumps(record))
    text = build_report(folder).read_text()
    assert 'Baseline: the first cell of the matrix (precision="bf16", checkpointing=false)' in text
    base = table_line(text, 'precision="fp32"').split(" | ")
    fp32, bf16 = np.log([95.0, 100.0, 105.0]), np.log([190.0, 200.0, 210.0])
    ci = scipy_stats.ttest_ind(fp32, bf16, equal_var=False).confidence_interval(0.95)
    assert base[8] == f"0.50× [{np.exp(ci.low):.2f}, {np.exp(ci.high):.2f}]"  # fp32, now measured against bf16
    (folder / "matrix.json").unlink()
    assert "Baseline: the cell of the first row written" in build_report(folder).read_text()


def test_one_table_per_axis_with_the_baseline(built):
    _, text = built
    assert "### precision" in text and "### checkpointing" in text
    assert text.count("| **baseline** |") == 2


def test_failed_rows_are_listed(built):
    _, text = built
    failures = text.split("## Failed runs")[1].split("## Figures")[0]
    assert "| checkpointing=true | 2 | oom | 7 | CUDA out of memory \\| tried 2 GiB |" in failures


def test_environment_section_without_warning(built):
    _, text = built
    assert "Test CPU" in text and "2.5.0" in text and "abc123def456" in text
    assert "WARNING" not in text


def test_figures_exist_are_png_and_not_blank(built):
    import matplotlib.image as mpimg

    folder, text = built
    for name in FIGURES:
        path = folder / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = mpimg.imread(path)
        assert pixels.std() > 0.01, name
        rgb = (pixels[..., :3] * 255).astype(np.uint32)
        assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 8, name  # distinct colours
        assert f"(figures/{name}.png)" in text


def test_results_csv_is_refreshed(built):
    folder, _ = built
    assert len((folder / "results.csv").read_text().splitlines()) == 1 + 9


def test_warning_when_rows_mix_machines_and_versions():
    rows = toy_rows()
    rows[4] = dict(rows[4], env={**ENV, "hostname": "other-box", "torch": "2.6.0"})
    text = render_report(rows, all_cell_stats(rows), [], [])
    assert "WARNING: rows come from different machines" in text and "other-box" in text
    assert "WARNING: rows come from different library versions" in text and "2.6.0" in text
    assert "different commits" not in text
    rows[5] = dict(rows[5], env={**ENV, "git_commit": "fedcba9876543210"})
    assert "different commits" in render_report(rows, all_cell_stats(rows), [], [])


def test_note_when_seeds_disagree_on_throughput(built):
    _, text = built
    assert "throughput varies by more than" not in text
    rows = toy_rows()
    rows[3] = dict(rows[3], throughput_samples_per_s=300.0)  # baseline seed 1: a quiet machine at last
    text = render_report(rows, all_cell_stats(rows), [], [])
    assert "throughput varies by more than 25%" in text and "baseline (" in text


def test_cell_whose_runs_all_failed_still_appears():
    sam = {**BASE, "precision": "fp16"}
    rows = toy_rows() + [failed_row("fp16", sam, 0, status="diverged", error="loss is nan", step=3)]
    text = render_report(rows, all_cell_stats(rows), [], [])
    line = table_line(text, 'precision="fp16"')
    assert "0/1" in line and "—" in line
    assert "| diverged | 3 | loss is nan |" in text


def test_accuracy_figure_skipped_with_note_when_accuracy_is_null(tmp_path):
    rows = [dict(r, accuracy_top1=None, curve=[{k: v for k, v in p.items() if not k.startswith("accuracy")}
                                               for p in r.get("curve", [])]) for r in toy_rows()]
    text = build_report(write_rows(tmp_path, rows)).read_text()
    assert not (tmp_path / "figures" / "accuracy.png").exists()
    assert "accuracy.png skipped" in text and "(figures/curves.png)" in text


def test_full_factorial_has_main_effects_and_interactions(tmp_path, no_figures):
    rows = []
    for seed in (0, 1):
        for precision, p_speed in (("fp32", 1.0), ("bf16", 2.0)):
            for ckpt, c_speed in ((False, 1.0), (True, 0.5)):
                axes = {"precision": precision, "checkpointing": ckpt}
                rows.append(ok_row(f"{precision}-{ckpt}", axes, seed, 100 * p_speed * c_speed + seed, 100, 0.9,
                                   10.0 / (p_speed * c_speed)))
    text = build_report(write_rows(tmp_path, rows)).read_text()
    assert "full_factorial" in text and "### Main effects" in text and "### Interactions" in text
    assert 'precision="bf16", checkpointing=true' in text or 'checkpointing=true, precision="bf16"' in text
    assert '| "bf16" | 2.00× | 1.00× |' in text  # speedup pivot: bf16 doubles, checkpointing halves
    assert plot_speedup_heatmap(all_cell_stats(rows), "full_factorial", tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_rows_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cells.jsonl")):
        build_report(tmp_path)


def test_write_index_links_every_report(built, tmp_path, no_figures):
    folder, _ = built
    shutil.copy(folder / "cells.jsonl", write_rows(tmp_path / "core", []) / "cells.jsonl")
    write_rows(tmp_path / "nested" / "second", toy_rows()[:3])
    text = write_index(tmp_path).read_text()
    for link in ("(core/report.md)", "(nested/second/report.md)"):
        assert link in text
        assert (tmp_path / link.strip("()")).is_file()
    assert "8 ok / 1 failed (oom 1)" in text and "3 ok / 0 failed" in text
    assert 'fastest: precision="bf16"' in text and "2.00× throughput (faster)" in text
    assert "lowest peak memory: checkpointing=true" in text and "best top-1" in text


def test_cli_report_and_index(tmp_path, capsys, no_figures):
    parser = argparse.ArgumentParser()
    add_report(parser.add_subparsers(dest="command", required=True))
    folder = write_rows(tmp_path / "run", toy_rows()[:3])
    args = parser.parse_args(["report", str(folder)])
    assert args.func(args) == 0 and capsys.readouterr().out.strip() == str(folder / "report.md")
    args = parser.parse_args(["index", str(tmp_path)])
    assert args.func(args) == 0 and (tmp_path / "README.md").is_file()


def test_md_table_escapes_pipes_and_newlines():
    text = md_table(["a", "b"], [["x|y", "1\n2"]])
    assert text.splitlines() == ["| a | b |", "| :--- | ---: |", "| x\\|y | 1 2 |"]


def test_step_time_figure_is_the_same_when_rebuilt(tmp_path):
    """Reports are functions of the rows: the jittered per-run plot too, byte for byte."""
    from bench.reports.figures import plot_step_times

    stats = all_cell_stats(toy_rows())
    assert plot_step_times(stats, tmp_path / "a.png") and plot_step_times(stats, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_data_stall_column_where_an_input_pipeline_axis_varies(tmp_path, no_figures):
    """num_workers varies: its table shows each cell's mean data-stall fraction; precision's does not."""
    base = {**BASE, "num_workers": 0}
    workers, bf16 = {**base, "num_workers": 2}, {**base, "precision": "bf16"}
    rows = []
    for seed in range(3):
        rows += [dict(ok_row("base", base, seed, 100, 100, 0.9, 10.0), data_stall_fraction=0.4 + 0.1 * seed),
                 dict(ok_row("w2", workers, seed, 150, 100, 0.9, 7.0), data_stall_fraction=0.02),
                 ok_row("bf16", bf16, seed, 200, 50, 0.9, 5.0)]
    rows[-1].pop("data_stall_fraction")  # an old row without the field: no value, not a zero
    text = build_report(write_rows(tmp_path / "pipe", rows)).read_text()
    sections = text.split("### ")
    workers_table = next(s for s in sections if s.startswith("num_workers"))
    precision_table = next(s for s in sections if s.startswith("precision"))
    assert "data stall (%)" in workers_table and "data stall (%)" not in precision_table
    assert table_line(workers_table, "**baseline**").endswith("| 50.0 |")  # mean of 40, 50, 60 %
    assert table_line(workers_table, "num_workers=2").endswith("| 2.0 |")


def test_beyond_noise_section_says_what_is_and_is_not_beyond_seed_noise(built):
    _, text = built
    section = text.split("## Beyond seed noise?")[1].split("\n## ")[0]
    bf16 = next(line for line in section.splitlines() if line.startswith('- precision="bf16"'))
    # Step time halved past both gates; memory is deterministic; +2.0 pts with n=3 per side and a
    # per-run spread of 1 pt: Welch's interval is 2.0 ± 2.3, so it includes 0.
    assert "step faster (0.50×); throughput 2.00× [" in bf16 and "peak memory 0.50×" in bf16
    assert "top-1 within seed noise (+2.0 pts" in bf16
    ckpt = next(line for line in section.splitlines() if line.startswith("- checkpointing=true"))
    assert "too few runs to call" in ckpt and "peak memory 0.40×" in ckpt
