"""The pure tensor functions of the PPO trainer: masked statistics, stop-token truncation, KL, PPO losses."""

import math

import pytest
import torch

from lenvm_rl.trainers.utils import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimates,
    masked_mean,
    masked_var,
    masked_whiten,
    truncate_after_stop_token,
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


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.1, 9.0]])
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: max(0, (0.2 - 1)^2) = 0.64; token 1: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
