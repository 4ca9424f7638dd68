"""Tests of lenvm_rl.core, three ways each: hand-computed arithmetic, random equivalences, edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenvm_rl.core import (
    compute_gae,
    gamma_for_length,
    length_advantages,
    length_returns,
    length_shaping_rewards,
    length_td_residuals,
    lengths_to_values,
    values_to_lengths,
)

# ---------------------------------------------------------------------------------------------------------
# Reference implementations: plain Python loops over one row, written straight from the method doc.
# ---------------------------------------------------------------------------------------------------------


def gae_by_hand(rewards, values, length, gamma, lam, terminated):
    """rewards: list of length >= L, values: list of length >= L + 1, one row."""
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(length)):
        next_value = 0.0 if (t == length - 1 and terminated) else values[t + 1]
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def random_batch(seed, B=4, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    values = -torch.rand(B, T + 1, generator=g, dtype=dtype)
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    terminated = torch.rand(B, generator=g) < 0.5
    return rewards, values, mask, lengths, terminated


# ---------------------------------------------------------------------------------------------------------
# lengths_to_values / values_to_lengths / gamma_for_length
# ---------------------------------------------------------------------------------------------------------


def test_lengths_to_values_by_hand():
    values = lengths_to_values(torch.tensor([0, 1, 3, 10]), 0.9)
    expected = torch.tensor([-(1 - 0.9**0), -(1 - 0.9**1), -(1 - 0.9**3), -(1 - 0.9**10)], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-15)


def test_values_to_lengths_by_hand():
    lengths = values_to_lengths(torch.tensor([-(1 - 0.9**3), -(1 - 0.9**10)], dtype=torch.float64), 0.9)
    torch.testing.assert_close(lengths, torch.tensor([3.0, 10.0], dtype=torch.float64))


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20_000), min_size=1, max_size=8),
    gamma=st.floats(0.5, 0.99999),
)
def test_lengths_values_round_trip(lengths, gamma):
    lengths = torch.tensor(lengths, dtype=torch.float64)
    values = lengths_to_values(lengths, gamma)
    assert bool(((values >= -1) & (values <= 0)).all())  # -1 only where gamma^l underflows float64
    # Round trip is exact up to float64 resolution of 1 + V near -1 (long lengths, small gamma).
    recovered = values_to_lengths(values, gamma)
    finite_range = values > -1 + 1e-9
    torch.testing.assert_close(recovered[finite_range], lengths[finite_range], rtol=1e-6, atol=1e-6)


def test_values_monotone_in_length():
    values = lengths_to_values(torch.arange(0, 5000), 0.997)
    assert bool((values[1:] < values[:-1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_to_lengths_finite_at_minus_one(dtype):
    values = torch.tensor([-1.0, -1.0 - 1e-3, -0.999999, 0.0, 1e-3], dtype=dtype)
    lengths = values_to_lengths(values, 0.997)
    assert lengths.dtype == dtype
    assert bool(torch.isfinite(lengths).all())
    assert lengths[0] > 1000  # at -1 the horizon is "very long", not infinite
    assert lengths[3] == 0 and lengths[4] == 0  # values above 0 clamp to zero length


def test_values_to_lengths_gamma_close_to_one():
    # 16k-token horizons with the paper's Qwen3 gamma: float64 keeps sub-token accuracy.
    lengths = torch.tensor([1.0, 16_000.0], dtype=torch.float64)
    torch.testing.assert_close(values_to_lengths(lengths_to_values(lengths, 0.9998), 0.9998), lengths)


def test_float32_matches_float64():
    lengths = torch.tensor([1.0, 50.0, 500.0])
    v32 = lengths_to_values(lengths, 0.997)
    v64 = lengths_to_values(lengths.double(), 0.997)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v64, rtol=1e-6, atol=1e-7)


def test_gamma_for_length_by_hand():
    assert gamma_for_length(100) == pytest.approx(0.01 ** (1 / 100))
    gamma = gamma_for_length(1535, coverage=0.99)
    assert 1 - gamma**1535 == pytest.approx(0.99)
    assert gamma_for_length(2, coverage=0.75) == pytest.approx(0.5)


@settings(max_examples=50, deadline=None)
@given(length=st.floats(1, 1e5), coverage=st.floats(0.01, 0.999))
def test_gamma_for_length_inverts(length, coverage):
    gamma = gamma_for_length(length, coverage)
    assert 0 < gamma < 1
    assert 1 - gamma**length == pytest.approx(coverage, rel=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 1.0, -0.5, 1.5, float("nan")])
def test_bad_gamma_is_a_clear_error(gamma):
    with pytest.raises(ValueError, match="gamma must be in"):
        lengths_to_values(torch.tensor([1.0]), gamma)
    with pytest.raises(ValueError, match="gamma must be in"):
        values_to_lengths(torch.tensor([-0.5]), gamma)


@pytest.mark.parametrize("length, coverage", [(0, 0.99), (-3, 0.99), (10, 1.0), (10, 0.0)])
def test_gamma_for_length_bad_input(length, coverage):
    with pytest.raises(ValueError):
        gamma_for_length(length, coverage)


# ---------------------------------------------------------------------------------------------------------
# length_returns
# ---------------------------------------------------------------------------------------------------------


def test_length_returns_by_hand_left_padded_prompt():
    # Row 0: pad, p, p | c, c, EOS  -> L = 3, targets from the last prompt token (column 2) to EOS (column 5).
    # Row 1: p, p, p | c, EOS, pad  -> L = 2.
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]).bool()
    out = length_returns(completion_mask, torch.tensor([True, True]), gamma=0.9)
    g = 0.9
    expected = torch.tensor(
        [
            [0, 0, -(1 - g**3), -(1 - g**2), -(1 - g**1), 0],
            [0, 0, -(1 - g**2), -(1 - g**1), 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out.returns, expected)
    assert out.returns.dtype == torch.float64
    assert out.mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]]
    assert out.censored.tolist() == [False, False]


def test_length_returns_censored_rows_get_no_target():
    completion_mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]]).bool()
    out = length_returns(completion_mask, torch.tensor([False, True]), gamma=0.5)
    assert out.censored.tolist() == [True, False]
    assert not out.mask[0].any()
    assert (out.returns[0] == 0).all()
    assert out.mask[1].tolist() == [True, True, True, False]


def test_length_returns_censored_bootstrap_by_hand():
    # A row cut after 2 tokens with V(s_2) = -0.5: G_t = -(1 - g^(2-t)) + g^(2-t) * V(s_2).
    g, v = 0.5, -0.5
    out = length_returns(
        torch.tensor([[0, 1, 1]]).bool(), torch.tensor([False]), gamma=g, bootstrap_values=torch.tensor([v])
    )
    expected = [-(1 - g**2) + g**2 * v, -(1 - g) + g * v, v]
    torch.testing.assert_close(out.returns[0], torch.tensor(expected, dtype=torch.float64))
    assert out.mask.tolist() == [[True, True, True]]
    assert out.censored.tolist() == [True]


def test_length_returns_bellman_consistent():
    # G_t = r + gamma * G_{t+1} along every target span, r = -(1 - gamma).
    gamma = 0.97
    completion_mask = torch.zeros(3, 40, dtype=torch.bool)
    completion_mask[0, 5:30] = True
    completion_mask[1, 1:2] = True
    completion_mask[2, 10:40] = True
    out = length_returns(completion_mask, torch.tensor([True, True, True]), gamma)
    for row in range(3):
        g = out.returns[row][out.mask[row]]
        torch.testing.assert_close(g[:-1], -(1 - gamma) + gamma * g[1:])
        assert g[-1] == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.integers(0, 5))
def test_length_returns_invariant_to_padding_shift(seed, shift):
    # Moving a sequence right by `shift` padding columns moves its targets by the same amount.
    _, _, _, lengths, terminated = random_batch(seed, B=3, T=6)
    mask = torch.zeros(3, 15, dtype=torch.bool)  # room for prompt (3) + completion (<= 6) + shift (<= 5)
    for i, length in enumerate(lengths.tolist()):
        mask[i, 3 : 3 + length] = True
    shifted = torch.roll(mask, shift, dims=1)
    base = length_returns(mask, terminated, 0.8)
    moved = length_returns(shifted, terminated, 0.8)
    torch.testing.assert_close(torch.roll(base.returns, shift, dims=1), moved.returns)
    assert torch.equal(torch.roll(base.mask, shift, dims=1), moved.mask)


def test_length_returns_length_one_and_empty_rows():
    completion_mask = torch.tensor([[0, 1, 0], [0, 0, 0]]).bool()
    out = length_returns(completion_mask, torch.tensor([True, False]), gamma=0.9)
    # L = 1: the last prompt token gets -(1 - g), the EOS gets 0.
    torch.testing.assert_close(out.returns[0], torch.tensor([-(1 - 0.9), 0.0, 0.0], dtype=torch.float64))
    assert out.mask.tolist() == [[True, True, False], [False, False, False]]
    assert out.censored.tolist() == [False, False]  # an empty row is not censored, it has nothing


def test_length_returns_rejects_bad_masks():
    with pytest.raises(ValueError, match="contiguous"):
        length_returns(torch.tensor([[0, 1, 0, 1]]).bool(), torch.tensor([True]), 0.9)
    with pytest.raises(ValueError, match="column 0"):
        length_returns(torch.tensor([[1, 1, 0]]).bool(), torch.tensor([True]), 0.9)


# ---------------------------------------------------------------------------------------------------------
# compute_gae
# ---------------------------------------------------------------------------------------------------------


def test_compute_gae_by_hand():
    # One row, L = 3, finished; gamma = 0.9, lam = 0.5.
    g, lam = 0.9, 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 99.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    d2 = 1.0 + g * 0.0 - 0.6
    d1 = 0.0 + g * 0.6 - 0.4
    d0 = 0.0 + g * 0.4 - 0.2
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    advantages, returns = compute_gae(rewards, values, mask, g, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0]]))


def test_compute_gae_truncated_row_bootstraps():
    # Same row but cut at the length cap: V(s_3) = 7 enters the last delta.
    g, lam = 0.9, 1.0
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 7.0]])
    advantages, _ = compute_gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), g, lam, torch.tensor([False]))
    a2 = 1.0 + g * 7.0 - 0.6
    a1 = g * 0.6 - 0.4 + g * a2
    a0 = g * 0.4 - 0.2 + g * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_compute_gae_matches_loop(seed, gamma, lam):
    rewards, values, mask, lengths, terminated = random_batch(seed)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam, terminated)
    for i in range(rewards.shape[0]):
        L = int(lengths[i])
        expected = gae_by_hand(rewards[i].tolist(), values[i].tolist(), L, gamma, lam, bool(terminated[i]))
        torch.testing.assert_close(advantages[i], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(returns[i, :L], advantages[i, :L] + values[i, :L])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_compute_gae_ignores_values_and_rewards_outside_the_mask(seed):
    rewards, values, mask, lengths, terminated = random_batch(seed)
    noisy_rewards = rewards.clone()
    noisy_rewards[~mask] = 1e6
    noisy_values = values.clone()
    columns = torch.arange(values.shape[1])[None, :]
    # Columns beyond L (the state after the last token) never matter.
    noisy_values[columns > lengths[:, None]] = -1e6
    a, r = compute_gae(rewards, values, mask, 0.95, 0.9, terminated)
    a2, r2 = compute_gae(noisy_rewards, noisy_values, mask, 0.95, 0.9, terminated)
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(r, r2)


def test_compute_gae_lambda_one_is_monte_carlo():
    rewards, values, mask, lengths, _ = random_batch(3, B=5, T=9)
    terminated = torch.ones(5, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, 0.9, 1.0, terminated)
    for i in range(5):
        L = int(lengths[i])
        mc = [sum(0.9**k * float(rewards[i, t + k]) for k in range(L - t)) for t in range(L)]
        torch.testing.assert_close(returns[i, :L], torch.tensor(mc, dtype=torch.float64))


def test_compute_gae_all_masked_and_shape_errors():
    advantages, returns = compute_gae(torch.ones(2, 3), torch.ones(2, 4), torch.zeros(2, 3, dtype=torch.bool), 1, 1)
    assert (advantages == 0).all() and (returns == 0).all()
    with pytest.raises(ValueError, match="T \\+ 1"):
        compute_gae(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), 1, 1)


def test_compute_gae_float32_matches_float64():
    rewards, values, mask, _, terminated = random_batch(11, B=6, T=50)
    a64, _ = compute_gae(rewards, values, mask, 0.997, 0.95, terminated)
    a32, _ = compute_gae(rewards.float(), values.float(), mask, 0.997, 0.95, terminated)
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), a64, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# length_advantages
# ---------------------------------------------------------------------------------------------------------


def test_length_advantages_by_hand():
    # L = 2, finished, gamma = 0.9, lam = 1: delta_t = -(1 - g) + g v(s_{t+1}) - v(s_t), v(after EOS) = 0.
    g = 0.9
    v = [-0.3, -0.2, 5.0]
    d1 = -(1 - g) + g * 0.0 - v[1]
    d0 = -(1 - g) + g * v[1] - v[0]
    out = length_advantages(torch.tensor([v]), torch.tensor([[True, True]]), g, 1.0, torch.tensor([True]))
    torch.testing.assert_close(out, torch.tensor([[d0 + g * d1, d1]]))


def test_length_advantages_exact_lenvm_gives_zero():
    # If v(s_t) is the realised return G_t, every TD residual and every advantage is 0 (any lambda).
    g, L = 0.95, 6
    returns = lengths_to_values(torch.arange(L, -1, -1), g)  # G_0 .. G_L, G_L = 0
    values = torch.cat([returns, torch.tensor([123.0], dtype=torch.float64)])[None, :]  # (1, T + 1), T = L + 1
    mask = torch.tensor([[True] * L + [False]])
    for lam in (0.0, 0.5, 1.0):
        out = length_advantages(values, mask, g, lam, torch.tensor([True]))
        torch.testing.assert_close(out, torch.zeros(1, L + 1, dtype=torch.float64))


def test_length_advantages_lambda_one_is_return_minus_value():
    # A_len_t = G_t - v(s_t) with lam = 1 (method doc section 6).
    g = 0.9
    rewards, values, mask, lengths, _ = random_batch(5, B=4, T=8)
    terminated = torch.ones(4, dtype=torch.bool)
    out = length_advantages(values, mask, g, 1.0, terminated)
    for i in range(4):
        L = int(lengths[i])
        realised = lengths_to_values(torch.arange(L, 0, -1), g)  # G_t for t = 0 .. L - 1
        torch.testing.assert_close(out[i, :L], realised - values[i, :L])


def test_length_advantages_positive_when_shorter_than_predicted():
    g = 0.99
    predicted = lengths_to_values(torch.tensor(50.0), g)  # LenVM expected 50 tokens
    values = torch.full((1, 11), float(predicted))  # a flat (stale) prediction
    out = length_advantages(values, torch.ones(1, 10, dtype=torch.bool), g, 1.0, torch.tensor([True]))
    assert out[0, 0] > 0  # finished in 10 tokens: shorter than predicted


def test_length_advantages_truncated_row_bootstraps():
    g = 0.9
    values = torch.tensor([[-0.5, -0.5, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cut = length_advantages(values, mask, g, 1.0, torch.tensor([False]))
    done = length_advantages(values, mask, g, 1.0, torch.tensor([True]))
    torch.testing.assert_close(cut[0, 1], torch.tensor(-(1 - g) + g * -0.5 + 0.5))
    torch.testing.assert_close(done[0, 1], torch.tensor(-(1 - g) + 0.5))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), lam=st.floats(0.0, 1.0))
def test_length_advantages_equal_gae_with_constant_reward(seed, lam):
    _, values, mask, lengths, terminated = random_batch(seed)
    out = length_advantages(values, mask, 0.9, lam, terminated)
    for i in range(values.shape[0]):
        L = int(lengths[i])
        expected = gae_by_hand([-(1 - 0.9)] * 7, values[i].tolist(), L, 0.9, lam, bool(terminated[i]))
        torch.testing.assert_close(out[i], torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# length_shaping_rewards
# ---------------------------------------------------------------------------------------------------------


def test_length_shaping_rewards_by_hand():
    g = 0.9
    values = torch.tensor([[-0.6, -0.4, -0.1, 3.0], [-0.6, -0.4, -0.1, -0.2]])
    mask = torch.tensor([[True, True, True], [True, True, True]])
    out = length_shaping_rewards(values, mask, g, torch.tensor([True, False]))
    expected = torch.tensor(
        [
            [g * -0.4 + 0.6, g * -0.1 + 0.4, g * 0.0 + 0.1],  # finished: Phi after EOS = 0
            [g * -0.4 + 0.6, g * -0.1 + 0.4, g * -0.2 + 0.1],  # cut: Phi(s_3) kept
        ]
    )
    torch.testing.assert_close(out, expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), gamma=st.floats(0.5, 1.0))
def test_length_shaping_telescopes_to_minus_initial_potential(seed, gamma):
    _, values, mask, lengths, _ = random_batch(seed)
    terminated = torch.ones(values.shape[0], dtype=torch.bool)
    out = length_shaping_rewards(values, mask, gamma, terminated)
    for i in range(values.shape[0]):
        L = int(lengths[i])
        discounted = sum(gamma**t * float(out[i, t]) for t in range(L))
        expected = -float(values[i, 0]) if L > 0 else 0.0
        assert math.isclose(discounted, expected, rel_tol=1e-9, abs_tol=1e-9)
    assert (out[~mask] == 0).all()


def test_length_shaping_length_one_and_all_masked():
    out = length_shaping_rewards(
        torch.tensor([[-0.3, 9.0], [-0.3, 9.0]]), torch.tensor([[True], [False]]), 0.9, torch.tensor([True, True])
    )
    torch.testing.assert_close(out, torch.tensor([[0.3], [0.0]]))


# ---------------------------------------------------------------------------------------------------------
# length_td_residuals
# ---------------------------------------------------------------------------------------------------------


def test_length_td_residuals_by_hand():
    g = 0.9
    out = length_td_residuals(torch.tensor([[-0.5, -0.6, -0.2]]), g)
    expected = torch.tensor([[-(1 - g) + g * -0.6 + 0.5, -(1 - g) + g * -0.2 + 0.6]])
    torch.testing.assert_close(out, expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_length_td_residuals_agree_with_lambda_zero_advantages(seed):
    # The TD residuals are the lam = 0 length advantages of a full row that never ends inside the window.
    g = 0.97
    values = -torch.rand(2, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    advantages = length_advantages(values, mask, g, 0.0, torch.tensor([False, False]))
    torch.testing.assert_close(length_td_residuals(values, g), advantages)


def test_length_td_residuals_zero_on_exact_values_and_short_input():
    values = lengths_to_values(torch.arange(20, -1, -1), 0.99)
    torch.testing.assert_close(length_td_residuals(values, 0.99), torch.zeros(20, dtype=torch.float64))
    assert length_td_residuals(torch.tensor([-0.5]), 0.99).shape == (0,)


def test_length_returns_windowed_completion_keeps_exact_targets():
    # A 5-token completion of which the training window shows 2 tokens: targets still use L = 5.
    g = 0.9
    out = length_returns(torch.tensor([[0, 1, 1]]).bool(), torch.tensor([True]), g, lengths=torch.tensor([5]))
    expected = [-(1 - g**5), -(1 - g**4), -(1 - g**3)]
    torch.testing.assert_close(out.returns[0], torch.tensor(expected, dtype=torch.float64))
    assert out.mask.tolist() == [[True, True, True]]
    with pytest.raises(ValueError, match="at least"):
        length_returns(torch.tensor([[0, 1, 1]]).bool(), torch.tensor([True]), g, lengths=torch.tensor([1]))
