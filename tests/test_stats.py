"""bench.stats: intervals checked against hand computations, the two significance gates, aggregates."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.stats import (all_cell_stats, cell_label, diff_ci, differs, excludes, infer_design, pareto_front,
                         ratio_ci, summarize)

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


def test_ratio_ci_is_ratio_of_means_with_reproducible_bracketing_interval():
    a, b = [95.0, 100.0, 105.0], [190.0, 200.0, 210.0]
    ratio, low, high = ratio_ci(a, b)
    assert ratio == pytest.approx(2.0)
    assert 1.8 < low < 2.0 < high < 2.2
    assert ratio_ci(a, b) == (ratio, low, high)  # seeded bootstrap: same rows, same interval


def test_ratio_ci_single_seed_has_no_interval():
    ratio, low, high = ratio_ci([100.0], [150.0, 160.0])
    assert ratio == pytest.approx(1.55) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in ratio_ci([], [1.0]))


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


def test_differs_clearly_separated_samples():
    rng = np.random.default_rng(1)
    verdict = differs(rng.normal(10.0, 0.5, 200), rng.normal(12.0, 0.5, 200))
    assert verdict.significant and verdict.p_value < 1e-6
    assert verdict.effect == pytest.approx(0.2, abs=0.03)


def test_differs_identical_distributions_not_significant():
    samples = np.random.default_rng(2).normal(10.0, 0.5, 200)
    verdict = differs(samples, samples.copy())
    assert not verdict.significant and verdict.p_value > 0.5
    assert "no detectable difference" in verdict.reason


def test_differs_small_effect_fails_the_effect_gate():
    base = np.random.default_rng(3).normal(100.0, 0.1, 500)
    verdict = differs(base, base * 1.01)  # certainly different, but only 1%
    assert verdict.p_value < 0.05 and verdict.effect == pytest.approx(0.01, abs=1e-3)
    assert not verdict.significant and "minimum" in verdict.reason


def test_differs_too_few_samples():
    assert not differs([1.0], [2.0, 3.0]).significant


def test_verdict_is_frozen():
    with pytest.raises(AttributeError):
        differs([1.0, 2.0], [3.0, 4.0]).significant = True


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
    assert stats[1]["speedup"][0] == pytest.approx(3.0) and stats[1]["memory_ratio"] == pytest.approx(2.0)
    assert infer_design(stats) == "one_at_a_time"
    both = all_cell_stats(rows + [_row("z", {"a": 2, "b": True}, 0)])
    assert infer_design(both) == "full_factorial"
    assert cell_label({"a": 2, "b": True}, base) == "a=2, b=true"
