"""The timing tier's false-alarm and power measurement (bench.regression.power) on synthetic A/A runs."""
import json

import numpy as np

from bench.cli.main import main
from bench.regression import power


def aa_rows(step_ms, cell="c"):
    """One ok row per run, seeds in time order; throughput as a batch of 32 over the step time."""
    return [{"schema_version": 2, "matrix": "aa", "cell_id": cell, "seed": i, "axes": {}, "status": "ok",
             "peak_memory_bytes": 1000, "step_time_ms_median": float(ms),
             "throughput_samples_per_s": 32_000 / float(ms)} for i, ms in enumerate(step_ms)]


def lognormal_runs(n=60, sigma=0.05, seed=1):
    return 20 * np.exp(np.random.default_rng(seed).normal(0, sigma, n))


def test_after_splits_are_disjoint_consecutive_blocks_in_time_order():
    splits = power.after_splits(13, 3)
    assert splits == [([0, 1, 2], [3, 4, 5]), ([6, 7, 8], [9, 10, 11])]


def test_noise_free_runs_detect_exactly_the_slowdowns_beyond_the_factor():
    """No spread: p is 0 for any shift, so only the factor gate decides (1.10 by default)."""
    result = power.timing_power(aa_rows([20.0] * 30), per_groups=[3], slowdowns=[0.05, 0.09, 0.11, 0.5], splits=50)
    assert set(result["metrics"]) == {"step_time_ms_median", "throughput_samples_per_s"}
    for metric in result["metrics"]:
        r = result["metrics"][metric]["3"]
        assert all(rate["hits"] == 0 for rate in r["false_alarms"].values())
        assert {d: rate["rate"] for d, rate in r["detected"].items()} == {"0.05": 0, "0.09": 0, "0.11": 1, "0.5": 1}
        assert power.smallest_detected(r["detected"]) == "0.11"


def test_a_slowdown_lowers_throughput_and_is_judged_regressed_not_improved():
    assert power.slowed("throughput_samples_per_s", 100.0, 0.25) == 80.0
    assert power.slowed("step_time_ms_median", 100.0, 0.25) == 125.0


def test_detection_grows_with_the_slowdown_and_reaches_certainty_on_a_quiet_machine():
    result = power.timing_power(aa_rows(lognormal_runs(sigma=0.05)), per_groups=[3, 5], splits=300)
    for by_n in result["metrics"].values():
        for r in by_n.values():
            rates = [rate["rate"] for rate in r["detected"].values()]
            assert rates == sorted(rates)
            assert rates[0] < 0.5 and rates[-1] == 1.0
            assert r["false_alarms"]["random"]["rate"] < 0.05  # both gates: rarer than alpha alone
    # more runs a side: at least as powerful at every slowdown
    for by_n in result["metrics"].values():
        assert all(by_n["5"]["detected"][d]["rate"] >= by_n["3"]["detected"][d]["rate"] for d in by_n["3"]["detected"])


def test_drift_between_recording_and_checking_makes_after_alarms_that_interleaving_avoids():
    """The machine gets 30% slower half-way (another job starts): comparing the runs before with the
    runs after cries wolf at the boundary; dealing the same runs A, B, A, B does not."""
    step_ms = np.concatenate([lognormal_runs(3, 0.02, 1), 1.3 * lognormal_runs(9, 0.02, 2)])
    alarms = power.timing_power(aa_rows(step_ms), per_groups=[3], splits=10)["metrics"]["step_time_ms_median"]["3"]
    assert alarms["false_alarms"]["after"]["hits"] == 1  # runs 0-2 against 3-5: across the change
    assert alarms["false_alarms"]["interleaved"]["hits"] == 0


def test_cli_prints_both_tables_and_refuses_rows_of_several_cells(tmp_path, capsys):
    (tmp_path / "aa").mkdir()
    (tmp_path / "aa" / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in aa_rows(lognormal_runs(12))))
    assert main(["power", str(tmp_path / "aa"), "--splits", "20", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "false alarms" in out and "smallest ≥ 90%" in out
    assert json.loads((tmp_path / "p.json").read_text())["runs"] == 12
    mixed = aa_rows(lognormal_runs(6)) + aa_rows(lognormal_runs(6), cell="other")
    (tmp_path / "aa" / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert main(["power", str(tmp_path / "aa")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "2 cells" in err and len(err.strip().splitlines()) == 1
