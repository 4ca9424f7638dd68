"""Statistics of a length ablation: bootstrap intervals over seeds and problems, frontiers, matched accuracy.

Pure numpy, no torch or transformers. ``recipes/ablate_length.py`` runs each row (a length method at one coefficient)
with several seeds; every run evaluates the policy before and after RL on the same held-out problems, several
completions per problem. This module turns the per-completion ``correct`` / ``lengths`` lists of those evaluations
into:

- [`hierarchical_bootstrap`]: resampled means over seeds, then problems within each seed (completions of one
  problem stay together), several quantities resampled jointly so that paired differences keep their pairing;
- [`row_statistics`]: a row's accuracy, mean tokens, change against the start and share of removable verbosity
  removed, each as mean, 95% interval and the seeds' spread;
- [`tokens_at_accuracy`] / [`matched_accuracy_tokens`]: the mean tokens at which a method's coefficient sweep
  crosses a target accuracy (linear interpolation on its frontier), or "not reached";
- [`removable_share`]: ``(start - tokens) / (start - floor)``, the share of the removable verbosity removed;
- [`prompt_mre_statistics`]: the prompt-boundary MRE of a LenVM and of the length baselines, and the LenVM's paired
  difference with each, from the per-prompt predictions of ``recipes/eval_length_prediction.py``.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "format_interval",
    "hierarchical_bootstrap",
    "interval",
    "matched_accuracy_tokens",
    "per_problem_means",
    "prompt_mre_statistics",
    "removable_share",
    "row_statistics",
    "run_problem_values",
    "tokens_at_accuracy",
]


def per_problem_means(values: Sequence[float], num_samples: int) -> np.ndarray:
    """Mean over each problem's completions of a per-completion list in problem-major order.

    Args:
        values (`Sequence[float]`): ``(N * K,)`` values (lengths, or correctness as 0/1), the ``K = num_samples``
            completions of problem 0 first.
        num_samples (`int`): Completions per problem ``K``.

    Returns:
        `np.ndarray`: ``(N,)`` per-problem means; their mean is the mean of ``values``.

    Example:
        >>> per_problem_means([10, 20, 30, 50], num_samples=2).tolist()
        [15.0, 40.0]
    """
    array = np.asarray(values, dtype=np.float64)
    if num_samples < 1 or array.size == 0 or array.size % num_samples:
        raise ValueError(f"Need a non-empty multiple of num_samples={num_samples} values, got {array.size}.")
    return array.reshape(-1, num_samples).mean(axis=1)


def run_problem_values(before: Mapping, after: Mapping, floor_tokens: Sequence[float] | None = None) -> dict:
    """The per-problem quantities of one run that [`hierarchical_bootstrap`] resamples together.

    Args:
        before (`Mapping`): The start evaluation (`lenvm_rl.evaluation.evaluate_gsm8k`'s dict: ``correct``,
            ``lengths``, ``num_samples``).
        after (`Mapping`): The evaluation after RL, on the same problems.
        floor_tokens (`Sequence[float]`, *optional*): ``(N,)`` tokens of the shortest correct reference solution of
            each problem.

    Returns:
        `dict[str, np.ndarray]`: ``accuracy``, ``mean_tokens``, ``start_accuracy``, ``start_tokens`` (and
        ``floor_tokens``), each ``(N,)``.
    """
    values = {
        "accuracy": per_problem_means(after["correct"], after["num_samples"]),
        "mean_tokens": per_problem_means(after["lengths"], after["num_samples"]),
        "start_accuracy": per_problem_means(before["correct"], before["num_samples"]),
        "start_tokens": per_problem_means(before["lengths"], before["num_samples"]),
    }
    if floor_tokens is not None:
        values["floor_tokens"] = np.asarray(floor_tokens, dtype=np.float64)
    if len({len(v) for v in values.values()}) != 1:
        raise ValueError(
            f"The evaluations cover different numbers of problems ({ {k: len(v) for k, v in values.items()} }): "
            "before, after and the floor must describe the same held-out problems."
        )
    return values


def hierarchical_bootstrap(
    runs: Sequence[Mapping[str, np.ndarray]], num_resamples: int = 2000, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """Bootstrap over seeds and problems: resampled grand means of per-problem quantities.

    Each resample draws ``S`` runs (seeds) with replacement, then, independently in each drawn run, ``N`` problems
    with replacement, and averages over the drawn runs of the mean over the drawn problems:

        m_b = 1/S sum_{j=1..S} 1/N sum_{i=1..N} x[s_bj, p_bji]

    Every key of a run is resampled with the same indices, so a difference or a ratio of two keys computed per
    resample is a paired statistic. Resampling the seeds carries the seed-to-seed (training) variance, resampling the
    problems the evaluation's sampling variance; with one seed only the second remains.

    Args:
        runs (`Sequence[Mapping[str, np.ndarray]]`): ``S`` runs, each ``{key: (N,) per-problem values}``, with the
            same keys and the same ``N`` in every run.
        num_resamples (`int`, *optional*, defaults to `2000`): ``B``.
        rng (`np.random.Generator`, *optional*): Source of the draws (default: seeded with 0).

    Returns:
        `dict[str, np.ndarray]`: ``{key: (B,) resampled means}``.
    """
    if not runs:
        raise ValueError("Need at least one run to bootstrap.")
    keys = list(runs[0])
    if any(list(run) != keys for run in runs):
        raise ValueError(f"Every run needs the same keys, got {[list(run) for run in runs]}.")
    stacked = {key: np.stack([np.asarray(run[key], dtype=np.float64) for run in runs]) for key in keys}  # (S, N)
    num_runs, num_problems = next(iter(stacked.values())).shape
    rng = rng if rng is not None else np.random.default_rng(0)
    seeds = rng.integers(num_runs, size=(num_resamples, num_runs))  # (B, S)
    problems = rng.integers(num_problems, size=(num_resamples, num_runs, num_problems))  # (B, S, N)
    return {key: values[seeds[..., None], problems].mean(axis=(1, 2)) for key, values in stacked.items()}


def interval(point: float, samples: np.ndarray, confidence: float = 0.95) -> dict:
    """A point estimate with the percentile interval of its bootstrap samples (NaN samples are left out).

    Returns:
        `dict`: ``mean`` (the point estimate), ``ci_low``, ``ci_high`` (``None`` when no sample is finite).

    Example:
        >>> interval(2.0, np.arange(0.0, 101.0), confidence=0.5)
        {'mean': 2.0, 'ci_low': 25.0, 'ci_high': 75.0}
    """
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return {"mean": float(point), "ci_low": None, "ci_high": None}
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return {"mean": float(point), "ci_low": float(low), "ci_high": float(high)}


def format_interval(stat: Mapping | None, fmt: str = ".1f", percent: bool = False) -> str:
    """An [`interval`] dict as ``"mean [low, high]"`` (``"mean"`` without interval, ``""`` for `None`).

    Example:
        >>> format_interval({"mean": 0.25, "ci_low": 0.2, "ci_high": 0.3}, ".0f", percent=True)
        '25% [20%, 30%]'
        >>> format_interval({"mean": 31.84, "ci_low": None, "ci_high": None})
        '31.8'
    """
    if stat is None:
        return ""
    scale, suffix = (100, "%") if percent else (1, "")
    text = f"{scale * stat['mean']:{fmt}}{suffix}"
    if stat.get("ci_low") is not None:
        text += f" [{scale * stat['ci_low']:{fmt}}{suffix}, {scale * stat['ci_high']:{fmt}}{suffix}]"
    return text


def removable_share(start_tokens, tokens, floor_tokens):
    """Share of the removable verbosity removed: ``(start - tokens) / (start - floor)``.

    1 means the policy is as short as the floor (the shortest correct reference style), 0 means no shorter than at
    the start, negative means longer. Undefined (NaN) when the start is not above the floor. Works elementwise on
    arrays.

    Example:
        >>> removable_share(40.0, 34.0, 30.0)
        0.6
        >>> math.isnan(removable_share(30.0, 28.0, 30.0))
        True
    """
    start, tokens, floor = (np.asarray(x, dtype=np.float64) for x in (start_tokens, tokens, floor_tokens))
    removable = start - floor
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(removable > 0, (start - tokens) / np.where(removable > 0, removable, 1.0), np.nan)
    return float(share) if share.ndim == 0 else share


# per_prompt column of eval_length_prediction.json -> predictor name (the keys of its prompt_mre)
PROMPT_PREDICTORS = {
    "predicted_length": "lenvm",
    "constant_length": "constant",
    "regression_length": "prompt_length_regression",
    "linear_length": "linear_prompt_length",
}


def prompt_mre_statistics(
    per_prompt_runs: Sequence[Mapping[str, Sequence[float]]],
    num_resamples: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
) -> dict[str, dict]:
    """Prompt-boundary MRE of the LenVM and of each baseline, and the LenVM's paired difference with each baseline.

    Per held-out prompt ``i`` and predictor ``k`` the relative error is ``e_ki = |L_hat_ki - L_GT_i| / L_GT_i`` and
    ``MRE_k = mean_i e_ki``. The difference ``d_ki = e_lenvm,i - e_ki`` is resampled with [`hierarchical_bootstrap`]:
    over the runs (LenVMs trained with other seeds) and the prompts, both predictors of a resample on the same
    prompts, so a negative interval means the LenVM beats that baseline on these prompts. With one run only the
    prompts are resampled.

    Args:
        per_prompt_runs (`Sequence[Mapping]`): The ``per_prompt`` dict of each run's `eval_length_prediction.json`
            (``true_length`` and the predicted-length columns of `PROMPT_PREDICTORS`), on the same prompts.
        num_resamples, confidence, rng: Of [`hierarchical_bootstrap`] and [`interval`].

    Returns:
        `dict`: ``mre`` ``{predictor: interval}`` and ``lenvm_minus`` ``{baseline: interval}`` (negative: the LenVM
        errs less), for the predictors every run has.

    Example:
        >>> run = {"true_length": [100, 200], "predicted_length": [110, 180], "constant_length": [150, 150]}
        >>> stats = prompt_mre_statistics([run], num_resamples=200)
        >>> round(stats["mre"]["lenvm"]["mean"], 3), round(stats["lenvm_minus"]["constant"]["mean"], 3)
        (0.1, -0.275)
    """
    if not per_prompt_runs:
        raise ValueError("Need at least one evaluation.")
    columns = [column for column in PROMPT_PREDICTORS if all(column in run for run in per_prompt_runs)]
    if "predicted_length" not in columns:
        raise ValueError("Every evaluation needs the LenVM's per-prompt `predicted_length`.")
    errors = []
    for run in per_prompt_runs:
        true = np.asarray(run["true_length"], dtype=np.float64)
        if true.size == 0 or np.any(~np.isfinite(true)) or np.any(true <= 0):
            raise ValueError("`true_length` must hold positive lengths, one per prompt.")
        per_run = {PROMPT_PREDICTORS[c]: np.abs(np.asarray(run[c], dtype=np.float64) - true) / true for c in columns}
        for name in [PROMPT_PREDICTORS[c] for c in columns[1:]]:
            per_run[f"lenvm_minus_{name}"] = per_run["lenvm"] - per_run[name]
        errors.append(per_run)
    samples = hierarchical_bootstrap(errors, num_resamples, rng)
    stats = {
        key: interval(float(np.mean([run[key].mean() for run in errors])), samples[key], confidence)
        for key in errors[0]
    }
    baselines = [PROMPT_PREDICTORS[c] for c in columns[1:]]
    return {
        "mre": {name: stats[name] for name in ("lenvm", *baselines)},
        "lenvm_minus": {name: stats[f"lenvm_minus_{name}"] for name in baselines},
    }


def row_statistics(
    runs: Sequence[Mapping[str, np.ndarray]],
    num_resamples: int = 2000,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """A row's statistics over its seeds: mean, bootstrap interval and the seeds' spread.

    Args:
        runs (`Sequence[Mapping[str, np.ndarray]]`): One [`run_problem_values`] dict per seed.
        num_resamples, confidence, rng: Of [`hierarchical_bootstrap`] and [`interval`].

    Returns:
        `tuple[dict, dict]`: the statistics (JSON-ready) and the bootstrap samples ``{key: (B,)}`` (for
        [`matched_accuracy_tokens`]). Statistics: ``n_seeds``; ``accuracy``, ``mean_tokens``, ``start_accuracy``,
        ``start_tokens`` each with ``mean``, ``ci_low``, ``ci_high``, ``seed_std`` (standard deviation of the per-seed
        means, 0 for one seed) and ``per_seed``; ``tokens_vs_start`` (``tokens / start - 1``) and, with
        ``floor_tokens``, ``floor_tokens`` and ``removable_share``, with paired intervals (the same seeds and problems
        for both sides of every resample).
    """
    per_seed = {key: [float(np.mean(run[key])) for run in runs] for key in runs[0]}
    point = {key: float(np.mean(values)) for key, values in per_seed.items()}
    samples = hierarchical_bootstrap(runs, num_resamples, rng)
    stats = {"n_seeds": len(runs)}
    for key in ("accuracy", "mean_tokens", "start_accuracy", "start_tokens", "floor_tokens"):
        if key in point:
            stats[key] = {
                **interval(point[key], samples[key], confidence),
                "seed_std": float(np.std(per_seed[key], ddof=1)) if len(runs) > 1 else 0.0,
                "per_seed": per_seed[key],
            }
    with np.errstate(divide="ignore", invalid="ignore"):
        change = samples["mean_tokens"] / samples["start_tokens"] - 1
    stats["tokens_vs_start"] = interval(point["mean_tokens"] / point["start_tokens"] - 1, change, confidence)
    if "floor_tokens" in point:
        share = removable_share(samples["start_tokens"], samples["mean_tokens"], samples["floor_tokens"])
        point_share = removable_share(point["start_tokens"], point["mean_tokens"], point["floor_tokens"])
        stats["removable_share"] = interval(point_share, share, confidence)
    return stats, samples


def tokens_at_accuracy(tokens: Sequence[float], accuracies: Sequence[float], target: float) -> dict:
    """The fewest mean tokens at which a frontier reaches `target` accuracy, by linear interpolation.

    The frontier is the piecewise-linear curve through the points ``(tokens_i, accuracy_i)`` sorted by tokens. Going
    from its shortest point up, the first point at or above `target` and the one before it (below `target`) bracket
    the crossing:

        t* = t_{i-1} + (target - a_{i-1}) * (t_i - t_{i-1}) / (a_i - a_{i-1})

    Not reached when the shortest point is already at or above `target` (the sweep never pushed the accuracy down to
    it, so fewer tokens may still keep it: ``side="above"``, ``bound`` is the shortest point's tokens, an upper bound)
    or when no point reaches it (``side="below"``).

    Args:
        tokens (`Sequence[float]`): ``(P,)`` mean tokens of the frontier's points (any order).
        accuracies (`Sequence[float]`): ``(P,)`` their accuracies.
        target (`float`): The accuracy to match.

    Returns:
        `dict`: ``reached`` (`bool`), ``tokens`` (the crossing, or `None`), ``side`` (`None`, ``"above"`` or
        ``"below"``) and ``bound`` (the shortest point's tokens when ``side="above"``).

    Example:
        >>> tokens_at_accuracy([40.0, 30.0, 20.0], [1.0, 0.75, 0.25], target=0.5)  # 20 + (0.5 - 0.25) * 10 / 0.5
        {'reached': True, 'tokens': 25.0, 'side': None, 'bound': None}
    """
    if len(tokens) != len(accuracies) or not len(tokens):
        raise ValueError(f"Need as many tokens as accuracies, at least one; got {len(tokens)} and {len(accuracies)}.")
    points = sorted(zip(tokens, accuracies))
    if points[0][1] >= target:
        return {"reached": False, "tokens": None, "side": "above", "bound": float(points[0][0])}
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if a1 >= target:  # a0 < target: every point before this one is below
            crossing = t0 + (target - a0) * (t1 - t0) / (a1 - a0)
            return {"reached": True, "tokens": float(crossing), "side": None, "bound": None}
    return {"reached": False, "tokens": None, "side": "below", "bound": None}


def matched_accuracy_tokens(
    points: Sequence[tuple[float, float]],
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    target: float,
    confidence: float = 0.95,
) -> dict:
    """[`tokens_at_accuracy`] of a method's frontier, with a bootstrap interval.

    Each bootstrap resample ``b`` re-evaluates the crossing on the frontier of the resampled row means (rows are
    resampled independently of each other; `target` is held fixed). The interval is over the resamples that reach
    `target`; ``reached_fraction`` says how many did.

    Args:
        points (`Sequence[tuple[float, float]]`): ``(mean tokens, accuracy)`` of each row of the sweep.
        samples (`Sequence[tuple[np.ndarray, np.ndarray]]`): ``((B,) tokens, (B,) accuracies)`` per row, in the order
            of `points`, with the same ``B``.
        target (`float`): The accuracy to match.
        confidence (`float`, *optional*, defaults to `0.95`): Of the interval.

    Returns:
        `dict`: [`tokens_at_accuracy`]'s keys, ``ci_low`` / ``ci_high`` (``None`` unless reached) and
        ``reached_fraction``.
    """
    tokens, accuracies = zip(*points)
    result = tokens_at_accuracy(tokens, accuracies, target)
    sample_tokens = np.stack([np.asarray(t, dtype=np.float64) for t, _ in samples], axis=1)  # (B, P)
    sample_accuracies = np.stack([np.asarray(a, dtype=np.float64) for _, a in samples], axis=1)  # (B, P)
    crossings = np.array(
        [
            math.nan if (found := tokens_at_accuracy(t, a, target))["tokens"] is None else found["tokens"]
            for t, a in zip(sample_tokens, sample_accuracies)
        ]
    )
    result["reached_fraction"] = float(np.isfinite(crossings).mean())
    result["ci_low"] = result["ci_high"] = None
    if result["reached"]:
        bounds = interval(result["tokens"], crossings, confidence)
        result["ci_low"], result["ci_high"] = bounds["ci_low"], bounds["ci_high"]
    return result
