r"""The candidate set of a decoding step and the LenVM-guided rules that choose one candidate (paper section 5).

Pure torch, no model: [`~lenvm_rl.guidance.generate_with_length_guidance`] runs the policy and the LenVM and calls
these two functions at every step.

1. [`candidate_set`]: the policy's ``top_k`` most likely tokens, then top-p and min-p inside them.
2. [`select_candidates`]: one candidate per row, from the candidates' log-probabilities ``log p(x)`` and their LenVM
   values ``v(x) = V(s_t + x)`` (a stop-token candidate has value exactly 0: the episode ends there). With
   ``u(x) = -v(x) = 1 - gamma^l(x)`` in ``[0, 1)`` and ``l(x) = log(1 + v(x)) / log(gamma)`` the predicted tokens
   left after ``x``:

   - ``"none"``: sample from ``p(x)`` (argmax at temperature 0).
   - ``"tilt"``: sample from ``p'(x) ∝ p(x) exp(beta * u(x))``, as in the reference implementation; ``beta < 0``
     favours shorter continuations and ``beta = 0`` is ``"none"`` bit for bit.
   - ``"equal_to"`` (target ``T``): ``argmin_x |v(x) - v*|`` with ``v* = -(1 - gamma^max(T - t, 0))``, where ``t``
     counts the generated tokens *including* the candidate. Sign convention: our values are the negative returns
     ``V = -(1 - gamma^l)``, so ``v*`` is the value of a state with exactly ``T - t`` tokens left (the method doc
     writes the same target in ``u``-space, ``1 - gamma^(T - t)``). A stop token chosen as token ``T`` has value
     0 = ``v*``, so ``L = T`` is reachable exactly.
   - ``"at_most"`` / ``"at_least"`` (target ``T``): the reference rule picks the candidate with the shortest
     (longest) predicted continuation at every step, which meets the bound trivially (At Most stops as soon as a
     stop token enters the candidate set). Here the policy keeps its own choice (sampled or greedy) among the
     candidates with ``t + l(x) <= T`` (``>= T``), and the reference rule applies only when no candidate does.

     A bound never forces output the policy finds near-impossible: both steps choose only among the *eligible*
     candidates, those with ``p(x) >= bound_min_prob`` in the candidate distribution (the most likely candidate is
     always eligible). So a stop token is forced (At Most) only when its probability reaches the floor, and it is
     banned (At Least) only when another candidate reaches it; otherwise the bound gives way: At Most may run past
     ``T`` and At Least may stop before it. ``bound_min_prob = 0`` is the unfloored rule, under which At Most
     ends a row as soon as the stop token is among the ``top_k`` candidates, however unlikely. The floor does not
     make a bound far below the policy's own length produce good text: on SmolLM2-135M, At Most 64 on the first
     three GSM8K test prompts (sampled completions average 110-230 tokens) gives 6-19-token answers whether the floor
     is 0, 0.01 or 0.05, because the tokens that jump to an answer have probabilities of 1-20% among the
     candidates, not near 0.
"""

import math
from typing import Literal

import torch

from .core import lengths_to_values, values_to_lengths

__all__ = ["BOUND_MIN_PROB", "CONSTRAINT_MODES", "GuidanceMode", "candidate_set", "select_candidates"]

GuidanceMode = Literal["none", "tilt", "equal_to", "at_most", "at_least"]
CONSTRAINT_MODES = ("equal_to", "at_most", "at_least")
# Default probability floor of the At Most / At Least candidates (see the module docstring).
BOUND_MIN_PROB = 0.01


def candidate_set(
    logits: torch.Tensor, top_k: int, top_p: float = 1.0, min_p: float = 0.0, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The candidate tokens of one decoding step and their temperature-scaled log-probabilities.

    With ``q = softmax(logits[top_k] / temperature)`` over the ``top_k`` most likely tokens in descending order
    (temperature `0` filters at temperature 1), candidate ``i`` is dropped when

        sum_{j < i} q_j >= top_p        (top-p: the candidates above it already reach top_p)
        q_i < min_p * q_0               (min-p)

    A dropped candidate keeps its id and gets log-probability `-inf`; the most likely token is never dropped.

    Args:
        logits (`torch.Tensor`):
            `(B, V)` next-token logits.
        top_k (`int`):
            Candidates per row, at most `V`.
        top_p (`float`, *optional*, defaults to `1.0`):
            Keep the smallest prefix of candidates whose probability reaches `top_p`.
        min_p (`float`, *optional*, defaults to `0.0`):
            Drop candidates with probability below `min_p` times the top probability.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `candidate_ids` `(B, k)` long and `candidate_logprobs` `(B, k)`
        float32, normalised over the kept candidates.

    Example:
        >>> ids, logprobs = candidate_set(torch.tensor([[0.0, 3.0, 1.0, 2.0]]), top_k=3, min_p=0.3)
        >>> ids.tolist(), logprobs.isfinite().tolist()
        ([[1, 3, 2]], [[True, True, False]])
        >>> _, logprobs = candidate_set(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), top_k=3, top_p=0.7)
        >>> logprobs.exp().tolist()  # 0.5 < 0.7 <= 0.5 + 0.3: two candidates, renormalised
        [[0.625, 0.375, 0.0]]
    """
    top_k = min(top_k, logits.size(-1))
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)  # (B, V)
    top_logits, candidate_ids = scaled.topk(top_k, dim=-1)  # (B, k), descending
    probs = top_logits.softmax(dim=-1)  # (B, k) renormalised over the top-k
    drop = torch.zeros_like(probs, dtype=torch.bool)
    if top_p < 1.0:
        drop |= probs.cumsum(dim=-1) - probs >= top_p
    if min_p > 0.0:
        drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    return candidate_ids, top_logits.masked_fill(drop, float("-inf")).log_softmax(dim=-1)


def select_candidates(
    candidate_logprobs: torch.Tensor,
    values: torch.Tensor | None,
    mode: GuidanceMode,
    gamma: float | None = None,
    beta: float = 0.0,
    steps: torch.Tensor | None = None,
    target_lengths: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    bound_min_prob: float = BOUND_MIN_PROB,
) -> torch.Tensor:
    r"""
    Choose one candidate per row (paper section 5; the rules are spelled out in the module docstring).

    - `"none"`: sample from the candidate distribution (argmax at temperature 0).
    - `"tilt"`: the same on `log p(x) + beta * u(x)` with `u(x) = -v(x) = 1 - gamma^l(x)`; with `beta = 0` this
      is exactly `"none"` (adding 0 changes no bit).
    - `"equal_to"`: `argmin_x |v(x) - v*|` with `v* = -(1 - gamma^max(T - t, 0))`, `t = steps + 1` the generated
      tokens including the candidate.
    - `"at_most"` / `"at_least"`: among the eligible candidates (`p(x) >= bound_min_prob`, the most likely one
      always), the base choice among those with `t + l(x) <= T` (`>= T`), where `l(x) = log(1 + v(x)) / log(gamma)`;
      the largest (smallest) value when none qualifies. A candidate below the floor is never chosen, a stop token
      included.

    Args:
        candidate_logprobs (`torch.Tensor`):
            `(B, k)` temperature-scaled log-probabilities, `-inf` for dropped candidates.
        values (`torch.Tensor` or `None`):
            `(B, k)` LenVM values of the candidates (0 for stop tokens); unused for `"none"`.
        mode (`str`):
            One of `"none"`, `"tilt"`, `"equal_to"`, `"at_most"`, `"at_least"`.
        gamma (`float`, *optional*):
            The LenVM's discount; needed by the constraint modes.
        beta (`float`, *optional*, defaults to `0.0`):
            Tilt strength.
        steps (`torch.Tensor`, *optional*):
            `(B,)` tokens generated so far (before the candidate); needed by the constraint modes.
        target_lengths (`torch.Tensor`, *optional*):
            `(B,)` target lengths `T` in tokens, stop token included; needed by the constraint modes.
        temperature (`float`, *optional*, defaults to `1.0`):
            `0` takes the argmax instead of sampling.
        generator (`torch.Generator`, *optional*):
            Source of randomness.
        bound_min_prob (`float`, *optional*, defaults to `0.01`):
            Probability floor of `"at_most"` / `"at_least"`: candidates with `exp(candidate_logprobs) <
            bound_min_prob` are never chosen (the most likely one always may be). `0` is the unfloored rule.

    Returns:
        `torch.Tensor`: `(B,)` index of the chosen candidate in each row.

    Example:
        >>> logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
        >>> values = torch.tensor([[-0.75, -0.5, 0.0]])  # 2, 1 and 0 tokens left at gamma = 0.5
        >>> select_candidates(logprobs, values, "equal_to", 0.5, steps=torch.tensor([3]),
        ...                   target_lengths=torch.tensor([5])).tolist()  # 5 - 4 = 1 token left after it
        [1]
        >>> select_candidates(logprobs, values, "at_most", 0.5, steps=torch.tensor([3]),
        ...                   target_lengths=torch.tensor([5]), temperature=0).tolist()  # 4 + 2 > 5 >= 4 + 1
        [1]
        >>> select_candidates(logprobs, values, "tilt", beta=-50.0, temperature=0).tolist()  # u = 0.75, 0.5, 0
        [2]
        >>> unlikely_stop = torch.log(torch.tensor([[0.6, 0.395, 0.005]]))  # only the stop token fits 4 + 0 <= 4
        >>> [select_candidates(unlikely_stop, values, "at_most", 0.5, steps=torch.tensor([3]),
        ...                    target_lengths=torch.tensor([4]), temperature=0, bound_min_prob=floor).tolist()
        ...  for floor in (0.0, 0.01)]  # without a floor p = 0.005 is forced; with it, the shortest eligible
        [[2], [1]]
    """
    valid = candidate_logprobs.isfinite()  # (B, k)
    if mode in ("none", "tilt"):
        scores = candidate_logprobs if mode == "none" else candidate_logprobs + beta * (-values)
        return _sample(scores, temperature, generator)
    if mode not in CONSTRAINT_MODES:
        raise ValueError(f"unknown guidance mode {mode!r}")
    if values is None or gamma is None or steps is None or target_lengths is None:
        raise ValueError(f"mode={mode!r} needs candidate values, gamma, steps and target_lengths")
    remaining = (target_lengths - (steps + 1)).clamp(min=0)  # (B,) tokens left after the candidate
    if mode == "equal_to":
        target_values = lengths_to_values(remaining.to(values.dtype), gamma).to(values.dtype)  # (B,)
        distance = (values - target_values[:, None]).abs().masked_fill(~valid, float("inf"))
        return distance.argmin(dim=-1)
    # The floor: a bound may only choose among candidates the policy gives a real chance (the most likely always).
    eligible = valid if bound_min_prob <= 0 else valid & (candidate_logprobs >= math.log(bound_min_prob))  # (B, k)
    eligible = eligible | (candidate_logprobs == candidate_logprobs.amax(dim=-1, keepdim=True))
    predicted = values_to_lengths(values.double(), gamma)  # (B, k) predicted tokens left after the candidate
    feasible = predicted <= remaining[:, None] if mode == "at_most" else predicted >= remaining[:, None]
    feasible &= eligible
    base = _sample(candidate_logprobs.masked_fill(~feasible, float("-inf")), temperature, generator)
    extreme_values = values.masked_fill(~eligible, -math.inf if mode == "at_most" else math.inf)
    extreme = extreme_values.argmax(dim=-1) if mode == "at_most" else extreme_values.argmin(dim=-1)
    return torch.where(feasible.any(dim=-1), base, extreme)


def _sample(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one index per row from ``softmax(scores)`` (argmax at temperature 0); ``(B, k) -> (B,)``."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    # Rows without a finite score (only reachable through masking) fall back to the first candidate.
    scores = torch.where(scores.isfinite().any(dim=-1, keepdim=True), scores, torch.zeros_like(scores))
    probs = (scores - scores.amax(dim=-1, keepdim=True)).exp()  # (B, k), softmax up to normalisation
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
