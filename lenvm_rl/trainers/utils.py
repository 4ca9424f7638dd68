"""Pure tensor functions of the PPO trainer: masked statistics, stop-token truncation, KL estimates, PPO losses.

Layout (TRL's PPO layout, as in ``lenvm_rl.core``): ``(B, T)`` tensors over the response tokens,
``mask`` True on real response tokens (the stop token included), a prefix of each row. Everything here
imports only torch; cross-process reductions are injected as an ``all_reduce`` callable (a sum over
processes; the identity on one process), so the functions stay testable on one CPU.
"""

from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "clipped_policy_loss",
    "clipped_value_loss",
    "kl_estimates",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "truncate_after_stop_token",
]


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``mask``; 0 for an empty mask (never NaN).

    ``torch.where`` rather than a product, so an ``inf`` or ``NaN`` at a masked-out entry cannot leak in.

    Example:
        >>> masked_mean(torch.tensor([1.0, 3.0, float("inf")]), torch.tensor([True, True, False]))
        tensor(2.)
        >>> masked_mean(torch.tensor([1.0]), torch.tensor([False]))
        tensor(0.)
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over the True entries of ``mask``.

        var = sum_mask (x - mean)^2 / (n - 1)        (unbiased; ``n`` in the denominator otherwise)

    Safe for tiny masks: 0 when ``n <= 1`` (TRL 1.12's version divided by zero there).

    Example:
        >>> masked_var(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False]))
        tensor(2.)
        >>> masked_var(torch.tensor([5.0]), torch.tensor([True]))
        tensor(0.)
    """
    mask = mask.bool()
    count = mask.sum()
    centred = torch.where(mask, values - masked_mean(values, mask), torch.zeros_like(values))
    denominator = count - 1 if unbiased else count
    return (centred**2).sum() / denominator.clamp(min=1)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise ``values`` to zero mean and unit variance over the masked entries of *all processes*.

        x' = (x - mean) / sqrt(var + eps)        (+ mean again when ``shift_mean`` is False)

    ``mean`` and the unbiased ``var`` are computed from sums and counts reduced with ``all_reduce``, so the
    statistics are those of the global batch, not of each process's shard (TRL 1.12 whitened per process).
    Two reductions (the mean first, then the centred squares) avoid the cancellation of ``E[x^2] - E[x]^2``.
    Entries outside ``mask`` are set to 0.

    Args:
        values (`torch.Tensor`): any shape.
        mask (`torch.Tensor`): bool, same shape.
        shift_mean (`bool`, *optional*, defaults to `True`): if False, only the scale is normalised.
        eps (`float`, *optional*, defaults to `1e-8`): added to the variance.
        all_reduce (`Callable`, *optional*): sums a tensor over processes; the identity by default.

    Returns:
        `torch.Tensor`: same shape and dtype as ``values``.

    Example:
        >>> masked_whiten(torch.tensor([1.0, 3.0, 7.0]), torch.tensor([True, True, False]))
        tensor([-0.7071,  0.7071,  0.0000])
    """
    all_reduce = all_reduce or _identity
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    sums = all_reduce(torch.stack([torch.where(mask, values, zeros).sum(), mask.sum().to(values.dtype)]))
    total, count = sums[0], sums[1]
    mean = total / count.clamp(min=1)
    squares = all_reduce(torch.where(mask, (values - mean) ** 2, zeros).sum())
    var = squares / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zeros)


def truncate_after_stop_token(
    responses: torch.Tensor, stop_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sampled response after its first stop token (kept) and pad the rest.

    The mask is derived from the *position* of the first stop token, never from ``ids != pad``, so a
    padding id equal to the EOS id (or a sampled padding id) cannot shorten a response.

    Args:
        responses (`torch.Tensor`): ``(B, T)`` sampled token ids.
        stop_token_id (`int`): the configured stop token.
        pad_token_id (`int`): id written after the stop token.

    Returns:
        `tuple`: ``responses`` ``(B, T)`` padded after the stop token; ``response_mask`` ``(B, T)`` bool;
        ``sequence_lengths`` ``(B,)`` the index of each row's last real token (TRL's meaning: ``L - 1``);
        ``terminated`` ``(B,)`` bool, True if the row holds a stop token (False: cut at ``T``).

    Example:
        >>> ids, mask, last, done = truncate_after_stop_token(torch.tensor([[5, 1, 7], [5, 6, 7]]), 1, 0)
        >>> ids, last, done
        (tensor([[5, 1, 0],
                [5, 6, 7]]), tensor([1, 2]), tensor([ True, False]))
    """
    B, T = responses.shape
    columns = torch.arange(T, device=responses.device).expand(B, T)  # (B, T)
    is_stop = responses == stop_token_id
    terminated = is_stop.any(dim=1)  # (B,)
    first_stop = torch.where(is_stop, columns, torch.full_like(columns, T)).amin(dim=1)  # (B,), T if none
    sequence_lengths = torch.where(terminated, first_stop, torch.full_like(first_stop, T - 1))
    response_mask = columns <= sequence_lengths[:, None]
    responses = responses.masked_fill(~response_mask, pad_token_id)
    return responses, response_mask, sequence_lengths, terminated


def kl_estimates(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimates of ``KL(pi || pi_ref)`` from the log-probabilities of the sampled tokens.

    Schulman, "Approximating KL divergence" (2020), with ``log r = log pi_ref(a) - log pi(a)``:

        k1 = -log r                    (unbiased, can be negative)
        k3 = (r - 1) - log r           (unbiased, always >= 0, lower variance)

    Example:
        >>> kl_estimates(torch.tensor([0.0]), torch.tensor([-1.0]), "k1")
        tensor([1.])
        >>> kl_estimates(torch.tensor([0.0]), torch.tensor([0.0]), "k3")
        tensor([0.])
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), a token-level masked mean.

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        L     = mean_mask max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    Returns:
        `tuple`: the loss (scalar, differentiable) and detached statistics ``approxkl``
        (``0.5 * mean (log rho)^2``), ``clipfrac`` (fraction of tokens where the clipped term is active) and
        ``ratio`` (mean ``rho``).

    Example:
        >>> loss, stats = clipped_policy_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]),
        ...                                   torch.tensor([[1.0]]), torch.tensor([[True]]), 0.2)
        >>> loss, stats["clipfrac"]
        (tensor(-1.2000), tensor(1.))
    """
    mask = mask.bool()
    # Padding is zeroed before exp: an arbitrary difference there could overflow and turn gradients into NaN.
    log_ratio = (logprobs - old_logprobs).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, clipped_losses), mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "clipfrac": masked_mean((clipped_losses > losses).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss (as in TRL and OpenAI's lm-human-preferences), a token-level masked mean.

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 0.5 * mean_mask max((V - R)^2, (V_clip - R)^2)

    Returns:
        `tuple`: the loss (scalar, differentiable) and the detached clip fraction.

    Example:
        >>> loss, clipfrac = clipped_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]),
        ...                                     torch.tensor([[1.0]]), torch.tensor([[True]]), 0.2)
        >>> loss, clipfrac
        (tensor(0.3200), tensor(1.))
    """
    mask = mask.bool()
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    clipped_losses = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, clipped_losses), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_losses > losses).float(), mask)
    return loss, clipfrac
