"""The instruction-count tier: its margin and verdicts on synthetic counts (fast), and one real
count under valgrind (slow, opt-in like the tier itself)."""
import json
import shutil
import statistics
from pathlib import Path

import pytest

from bench.cli.main import main
from bench.regression import compare as cmp
from bench.regression import instructions as ins
from bench.regression import sides
from bench.regression.baseline import baseline_document, updated_document, without_instructions

FINGERPRINT = {"torch": "2.14.1", "python": "3.11.9", "cpu_model": "CPU A", "cpu_capability": "AVX2",
               "valgrind": "valgrind-3.19.0", "device": "cpu", "schema_version": 2}
COUNT = 40_000_000


def cell(count, spread=0.0, **env):
    return {"c1": cmp.CellRecord("c1", "sam=null", {"sam": None}, {**FINGERPRINT, **env},
                                 {ins.METRIC: {"0": count}}, spreads={ins.METRIC: spread})}


def judged(base, new):
    found = cmp.compare_cells(base, new)
    return next(v for v in found if v.metric == ins.METRIC), cmp.exit_code(found)


def test_margin_is_the_wider_measured_spread_widened_and_never_below_the_floor():
    assert ins.margin(0.0, 0.0) == ins.MARGIN_FLOOR == ins.margin(None, None)
    assert ins.margin(0.002, 0.0005) == pytest.approx(ins.SPREAD_FACTOR * 0.002)
    assert ins.margin(0.0005, 0.002) == ins.margin(0.002, 0.0005)  # either side's noise counts
    assert ins.spread([100, 101, 99]) == pytest.approx(0.02)


@pytest.mark.parametrize("relative, expected", [
    (0.0, cmp.PASS), (0.5 * ins.MARGIN_FLOOR, cmp.PASS),
    (3 * ins.MARGIN_FLOOR, cmp.REGRESSED), (-3 * ins.MARGIN_FLOOR, cmp.IMPROVED)])
def test_a_count_beyond_the_margin_fails_either_way(relative, expected):
    verdict, code = judged(cell(COUNT), cell(round(COUNT * (1 + relative))))
    assert verdict.verdict == expected and verdict.tier == "instructions"
    assert verdict.fails == (expected != cmp.PASS) and code == int(expected != cmp.PASS)


def test_a_noisy_baseline_widens_the_margin():
    new = cell(round(COUNT * 1.01))  # +1%: a regression against quiet counts, noise against 0.5% spread
    assert judged(cell(COUNT, spread=0.0), new)[0].verdict == cmp.REGRESSED
    assert judged(cell(COUNT, spread=0.005), new)[0].verdict == cmp.PASS


@pytest.mark.parametrize("key", ["torch", "python", "cpu_model", "cpu_capability", "valgrind"])
def test_another_fingerprint_is_not_comparable_and_does_not_fail(key):
    verdict, code = judged(cell(COUNT), cell(COUNT * 2, **{key: "other"}))
    assert verdict.verdict == cmp.NOT_COMPARABLE and key in verdict.note and code == 0


def test_baseline_file_keeps_the_count_and_its_spread_and_update_moves_both():
    document = json.loads(json.dumps(baseline_document(cell(COUNT, spread=0.0002), "m", "cmd")))
    assert document["cells"]["c1"]["spreads"] == {ins.METRIC: 0.0002}
    back = sides.cells_from_baseline(document, "b.json")
    assert back["c1"].spreads == {ins.METRIC: 0.0002} and judged(back, cell(COUNT))[0].verdict == cmp.PASS
    updated, changes = updated_document(document, back, cell(COUNT * 2, spread=0.0001), cmp.Policy())
    assert len(changes) == 1 and ins.METRIC in changes[0]
    assert updated["cells"]["c1"]["metrics"][ins.METRIC] == COUNT * 2
    assert updated["cells"]["c1"]["spreads"][ins.METRIC] == 0.0001


def test_a_check_that_does_not_count_neither_judges_nor_drops_the_baseline_counts():
    base = without_instructions(cell(COUNT))
    new = cmp.CellRecord("c1", "sam=null", {}, dict(FINGERPRINT), {})
    assert all(v.metric != ins.METRIC for v in cmp.compare_cells(base, {"c1": new}))


def test_without_valgrind_the_tier_is_skipped_with_one_note(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    notes = []
    cells = cell(COUNT)
    cells["c1"].values.pop(ins.METRIC)
    assert ins.measure_cells(cells, {"c1": object()}, 0, 3, log=notes.append) is False
    assert notes == [ins.SKIPPED] and ins.METRIC not in cells["c1"].values


def test_instructions_on_a_results_folder_is_a_one_line_error_before_anything_runs(tmp_path, capsys):
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps(baseline_document(cell(COUNT), "m", "cmd")))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cells.jsonl").write_text("")
    assert main(["check", str(tmp_path / "results"), "--baseline", str(baseline), "--instructions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--instructions" in err[0]


# ---- real counts ---------------------------------------------------------------------------------

EXTRA_MATMUL = "_x = torch.ones(256, 256)\n_x @ _x  # injected: an extra matmul per step\n"


def tiny_config():
    from bench.config.train_config import TrainConfig

    return TrainConfig.from_dict({"model": "tiny_cnn", "dataset": "synthetic", "image_size": 8, "batch_size": 8,
                                  "num_samples": 64, "num_classes": 10, "steps": 4, "warmup_steps": 0})


def with_extra_matmul(tmp_path: Path) -> Path:
    """A copy of ``bench`` whose training step does one more 256×256 matmul."""
    shutil.copytree(Path(ins.__file__).parents[1], tmp_path / "bench")
    train = tmp_path / "bench" / "training" / "train.py"
    source = train.read_text()
    anchor = "    def compute_grads() -> torch.Tensor:\n"
    assert anchor in source
    body = "".join(" " * 8 + line for line in EXTRA_MATMUL.splitlines(keepends=True))  # compute_grads' body
    train.write_text(source.replace(anchor, anchor + body))
    return tmp_path


@pytest.mark.slow  # ~7 minutes on 2 cores: torch is imported under valgrind three times
@pytest.mark.skipif(ins.valgrind_version() is None, reason=ins.SKIPPED)
def test_real_counts_repeat_within_the_margin_and_an_extra_matmul_exceeds_it(tmp_path):
    counts = ins.count_step_instructions(tiny_config(), seed=0, repeats=2)
    assert min(counts) > 0
    tolerance = ins.margin(ins.spread(counts), None)
    base = statistics.median(counts)
    again = ins.count_step_instructions(tiny_config(), seed=0, repeats=1)  # another process, as in a check
    assert abs(again[0] - base) / base <= tolerance
    mutated = ins.count_step_instructions(tiny_config(), seed=0, repeats=1, root=with_extra_matmul(tmp_path))
    print(f"counts {counts}, another process {again}, with the extra matmul {mutated}; margin {tolerance:.3%}")
    assert (mutated[0] - base) / base > tolerance
