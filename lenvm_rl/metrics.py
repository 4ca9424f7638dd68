"""Length-prediction metrics of a LenVM and the trivial predictors it has to beat, as pure torch functions.

A LenVM predicts the expected discounted return ``V(s_t) = E[-(1 - gamma^(L - t))]``, not the expected length.
Because ``1 - gamma^L`` is concave, inverting a predicted *mean* value gives a length at or below the mean
length (Jensen), so the paper scores the prompt-boundary prediction against a ground truth that is averaged in
value space first and only then converted to tokens ([`prompt_boundary_mre`], paper section 5). Per-token errors
against a single realised completion ([`value_mse`], [`relative_length_error_at_fractions`]) complete the
picture; the baselines ([`constant_baseline_value`], [`fit_prompt_length_regression`]) predict values too, so
they go through exactly the same metric.

Lengths ``L`` count the completion's tokens including its stop token; completions cut at the sampling cap
have an unknown length and must be left out by the caller. This module imports nothing but torch and
[`lenvm_rl.core`].
"""

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from .core import lengths_to_values, values_to_lengths

__all__ = [
    "fit_linear_prompt_length_baseline",
    "remaining_length_baseline_errors",
    "PromptBoundaryMRE",
    "constant_baseline_value",
    "fit_prompt_length_regression",
    "predict_prompt_length_regression",
    "prompt_boundary_mre",
    "relative_length_error_at_fractions",
    "value_mse",
]


class PromptBoundaryMRE(NamedTuple):
    """Result of [`prompt_boundary_mre`].

    Attributes:
        mre (`float`): Mean relative error over prompts.
        predicted_lengths (`torch.Tensor`): ``(P,)`` float64 ``L_hat`` per prompt.
        true_lengths (`torch.Tensor`): ``(P,)`` float64 ``L_GT`` per prompt.
        relative_errors (`torch.Tensor`): ``(P,)`` float64 ``|L_hat - L_GT| / L_GT`` per prompt.
    """

    mre: float
    predicted_lengths: torch.Tensor
    true_lengths: torch.Tensor
    relative_errors: torch.Tensor


def prompt_boundary_mre(
    predicted_values: torch.Tensor | Sequence[float],
    sampled_lengths: Sequence[Sequence[int] | torch.Tensor] | torch.Tensor,
    gamma: float,
) -> PromptBoundaryMRE:
    """Mean relative error of the predicted completion length at the prompt boundary (paper section 5).

    For prompt ``p`` with ``N_p`` sampled lengths ``L_1 .. L_{N_p}`` (stop token included) and predicted value
    ``V(s_0)`` at its last prompt token:

        mu_p    = mean_i (1 - gamma^L_i)
        L_GT_p  = log(1 - mu_p) / log(gamma)
        L_hat_p = log(1 + V(s_0)) / log(gamma)
        MRE     = mean_p |L_hat_p - L_GT_p| / L_GT_p

    Averaging in value space before converting puts the ground truth where a perfect LenVM's prediction lands
    (``V(s_0) = -mu_p`` gives ``L_hat_p = L_GT_p``), so the metric does not charge the LenVM for Jensen's gap.
    Every prompt counts once, whatever its number of completions.

    Args:
        predicted_values (`torch.Tensor` or `Sequence[float]`):
            ``(P,)`` values ``V(s_0)`` in ``(-1, 0]``, one per prompt (a LenVM or a baseline).
        sampled_lengths (`Sequence` of `Sequence[int]` or `torch.Tensor`):
            Per prompt, the lengths of its finished completions (a ragged list, or a ``(P, N)`` tensor); each
            prompt needs at least one length and every length must be ``>= 1``.
        gamma (`float`):
            The LenVM's discount, in ``(0, 1)``.

    Returns:
        [`PromptBoundaryMRE`]: ``mre`` and the per-prompt ``predicted_lengths``, ``true_lengths`` and
        ``relative_errors``.

    Example:
        >>> result = prompt_boundary_mre(torch.tensor([-0.625]), [[1, 2]], gamma=0.5)  # mu = (0.5 + 0.75) / 2
        >>> result.mre, round(float(result.true_lengths[0]), 4)
        (0.0, 1.415)
    """
    predicted_values = torch.as_tensor(predicted_values).detach().to("cpu", torch.float64)
    if predicted_values.ndim != 1:
        raise ValueError(f"predicted_values must have shape (P,), got {tuple(predicted_values.shape)}")
    if len(sampled_lengths) != len(predicted_values):
        raise ValueError(
            f"got {len(predicted_values)} predicted values but sampled lengths for {len(sampled_lengths)} prompts"
        )
    if len(predicted_values) == 0:
        raise ValueError("prompt_boundary_mre needs at least one prompt")
    mus = []
    for p, lengths in enumerate(sampled_lengths):
        lengths = torch.as_tensor(lengths).detach().to("cpu", torch.float64)
        if lengths.numel() == 0 or bool((lengths < 1).any()):
            raise ValueError(
                f"prompt {p}: needs at least one sampled length and every length must be >= 1 (stop token "
                f"included); got {lengths.tolist()}"
            )
        mus.append(-lengths_to_values(lengths, gamma).mean())
    true_lengths = values_to_lengths(-torch.stack(mus), gamma)  # (P,) log(1 - mu) / log(gamma)
    predicted_lengths = values_to_lengths(predicted_values, gamma)  # (P,)
    relative_errors = (predicted_lengths - true_lengths).abs() / true_lengths
    return PromptBoundaryMRE(float(relative_errors.mean()), predicted_lengths, true_lengths, relative_errors)


def value_mse(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """Squared error of LenVM values against their Monte-Carlo targets, averaged over target positions.

    The evaluation counterpart of the pretraining loss (paper section 3), token-averaged over every target
    position of the batch:

        MSE = sum_{(b, t) in mask} (V_bt - G_bt)^2 / |mask|,        G_bt = -(1 - gamma^(L_b - t))

    Args:
        values (`torch.Tensor`):
            ``(B, T)`` predicted values; entries outside ``mask`` are ignored (they may be NaN).
        returns (`torch.Tensor`):
            ``(B, T)`` targets, e.g. ``length_targets`` of [`LenVMDataCollator`] or ``returns`` of
            [`~lenvm_rl.core.length_returns`].
        mask (`torch.Tensor`):
            ``(B, T)`` bool, True on target positions.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` divides by the number of target positions (NaN when there is none); `"sum"` returns the sum
            of squared errors, for accumulating over batches.

    Returns:
        `torch.Tensor`: float64 scalar.

    Example:
        >>> values, returns = torch.tensor([[-0.5, 0.0, 9.0]]), torch.tensor([[-0.75, -0.5, 0.0]])
        >>> mask = torch.tensor([[True, True, False]])
        >>> value_mse(values, returns, mask, reduction="sum")  # 0.25^2 + 0.5^2
        tensor(0.3125, dtype=torch.float64)
        >>> value_mse(values, returns, mask) == 0.3125 / 2
        tensor(True)
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    mask = mask.bool()
    errors = (values.to(torch.float64) - returns.to(torch.float64)).square()  # (B, T)
    total = torch.where(mask, errors, torch.zeros_like(errors)).sum()
    return total if reduction == "sum" else total / mask.sum()


def relative_length_error_at_fractions(
    values: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    gamma: float,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Relative error of the predicted remaining length at fixed fractions of each completion.

    For a completion of length ``L`` and a fraction ``f``, the state is ``s_t`` with ``t = floor(f * L + 1/2)``
    (``f * L`` rounded half up) and

        e_f = |log(1 + V(s_t)) / log(gamma) - (L - t)| / (L - t).

    The state after the stop token (``t = L``, nothing left to predict) has no relative error; neither does a
    state missing from ``values`` (NaN or beyond its width). Those entries are NaN and the mean skips them.

    Jensen caveat: ``V(s_t)`` estimates the *mean* return over the policy's continuations, while ``L - t`` is
    one sampled continuation. Even a perfect LenVM has ``e_f > 0`` here (the sampling spread of the remaining
    length), and its inverted length sits at or below the mean remaining length. Use this to compare models and
    positions on the same rollouts, not as an absolute accuracy; the prompt-boundary metric
    ([`prompt_boundary_mre`]) averages several completions in value space and has neither problem.

    Args:
        values (`torch.Tensor`):
            ``(B, K)`` values aligned with each completion: column ``t`` holds ``V(s_t)``, column 0 the last
            prompt token, column ``L`` the stop token. NaN marks states that were not evaluated.
        lengths (`torch.Tensor` or `Sequence[int]`):
            ``(B,)`` completion lengths ``L >= 1``, stop token included.
        gamma (`float`):
            The LenVM's discount.
        fractions (`Sequence[float]`, *optional*, defaults to `(0.0, 0.25, 0.5, 0.75)`):
            Fractions ``f`` in ``[0, 1)`` of each completion.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: ``(F,)`` mean over completions of the defined errors (NaN if none is defined); `"none"`:
            ``(B, F)`` per-completion errors with NaN where undefined.

    Returns:
        `torch.Tensor`: float64, ``(F,)`` or ``(B, F)``.

    Example:
        >>> values = torch.full((1, 5), -0.5)  # always predicts 1 remaining token (gamma = 0.5)
        >>> relative_length_error_at_fractions(values, [4], gamma=0.5)  # remaining 4, 3, 2, 1
        tensor([0.7500, 0.6667, 0.5000, 0.0000], dtype=torch.float64)
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if any(not 0.0 <= f < 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1) (f = 1 is the terminal state), got {list(fractions)}")
    values = values.detach().to("cpu", torch.float64)
    lengths = torch.as_tensor(lengths).to("cpu", torch.long)
    B, K = values.shape
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape (B,) = {(B,)}, got {tuple(lengths.shape)}")
    fractions = torch.tensor([float(f) for f in fractions], dtype=torch.float64)

    steps = torch.floor(fractions[None, :] * lengths[:, None] + 0.5).long()  # (B, F) t = round(f * L)
    remaining = lengths[:, None] - steps  # (B, F) realised L - t
    picked = values.gather(1, steps.clamp(max=K - 1))  # (B, F) V(s_t)
    errors = (values_to_lengths(picked, gamma) - remaining).abs() / remaining.clamp(min=1)
    errors = errors.masked_fill((remaining < 1) | (steps >= K), math.nan)  # NaN values stay NaN
    return errors if reduction == "none" else errors.nanmean(dim=0)


def constant_baseline_value(lengths: torch.Tensor | Sequence[int], gamma: float) -> torch.Tensor:
    """The constant predictor: the mean training return, ``V_c = -mean_i (1 - gamma^L_i)``.

    Averaged in value space, like the ground truth of [`prompt_boundary_mre`]; predicting ``V_c`` for every
    prompt is the best constant value under squared error.

    Args:
        lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` lengths of the finished training completions.
        gamma (`float`):
            The LenVM's discount.

    Returns:
        `torch.Tensor`: float64 scalar value in ``(-1, 0]``.

    Example:
        >>> constant_baseline_value([1, 2], gamma=0.5)  # -((1 - 0.5) + (1 - 0.25)) / 2
        tensor(-0.6250, dtype=torch.float64)
    """
    lengths = torch.as_tensor(lengths).to("cpu", torch.float64)
    if lengths.numel() == 0:
        raise ValueError("constant_baseline_value needs at least one training length")
    return lengths_to_values(lengths, gamma).mean()


def fit_prompt_length_regression(
    prompt_lengths: torch.Tensor | Sequence[int], lengths: torch.Tensor | Sequence[int], gamma: float
) -> torch.Tensor:
    """Least-squares fit of the completion's return on the log prompt length: ``G ~ a + b log(p)``.

    The regression target is the value-space return ``G_i = -(1 - gamma^L_i)`` of each training completion
    (``p_i`` its prompt's length in tokens), so the fitted line predicts ``V(s_0)`` and is scored like a LenVM.
    Fitting on completions weights every prompt by its number of completions. The log keeps a few very long
    prompts from dominating the fit.

    Args:
        prompt_lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` prompt lengths ``p_i >= 1`` in tokens, one per completion.
        lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` completion lengths ``L_i``.
        gamma (`float`):
            The LenVM's discount.

    Returns:
        `torch.Tensor`: ``(2,)`` float64 coefficients ``[a, b]`` for [`predict_prompt_length_regression`].

    Example:
        >>> coefficients = fit_prompt_length_regression([2, 4, 2, 4], [1, 2, 1, 2], gamma=0.5)
        >>> predict_prompt_length_regression(coefficients, [2, 4])  # -(1 - 0.5), -(1 - 0.25)
        tensor([-0.5000, -0.7500], dtype=torch.float64)
    """
    design = _log_prompt_length_design(prompt_lengths)  # (N, 2)
    returns = lengths_to_values(torch.as_tensor(lengths).to("cpu", torch.float64), gamma)  # (N,)
    if returns.shape != design.shape[:1] or returns.numel() == 0:
        raise ValueError(
            f"need one completion length per prompt length and at least one pair, got {returns.numel()} lengths "
            f"and {design.shape[0]} prompt lengths"
        )
    return torch.linalg.lstsq(design, returns[:, None]).solution.squeeze(1)


def predict_prompt_length_regression(
    coefficients: torch.Tensor, prompt_lengths: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Values ``V(s_0) = a + b log(p)`` predicted by [`fit_prompt_length_regression`].

    A line can leave ``(-1, 0]``; [`~lenvm_rl.core.values_to_lengths`] clamps such values when they are
    converted to lengths.

    Args:
        coefficients (`torch.Tensor`):
            ``(2,)`` ``[a, b]`` from [`fit_prompt_length_regression`].
        prompt_lengths (`torch.Tensor` or `Sequence[int]`):
            ``(P,)`` prompt lengths in tokens.

    Returns:
        `torch.Tensor`: ``(P,)`` float64 predicted values.
    """
    return _log_prompt_length_design(prompt_lengths) @ coefficients.to(torch.float64)


def fit_linear_prompt_length_baseline(
    prompt_lengths: torch.Tensor | Sequence[int], lengths: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """The plain baseline: a least-squares line in token space, ``L ~ a + b * p`` (``p`` = prompt tokens).

    Unlike [`fit_prompt_length_regression`] (which regresses the value-space return on ``log p``), this is the
    predictor a reader has in mind when told "a linear regression on prompt length". Predict with
    ``a + b * p`` clamped to at least 1 token and score it through `lengths_to_values`.

    Example:
        >>> fit_linear_prompt_length_baseline([10, 20, 30], [5, 7, 9])
        tensor([3.0000, 0.2000], dtype=torch.float64)
    """
    p = torch.as_tensor(prompt_lengths).to("cpu", torch.float64)
    y = torch.as_tensor(lengths).to("cpu", torch.float64)
    if p.ndim != 1 or p.shape != y.shape or p.numel() == 0:
        raise ValueError(f"need one completion length per prompt length, got {p.numel()} and {y.numel()}")
    design = torch.stack([torch.ones_like(p), p], dim=1)  # (N, 2)
    return torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1)


def remaining_length_baseline_errors(
    train_lengths: torch.Tensor | Sequence[int],
    lengths: torch.Tensor | Sequence[int],
    fractions: Sequence[float],
) -> torch.Tensor:
    """Relative errors of the "mean remaining length given t tokens so far" baseline, at the positions of
    [`relative_length_error_at_fractions`] (``t = round(f * L)``).

        l_hat(t) = mean_{i: L_i > t} (L_i - t)          over the training lengths L_i
        error    = |l_hat(t) - (L - t)| / (L - t)

    The baseline knows how far the completion has got but nothing about its content; a LenVM should beat it
    mid-completion. NaN where no training completion is longer than ``t`` or ``L - t < 1``.

    Returns:
        `torch.Tensor`: ``(B, F)`` float64.

    Example:
        >>> remaining_length_baseline_errors([2, 4], [4], [0.0, 0.5])  # t = 0: mean(2, 4) = 3 vs 4; t = 2: 2 vs 2
        tensor([[0.2500, 0.0000]], dtype=torch.float64)
    """
    train = torch.as_tensor(train_lengths).to("cpu", torch.float64)
    lengths = torch.as_tensor(lengths).to("cpu", torch.long)
    fractions = torch.tensor([float(f) for f in fractions], dtype=torch.float64)
    steps = torch.floor(fractions[None, :] * lengths[:, None] + 0.5)  # (B, F)
    remaining = lengths[:, None] - steps  # (B, F)
    longer = train[None, None, :] > steps[..., None]  # (B, F, N)
    totals = ((train[None, None, :] - steps[..., None]) * longer).sum(-1)
    counts = longer.sum(-1)
    predicted = totals / counts.clamp(min=1)
    errors = (predicted - remaining).abs() / remaining.clamp(min=1)
    return errors.masked_fill((counts == 0) | (remaining < 1), math.nan)


def _log_prompt_length_design(prompt_lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
    prompt_lengths = torch.as_tensor(prompt_lengths).to("cpu", torch.float64)
    if prompt_lengths.ndim != 1 or bool((prompt_lengths < 1).any()):
        raise ValueError("prompt lengths must be a 1-D sequence of values >= 1")
    return torch.stack([torch.ones_like(prompt_lengths), prompt_lengths.log()], dim=1)  # (N, 2)
