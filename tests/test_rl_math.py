"""lenvm_rl.rl_math: masked statistics, stop-token truncation, KL, PPO losses, the length term of the advantage."""

import math

import pytest
import torch

from lenvm_rl.rl_math import (
    add_length_advantages,
    clipped_policy_loss,
    clipped_value_loss,
    combine_advantages,
    kl_estimates,
    masked_mean,
    masked_var,
    masked_whiten,
    rms_normalize_length_advantages,
    scheduled_length_coef,
    truncate_after_stop_token,
    truncated_importance_weights,
)


def test_masked_mean_and_var_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    # mean 2, squares 1 + 0 + 1, unbiased: / (3 - 1)
    assert masked_var(values, mask).item() == pytest.approx(2 / 2)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("count", [0, 1])
def test_tiny_masks_give_finite_statistics(count):
    values = torch.tensor([4.0, 5.0])
    mask = torch.tensor([True, False]) if count else torch.tensor([False, False])
    assert torch.isfinite(masked_var(values, mask))
    whitened = masked_whiten(values, mask)
    assert torch.isfinite(whitened).all()
    assert torch.equal(whitened, torch.zeros(2))  # one entry is its own mean; padding is 0


def test_masked_whiten_by_hand_and_padding_invariance():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)
    expected = torch.tensor([[(1 - 2) / std, 0.0, (3 - 2) / std, 0.0]])
    torch.testing.assert_close(masked_whiten(values, mask, eps=0.0), expected)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False, eps=0.0), (expected + 2) * mask)
    changed = values.clone()
    changed[0, 3] = 1e6
    torch.testing.assert_close(masked_whiten(changed, mask), masked_whiten(values, mask))


def test_masked_whiten_uses_reduced_statistics():
    # Two processes holding the same shard: summing each statistic twice must equal whitening both shards together.
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    reduced = masked_whiten(values, mask, all_reduce=lambda tensor: 2 * tensor)
    together = masked_whiten(torch.cat([values, values]), torch.cat([mask, mask]))
    torch.testing.assert_close(reduced, together[:3])
    assert not torch.allclose(reduced, masked_whiten(values, mask))  # per-shard statistics differ


def test_truncate_after_stop_token_with_pad_equal_to_eos():
    eos = pad = 1
    responses = torch.tensor([[5, 1, 7, 8], [5, 6, 7, 8], [1, 1, 1, 1], [5, 6, 7, 1]])
    ids, mask, last, done = truncate_after_stop_token(responses, stop_token_id=eos, pad_token_id=pad)
    assert last.tolist() == [1, 3, 0, 3]
    assert done.tolist() == [True, False, True, True]
    assert mask.sum(1).tolist() == [2, 4, 1, 4]
    assert ids.tolist() == [[5, 1, 1, 1], [5, 6, 7, 8], [1, 1, 1, 1], [5, 6, 7, 1]]


def test_truncate_after_a_configured_stop_token():
    responses = torch.tensor([[5, 9, 1, 8]])  # 9 is the stop token, EOS (1) after it is cut
    ids, mask, last, done = truncate_after_stop_token(responses, stop_token_id=9, pad_token_id=0)
    assert ids.tolist() == [[5, 9, 0, 0]] and last.tolist() == [1] and done.tolist() == [True]


def test_kl_estimates_by_hand():
    logprobs, ref_logprobs = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimates(logprobs, ref_logprobs, "k1"), torch.tensor([0.5, -1.0]))
    log_r = torch.tensor([-0.5, 1.0])
    torch.testing.assert_close(kl_estimates(logprobs, ref_logprobs, "k3"), torch.exp(log_r) - 1 - log_r)
    assert (kl_estimates(logprobs, ref_logprobs, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_estimates(logprobs, ref_logprobs, "k2")


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), 50.0]])  # the third token is padding
    advantages = torch.tensor([[1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5 (not clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5) / 2)
    new.requires_grad_(True)
    clipped_policy_loss(new, old, advantages, mask, 0.2)[0].backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 2] == 0  # padding never overflows into the gradient


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[math.log(0.6), math.log(0.2), math.log(0.9), 7.0]])  # the last token is padding
    sampler = torch.tensor([[math.log(0.1), math.log(0.4), math.log(0.9), -7.0]])
    mask = torch.tensor([[True, True, True, False]])
    truncated = truncated_importance_weights(old, sampler, mask, clip_max=3.0)
    # 0.6 / 0.1 = 6 -> 3 (truncated); 0.2 / 0.4 = 0.5; 0.9 / 0.9 = 1; padding -> 1
    torch.testing.assert_close(truncated, torch.tensor([[3.0, 0.5, 1.0, 1.0]]))
    masked = truncated_importance_weights(old, sampler, mask, clip_max=3.0, mode="token_mask")
    torch.testing.assert_close(masked, torch.tensor([[0.0, 0.5, 1.0, 1.0]]))  # 6 > 3: the token is dropped
    with pytest.raises(ValueError, match="mode"):
        truncated_importance_weights(old, sampler, mask, 3.0, mode="sequence_mask")


def test_equal_engines_give_unit_weights_and_leave_the_loss_unchanged():
    torch.manual_seed(0)
    logprobs, old, advantages = -torch.rand(2, 5), -torch.rand(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    weights = truncated_importance_weights(old, old, mask, clip_max=2.0)
    assert torch.equal(weights, torch.ones(2, 5))
    plain, _ = clipped_policy_loss(logprobs, old, advantages, mask, 0.2)
    weighted, _ = clipped_policy_loss(logprobs, old, advantages, mask, 0.2, token_weights=weights)
    assert torch.equal(plain, weighted)


def test_token_weights_scale_each_tokens_policy_gradient_term():
    old, new = torch.zeros(1, 2), torch.zeros(1, 2, requires_grad=True)  # ratio 1: nothing clipped
    advantages, mask = torch.tensor([[1.0, 1.0]]), torch.tensor([[True, True]])
    weights = torch.tensor([[3.0, 0.5]], requires_grad=True)
    loss, _ = clipped_policy_loss(new, old, advantages, mask, 0.2, token_weights=weights)
    assert loss.item() == pytest.approx((-3.0 - 0.5) / 2)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-1.5, -0.25]]))  # d/dnew of -w * exp(new - old) / 2
    assert weights.grad is None  # the weights are constants of the loss


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.1, 9.0]])
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: max(0, (0.2 - 1)^2) = 0.64; token 1: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


# ---------------------------------------------------------------------- the length term of the advantage


def test_schedules_by_hand():
    constant = [scheduled_length_coef(u, 5, 0.4) for u in range(5)]
    assert constant == [0.4] * 5
    warmup = [scheduled_length_coef(u, 5, 0.4, "constant", warmup_steps=2) for u in range(5)]
    assert warmup == pytest.approx([0.0, 0.4 * 1 / 2, 0.4, 0.4, 0.4])
    decay = [scheduled_length_coef(u, 4, 0.4, "linear") for u in range(4)]
    assert decay == pytest.approx([0.4 * 4 / 4, 0.4 * 3 / 4, 0.4 * 2 / 4, 0.4 * 1 / 4])
    both = [scheduled_length_coef(u, 5, -0.3, "linear", warmup_steps=1) for u in range(5)]
    assert both == pytest.approx([0.0, -0.3 * 4 / 4, -0.3 * 3 / 4, -0.3 * 2 / 4, -0.3 * 1 / 4])
    with pytest.raises(ValueError, match="schedule"):
        scheduled_length_coef(3, 5, 0.4, "cosine")


def test_add_length_advantages_by_hand_and_invariances():
    advantages = torch.tensor([[0.5, -1.0, 0.0], [1.0, 0.2, -0.7]])
    length_advantages = torch.tensor([[0.3, -0.1, 9.0], [0.2, 0.4, 0.1]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rms = math.sqrt((0.3**2 + 0.1**2 + 0.2**2 + 0.4**2 + 0.1**2) / 5)  # real tokens only, mean not removed
    expected = torch.tensor(
        [
            [0.5 + 2 * 0.3 / rms, -1.0 + 2 * -0.1 / rms, 0.0],
            [1.0 + 2 * 0.2 / rms, 0.2 + 2 * 0.4 / rms, -0.7 + 2 * 0.1 / rms],
        ]
    )
    out = add_length_advantages(advantages, length_advantages, mask, coef=2.0)
    torch.testing.assert_close(out, expected)
    # The drift keeps its sign: an all-positive A_len moves every advantage up.
    shifted = add_length_advantages(advantages, torch.ones_like(advantages), mask, coef=1.0)
    torch.testing.assert_close(shifted, (advantages + 1.0) * mask)
    # Invariant to the scale of A_len (s is unitless); coefficient 0 is the identity, bit for bit.
    torch.testing.assert_close(add_length_advantages(advantages, 1e-2 * length_advantages, mask, 2.0), out)
    assert torch.equal(add_length_advantages(advantages, length_advantages, mask, 0.0), advantages * mask)
    # An all-zero A_len (nothing to learn) adds nothing and makes no NaN.
    assert torch.equal(add_length_advantages(advantages, torch.zeros_like(advantages), mask, 1.0), advantages * mask)


def test_rms_normalize_length_advantages_by_hand():
    length_advantages = torch.tensor([[3.0, -4.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    rms = math.sqrt((3.0**2 + 4.0**2) / 2)
    expected = torch.tensor([[3.0 / rms, -4.0 / rms, 0.0]])
    torch.testing.assert_close(rms_normalize_length_advantages(length_advantages, mask, eps=0.0), expected)


@pytest.mark.parametrize("seed", range(3))
def test_rms_normalize_has_unit_rms_and_ignores_masked_values(seed):
    generator = torch.Generator().manual_seed(seed)
    length_advantages = torch.randn(4, 7, generator=generator) * 1e-3 + 2e-4  # order 1 - gamma, with a drift
    mask = torch.rand(4, 7, generator=generator) > 0.3
    out = rms_normalize_length_advantages(length_advantages, mask)
    torch.testing.assert_close((out[mask] ** 2).mean(), torch.tensor(1.0))
    assert torch.all(out[~mask] == 0)
    changed = length_advantages.masked_fill(~mask, 1e6)  # values outside the mask change nothing
    torch.testing.assert_close(rms_normalize_length_advantages(changed, mask), out)
    # The mean is not removed: the sign of every token's credit survives.
    assert torch.equal(torch.sign(out[mask]), torch.sign(length_advantages[mask]))


def test_rms_normalize_all_reduce_pools_two_processes():
    first, second = torch.tensor([[1.0, 2.0]]), torch.tensor([[4.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    pooled = rms_normalize_length_advantages(torch.cat([first, second]), torch.ones(2, 2, dtype=torch.bool))
    other_sums = torch.stack([(second**2).sum(), torch.tensor(2.0)])
    out = rms_normalize_length_advantages(first, mask, all_reduce=lambda sums: sums + other_sums)
    torch.testing.assert_close(out, pooled[:1])


def test_rms_normalize_all_masked_and_all_zero_are_finite():
    zeros = torch.zeros(2, 3)
    assert torch.equal(rms_normalize_length_advantages(zeros, torch.ones(2, 3, dtype=torch.bool)), zeros)
    assert torch.equal(rms_normalize_length_advantages(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)), zeros)


def test_combine_advantages_by_hand_per_token_and_per_sequence():
    length_advantages = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    per_token = combine_advantages(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), length_advantages, coef=0.5)
    torch.testing.assert_close(per_token, torch.tensor([[1.0 + 0.25, 2.0 - 0.5], [3.0 + 1.0, 4.0 + 0.0]]))
    per_sequence = combine_advantages(torch.tensor([1.0, -1.0]), length_advantages, coef=0.5)
    torch.testing.assert_close(per_sequence, torch.tensor([[1.0 + 0.25, 1.0 - 0.5], [-1.0 + 1.0, -1.0 + 0.0]]))
    mask = torch.tensor([[True, False], [True, True]])
    masked = combine_advantages(torch.tensor([1.0, -1.0]), length_advantages, coef=0.5, response_mask=mask)
    torch.testing.assert_close(masked, per_sequence * mask)


@pytest.mark.parametrize("seed", range(3))
def test_combine_advantages_is_linear_in_the_coefficient(seed):
    generator = torch.Generator().manual_seed(seed)
    advantages, length_advantages = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    one, two = (combine_advantages(advantages, length_advantages, coef) for coef in (1.0, 2.0))
    torch.testing.assert_close(two - one, one - advantages)


def test_combine_advantages_coefficient_zero_never_reads_the_length_term():
    advantages = torch.tensor([1.0, -1.0])
    nan_length_advantages = torch.full((2, 3), float("nan"))
    assert combine_advantages(advantages, nan_length_advantages, coef=0.0) is advantages
    out = add_length_advantages(torch.ones(2, 3), nan_length_advantages, torch.ones(2, 3, dtype=torch.bool), 0.0)
    assert torch.isfinite(out).all()
