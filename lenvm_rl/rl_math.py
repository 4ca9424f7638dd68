"""The RL math of the trainers, in pure torch: masked statistics and whitening, stop-token truncation, KL
estimates, clipped PPO losses, and the length term of the advantage (its coefficient schedule, its normalisation
and its combination with the task advantage, method doc section 6). The length-value math itself (returns, GAE,
length advantages, shaping) lives in ``lenvm_rl.core``.

Layout (TRL's PPO layout, as in ``lenvm_rl.core``): ``(B, T)`` tensors over the response tokens,
``mask`` True on real response tokens (the stop token included), a prefix of each row. Everything here
imports only torch; cross-process reductions are injected as an ``all_reduce`` callable (a sum over
processes; the identity on one process), so the functions stay testable on one CPU.
"""

from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "LENGTH_COEF_SCHEDULES",
    "add_length_advantages",
    "check_finite",
    "clipped_policy_loss",
    "clipped_value_loss",
    "combine_advantages",
    "kl_estimates",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "rms_normalize_length_advantages",
    "scheduled_length_coef",
    "truncate_after_stop_token",
    "truncated_importance_weights",
]

LENGTH_COEF_SCHEDULES = ("constant", "linear")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def check_finite(tensor: torch.Tensor, what: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Raise `FloatingPointError` naming `what` if `tensor` (where `mask` is True) holds NaN or inf; else return it.

    The trainers call it where each quantity that enters the loss is produced (rewards, values, LenVM values,
    advantages, losses), so a non-finite value stops the run before an optimizer step or a checkpoint carries it.

    Example:
        >>> check_finite(torch.tensor([1.0, float("nan")]), "values", mask=torch.tensor([True, False]))
        tensor([1., nan])
        >>> check_finite(torch.tensor([1.0, float("inf")]), "LenVM values at update 3")
        Traceback (most recent call last):
        ...
        FloatingPointError: LenVM values at update 3: 1 of 2 entries are not finite (0 NaN, 1 inf).
    """
    values = tensor if mask is None else tensor[mask.bool()]
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        num_nan = int(torch.isnan(values).sum())
        num_bad = int((~finite).sum())
        raise FloatingPointError(
            f"{what}: {num_bad} of {values.numel()} entries are not finite ({num_nan} NaN, {num_bad - num_nan} inf)."
        )
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


def truncated_importance_weights(
    old_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    mask: torch.Tensor,
    clip_max: float,
    mode: Literal["token_truncate", "token_mask"] = "token_truncate",
) -> torch.Tensor:
    """Per-token importance weights of tokens sampled by another engine than the one that scores them (truncated
    importance sampling, Yao et al. 2025; TRL's vLLM correction at token level).

        w_t = pi_old(a_t) / mu(a_t) = exp(log pi_old(a_t) - log mu(a_t))      mu = the sampler (vLLM)
        token_truncate:  w_t = min(w_t, C)
        token_mask:      w_t = w_t if w_t <= C else 0

    Args:
        old_logprobs, sampler_logprobs (`torch.Tensor`): `(B, T)` log-probabilities of the sampled tokens under the
            training model at rollout time and under the sampler (both at the sampling temperature).
        mask (`torch.Tensor`): `(B, T)`, True on real response tokens.
        clip_max (`float`): `C`, at least 1.
        mode (`str`, *optional*, defaults to `"token_truncate"`): see above.

    Returns:
        `torch.Tensor`: `(B, T)` weights, 1 on padding.

    Example:
        >>> import math
        >>> old, sampler = torch.tensor([[math.log(0.5), math.log(0.9)]]), torch.tensor([[math.log(0.1), math.log(0.9)]])
        >>> truncated_importance_weights(old, sampler, torch.tensor([[True, True]]), clip_max=3.0)
        tensor([[3., 1.]])
    """
    mask = mask.bool()
    # Padding is zeroed before exp, as in clipped_policy_loss: an arbitrary difference there could overflow.
    ratio = torch.exp((old_logprobs - sampler_logprobs).masked_fill(~mask, 0.0))
    if mode == "token_truncate":
        ratio = ratio.clamp(max=clip_max)
    elif mode == "token_mask":
        ratio = ratio.masked_fill(ratio > clip_max, 0.0)
    else:
        raise ValueError(f"mode must be 'token_truncate' or 'token_mask', got {mode!r}")
    return ratio.masked_fill(~mask, 1.0)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), a token-level masked mean.

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        L     = mean_mask w_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))

    `w_t` are optional per-token weights (`token_weights`, `(B, T)`, no gradient), e.g.
    [`truncated_importance_weights`] when another engine sampled the tokens; without them `w_t = 1`.

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
    token_losses = torch.max(losses, clipped_losses)
    if token_weights is not None:
        token_losses = token_losses * token_weights.detach()
    loss = masked_mean(token_losses, mask)
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


# ---------------------------------------------------------------------- the length term in the advantage


def scheduled_length_coef(
    update: int, num_updates: int, coef: float, schedule: str = "constant", warmup_steps: int = 0
) -> float:
    """The length coefficient ``s`` of update ``update`` (0-based): a linear warm-up, then constant or a linear decay.

        c(u) = coef * u / W                                    u < W  (warm-up)
        c(u) = coef                                            "constant"
        c(u) = coef * max(0, (N - u) / max(1, N - W))          "linear"

    The same shapes as `transformers`' `constant_with_warmup` and `linear` learning-rate schedules. A pure function of
    the update index, so a resumed run uses the coefficients of an uninterrupted one.

    Args:
        update (`int`): 0-based index of the update (PPO) or optimizer step (GRPO).
        num_updates (`int`): ``N``, the number of updates of the run.
        coef (`float`): the coefficient after warm-up.
        schedule (`str`): one of `LENGTH_COEF_SCHEDULES`.
        warmup_steps (`int`): ``W``.

    Example:
        >>> [scheduled_length_coef(u, 4, 1.0, "linear", warmup_steps=2) for u in range(4)]
        [0.0, 0.5, 1.0, 0.5]
    """
    if schedule not in LENGTH_COEF_SCHEDULES:
        raise ValueError(f"schedule must be one of {LENGTH_COEF_SCHEDULES}, got {schedule!r}")
    if update < warmup_steps:
        return coef * update / warmup_steps
    if schedule == "constant":
        return coef
    return coef * max(0.0, (num_updates - update) / max(1, num_updates - warmup_steps))


def rms_normalize_length_advantages(
    length_advantages: torch.Tensor, response_mask: torch.Tensor, eps: float = 1e-12, all_reduce=None
) -> torch.Tensor:
    """The length advantage divided by its root mean square over real tokens, without removing its mean.

        A_len_t / sqrt(mean_{real tokens of all processes}(A_len^2) + eps)

    Why the root mean square and no centring (the meaning of ``s`` in ``A_task + s * A_len``):

    - Raw ``A_len`` lives in value units (order ``1 - gamma`` per token), the task advantage in whitened reward units;
      scaling ``A_len`` to unit size makes ``s`` the size of the length term relative to the task term, whatever the
      gamma, response length or LenVM calibration of the run.
    - Not centring keeps the LenVM's prediction as the reference: a token whose remainder was shorter than predicted
      always gets positive credit, even when the whole batch is shorter. The mean of ``A_len`` is the LenVM's drift;
      trainers log it (`length/advantages_mean`) rather than remove it.
    - ``sqrt(mean^2 + var)`` rather than the standard deviation: they agree for a calibrated LenVM (``E[A_len] = 0``
      at ``lam = 1``), and when the policy drifts away from the LenVM the length term keeps the size ``s`` instead of
      a drift offset of ``s * mean / std`` that would swamp the task term.

    Args:
        length_advantages (`torch.Tensor`): ``(B, T)`` raw length advantages ([`~lenvm_rl.core.length_advantages`]).
        response_mask (`torch.Tensor`): ``(B, T)`` bool, True on the tokens that enter the statistic.
        eps (`float`): added to the mean square; raw ``A_len`` is small, so the usual 1e-8 would not be negligible.
        all_reduce (`Callable`, *optional*): sums a tensor over processes; the identity by default.

    Returns:
        `torch.Tensor`: ``(B, T)`` scaled length advantages, 0 outside ``response_mask``.

    Example:
        >>> rms_normalize_length_advantages(torch.tensor([[0.3, 0.4, 9.0]]), torch.tensor([[True, True, False]]),
        ...                                 eps=0.0)
        tensor([[0.8485, 1.1314, 0.0000]])
    """
    mask = response_mask.bool()
    zeros = torch.zeros_like(length_advantages)
    sums = torch.stack([torch.where(mask, length_advantages**2, zeros).sum(), mask.sum().to(zeros.dtype)])  # (2,)
    if all_reduce is not None:
        sums = all_reduce(sums)
    mean_square = sums[0] / sums[1].clamp(min=1)
    return torch.where(mask, length_advantages * torch.rsqrt(mean_square + eps), zeros)


def combine_advantages(
    advantages: torch.Tensor, length_advantages: torch.Tensor, coef: float, response_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The objective ``J_task + s * J_len`` in advantage form (method doc section 6): ``A_t = A_task_t + s * A_len_t``.

    ``advantages`` is per token ``(B, T)`` (PPO's whitened GAE) or per sequence ``(B,)`` (GRPO's group-normalised
    reward, broadcast over the tokens). With ``s = 0`` the task advantage is returned as it is (not multiplied by 0),
    so a non-finite length term cannot leak into plain PPO / GRPO.

    Args:
        advantages (`torch.Tensor`): ``(B, T)`` or ``(B,)`` task advantages.
        length_advantages (`torch.Tensor`): ``(B, T)`` (normalised) length advantages.
        coef (`float`): ``s``; > 0 favours shorter continuations.
        response_mask (`torch.Tensor`, *optional*): ``(B, T)`` bool; positions outside it are set to 0.

    Returns:
        `torch.Tensor`: ``(B, T)`` combined advantages (``advantages`` itself when ``coef == 0``).

    Example:
        >>> combine_advantages(torch.tensor([1.0, -1.0]), torch.tensor([[0.5, 0.0], [1.0, 2.0]]), coef=0.5)
        tensor([[ 1.2500,  1.0000],
                [-0.5000,  0.0000]])
    """
    if coef == 0.0:
        return advantages
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1)
    combined = advantages + coef * length_advantages.to(advantages.dtype)  # (B, T)
    if response_mask is not None:
        combined = combined.masked_fill(~response_mask.bool(), 0.0)
    return combined


def add_length_advantages(
    advantages: torch.Tensor,
    length_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
    eps: float = 1e-12,
    all_reduce=None,
) -> torch.Tensor:
    """PPO's length term: ``A_t = A_task_t + s * A_len_t / rms(A_len)``, 0 on padding.

    [`rms_normalize_length_advantages`] then [`combine_advantages`]; ``A_task`` arrives whitened (zero mean, unit
    variance over all processes' real tokens) and the sum is not re-whitened (that would remove the drift that was
    kept on purpose and rescale ``A_task``, so ``s`` would stop meaning a fixed ratio). With ``s = 0`` the length
    advantages are not read at all.

    Args:
        advantages (`torch.Tensor`): ``(B, T)`` whitened task advantages, 0 on padding.
        length_advantages (`torch.Tensor`): ``(B, T)`` raw length advantages ([`~lenvm_rl.core.length_advantages`]).
        response_mask (`torch.Tensor`): ``(B, T)`` bool, True on real response tokens.
        coef (`float`): ``s``; > 0 favours shorter continuations.
        eps (`float`): see [`rms_normalize_length_advantages`].
        all_reduce (`Callable`, *optional*): sums a tensor over processes.

    Returns:
        `torch.Tensor`: ``(B, T)`` combined advantages, 0 on padding.

    Example:
        >>> add_length_advantages(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.3, 0.4]]),
        ...                       torch.tensor([[True, True]]), coef=0.5, eps=0.0)
        tensor([[ 1.4243, -0.4343]])
    """
    mask = response_mask.bool()
    if coef == 0.0:
        return advantages.masked_fill(~mask, 0.0)
    scaled = rms_normalize_length_advantages(length_advantages, mask, eps, all_reduce)
    return combine_advantages(advantages, scaled, coef, mask)
