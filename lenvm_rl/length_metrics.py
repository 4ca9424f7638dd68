"""Metrics of generated lengths: how well completions meet a length constraint (LIFEBench's Length Score and Length
Deviation, method doc section 5), the hard token-budget baseline of the accuracy / length trade-off, and how much of
the length variance the prompt explains. Lengths are generated tokens, stop token included. Pure torch.

The metrics of a LenVM's length *predictions* are in [`lenvm_rl.metrics`].
"""

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

__all__ = [
    "TokenBudgetCurve",
    "length_deviation",
    "length_score",
    "length_variance_explained",
    "token_budget_curve",
]

LengthConstraint = Literal["equal_to", "at_most", "at_least"]


def length_deviation(
    output_lengths: torch.Tensor | Sequence[int], target_lengths: torch.Tensor | Sequence[int] | int
) -> torch.Tensor:
    """Relative length deviation of each sample, ``LD = (L_out - T) / T`` (LIFEBench; method doc section 5).

    Args:
        output_lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` generated lengths ``L_out``.
        target_lengths (`torch.Tensor`, `Sequence[int]` or `int`):
            ``(N,)`` (or one) target lengths ``T > 0``.

    Returns:
        `torch.Tensor`: ``(N,)`` float64 deviations; negative when the output is too short.

    Example:
        >>> length_deviation([8, 16, 24], 16)
        tensor([-0.5000,  0.0000,  0.5000], dtype=torch.float64)
    """
    output_lengths = torch.as_tensor(output_lengths).to(torch.float64)
    target_lengths = torch.as_tensor(target_lengths).to(torch.float64).expand_as(output_lengths)
    if bool((target_lengths <= 0).any()):
        raise ValueError("target lengths must be > 0")
    return (output_lengths - target_lengths) / target_lengths


def length_score(
    output_lengths: torch.Tensor | Sequence[int],
    target_lengths: torch.Tensor | Sequence[int] | int,
    constraint: LengthConstraint,
) -> torch.Tensor:
    """LIFEBench Length Score of each sample (method doc section 5), in ``(0, 100]``.

    With ``LD = (L_out - T) / T``:

        LS = 100 * exp(5 * LD)     if LD < 0 and the constraint is "equal_to" or "at_least" (too short)
        LS = 100 * exp(-2 * LD)    if LD > 0 and the constraint is "equal_to" or "at_most"  (too long)
        LS = 100                   otherwise (on target, or on the allowed side of the bound)

    Average over samples for the benchmark score.

    Args:
        output_lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` generated lengths.
        target_lengths (`torch.Tensor`, `Sequence[int]` or `int`):
            ``(N,)`` (or one) target lengths ``T > 0``.
        constraint (`str`):
            ``"equal_to"``, ``"at_most"`` or ``"at_least"``.

    Returns:
        `torch.Tensor`: ``(N,)`` float64 scores.

    Example:
        >>> length_score([8, 16, 24], 16, "equal_to")  # 100 e^-2.5, 100, 100 e^-1
        tensor([  8.2085, 100.0000,  36.7879], dtype=torch.float64)
        >>> length_score([8, 24], 16, "at_most"), length_score([8, 24], 16, "at_least")
        (tensor([100.0000,  36.7879], dtype=torch.float64), tensor([  8.2085, 100.0000], dtype=torch.float64))
    """
    if constraint not in ("equal_to", "at_most", "at_least"):
        raise ValueError(f"constraint must be 'equal_to', 'at_most' or 'at_least', got {constraint!r}")
    deviations = length_deviation(output_lengths, target_lengths)
    scores = torch.full_like(deviations, 100.0)
    if constraint != "at_most":
        scores = torch.where(deviations < 0, 100.0 * torch.exp(5.0 * deviations), scores)
    if constraint != "at_least":
        scores = torch.where(deviations > 0, 100.0 * torch.exp(-2.0 * deviations), scores)
    return scores


class TokenBudgetCurve(NamedTuple):
    """Result of [`token_budget_curve`].

    Attributes:
        budgets (`torch.Tensor`): ``(K,)`` long token budgets ``B``.
        mean_tokens (`torch.Tensor`): ``(K,)`` float64 mean tokens per completion at each budget.
        accuracy (`torch.Tensor`): ``(K,)`` float64 accuracy at each budget.
    """

    budgets: torch.Tensor
    mean_tokens: torch.Tensor
    accuracy: torch.Tensor

    def to_dict(self) -> dict[str, list]:
        """The curve as JSON-ready lists: ``{"budgets": [...], "mean_tokens": [...], "accuracy": [...]}``."""
        return {name: tensor.tolist() for name, tensor in self._asdict().items()}


def token_budget_curve(
    lengths: torch.Tensor | Sequence[int],
    correct: torch.Tensor | Sequence[bool],
    budgets: torch.Tensor | Sequence[int] | None = None,
) -> TokenBudgetCurve:
    """Accuracy and mean tokens of the hard token-budget baseline (paper section 5).

    Each completion is cut at ``B`` tokens: it costs ``min(L, B)`` tokens and counts as correct only if it was
    correct and finished within the budget (``L <= B``; a truncated answer counts as wrong).

        mean_tokens(B) = mean_i min(L_i, B)        accuracy(B) = mean_i [correct_i and L_i <= B]

    Args:
        lengths (`torch.Tensor` or `Sequence[int]`):
            ``(N,)`` lengths of the unconstrained completions.
        correct (`torch.Tensor` or `Sequence[bool]`):
            ``(N,)`` whether each unconstrained completion is correct.
        budgets (`torch.Tensor` or `Sequence[int]`, *optional*):
            ``(K,)`` token budgets; by default (`None` or empty) every 8 tokens up to the longest completion.

    Returns:
        [`TokenBudgetCurve`]: ``budgets``, ``mean_tokens`` and ``accuracy``, each ``(K,)``; ``to_dict()`` gives
        the JSON form.

    Example:
        >>> curve = token_budget_curve([2, 4, 8], [True, True, False], budgets=[4, 8])
        >>> curve.mean_tokens, curve.accuracy
        (tensor([3.3333, 4.6667], dtype=torch.float64), tensor([0.6667, 0.6667], dtype=torch.float64))
        >>> token_budget_curve([3, 17], [True, False]).to_dict()  # default budgets: 8, 16, 24
        {'budgets': [8, 16, 24], 'mean_tokens': [5.5, 9.5, 10.0], 'accuracy': [0.5, 0.5, 0.5]}
    """
    lengths = torch.as_tensor(lengths).to(torch.float64)  # (N,)
    correct = torch.as_tensor(correct).bool()  # (N,)
    if budgets is None or len(budgets) == 0:
        budgets = torch.arange(8, int(lengths.max()) + 8, 8)
    budgets = torch.as_tensor(budgets).long()  # (K,)
    cut = budgets.to(torch.float64)[:, None]  # (K, 1)
    mean_tokens = torch.minimum(lengths[None, :], cut).mean(dim=1)  # (K,)
    accuracy = (correct[None, :] & (lengths[None, :] <= cut)).to(torch.float64).mean(dim=1)  # (K,)
    return TokenBudgetCurve(budgets, mean_tokens, accuracy)


def length_variance_explained(lengths: Sequence[Sequence[int]] | torch.Tensor) -> float:
    """Share of the variance of completion lengths that the prompt explains, from several completions per prompt.

    One-way random-effects ANOVA (the intraclass correlation ICC(1)) over ``P`` prompts with ``n`` completions
    each, ``m_p`` and ``s_p^2`` the mean and sample variance of prompt ``p``'s lengths:

        within  = mean_p s_p^2
        between = Var_p(m_p) - within / n          (the spread of the prompt means minus the noise they carry)
        share   = clip(between / (between + within), 0, 1)

    Both variances divide by one less than their count. Prompts with fewer than two completions are ignored.

    Args:
        lengths (`Sequence[Sequence[int]]` or `torch.Tensor`):
            Completion lengths grouped by prompt, the same number per prompt (nested lists or a ``(P, n)`` tensor).

    Returns:
        `float`: the between-prompt share, NaN when no prompt has two completions, 0 when every length is equal.

    Example:
        >>> length_variance_explained([[10, 10], [30, 30]])  # the prompt decides everything
        1.0
        >>> length_variance_explained([[10, 30], [30, 10]])  # the prompt decides nothing
        0.0
    """
    groups = [torch.as_tensor(group, dtype=torch.float64) for group in lengths]
    groups = [group for group in groups if group.numel() >= 2]
    if not groups:
        return float("nan")
    groups = torch.stack(groups)  # (P, n)
    within = groups.var(dim=1).mean()
    between = groups.mean(dim=1).var() - within / groups.shape[1]
    total = between + within
    return float((between / total).clamp(0.0, 1.0)) if total > 0 else 0.0
