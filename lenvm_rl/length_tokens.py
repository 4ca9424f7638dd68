"""Length tokens: the tokens after which a LenVM's predicted horizon jumps (paper section 5), and a hover view.

The one-step TD residual of completion token ``i`` (the token that leads from state ``s_i`` to ``s_{i+1}``) is

    delta_i = -(1 - gamma) + gamma * V(s_{i+1}) - V(s_i)        (V after a stop token = 0)

([`~lenvm_rl.core.length_td_residuals`]). For an exact LenVM it is 0 in expectation; ``delta < -threshold`` marks
a token that *lengthens* the predicted continuation ("wait", "but"), ``delta > threshold`` one that *shortens* it
("therefore", "\\n\\n"). The paper flags ``|delta| > 0.01`` at gamma = 0.997. A residual of a state with ``l``
tokens left moved by ``dl`` tokens is about ``gamma^l (1 - gamma) dl``, so residuals scale with ``1 - gamma``;
[`default_length_token_threshold`] keeps the paper's threshold in units of ``1 - gamma`` for other discounts.

Everything here is pure (torch and the standard library); running the LenVM is the caller's job.
"""

import html
from collections.abc import Sequence

import torch

from .core import length_td_residuals, values_to_lengths

__all__ = [
    "completion_td_residuals",
    "count_length_tokens",
    "default_length_token_threshold",
    "length_tokens_html",
    "top_length_tokens",
]

PAPER_GAMMA, PAPER_THRESHOLD = 0.997, 0.01


def default_length_token_threshold(gamma: float) -> float:
    """The paper's ``|delta| > 0.01`` at gamma = 0.997, rescaled by ``(1 - gamma) / (1 - 0.997)``.

    Example:
        >>> round(default_length_token_threshold(0.997), 6), round(default_length_token_threshold(0.97), 6)
        (0.01, 0.1)
    """
    return PAPER_THRESHOLD * (1.0 - gamma) / (1.0 - PAPER_GAMMA)


def completion_td_residuals(state_values: torch.Tensor, gamma: float, terminated: bool = True) -> torch.Tensor:
    """TD residuals of the tokens of one completion from the LenVM values of its states.

    Args:
        state_values (`torch.Tensor`):
            ``(L + 1,)`` values ``V(s_0) .. V(s_L)``: at the last prompt token, then after each of the ``L``
            completion tokens.
        gamma (`float`):
            The LenVM's discount.
        terminated (`bool`, *optional*, defaults to `True`):
            The completion ended with its stop token, so ``V(s_L)`` is set to 0 (terminal state).

    Returns:
        `torch.Tensor`: ``(L,)`` residuals; entry ``i`` belongs to completion token ``i``.

    Example:
        >>> completion_td_residuals(torch.tensor([-0.75, -0.9, -0.3]), gamma=0.5)  # the stop value becomes 0
        tensor([-0.2000,  0.4000])
    """
    values = state_values.clone()
    if terminated:
        values[-1] = 0.0
    return length_td_residuals(values, gamma)


def count_length_tokens(
    token_ids: Sequence[Sequence[int]], residuals: Sequence[torch.Tensor], threshold: float
) -> dict[int, dict[str, float]]:
    """Per token id: occurrences, how often it lengthens (``delta < -threshold``) or shortens (``delta > threshold``)
    the predicted horizon, and its mean residual.

    Args:
        token_ids (`Sequence[Sequence[int]]`):
            Completion token ids, one sequence per completion.
        residuals (`Sequence[torch.Tensor]`):
            Their residuals, same lengths (from [`completion_td_residuals`]).
        threshold (`float`):
            ``|delta|`` above which a token counts.

    Returns:
        `dict[int, dict[str, float]]`: for each token id ``{"count", "lengthen", "shorten", "mean_delta"}``.

    Example:
        >>> stats = count_length_tokens([[7, 8, 7]], [torch.tensor([-0.2, 0.0, 0.3], dtype=torch.float64)], threshold=0.1)
        >>> stats[7]
        {'count': 2, 'lengthen': 1, 'shorten': 1, 'mean_delta': 0.05}
    """
    stats: dict[int, dict[str, float]] = {}
    for ids, deltas in zip(token_ids, residuals, strict=True):
        if len(ids) != len(deltas):
            raise ValueError(f"a completion has {len(ids)} tokens but {len(deltas)} residuals")
        for token, delta in zip(ids, deltas.tolist()):
            entry = stats.setdefault(int(token), {"count": 0, "lengthen": 0, "shorten": 0, "sum_delta": 0.0})
            entry["count"] += 1
            entry["lengthen"] += delta < -threshold
            entry["shorten"] += delta > threshold
            entry["sum_delta"] += delta
    return {
        token: {
            "count": e["count"],
            "lengthen": int(e["lengthen"]),
            "shorten": int(e["shorten"]),
            "mean_delta": round(e["sum_delta"] / e["count"], 12),
        }
        for token, e in stats.items()
    }


def top_length_tokens(
    stats: dict[int, dict[str, float]], direction: str, top_n: int = 15, min_count: int = 1
) -> list[tuple[int, dict[str, float]]]:
    """The tokens that most often lengthen (``direction="lengthen"``) or shorten the predicted horizon.

    Ranked by the number of flagged occurrences, then by the flagged fraction; tokens seen fewer than
    ``min_count`` times are skipped, as are tokens never flagged.

    Example:
        >>> stats = {5: {"count": 4, "lengthen": 3, "shorten": 0, "mean_delta": -0.1},
        ...          6: {"count": 9, "lengthen": 3, "shorten": 1, "mean_delta": 0.0}}
        >>> [token for token, _ in top_length_tokens(stats, "lengthen")]
        [5, 6]
    """
    if direction not in ("lengthen", "shorten"):
        raise ValueError(f"direction must be 'lengthen' or 'shorten', got {direction!r}")
    ranked = [(t, e) for t, e in stats.items() if e["count"] >= min_count and e[direction] > 0]
    ranked.sort(key=lambda item: (-item[1][direction], -item[1][direction] / item[1]["count"], item[0]))
    return ranked[:top_n]


def length_tokens_html(
    pieces: Sequence[str],
    state_values: torch.Tensor,
    gamma: float,
    threshold: float,
    title: str = "",
    prompt: str = "",
) -> str:
    """A self-contained HTML page of one completion: hovering a token shows the predicted remaining length after it.

    Tokens flagged as lengthening are tinted red, shortening ones green (stronger for larger ``|delta|``). All text
    is HTML-escaped.

    Args:
        pieces (`Sequence[str]`):
            The ``L`` completion tokens as display text (e.g. incremental decodes, so spaces are kept).
        state_values (`torch.Tensor`):
            ``(L + 1,)`` LenVM values ``V(s_0) .. V(s_L)`` (``V(s_L) = 0`` after a stop token).
        gamma (`float`):
            The LenVM's discount.
        threshold (`float`):
            Residual magnitude that counts as a length token.
        title (`str`, *optional*):
            Page heading.
        prompt (`str`, *optional*):
            The prompt, shown above the completion.

    Returns:
        `str`: the HTML document.
    """
    if len(state_values) != len(pieces) + 1:
        raise ValueError(f"{len(pieces)} tokens need {len(pieces) + 1} state values, got {len(state_values)}")
    state_values = state_values.double()
    remaining = values_to_lengths(state_values, gamma)  # (L + 1,)
    residuals = length_td_residuals(state_values, gamma)  # (L,)
    spans = []
    for i, piece in enumerate(pieces):
        delta = float(residuals[i])
        strength = min(abs(delta) / (4 * threshold), 1.0) if threshold > 0 else 0.0
        if delta < -threshold:
            color = f"rgba(220,50,47,{0.2 + 0.6 * strength:.2f})"
        elif delta > threshold:
            color = f"rgba(40,160,60,{0.2 + 0.6 * strength:.2f})"
        else:
            color = "transparent"
        tip = f"token {i + 1}: {piece!r}\nremaining after it ≈ {float(remaining[i + 1]):.1f} tokens"
        tip += f"\nV = {float(state_values[i + 1]):.4f}, delta = {delta:+.4f}"
        spans.append(
            f'<span class="tok" style="background:{color}" title="{html.escape(tip, quote=True)}">'
            f"{html.escape(piece)}</span>"
        )
    heading = html.escape(title or "LenVM: predicted remaining length per token")
    legend = (
        f"gamma = {gamma}, threshold |delta| &gt; {threshold:.4g}; predicted length at the prompt ≈ "
        f"{float(remaining[0]):.1f} tokens. <span style='background:rgba(220,50,47,0.5)'>lengthens</span> "
        "<span style='background:rgba(40,160,60,0.5)'>shortens</span>. Hover a token for details."
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
        + heading
        + "</title>\n<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.8;border:1px solid #ccc;padding:1em}"
        ".tok:hover{outline:1px solid #333}</style></head>\n<body>\n<h2>"
        + heading
        + "</h2>\n<p>"
        + legend
        + "</p>\n"
        + (f"<h3>Prompt</h3><div class='text'>{html.escape(prompt)}</div>\n<h3>Completion</h3>\n" if prompt else "")
        + "<div class='text'>"
        + "".join(spans)
        + "</div>\n</body></html>\n"
    )
