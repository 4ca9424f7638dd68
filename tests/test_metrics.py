"""Length-prediction metrics: hand-computed cases, invariances, edge cases and the baselines."""

import math

import pytest
import torch

from lenvm_rl.core import lengths_to_values
from lenvm_rl.metrics import (
    constant_baseline_value,
    fit_linear_prompt_length_baseline,
    fit_prompt_length_regression,
    predict_prompt_length_regression,
    prompt_boundary_mre,
    relative_length_error_at_fractions,
    remaining_length_baseline_errors,
    value_mse,
)


# ---------------------------------------------------------------- prompt_boundary_mre
def test_prompt_boundary_mre_by_hand():
    gamma = 0.5
    # Prompt A sampled lengths 1 and 3, prompt B length 2; predictions V_A = -0.75 (2 tokens), V_B = -0.5 (1 token).
    result = prompt_boundary_mre(torch.tensor([-0.75, -0.5]), [[1, 3], [2]], gamma)
    true_a = math.log(1 - ((1 - 0.5**1) + (1 - 0.5**3)) / 2) / math.log(0.5)  # log2(1 / 0.3125) = 1.678
    true_b = math.log(1 - (1 - 0.5**2)) / math.log(0.5)  # 2
    expected = (abs(2 - true_a) / true_a + abs(1 - true_b) / true_b) / 2
    assert result.mre == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(result.true_lengths, torch.tensor([true_a, true_b], dtype=torch.float64))
    torch.testing.assert_close(result.predicted_lengths, torch.tensor([2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(
        result.relative_errors, torch.tensor([abs(2 - true_a) / true_a, 0.5], dtype=torch.float64)
    )


def test_prompt_boundary_ground_truth_is_not_the_mean_length():
    # Jensen: the value-space mean of lengths 1 and 3 is 1.678 tokens, below their mean of 2.
    result = prompt_boundary_mre([-0.5], [[1, 3]], 0.5)
    assert float(result.true_lengths[0]) < 2.0


def test_prompt_boundary_mre_perfect_predictor_is_zero():
    g = torch.Generator().manual_seed(0)
    gamma = 0.97
    sampled = [torch.randint(1, 200, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g) for _ in range(20)]
    mus = torch.stack([(1 - gamma ** s.double()).mean() for s in sampled])
    result = prompt_boundary_mre(-mus, sampled, gamma)
    assert result.mre == pytest.approx(0.0, abs=1e-12)


def test_prompt_boundary_mre_invariant_to_completion_and_prompt_order():
    g = torch.Generator().manual_seed(1)
    gamma = 0.99
    sampled = [torch.randint(1, 300, (6,), generator=g) for _ in range(10)]
    values = -torch.rand(10, generator=g, dtype=torch.float64)
    reference = prompt_boundary_mre(values, sampled, gamma)
    shuffled = [s[torch.randperm(6, generator=g)] for s in sampled]
    assert prompt_boundary_mre(values, shuffled, gamma).mre == pytest.approx(reference.mre, rel=1e-12)
    order = torch.randperm(10, generator=g)
    permuted = prompt_boundary_mre(values[order], [sampled[i] for i in order], gamma)
    assert permuted.mre == pytest.approx(reference.mre, rel=1e-12)
    torch.testing.assert_close(permuted.true_lengths, reference.true_lengths[order])
    # A (P, N) tensor is read as P prompts of N completions.
    assert prompt_boundary_mre(values, torch.stack(sampled), gamma).mre == pytest.approx(reference.mre, rel=1e-12)


def test_prompt_boundary_mre_single_completion_ground_truth_is_its_length():
    result = prompt_boundary_mre([-0.5, -0.5], [[7], [1]], 0.9)
    torch.testing.assert_close(result.true_lengths, torch.tensor([7.0, 1.0], dtype=torch.float64))


def test_prompt_boundary_mre_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one sampled length"):
        prompt_boundary_mre([-0.5, -0.5], [[3], []], 0.9)
    with pytest.raises(ValueError, match=">= 1"):
        prompt_boundary_mre([-0.5], [[0, 3]], 0.9)
    with pytest.raises(ValueError, match="2 predicted values"):
        prompt_boundary_mre([-0.5, -0.5], [[3]], 0.9)


# ---------------------------------------------------------------- value_mse
def test_value_mse_by_hand_and_masked_values_change_nothing():
    values = torch.tensor([[-0.5, -0.2, 0.0], [-0.9, 0.0, 0.0]])
    returns = torch.tensor([[-0.75, -0.5, 0.0], [-0.875, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    expected = ((-0.5 + 0.75) ** 2 + (-0.2 + 0.5) ** 2 + 0.0**2 + (-0.9 + 0.875) ** 2) / 4
    assert float(value_mse(values, returns, mask)) == pytest.approx(expected, rel=1e-6)
    assert float(value_mse(values, returns, mask, reduction="sum")) == pytest.approx(4 * expected, rel=1e-6)
    garbage = values.masked_fill(~mask, float("nan"))
    assert float(value_mse(garbage, returns, mask)) == float(value_mse(values, returns, mask))


def test_value_mse_empty_mask():
    values, mask = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    assert float(value_mse(values, values, mask, reduction="sum")) == 0.0
    assert math.isnan(float(value_mse(values, values, mask)))


# ---------------------------------------------------------------- relative_length_error_at_fractions
def test_relative_length_error_by_hand():
    gamma = 0.5
    # One completion of L = 8 whose every state predicts 2 remaining tokens: V = -(1 - 0.5^2) = -0.75.
    values = torch.full((1, 9), -0.75)
    errors = relative_length_error_at_fractions(values, [8], gamma)
    # t = 0, 2, 4, 6 -> realised remaining 8, 6, 4, 2.
    expected = torch.tensor([abs(2 - 8) / 8, abs(2 - 6) / 6, abs(2 - 4) / 4, abs(2 - 2) / 2], dtype=torch.float64)
    torch.testing.assert_close(errors, expected)


def test_relative_length_error_of_the_realised_returns_is_zero():
    lengths = torch.tensor([5, 12, 1, 30])
    K = int(lengths.max()) + 1
    steps = torch.arange(K)
    remaining = (lengths[:, None] - steps[None, :]).clamp(min=0)
    values = lengths_to_values(remaining, 0.9).masked_fill(steps[None, :] > lengths[:, None], float("nan"))
    errors = relative_length_error_at_fractions(values, lengths, 0.9, reduction="none")
    defined = ~errors.isnan()
    assert torch.allclose(errors[defined], torch.zeros_like(errors[defined]), atol=1e-9)
    # L = 1: t = round(0.25) = 0 is the only non-terminal state; t = round(0.5) = round(0.75) = 1 is the end.
    assert defined[2].tolist() == [True, True, False, False]


def test_relative_length_error_skips_unavailable_states():
    gamma = 0.5
    values = torch.full((2, 9), -0.75)  # 2 remaining tokens predicted everywhere
    values[1, 2:] = float("nan")  # the second completion was cut by the window after s_1
    per_completion = relative_length_error_at_fractions(values, [8, 8], gamma, reduction="none")
    assert per_completion[1].isnan().tolist() == [False, True, True, True]
    narrow = relative_length_error_at_fractions(values[:1, :3], [8], gamma, reduction="none")  # only s_0 .. s_2
    assert narrow.isnan().tolist() == [[False, False, True, True]]
    mean = relative_length_error_at_fractions(values, [8, 8], gamma)
    torch.testing.assert_close(mean, per_completion[0])  # NaN entries leave the mean of the others


def test_relative_length_error_rejects_terminal_fraction():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        relative_length_error_at_fractions(torch.zeros(1, 3), [2], 0.9, fractions=(0.5, 1.0))


# ---------------------------------------------------------------- baselines
def test_constant_baseline_by_hand():
    value = constant_baseline_value([1, 2, 3], 0.5)
    assert float(value) == pytest.approx(-((1 - 0.5) + (1 - 0.25) + (1 - 0.125)) / 3)


def test_regression_recovers_an_exact_log_linear_relation():
    gamma = 0.95
    prompt_lengths = torch.tensor([3, 9, 27, 81, 3, 27])
    returns = -0.1 - 0.2 * prompt_lengths.double().log()  # exactly linear in log p; lengths need not be integers
    lengths = torch.log1p(returns) / math.log(gamma)
    coefficients = fit_prompt_length_regression(prompt_lengths, lengths, gamma)
    torch.testing.assert_close(coefficients, torch.tensor([-0.1, -0.2], dtype=torch.float64))
    torch.testing.assert_close(predict_prompt_length_regression(coefficients, prompt_lengths), returns)


def test_baselines_when_prompt_length_determines_length():
    gamma = 0.98
    length_of = {4: 5, 16: 60}  # the completion length is a function of the prompt length
    g = torch.Generator().manual_seed(2)
    train_prompts = torch.tensor([4] * 10 + [16] * 30)[torch.randperm(40, generator=g)]  # unbalanced
    train_lengths = torch.tensor([length_of[int(p)] for p in train_prompts])
    eval_prompts = [4, 16, 4, 16, 16]
    sampled = [[length_of[p]] * 4 for p in eval_prompts]

    coefficients = fit_prompt_length_regression(train_prompts, train_lengths, gamma)
    regression = prompt_boundary_mre(predict_prompt_length_regression(coefficients, eval_prompts), sampled, gamma)
    constant = prompt_boundary_mre(constant_baseline_value(train_lengths, gamma).expand(5), sampled, gamma)
    assert regression.mre == pytest.approx(0.0, abs=1e-9)
    assert constant.mre > 0.1


# ---------------------------------------------------------------- length_variance_explained
def test_length_variance_explained_by_hand():
    from lenvm_rl.length_metrics import length_variance_explained

    # Prompt means 10 and 30 with no noise: all variance is between prompts.
    assert length_variance_explained([[10, 10, 10], [30, 30, 30]]) == 1.0
    # Identical prompts: none of it is.
    assert length_variance_explained([[10, 30], [10, 30], [30, 10]]) == 0.0
    # Within variance 2 (per-prompt sample variance of [1, 3]); prompt means 2 and 12 have variance 50, of which
    # 2 / 2 is noise: share = (50 - 1) / (50 - 1 + 2).
    assert length_variance_explained([[1, 3], [11, 13]]) == pytest.approx(49 / 51)


def test_length_variance_explained_invariances():
    from lenvm_rl.length_metrics import length_variance_explained

    g = torch.Generator().manual_seed(0)
    prompt_means = torch.randint(20, 200, (30, 1), generator=g)  # (P, 1)
    lengths = prompt_means + torch.randint(0, 100, (30, 4), generator=g)  # (P, n): part prompt, part noise
    share = length_variance_explained(lengths)
    assert 0.0 < share < 1.0
    # The order of prompts and of completions within a prompt, a shift and a common scale change nothing.
    shuffled = lengths[torch.randperm(30, generator=g)][:, torch.randperm(4, generator=g)]
    assert length_variance_explained(shuffled) == pytest.approx(share)
    assert length_variance_explained(3 * lengths + 7) == pytest.approx(share)
    assert length_variance_explained(lengths.tolist()) == pytest.approx(share)


def test_length_variance_explained_edge_cases():
    from lenvm_rl.length_metrics import length_variance_explained

    assert math.isnan(length_variance_explained([[5], [7]]))  # no prompt with two completions
    assert length_variance_explained([[5, 5], [5, 5]]) == 0.0  # no variance at all
    # Prompts with one completion are ignored.
    assert length_variance_explained([[1, 3], [11, 13], [100]]) == pytest.approx(49 / 51)


def test_linear_prompt_length_baseline_by_hand():
    a, b = fit_linear_prompt_length_baseline([1, 2, 3, 4], [3, 5, 7, 9]).tolist()  # L = 1 + 2 p exactly
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)


def test_remaining_length_baseline_by_hand_and_edges():
    # train lengths 2, 4, 6; eval L = 4: t = 0 -> mean(2, 4, 6) = 4 vs 4; t = 1 -> mean(1, 3, 5) = 3 vs 3;
    # t = 2 -> mean(2, 4) = 3 vs 2; t = 3 -> mean(1, 3) = 2 vs 1
    errors = remaining_length_baseline_errors([2, 4, 6], [4], [0.0, 0.25, 0.5, 0.75])
    torch.testing.assert_close(errors, torch.tensor([[0.0, 0.0, 1 / 2, 1.0]], dtype=torch.float64))
    assert torch.isnan(remaining_length_baseline_errors([2], [8], [0.5]))[0, 0]  # no training completion that long
