"""bench.regression.aa: how the A/A check splits runs, its binomial interval, and old vs new marks on synthetic runs."""
from __future__ import annotations

import numpy as np
import pytest

from bench.regression.aa import analyse, disjoint_splits, format_result, jackknife_se, judge, random_splits, rate


def test_disjoint_splits_interleave_like_the_runner_and_reuse_no_run():
    splits = disjoint_splits(13, 3)
    assert splits == [([0, 2, 4], [1, 3, 5]), ([6, 8, 10], [7, 9, 11])]  # run 12 left over
    used = [i for a, b in splits for i in a + b]
    assert len(used) == len(set(used))


def test_random_splits_are_distinct_runs_within_a_draw():
    for a, b in random_splits(10, 3, 50):
        assert len(set(a + b)) == 6 and all(0 <= i < 10 for i in a + b)


def test_rate_has_the_exact_binomial_interval():
    zero = rate(0, 10)
    assert zero["rate"] == 0 and zero["ci_low"] == 0
    assert zero["ci_high"] == pytest.approx(1 - 0.025 ** (1 / 10))  # Clopper–Pearson upper bound for 0/n
    assert rate(10, 10)["ci_low"] == pytest.approx(0.025 ** (1 / 10))


def synthetic_runs(count, seed=0, steps=40):
    """Runs of one config: each run's level differs (sd 10% on the log scale), steps drift (AR(1))."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        noise = np.zeros(steps)
        for k in range(1, steps):
            noise[k] = 0.9 * noise[k - 1] + rng.normal(0.0, 0.05)
        steps_ms = 20.0 * np.exp(rng.normal(0.0, 0.1) + noise)
        rows.append({"seed": i, "status": "ok", "step_times_ms": list(steps_ms),
                     "step_time_ms_median": float(np.median(steps_ms)),
                     "throughput_samples_per_s": 64_000 / float(np.mean(steps_ms))})
    return rows


def test_analyse_counts_false_marks_of_the_new_and_the_former_method():
    result = analyse(synthetic_runs(60), per_group=3, splits=300)
    assert result["disjoint"]["call"]["total"] == 10 and result["random"]["call"]["total"] == 300
    assert result["random"]["call"]["rate"] <= 0.08  # per-run Welch: near the nominal 5%
    assert result["random"]["old_either"]["rate"] >= 0.5  # pooled steps / bootstrap of 3 values
    assert result["runs_load_unknown"] == 60
    assert "random splits (runs reused: not independent)" in format_result(result)


def test_judge_marks_a_real_difference():
    rows = synthetic_runs(6, seed=1)
    slow = [dict(r, step_time_ms_median=2 * r["step_time_ms_median"],
                 throughput_samples_per_s=r["throughput_samples_per_s"] / 2) for r in rows[3:]]
    verdict = judge(rows[:3], slow)
    assert verdict["call"] and verdict["interval"]
    assert not judge(rows[:3], rows[:3])["call"]


def test_jackknife_se_is_zero_without_variation_and_positive_when_one_run_drives_the_calls():
    pairs = random_splits(12, 3, 200)
    assert jackknife_se(pairs, [False] * len(pairs), 12) == 0.0
    hits = [0 in a + b for a, b in pairs]  # "false calls" whenever run 0 takes part: a bad run
    assert jackknife_se(pairs, hits, 12) > 0.05
