"""The length-value math of lenvm-rl, in one place and in pure torch.

Every quantity follows the Length Value Model paper (Zhang et al., arXiv 2604.27039; restated in
``shared/docs/lenvm_method.md``). Generation is an episode: ``s_t`` is the state after the prompt and
the first ``t`` generated tokens (``s_0`` sits on the last prompt token), a completion has ``L`` tokens
including its stop token, and every generated token costs the constant reward ``-(1 - gamma)``. The
discounted return from ``s_t`` is then

    G_t = -(1 - gamma^(L - t))   in (-1, 0],   G_L = 0,

a bounded, strictly monotone transform of the remaining length that a LenVM learns to predict.

Layout conventions shared by the RL functions (TRL's PPO layout):

- ``response_mask`` is ``(B, T)`` bool, True on real response tokens, the stop token included; each row is
  a contiguous run starting at column 0 (right padding).
- ``values`` / ``length_values`` are ``(B, T + 1)``: column ``t`` holds ``V(s_t)``, the value of the state in
  which response token ``t`` is chosen; column ``T`` holds the state after the last column of the padded
  width. For a row of length ``L``, column ``L`` is the state after its last token: ignored when the row
  ``terminated`` with its stop token (the value after a stop token is 0), used to bootstrap when the row was
  cut at the maximum length.

This module imports nothing but torch and the standard library.
"""

import math
from typing import NamedTuple

import torch

__all__ = [
    "LengthReturns",
    "compute_gae",
    "gamma_for_length",
    "length_advantages",
    "length_returns",
    "length_shaping_rewards",
    "length_td_residuals",
    "lengths_to_values",
    "values_to_lengths",
]


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1), got {gamma}. LenVMs typically use 0.997 (see `gamma_for_length`).")
    return gamma


def lengths_to_values(lengths: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """Value of a state with ``lengths`` tokens remaining: ``V = -(1 - gamma^l)``.

    Paper section 3. Computed as ``expm1(l * log(gamma))``, which keeps full relative precision when
    ``gamma`` is close to 1 or ``l`` is small.

    Args:
        lengths (`torch.Tensor` or `float`):
            Remaining lengths ``l >= 0`` in tokens, any shape. Integer tensors are promoted to float64.
        gamma (`float`):
            Discount in ``(0, 1)``.

    Returns:
        `torch.Tensor`: values in ``(-1, 0]``, same shape as ``lengths``.

    Example:
        >>> lengths_to_values(torch.tensor([0, 1, 2]), 0.5)
        tensor([ 0.0000, -0.5000, -0.7500], dtype=torch.float64)
    """
    gamma = _check_gamma(gamma)
    lengths = torch.as_tensor(lengths)
    if not lengths.is_floating_point():
        lengths = lengths.to(torch.float64)
    return torch.expm1(lengths * math.log(gamma)) + 0.0  # + 0.0 turns -0.0 (l = 0) into 0.0


def values_to_lengths(values: torch.Tensor | float, gamma: float) -> torch.Tensor:
    """Remaining length implied by LenVM values: ``l = log(1 + V) / log(gamma)``.

    Paper section 1. Exact for a realised return; for a predicted *mean* return it underestimates the
    expected remaining length (Jensen: ``1 - gamma^L`` is concave), which is why length-space metrics
    average in value space first (paper section 5). Values are clamped to ``[-1 + eps, 0]`` (``eps`` the
    machine epsilon of the dtype), so a value at or numerically below -1 maps to a large but finite length
    and a value above 0 maps to 0.

    Args:
        values (`torch.Tensor` or `float`):
            LenVM values, any shape, nominally in ``(-1, 0]``.
        gamma (`float`):
            The discount the LenVM was trained with.

    Returns:
        `torch.Tensor`: non-negative finite lengths, same shape and floating dtype as ``values``.

    Example:
        >>> values_to_lengths(torch.tensor([0.0, -0.5, -0.75]), 0.5)
        tensor([0., 1., 2.])
        >>> bool(torch.isfinite(values_to_lengths(torch.tensor([-1.0]), 0.997)).all())
        True
    """
    gamma = _check_gamma(gamma)
    values = torch.as_tensor(values)
    if not values.is_floating_point():
        values = values.to(torch.float64)
    eps = torch.finfo(values.dtype).eps
    values = values.clamp(min=-1.0 + eps, max=0.0)
    return torch.log1p(values) / math.log(gamma) + 0.0  # + 0.0 turns -0.0 (V = 0) into 0.0


def gamma_for_length(length: float, coverage: float = 0.99) -> float:
    """The discount whose horizon covers ``length`` tokens: ``1 - gamma^length = coverage``.

    Paper section 1: choose gamma so that the 99th-percentile completion length ``L99`` gives
    ``1 - gamma^L99 = 0.99``, i.e. ``gamma = (1 - coverage)^(1 / length)``. Longer lengths give a gamma
    closer to 1 (the paper uses 0.997 for lengths up to a few thousand tokens).

    Args:
        length (`float`):
            Length in tokens to cover, ``> 0`` (typically the 99th percentile of the training lengths).
        coverage (`float`, *optional*, defaults to `0.99`):
            Fraction of the value range ``(-1, 0)`` used up at ``length`` tokens, in ``(0, 1)``.

    Returns:
        `float`: gamma in ``(0, 1)``.

    Example:
        >>> round(gamma_for_length(1535), 4)
        0.997
        >>> gamma_for_length(1, coverage=0.75)
        0.25
    """
    if not length > 0:
        raise ValueError(f"length must be > 0, got {length}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    return float((1.0 - coverage) ** (1.0 / float(length)))


class LengthReturns(NamedTuple):
    """Training targets of a LenVM batch, as returned by [`length_returns`].

    Attributes:
        returns (`torch.Tensor`): ``(B, T)`` float64 targets ``G``; 0 where ``mask`` is False.
        mask (`torch.Tensor`): ``(B, T)`` bool, True on the positions that carry a target.
        censored (`torch.Tensor`): ``(B,)`` bool, True for rows without a stop token (cut at the length cap).
    """

    returns: torch.Tensor
    mask: torch.Tensor
    censored: torch.Tensor


def length_returns(
    completion_mask: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    bootstrap_values: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> LengthReturns:
    """Per-position LenVM targets of a padded batch of prompt + completion sequences.

    Paper section 3. For a completion of ``L`` tokens (stop token included) whose first token sits at
    column ``a``, the state ``s_t`` is read at column ``a - 1 + t`` (``s_0`` is the last prompt token) and
    gets the target

        G_t = -(1 - gamma^(L - t))        t = 0 .. L        (the stop token, t = L, gets 0).

    A completion cut at the length cap (no stop token) has an unknown true length; the paper's reference
    implementation trains it as if it had finished, which biases every target of the row. Here such a row is
    flagged ``censored`` and gets no target, unless ``bootstrap_values`` supplies ``V(s_L)`` for the state after
    its last token, in which case

        G_t = -(1 - gamma^(L - t)) + gamma^(L - t) * V(s_L).

    Targets are computed in float64 (paper section 3).

    Args:
        completion_mask (`torch.Tensor`):
            ``(B, T)`` bool, True on completion tokens. Each row's True entries must be contiguous and must not
            start at column 0 (a target sits on the last prompt token before them). Any padding layout works:
            left-padded prompts followed by right-padded completions, or right-padded rows.
        terminated (`torch.Tensor`):
            ``(B,)`` bool, True if the row's last completion token is its stop token.
        gamma (`float`):
            Discount in ``(0, 1)``.
        bootstrap_values (`torch.Tensor`, *optional*):
            ``(B,)`` values ``V(s_L)`` used as the tail of censored rows; ignored for terminated rows.
        lengths (`torch.Tensor`, *optional*):
            ``(B,)`` true completion lengths ``L`` when a training window shows only the first tokens of a
            completion (``L`` >= the row's mask count). The visible positions keep their exact targets, since
            ``L`` is known; defaults to the mask count.

    Returns:
        [`LengthReturns`]: ``returns`` ``(B, T)`` float64, ``mask`` ``(B, T)`` bool, ``censored`` ``(B,)`` bool.

    Example:
        >>> out = length_returns(torch.tensor([[0, 0, 1, 1]]).bool(), torch.tensor([True]), gamma=0.5)
        >>> out.returns
        tensor([[ 0.0000, -0.7500, -0.5000,  0.0000]], dtype=torch.float64)
        >>> out.mask
        tensor([[False,  True,  True,  True]])
    """
    gamma = _check_gamma(gamma)
    completion_mask = completion_mask.bool()
    terminated = terminated.bool().to(completion_mask.device)
    B, T = completion_mask.shape
    columns = torch.arange(T, device=completion_mask.device)
    visible = completion_mask.sum(-1)  # (B,)
    first = torch.where(visible > 0, (columns * completion_mask).masked_fill(~completion_mask, T).amin(-1), T)  # (B,)
    _check_contiguous(completion_mask, first, visible)
    if bool((first[visible > 0] == 0).any()):
        raise ValueError("completion_mask starts at column 0: the last prompt token must precede the completion.")
    if lengths is None:
        lengths = visible
    lengths = lengths.to(completion_mask.device)
    if bool((lengths < visible).any()):
        raise ValueError("`lengths` must be at least the number of completion tokens in each row of the mask")

    # Column c holds state s_t with t = c - (first - 1); the row's targets span t = 0 .. L (visible part only).
    steps = columns[None, :] - (first[:, None] - 1)  # (B, T)
    in_span = (steps >= 0) & (steps <= visible[:, None]) & (visible[:, None] > 0)
    in_span &= steps <= lengths[:, None]
    remaining = (lengths[:, None] - steps).clamp(min=0).to(torch.float64)  # (B, T)
    returns = lengths_to_values(remaining, gamma)

    censored = (~terminated) & (visible > 0)
    mask = in_span & ~censored[:, None]
    if bootstrap_values is not None:
        tail = bootstrap_values.to(torch.float64)[:, None] * torch.pow(gamma, remaining)
        returns = torch.where(censored[:, None], returns + tail, returns)
        mask = in_span
    returns = returns.masked_fill(~mask, 0.0)
    return LengthReturns(returns=returns, mask=mask, censored=censored)


def _check_contiguous(mask: torch.Tensor, first: torch.Tensor, lengths: torch.Tensor) -> None:
    columns = torch.arange(mask.shape[1], device=mask.device)
    expected = (columns[None, :] >= first[:, None]) & (columns[None, :] < (first + lengths)[:, None])
    if not torch.equal(expected, mask):
        raise ValueError("each row of the mask must be one contiguous run of True entries (one completion per row)")


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
    terminated: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a right-padded batch of responses.

    Schulman et al. 2016, in the layout of the module docstring:

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_{i>=0} (gamma * lam)^i delta_{t+i}        (within the row)
        R_t     = A_t + V(s_t)                                  (the critic's regression target)

    where ``V(s_{t+1}) = 0`` after the last token of a row that ``terminated`` and ``V(s_{t+1}) =
    values[:, L]`` (the bootstrap) after the last token of a row cut at the maximum length. Both the task
    critic of [`PPOTrainer`] and the frozen length critic ([`length_advantages`]) use this function.

    Args:
        rewards (`torch.Tensor`):
            ``(B, T)`` per-token rewards; entries outside ``response_mask`` are ignored.
        values (`torch.Tensor`):
            ``(B, T + 1)`` state values; column ``t`` is ``V(s_t)``, column ``L`` of a row is the state after its
            last token. Entries beyond column ``L`` are ignored.
        response_mask (`torch.Tensor`):
            ``(B, T)`` bool, True on real response tokens (stop token included), a prefix of each row.
        gamma (`float`):
            Discount in ``[0, 1]``.
        lam (`float`):
            GAE lambda in ``[0, 1]``; 1 gives Monte-Carlo returns minus values, 0 the one-step TD residual.
        terminated (`torch.Tensor`, *optional*):
            ``(B,)`` bool; True if the row ended with its stop token. Defaults to all True (no bootstrap).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``advantages`` and ``returns``, both ``(B, T)`` in the dtype of
        ``values`` (float32 inputs are accumulated in float32), zero outside ``response_mask``.

    Example:
        >>> adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5, 9.0]]),
        ...                        torch.tensor([[True, True]]), gamma=1.0, lam=1.0)
        >>> adv, ret
        (tensor([[0.5000, 0.5000]]), tensor([[1., 1.]]))
    """
    B, T = rewards.shape
    if values.shape != (B, T + 1):
        raise ValueError(f"values must have shape (B, T + 1) = {(B, T + 1)}, got {tuple(values.shape)}")
    if response_mask.shape != (B, T):
        raise ValueError(f"response_mask must have shape (B, T) = {(B, T)}, got {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    if terminated is None:
        terminated = torch.ones(B, dtype=torch.bool, device=mask.device)
    dtype = torch.promote_types(values.dtype, rewards.dtype)
    rewards = rewards.to(dtype).masked_fill(~mask, 0.0)
    values = values.to(dtype)

    # The last real token of a row is where the mask switches off; after it the value is 0 for a finished
    # row and the bootstrap values[:, t + 1] for a truncated one.
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # (B, T)
    is_last = mask & ~next_mask
    next_values = values[:, 1:].masked_fill(is_last & terminated.bool()[:, None], 0.0)  # (B, T)
    deltas = (rewards + gamma * next_values - values[:, :-1]).masked_fill(~mask, 0.0)  # (B, T)

    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in reversed(range(T)):
        running = deltas[:, t] + gamma * lam * running * next_mask[:, t]
        advantages[:, t] = running
    advantages = advantages.masked_fill(~mask, 0.0)
    returns = (advantages + values[:, :-1]).masked_fill(~mask, 0.0)
    return advantages, returns


def length_advantages(
    length_values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lam: float,
    terminated: torch.Tensor,
) -> torch.Tensor:
    """Length advantage of a frozen LenVM critic (paper appendix C, method doc section 6).

        delta_len_t = -(1 - gamma) + gamma * v(s_{t+1}) - v(s_t)        (v after a stop token = 0)
        A_len_t     = sum_{i>=0} (gamma * lam)^i delta_len_{t+i}

    With ``lam = 1`` and an exact LenVM, ``A_len_t = G_t - v(s_t)``: positive when the realised remainder was
    shorter than predicted, so ``A = A_task + s * A_len`` with ``s > 0`` favours shorter continuations. Rows cut
    at the maximum length bootstrap from ``length_values`` at the row's end (they are not treated as finished).

    Args:
        length_values (`torch.Tensor`):
            ``(B, T + 1)`` frozen LenVM values; column ``t`` is ``v(s_t)``.
        response_mask (`torch.Tensor`):
            ``(B, T)`` bool, True on real response tokens (stop token included).
        gamma (`float`):
            The LenVM's discount, in ``(0, 1)``.
        lam (`float`):
            GAE lambda of the length critic, in ``[0, 1]``.
        terminated (`torch.Tensor`):
            ``(B,)`` bool, True if the row ended with its stop token.

    Returns:
        `torch.Tensor`: ``(B, T)`` length advantages, zero outside ``response_mask``.

    Example:
        >>> length_advantages(torch.tensor([[-0.5, 0.0, 0.0]]), torch.tensor([[True, False]]),
        ...                   gamma=0.5, lam=1.0, terminated=torch.tensor([True]))
        tensor([[0., 0.]])
    """
    gamma = _check_gamma(gamma)
    rewards = torch.full(response_mask.shape, -(1.0 - gamma), dtype=length_values.dtype, device=length_values.device)
    advantages, _ = compute_gae(rewards, length_values, response_mask, gamma, lam, terminated)
    return advantages


def length_shaping_rewards(
    length_values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    terminated: torch.Tensor,
) -> torch.Tensor:
    """Potential-based shaping rewards with the LenVM as potential (Ng et al. 1999; method doc section 6).

        F_t = gamma * Phi(s_{t+1}) - Phi(s_t),        Phi = length_values,  Phi(after a stop token) = 0

    The discounted sum over a finished episode telescopes to ``-Phi(s_0)``, a constant per prompt, so adding
    ``beta * F_t`` to the task reward keeps the ordering of policies and only densifies credit assignment.
    A row cut at the maximum length keeps ``Phi`` of the state after its last token.

    Args:
        length_values (`torch.Tensor`):
            ``(B, T + 1)`` frozen LenVM values; column ``t`` is ``Phi(s_t)``.
        response_mask (`torch.Tensor`):
            ``(B, T)`` bool, True on real response tokens.
        gamma (`float`):
            Discount of the RL objective the rewards are added to.
        terminated (`torch.Tensor`):
            ``(B,)`` bool, True if the row ended with its stop token.

    Returns:
        `torch.Tensor`: ``(B, T)`` shaping rewards, zero outside ``response_mask``.

    Example:
        >>> length_shaping_rewards(torch.tensor([[-0.75, -0.5, 7.0]]), torch.tensor([[True, True]]),
        ...                        gamma=1.0, terminated=torch.tensor([True]))
        tensor([[0.2500, 0.5000]])
    """
    mask = response_mask.bool()
    if length_values.shape != (mask.shape[0], mask.shape[1] + 1):
        raise ValueError(f"length_values must have shape (B, T + 1), got {tuple(length_values.shape)}")
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    is_last = mask & ~next_mask
    next_potentials = length_values[:, 1:].masked_fill(is_last & terminated.bool()[:, None], 0.0)  # (B, T)
    return (gamma * next_potentials - length_values[:, :-1]).masked_fill(~mask, 0.0)


def length_td_residuals(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """One-step TD residuals of LenVM values along sequences: the "length tokens" signal.

    Method doc section 5: ``delta_t = -(1 - gamma) + gamma * V_t - V_{t-1}``. For an exact LenVM the residual
    of a token is 0 in expectation; a token after which the predicted horizon jumps up ("wait", "but") has
    ``delta < 0`` and one after which it drops ("therefore") has ``delta > 0``. The paper flags
    ``|delta| > 0.01``.

    Args:
        values (`torch.Tensor`):
            ``(..., T)`` LenVM values of consecutive states along the last dimension. Set the value at a stop
            token to 0 before calling if the stop token should count as terminal.
        gamma (`float`):
            The LenVM's discount.

    Returns:
        `torch.Tensor`: ``(..., T - 1)`` residuals; entry ``i`` belongs to the token that led from state ``i``
        to state ``i + 1``.

    Example:
        >>> length_td_residuals(torch.tensor([-0.75, -0.5, 0.0]), gamma=0.5)
        tensor([0., 0.])
    """
    gamma = _check_gamma(gamma)
    return -(1.0 - gamma) + gamma * values[..., 1:] - values[..., :-1]
