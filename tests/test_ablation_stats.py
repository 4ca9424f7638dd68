"""lenvm_rl.ablation_stats: hand-computed cases, invariances and edge cases of the ablation's statistics."""

import math
import random

import numpy as np
import pytest

from lenvm_rl.ablation_stats import (
    format_interval,
    hierarchical_bootstrap,
    interval,
    matched_accuracy_tokens,
    per_problem_means,
    prompt_mre_statistics,
    removable_share,
    row_statistics,
    run_problem_values,
    tokens_at_accuracy,
)


def evaluation(correct, lengths, num_samples):
    return {"correct": correct, "lengths": lengths, "num_samples": num_samples}


# ---------------------------------------------------------------------- per-problem means and the bootstrap


def test_per_problem_means_keeps_completions_of_a_problem_together():
    # Problem-major order: completions 0-2 belong to problem 0.
    assert per_problem_means([1, 0, 1, 0, 0, 1], num_samples=3).tolist() == [2 / 3, 1 / 3]
    with pytest.raises(ValueError, match="multiple of num_samples=4"):
        per_problem_means([1, 2, 3], num_samples=4)


def test_bootstrap_over_seeds_hand_computed():
    # Two seeds, one problem each, values 0 and 1: a resample draws two seeds with replacement, so its mean is 0, 0.5
    # or 1 with probabilities 1/4, 1/2, 1/4.
    runs = [{"x": np.array([0.0])}, {"x": np.array([1.0])}]
    samples = hierarchical_bootstrap(runs, num_resamples=20000, rng=np.random.default_rng(1))["x"]
    frequencies = [np.mean(samples == value) for value in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(frequencies, [1 / 4, 1 / 2, 1 / 4], atol=0.015)


def test_bootstrap_over_problems_hand_computed():
    # One seed, two problems 0 and 1: the seed draw is trivial, the problem draw gives 0, 0.5, 1 as above.
    samples = hierarchical_bootstrap([{"x": np.array([0.0, 1.0])}], 20000, np.random.default_rng(2))["x"]
    np.testing.assert_allclose([np.mean(samples == v) for v in (0.0, 0.5, 1.0)], [1 / 4, 1 / 2, 1 / 4], atol=0.015)


def test_bootstrap_resamples_keys_jointly_and_shifts_with_the_data():
    rng = np.random.default_rng(0)
    runs = [{"x": rng.normal(size=20), "y": rng.normal(size=20)} for _ in range(3)]
    paired = [{"x": run["x"], "x_plus_5": run["x"] + 5.0} for run in runs]
    samples = hierarchical_bootstrap(paired, 500, np.random.default_rng(3))
    # The same seeds and problems for every key: the paired difference is exactly 5 in every resample.
    np.testing.assert_allclose(samples["x_plus_5"] - samples["x"], 5.0)
    # A key's resamples do not depend on the other keys (same generator seed).
    alone = hierarchical_bootstrap([{"x": run["x"]} for run in runs], 500, np.random.default_rng(3))["x"]
    np.testing.assert_array_equal(alone, samples["x"])
    # Constant data: every resample is the constant.
    constant = hierarchical_bootstrap([{"x": np.full(7, 2.5)}] * 3, 100)["x"]
    np.testing.assert_array_equal(constant, 2.5)


def test_bootstrap_refuses_mismatched_runs():
    with pytest.raises(ValueError, match="at least one run"):
        hierarchical_bootstrap([])
    with pytest.raises(ValueError, match="same keys"):
        hierarchical_bootstrap([{"x": np.zeros(2)}, {"y": np.zeros(2)}])


def test_interval_percentiles_and_nan():
    # 0..100: the 2.5th / 97.5th percentiles are 2.5 and 97.5 (linear interpolation between order statistics).
    bounds = interval(50.0, np.arange(101.0))
    assert bounds["mean"] == 50.0
    assert bounds["ci_low"] == pytest.approx(2.5) and bounds["ci_high"] == pytest.approx(97.5)
    assert interval(1.0, np.array([np.nan, 1.0, np.nan])) == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert interval(1.0, np.array([np.nan])) == {"mean": 1.0, "ci_low": None, "ci_high": None}


# ---------------------------------------------------------------------- removable verbosity


def test_removable_share():
    assert removable_share(40.0, 34.0, 30.0) == pytest.approx((40 - 34) / (40 - 30))
    assert removable_share(40.0, 40.0, 30.0) == 0.0  # no shorter than at the start
    assert removable_share(40.0, 30.0, 30.0) == 1.0  # as short as the floor
    assert removable_share(40.0, 45.0, 30.0) == pytest.approx(-0.5)  # longer than at the start
    assert removable_share(40.0, 25.0, 30.0) == pytest.approx(1.5)  # shorter than the floor
    assert math.isnan(removable_share(30.0, 25.0, 30.0))  # nothing removable
    shares = removable_share(np.array([40.0, 20.0]), np.array([35.0, 20.0]), np.array([30.0, 20.0]))
    assert shares[0] == pytest.approx(0.5) and math.isnan(shares[1])


# ---------------------------------------------------------------------- a row's statistics


def test_row_statistics_hand_computed_two_seeds():
    # Seed 0: accuracy 1/2 at 30 tokens; seed 1: accuracy 1 at 20 tokens; both start at 40 tokens, floor 10.
    seed0 = run_problem_values(
        before=evaluation([True, False], [40, 40], 1),
        after=evaluation([True, False], [30, 30], 1),
        floor_tokens=[10, 10],
    )
    seed1 = run_problem_values(
        before=evaluation([True, True], [40, 40], 1),
        after=evaluation([True, True], [20, 20], 1),
        floor_tokens=[10, 10],
    )
    stats, samples = row_statistics([seed0, seed1], num_resamples=300, rng=np.random.default_rng(0))
    assert stats["n_seeds"] == 2
    assert stats["accuracy"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert stats["accuracy"]["per_seed"] == [0.5, 1.0]
    assert stats["accuracy"]["seed_std"] == pytest.approx(math.sqrt(((0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) / 1))
    assert stats["mean_tokens"]["mean"] == pytest.approx(25.0)
    assert stats["tokens_vs_start"]["mean"] == pytest.approx(25 / 40 - 1)
    assert stats["removable_share"]["mean"] == pytest.approx((40 - 25) / (40 - 10))
    # Every resample lies between the seeds' extremes; start and floor are constant here.
    assert np.all((samples["mean_tokens"] >= 20) & (samples["mean_tokens"] <= 30))
    assert stats["removable_share"]["ci_low"] >= (40 - 30) / 30 - 1e-12
    assert stats["removable_share"]["ci_high"] <= (40 - 20) / 30 + 1e-12


def test_row_statistics_one_seed_all_correct():
    run = run_problem_values(evaluation([True] * 6, [5, 6, 7, 8, 9, 10], 2), evaluation([True] * 6, [4] * 6, 2))
    stats, _ = row_statistics([run], num_resamples=200)
    assert stats["n_seeds"] == 1 and stats["accuracy"]["seed_std"] == 0.0
    assert (stats["accuracy"]["ci_low"], stats["accuracy"]["mean"], stats["accuracy"]["ci_high"]) == (1.0, 1.0, 1.0)
    assert stats["mean_tokens"]["ci_low"] == stats["mean_tokens"]["ci_high"] == 4.0
    assert stats["tokens_vs_start"]["mean"] == pytest.approx(4 / 7.5 - 1)
    assert "removable_share" not in stats  # no floor given


def test_run_problem_values_refuses_different_problems():
    with pytest.raises(ValueError, match="same held-out problems"):
        run_problem_values(evaluation([True] * 4, [3] * 4, 2), evaluation([True] * 2, [3] * 2, 2))


# ---------------------------------------------------------------------- matched accuracy


def test_tokens_at_accuracy_interpolates_the_crossing():
    # Sorted by tokens: (20, 0.80) is below 0.86, (30, 0.88) above it: t = 20 + (0.86 - 0.80) * (30 - 20) / 0.08.
    found = tokens_at_accuracy([40.0, 30.0, 20.0], [0.90, 0.88, 0.80], target=0.86)
    assert found["reached"] and found["tokens"] == pytest.approx(20 + (0.86 - 0.80) * (30 - 20) / (0.88 - 0.80))
    # A point exactly at the target is its own crossing.
    assert tokens_at_accuracy([40.0, 30.0, 20.0], [0.9, 0.86, 0.8], 0.86)["tokens"] == pytest.approx(30.0)


def test_tokens_at_accuracy_ignores_the_order_of_the_points():
    rng = random.Random(0)
    points = [(40.0, 0.91), (35.0, 0.9), (31.0, 0.84), (28.0, 0.87), (22.0, 0.6)]
    expected = tokens_at_accuracy(*zip(*points), target=0.86)
    for _ in range(5):
        rng.shuffle(points)
        assert tokens_at_accuracy(*zip(*points), target=0.86) == expected
    # The first crossing from the short end: (22, 0.6) -> (28, 0.87), not the later dip at 31 tokens.
    assert expected["tokens"] == pytest.approx(22 + (0.86 - 0.6) * 6 / (0.87 - 0.6))


def test_tokens_at_accuracy_not_reached():
    # Every coefficient keeps the accuracy above the target: the shortest point is an upper bound, not a crossing.
    above = tokens_at_accuracy([40.0, 31.0, 30.0], [0.95, 0.97, 0.96], target=0.88)
    assert above == {"reached": False, "tokens": None, "side": "above", "bound": 30.0}
    # Even the mildest coefficient loses more than the target allows.
    below = tokens_at_accuracy([45.0, 55.0], [0.85, 0.80], target=0.88)
    assert below == {"reached": False, "tokens": None, "side": "below", "bound": None}
    assert tokens_at_accuracy([30.0], [0.9], 0.88)["side"] == "above"  # one point
    with pytest.raises(ValueError, match="as many tokens as accuracies"):
        tokens_at_accuracy([], [], 0.5)


def test_matched_accuracy_tokens_interval():
    points = [(40.0, 0.9), (20.0, 0.8)]
    # Resamples equal to the points: a zero-width interval at the crossing 20 + (0.85 - 0.8) * 20 / 0.1 = 30.
    constant = [(np.full(50, t), np.full(50, a)) for t, a in points]
    found = matched_accuracy_tokens(points, constant, target=0.85)
    assert found["reached"] and found["reached_fraction"] == 1.0
    assert found["tokens"] == found["ci_low"] == found["ci_high"] == pytest.approx(30.0)
    # Half the resamples shift the short point above the target: those do not cross, the others still give 30.
    shifted = [constant[0], (np.full(50, 20.0), np.where(np.arange(50) < 25, 0.8, 0.86))]
    found = matched_accuracy_tokens(points, shifted, target=0.85)
    assert found["reached_fraction"] == 0.5 and found["ci_low"] == found["ci_high"] == pytest.approx(30.0)
    # A sweep that never reaches the matched accuracy has no interval.
    never = matched_accuracy_tokens([(40.0, 0.8), (30.0, 0.7)], constant, target=0.85)
    assert not never["reached"] and never["side"] == "below" and never["ci_low"] is None


def test_format_interval():
    stat = interval(0.5, np.array([0.4, 0.6]), confidence=1.0)
    assert format_interval(stat, ".2f") == "0.50 [0.40, 0.60]"
    assert format_interval(stat, "+.0f", percent=True) == "+50% [+40%, +60%]"
    assert format_interval(interval(3.0, np.array([np.nan]))) == "3.0"
    assert format_interval(None) == ""


def test_prompt_mre_statistics_hand_computed_and_paired():
    true = np.array([100.0, 200.0, 50.0, 400.0])
    # The LenVM and the constant err together prompt by prompt: the difference is a constant 0.05 on every prompt, so
    # a paired interval has zero width while each MRE's own interval is wide.
    lenvm = true * (1 + np.array([0.1, 0.5, 0.2, 0.9]))
    constant = true * (1 + np.array([0.15, 0.55, 0.25, 0.95]))
    run = {"true_length": true, "predicted_length": lenvm, "constant_length": constant}
    stats = prompt_mre_statistics([run], num_resamples=500)
    assert stats["mre"]["lenvm"]["mean"] == pytest.approx(0.425)
    assert stats["mre"]["constant"]["mean"] == pytest.approx(0.475)
    assert stats["mre"]["lenvm"]["ci_high"] - stats["mre"]["lenvm"]["ci_low"] > 0.2
    difference = stats["lenvm_minus"]["constant"]
    assert difference["mean"] == pytest.approx(-0.05)
    assert difference["ci_low"] == pytest.approx(-0.05) and difference["ci_high"] == pytest.approx(-0.05)
    assert set(stats["lenvm_minus"]) == {"constant"}  # only the baselines every run has


def test_prompt_mre_statistics_over_two_lenvms_averages_them():
    true = [100.0, 200.0]
    runs = [
        {"true_length": true, "predicted_length": [110.0, 220.0], "regression_length": [100.0, 260.0]},
        {"true_length": true, "predicted_length": [130.0, 260.0], "regression_length": [100.0, 260.0]},
    ]
    stats = prompt_mre_statistics(runs, num_resamples=200)
    assert stats["mre"]["lenvm"]["mean"] == pytest.approx((0.1 + 0.3) / 2)
    assert stats["lenvm_minus"]["prompt_length_regression"]["mean"] == pytest.approx(0.2 - 0.15)


@pytest.mark.parametrize("true", [[], [100.0, 0.0], [100.0, float("nan")]])
def test_prompt_mre_statistics_refuses_lengths_it_cannot_divide_by(true):
    with pytest.raises(ValueError, match="positive lengths"):
        prompt_mre_statistics([{"true_length": true, "predicted_length": [1.0] * len(true)}])


def test_prompt_mre_statistics_needs_the_lenvm_column():
    with pytest.raises(ValueError, match="predicted_length"):
        prompt_mre_statistics([{"true_length": [100.0], "constant_length": [90.0]}])
