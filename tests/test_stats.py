"""bench.reports.stats: intervals checked against hand computations, the two significance gates, aggregates."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.regression.aa import pooled_step_verdict
from bench.reports.stats import (
    MIN_RUNS,
    all_cell_stats,
    cell_label,
    compare_runs,
    diff_ci,
    excludes,
    group_cells,
    infer_design,
    pareto_front,
    ran_under_load,
    summarize,
)

T_975_DF3 = 3.182446305284263  # Student-t 97.5% quantile, 3 degrees of freedom (from tables)


def test_summarize_matches_hand_computation():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(((1.5 ** 2) * 2 + (0.5 ** 2) * 2) / 3)  # sample std, n-1 = 3
    half = T_975_DF3 * std / math.sqrt(4)
    assert s["n"] == 4 and s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(std)
    assert s["ci_low"] == pytest.approx(2.5 - half) and s["ci_high"] == pytest.approx(2.5 + half)


def test_summarize_single_value_has_unknown_spread_not_zero():
    s = summarize([7.0])
    assert s["mean"] == 7.0 and s["n"] == 1
    assert math.isnan(s["std"]) and math.isnan(s["ci_low"]) and math.isnan(s["ci_high"])


def test_summarize_drops_missing_values_and_handles_empty():
    assert summarize([1.0, None, float("nan"), 3.0])["n"] == 2
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_diff_ci_matches_welch_hand_computation():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]  # equal variances: Welch df = 6
    diff, low, high = diff_ci(a, b)
    se = math.sqrt(2 * (5 / 3) / 4)
    t_975_df6 = 2.4469118511449692
    assert diff == pytest.approx(2.0)
    assert low == pytest.approx(2.0 - t_975_df6 * se) and high == pytest.approx(2.0 + t_975_df6 * se)


def test_excludes():
    assert excludes(1.1, 1.3, 1.0) and not excludes(0.9, 1.3, 1.0)
    assert not excludes(float("nan"), 2.0, 0.0)


def test_pareto_front_keeps_undominated_points_by_memory():
    memory = [10.0, 5.0, 8.0, 12.0, float("nan")]
    throughput = [100.0, 50.0, 40.0, 90.0, 500.0]
    assert pareto_front(memory, throughput) == [1, 0]


def _row(cell_id, axes, seed, status="ok", **metrics):
    return {"cell_id": cell_id, "axes": axes, "seed": seed, "status": status, **metrics}


def test_cell_aggregates_and_design_inference():
    base, other = {"a": 1, "b": False}, {"a": 2, "b": False}
    rows = [_row("x", base, 0, throughput_samples_per_s=100.0, peak_memory_bytes=2 ** 20),
            _row("y", other, 0, throughput_samples_per_s=300.0, peak_memory_bytes=2 ** 21),
            _row("x", base, 1, throughput_samples_per_s=100.0, peak_memory_bytes=2 ** 20),
            _row("y", other, 1, status="oom")]
    stats = all_cell_stats(rows)
    assert [s["label"] for s in stats] == ["baseline", "a=2"]
    assert stats[1]["n_ok"] == 1 and stats[1]["n_runs"] == 2
    assert stats[1]["speedup"].ratio == pytest.approx(3.0) and stats[1]["memory_ratio"] == pytest.approx(2.0)
    assert stats[1]["speedup"].too_few
    assert infer_design(stats) == "one_at_a_time"
    both = all_cell_stats(rows + [_row("z", {"a": 2, "b": True}, 0)])
    assert infer_design(both) == "full_factorial"
    assert cell_label({"a": 2, "b": True}, base) == "a=2, b=true"


# --- the decision on one value per run ---------------------------------------------------------------

def test_compare_runs_matches_scipy_welch_on_logs():
    from scipy import stats

    a, b = [10.0, 11.0, 10.4, 9.8], [12.5, 13.1, 12.0]
    c = compare_runs(a, b)
    reference = stats.ttest_ind(np.log(b), np.log(a), equal_var=False)
    assert c.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert c.ratio == pytest.approx(math.exp(np.log(b).mean() - np.log(a).mean()))
    ci = reference.confidence_interval(0.95)  # interval of the difference of log means
    assert (c.low, c.high) == pytest.approx((math.exp(ci.low), math.exp(ci.high)), rel=1e-9)
    assert c.significant and c.low > 1 and c.n_base == 4 and c.n_cell == 3


def test_compare_runs_detects_a_known_difference_at_enough_runs():
    rng = np.random.default_rng(0)
    base = rng.lognormal(0.0, 0.05, size=(200, 5))  # 200 experiments, 5 runs per cell, 5% run-to-run noise
    calls = [compare_runs(a, b) for a, b in zip(base, 1.2 * rng.lognormal(0.0, 0.05, size=(200, 5)))]
    assert np.mean([c.significant for c in calls]) > 0.95
    assert np.median([c.effect for c in calls]) == pytest.approx(0.2, abs=0.02)


def test_compare_runs_too_few_runs_makes_no_call_even_for_a_huge_difference():
    c = compare_runs([10.0, 10.1], [100.0, 101.0, 99.0])
    assert c.too_few and not c.significant and c.reason == "n=2: too few runs to call"
    assert c.ratio == pytest.approx(math.exp(np.log([100.0, 101.0, 99.0]).mean() - np.log([10.0, 10.1]).mean()))
    assert math.isnan(c.low) and math.isnan(c.high) and math.isnan(c.p_value)
    assert compare_runs([10.0] * MIN_RUNS, [20.0] * MIN_RUNS).significant  # at the minimum it does call


def test_compare_runs_small_effect_fails_the_effect_gate():
    base = np.random.default_rng(3).normal(100.0, 0.01, 8)
    c = compare_runs(base, base * 1.01)  # certainly different, but only 1%
    assert c.p_value < 1e-6 and c.effect == pytest.approx(0.01, abs=1e-6)
    assert not c.significant and "minimum" in c.reason


def test_compare_runs_drops_missing_and_has_no_data_case():
    assert compare_runs([1.0, None, float("nan"), 2.0, 3.0], [1.0, 2.0, 3.0]).n_base == 3
    empty = compare_runs([], [1.0, 2.0, 3.0])
    assert math.isnan(empty.ratio) and not empty.significant


def autocorrelated_runs(rng, runs, steps=60, run_sd=0.10, rho=0.9, step_sd=0.05, mean_ms=20.0):
    """Step times of ``runs`` runs of one config: each run has its own level (process placement, load
    at the time: sd ``run_sd`` on the log scale) and AR(1) step noise around it (slow drifts)."""
    out = []
    for _ in range(runs):
        noise, level = np.zeros(steps), rng.normal(0.0, run_sd)
        for i in range(1, steps):
            noise[i] = rho * noise[i - 1] + rng.normal(0.0, step_sd)
        out.append({"status": "ok", "step_times_ms": list(mean_ms * np.exp(level + noise))})
    for row in out:
        row["step_time_ms_median"] = float(np.median(row["step_times_ms"]))
    return out


def test_equal_run_means_with_autocorrelated_steps_are_not_flagged_but_pooling_flags_them():
    rng = np.random.default_rng(7)
    new, old = [], []
    for _ in range(300):  # 300 A/A experiments, 3 runs per "cell", same distribution on both sides
        a, b = autocorrelated_runs(rng, 3), autocorrelated_runs(rng, 3)
        new.append(compare_runs([r["step_time_ms_median"] for r in a], [r["step_time_ms_median"] for r in b]).significant)
        old.append(pooled_step_verdict(a, b))
    assert np.mean(new) <= 0.08  # the nominal 5% (binomial noise of 300 trials: ±2.5%)
    assert np.mean(old) >= 0.5  # the former method: pooled steps look like 180 independent samples


# --- load flag and baseline ------------------------------------------------------------------------

def test_ran_under_load_rule():
    def row(start, end, cores=2):
        return {"load_avg_1m_start": start, "load_avg_1m_end": end, "env": {"cpu_cores": cores}}

    assert ran_under_load(row(3.1, 2.0)) is True  # someone else's work before the run
    assert ran_under_load(row(0.3, 2.6)) is True  # and during it
    assert ran_under_load(row(2.0, 2.4)) is False  # the harness's own runs: at most its threads = cores
    assert ran_under_load(row(9.0, 9.0, cores=16)) is False
    assert ran_under_load(row(None, 2.6)) is True  # one reading is enough to flag
    assert ran_under_load({"env": {"cpu_cores": 2}}) is None  # an old row: unknown, not quiet
    assert ran_under_load({"load_avg_1m_start": 5.0, "load_avg_1m_end": 5.0}) is None  # cores unknown


def test_explicit_baseline_overrides_the_first_row():
    x, y = {"a": 1}, {"a": 2}
    rows = [_row("y", y, 0, throughput_samples_per_s=200.0), _row("x", x, 0, throughput_samples_per_s=100.0)]
    assert [c["cell_id"] for c in group_cells(rows)] == ["y", "x"]  # fallback: the first row's cell
    stats = all_cell_stats(rows, baseline_cell_id="x")
    assert [(s["cell_id"], s["label"], s["is_base"]) for s in stats] == [("x", "baseline", True), ("y", "a=2", False)]
    assert stats[1]["speedup"].ratio == pytest.approx(2.0)
    with pytest.raises(ValueError, match="'z' has no rows"):
        group_cells(rows, baseline_cell_id="z")


def test_cell_stats_mark_step_time_from_run_medians_not_pooled_steps():
    rng = np.random.default_rng(11)
    runs = autocorrelated_runs(rng, 8)
    base = [dict(r, cell_id="x", axes={"a": 1}, seed=i) for i, r in enumerate(runs[:4])]
    cell = [dict(r, cell_id="y", axes={"a": 2}, seed=i) for i, r in enumerate(runs[4:])]
    stats = all_cell_stats(base + cell)
    verdict = stats[1]["step_verdict"]
    assert verdict.n_base == verdict.n_cell == 4  # runs, not steps
    assert stats[1]["step_ms"] == pytest.approx(math.exp(np.mean(np.log([r["step_time_ms_median"] for r in cell]))))
    assert [run["under_load"] for run in stats[1]["runs"]] == [None] * 4 and stats[1]["n_load_unknown"] == 4
