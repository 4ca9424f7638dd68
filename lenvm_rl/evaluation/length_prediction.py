"""How well a LenVM predicts lengths on held-out rollouts (paper section 5), with baselines, a plot and a table.

[`evaluate_length_prediction`] runs a LenVM over held-out rollout records (several completions per prompt, as
written by ``recipes/sample_rollouts.py``) and scores it with the functions of [`lenvm_rl.metrics`]:

- ``prompt_mre``: the paper's prompt-boundary mean relative error, for the LenVM and, given training rollouts,
  for a constant predictor (the mean training return) and a least-squares fit on the log prompt length;
- ``value_mse``: squared error of the values at every target position of the finished completions;
- ``relative_length_error``: relative error of the predicted remaining length at 0/25/50/75% of each completion.

Completions cut at the sampling cap (``finish_reason == "length"``) have an unknown true length: they are
left out of every ground truth, in the evaluation and in the baselines' training data, and counted. A prompt
whose completions were all cut has no ground truth and is left out too. Note that dropping the cut completions
shortens the ground truth of the prompts they came from (the longest continuations are the ones cut); sample
with a cap well above the lengths of interest.

[`plot_length_prediction`] and [`format_length_prediction_table`] render the returned dictionary, so a saved
``eval_length_prediction.json`` can be re-plotted without the model.
"""

import logging
import math
import os

import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from ..core import lengths_to_values, values_to_lengths
from ..metrics import (
    constant_baseline_value,
    fit_linear_prompt_length_baseline,
    fit_prompt_length_regression,
    predict_prompt_length_regression,
    prompt_boundary_mre,
    relative_length_error_at_fractions,
    remaining_length_baseline_errors,
    value_mse,
)
from ..targets import LenVMDataCollator, tokenize_rollouts

logger = logging.getLogger(__name__)

__all__ = ["evaluate_length_prediction", "format_length_prediction_table", "plot_length_prediction"]

POSITION_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


def evaluate_length_prediction(
    model,
    eval_dataset,
    train_dataset=None,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
    max_length: int | None = None,
    min_completions_per_prompt: int = 2,
) -> dict:
    """Score a LenVM's length predictions on held-out rollouts, next to three baselines.

    The LenVM runs once over every finished completion (prompt + completion, padded batches sorted by length,
    eval mode, no gradients); the value at the last prompt token is ``V(s_0)`` of that prompt, averaged over
    its completions (they share the prefix, so the copies differ only by floating-point noise).

    Args:
        model ([`LengthValueModel`]):
            The LenVM; its ``gamma`` converts values to lengths. Its train/eval mode is restored afterwards.
        eval_dataset (`datasets.Dataset`):
            Held-out rollout records with ``prompt_id``, ``prompt_ids``, ``completion_ids`` and ``finish_reason``;
            several completions per prompt (the paper uses 64).
        train_dataset (`datasets.Dataset`, *optional*):
            Training rollout records (same columns) to fit the baselines on; no baselines without it.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward.
        max_prompt_length (`int`, *optional*):
            Prompts longer than this are truncated from the left, as in pretraining (targets do not shift).
        max_length (`int`, *optional*):
            Window of prompt + completion tokens; states beyond it are not scored.
        min_completions_per_prompt (`int`, *optional*, defaults to `2`):
            Prompts with fewer finished completions are left out of the prompt-boundary MRE (and counted in
            ``num_prompts_excluded``): the paper's ground truth is a mean over several completions; one completion's
            length is a single noisy draw.

    Returns:
        `dict`: JSON-ready results:

        - ``gamma``, ``generator_model`` (the LenVM's), ``min_completions_per_prompt`` (the rule applied);
        - ``num_prompts`` (prompts scored), ``num_completions`` (finished completions scored),
            ``num_truncated_excluded`` (completions cut at the cap, left out), ``num_prompts_excluded`` (prompts
            without a finished completion), ``num_value_targets`` (positions in ``value_mse``);
        - ``prompt_mre``: ``{"lenvm": ...}`` plus, with ``train_dataset``, ``"constant"``,
            ``"prompt_length_regression"`` (value-space return on log prompt length) and ``"linear_prompt_length"``
            (the plain least-squares line ``L ~ a + b p`` in tokens);
        - ``mean_true_length`` and ``mean_predicted_length`` (means over prompts of ``L_GT`` and the LenVM's
            ``L_hat``), ``mean_sampled_length`` (mean over completions);
        - ``value_mse``;
        - ``relative_length_error`` and ``relative_length_error_counts``, keyed ``"0%"``, ``"25%"``, ``"50%"``,
            ``"75%"`` (completions of the scored prompts), and ``relative_length_error_remaining_baseline`` (with
            ``train_dataset``): the "mean remaining length given t tokens so far" baseline at the same positions;
        - ``baselines`` (``None`` without ``train_dataset``): ``constant_value``, ``constant_length``,
            ``regression_intercept``, ``regression_slope`` (of ``V = a + b log(prompt_length)``),
            ``num_train_completions``, ``num_train_truncated_excluded``;
        - ``per_prompt``: lists ``prompt_id``, ``prompt_length``, ``num_completions``, ``true_length``,
            ``predicted_length`` and, with baselines, ``constant_length`` and ``regression_length``.

        Undefined numbers (e.g. no completion long enough for a fraction) are ``None``.
    """
    gamma = model.gamma
    eval_records = _summarise_records(eval_dataset)
    finished = [i for i, ok in enumerate(eval_records["finished"]) if ok]
    if not finished:
        raise ValueError(
            f"None of the {len(eval_dataset)} eval completions finished with a stop token: there is no ground truth. "
            "Sample the eval rollouts with a larger max_new_tokens."
        )
    eval_generators = set(eval_dataset["generator_model"]) if "generator_model" in eval_dataset.column_names else set()
    if model.generator_model and eval_generators and eval_generators != {model.generator_model}:
        logger.warning(
            "The LenVM was trained on completions of %r but the eval rollouts come from %s: LenVM values are "
            "policy-dependent, so errors include the policy mismatch.",
            model.generator_model,
            sorted(eval_generators),
        )

    # 1. LenVM values of every finished completion.
    examples = tokenize_rollouts(
        eval_dataset.select(finished), max_prompt_length=max_prompt_length, max_length=max_length
    )
    if len(examples) != len(finished):
        raise ValueError("Eval records with an empty prompt_ids or completion_ids cannot be scored; remove them.")
    lengths = torch.tensor(examples["completion_length"])  # (N,)
    start_values, squared_error_sum, num_targets, fraction_errors = _score_completions(
        model, examples.to_list(), lengths, batch_size
    )

    # 2. Group by prompt: V(s_0) and the sampled lengths of each prompt.
    groups: dict = {}
    for row, i in enumerate(finished):
        groups.setdefault(eval_records["prompt_id"][i], []).append(row)
    groups = {key: members for key, members in groups.items() if len(members) >= min_completions_per_prompt}
    if not groups:
        raise ValueError(
            f"No prompt has {min_completions_per_prompt} finished completions: sample more completions per prompt, "
            "a larger --max_new_tokens, or lower min_completions_per_prompt (--min_completions_per_prompt)."
        )
    prompt_ids = list(groups)
    rows = [torch.tensor(members) for members in groups.values()]
    prompt_values = torch.stack([start_values[r].mean() for r in rows])  # (P,)
    sampled_lengths = [lengths[r] for r in rows]
    prompt_lengths = [eval_records["prompt_length"][finished[int(r[0])]] for r in rows]
    lenvm = prompt_boundary_mre(prompt_values, sampled_lengths, gamma)

    # 3. Baselines, fitted on the finished training completions and scored by the same metric.
    mre = {"lenvm": lenvm.mre}
    per_prompt = {
        "prompt_id": prompt_ids,
        "prompt_length": prompt_lengths,
        "num_completions": [len(r) for r in rows],
        "true_length": lenvm.true_lengths.tolist(),
        "predicted_length": lenvm.predicted_lengths.tolist(),
    }
    baselines, remaining_errors = None, None
    if train_dataset is not None:
        train = _summarise_records(train_dataset)
        keep = [i for i, ok in enumerate(train["finished"]) if ok]
        if not keep:
            raise ValueError("No finished completion in the training rollouts: the baselines cannot be fitted.")
        train_lengths = [train["length"][i] for i in keep]
        constant = constant_baseline_value(train_lengths, gamma)
        coefficients = fit_prompt_length_regression([train["prompt_length"][i] for i in keep], train_lengths, gamma)
        constant_result = prompt_boundary_mre(constant.expand(len(rows)), sampled_lengths, gamma)
        regression_values = predict_prompt_length_regression(coefficients, prompt_lengths)
        regression_result = prompt_boundary_mre(regression_values, sampled_lengths, gamma)
        linear = fit_linear_prompt_length_baseline([train["prompt_length"][i] for i in keep], train_lengths)
        linear_lengths = (linear[0] + linear[1] * torch.tensor(prompt_lengths, dtype=torch.float64)).clamp(min=1.0)
        linear_result = prompt_boundary_mre(lengths_to_values(linear_lengths, gamma), sampled_lengths, gamma)
        mre.update(
            constant=constant_result.mre,
            prompt_length_regression=regression_result.mre,
            linear_prompt_length=linear_result.mre,
        )
        per_prompt.update(
            constant_length=constant_result.predicted_lengths.tolist(),
            regression_length=regression_result.predicted_lengths.tolist(),
            linear_length=linear_result.predicted_lengths.tolist(),
        )
        scored = torch.cat(rows)  # the completions of the scored prompts
        remaining_errors = remaining_length_baseline_errors(train_lengths, lengths[scored], POSITION_FRACTIONS)
        baselines = {
            "constant_value": float(constant),
            "constant_length": float(values_to_lengths(constant, gamma)),
            "regression_intercept": float(coefficients[0]),
            "regression_slope": float(coefficients[1]),
            "linear_intercept": float(linear[0]),
            "linear_slope": float(linear[1]),
            "num_train_completions": len(keep),
            "num_train_truncated_excluded": len(train["finished"]) - len(keep),
        }

    labels = [f"{f:.0%}" for f in POSITION_FRACTIONS]
    scored_errors = fraction_errors[torch.cat(rows)]  # the completions of the scored prompts
    return {
        "gamma": gamma,
        "generator_model": model.generator_model,
        "min_completions_per_prompt": min_completions_per_prompt,
        "num_prompts": len(prompt_ids),
        "num_completions": len(finished),
        "num_truncated_excluded": len(eval_dataset) - len(finished),
        "num_prompts_excluded": len(set(eval_records["prompt_id"])) - len(prompt_ids),
        "num_value_targets": num_targets,
        "prompt_mre": mre,
        "mean_true_length": float(lenvm.true_lengths.mean()),
        "mean_predicted_length": float(lenvm.predicted_lengths.mean()),
        "mean_sampled_length": float(lengths.double().mean()),
        "value_mse": _finite_or_none(squared_error_sum / num_targets),
        "relative_length_error": dict(zip(labels, map(_finite_or_none, scored_errors.nanmean(0).tolist()))),
        "relative_length_error_counts": dict(zip(labels, (~scored_errors.isnan()).sum(0).tolist())),
        "relative_length_error_remaining_baseline": None
        if remaining_errors is None
        else dict(zip(labels, map(_finite_or_none, remaining_errors.nanmean(0).tolist()))),
        "baselines": baselines,
        "per_prompt": per_prompt,
    }


@torch.no_grad()
def _score_completions(model, examples: list[dict], lengths: torch.Tensor, batch_size: int):
    """Run the LenVM over the examples; return V(s_0) ``(N,)``, the squared-error sum and count over all targets
    and the relative errors at [`POSITION_FRACTIONS`] ``(N, F)``."""
    collator = LenVMDataCollator(gamma=model.gamma, pad_token_id=0)  # right padding: its id never reaches a value
    device = next(model.parameters()).device
    N = len(examples)
    start_values = torch.empty(N, dtype=torch.float64)
    fraction_errors = torch.empty(N, len(POSITION_FRACTIONS), dtype=torch.float64)
    squared_error_sum, num_targets = 0.0, 0
    # Longest first: similar lengths share a batch (little padding) and memory peaks in the first batch.
    order = sorted(range(N), key=lambda i: -len(examples[i]["input_ids"]))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, N, batch_size), desc="LenVM values", unit="batch"):
            index = order[start : start + batch_size]
            batch = collator([examples[i] for i in index])
            values = model(
                batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).values.cpu()  # (B, T)
            target_mask = batch["target_mask"]
            squared_error_sum += float(value_mse(values, batch["length_targets"], target_mask, reduction="sum"))
            num_targets += int(target_mask.sum())
            aligned = _align_to_completions(values, target_mask)  # (B, K) column t = V(s_t)
            start_values[index] = aligned[:, 0]
            fraction_errors[index] = relative_length_error_at_fractions(
                aligned, lengths[index], model.gamma, POSITION_FRACTIONS, reduction="none"
            )
    finally:
        model.train(was_training)
    return start_values, squared_error_sum, num_targets, fraction_errors


def _align_to_completions(values: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Shift each row so that column ``t`` holds ``V(s_t)``; NaN past the row's last target position."""
    T = values.shape[1]
    first = target_mask.long().argmax(dim=-1)  # (B,) column of s_0, the last prompt token
    counts = target_mask.sum(dim=-1)  # (B,) states s_0 .. s_L inside the window
    steps = torch.arange(int(counts.max()))  # (K,)
    columns = (first[:, None] + steps[None, :]).clamp(max=T - 1)  # (B, K)
    aligned = values.to(torch.float64).gather(1, columns)
    return aligned.masked_fill(steps[None, :] >= counts[:, None], math.nan)


def _summarise_records(dataset) -> dict[str, list]:
    """``prompt_id``, ``prompt_length``, ``length`` and ``finished`` of every record, read through Arrow (no
    Python lists of token ids)."""
    summary = {"prompt_id": [], "prompt_length": [], "length": [], "finished": []}
    columns = dataset.select_columns(["prompt_id", "prompt_ids", "completion_ids", "finish_reason"])
    for table in columns.with_format("arrow").iter(batch_size=4096):
        summary["prompt_id"] += table["prompt_id"].to_pylist()
        summary["prompt_length"] += pc.list_value_length(table["prompt_ids"]).to_pylist()
        summary["length"] += pc.list_value_length(table["completion_ids"]).to_pylist()
        summary["finished"] += [reason == "stop" for reason in table["finish_reason"].to_pylist()]
    return summary


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def format_length_prediction_table(results: dict) -> str:
    """A small text table of the main numbers of [`evaluate_length_prediction`]'s results."""
    names = {
        "lenvm": "LenVM",
        "constant": "constant baseline",
        "prompt_length_regression": "prompt-length regression (value ~ log p)",
        "linear_prompt_length": "linear prompt-length baseline (L ~ p)",
    }
    rows = [(f"prompt-boundary MRE, {names[key]}", _percent(value)) for key, value in results["prompt_mre"].items()]
    rows.append(
        ("value MSE (finished completions)", "n/a" if results["value_mse"] is None else f"{results['value_mse']:.4g}")
    )
    baseline = results.get("relative_length_error_remaining_baseline") or {}
    rows += [
        (
            f"relative remaining-length error at {label}",
            _percent(v) + (f" (mean-remaining baseline {_percent(baseline[label])})" if label in baseline else ""),
        )
        for label, v in results["relative_length_error"].items()
    ]
    rows.append(
        (
            "mean length: true / predicted",
            f"{results['mean_true_length']:.1f} / {results['mean_predicted_length']:.1f}",
        )
    )
    counts = (results["num_prompts"], results["num_completions"], results["num_truncated_excluded"])
    rows.append(("prompts / completions / truncated", " / ".join(map(str, counts))))
    if "min_completions_per_prompt" in results:  # results saved before the rule was recorded lack it
        rows.append(
            (
                "prompts in the MRE",
                f"those with >= {results['min_completions_per_prompt']} finished completions "
                f"({results['num_prompts_excluded']} left out)",
            )
        )
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def plot_length_prediction(results: dict, path: str | os.PathLike) -> None:
    """Save a two-panel PNG: predicted versus true length per prompt (log axes, ``y = x``) and the relative
    error of the remaining length by position in the completion.

    Args:
        results (`dict`): The output of [`evaluate_length_prediction`] (or its saved JSON).
        path (`str` or `os.PathLike`): Where to write the PNG.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    per_prompt = results["per_prompt"]
    # A value of exactly 0 inverts to length 0, which a log axis cannot show; 0.5 tokens is below any real length.
    true_lengths = [max(x, 0.5) for x in per_prompt["true_length"]]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    scatter, by_position = figure.subplots(1, 2)

    series = [("predicted_length", "LenVM", "lenvm", "o")]
    if "regression_length" in per_prompt:
        series.append(("regression_length", "prompt-length regression", "prompt_length_regression", "x"))
    shown = list(true_lengths)
    for key, name, mre_key, marker in series:
        predicted = [max(y, 0.5) for y in per_prompt[key]]
        shown += predicted
        label = f"{name} (MRE {results['prompt_mre'][mre_key]:.1%})"
        alpha = 0.7 if key == "predicted_length" else 0.4
        scatter.scatter(true_lengths, predicted, s=14, alpha=alpha, marker=marker, label=label)
    if results["baselines"] is not None:
        scatter.axhline(
            max(results["baselines"]["constant_length"], 0.5),
            color="gray",
            lw=1,
            label=f"constant baseline (MRE {results['prompt_mre']['constant']:.1%})",
        )
    low, high = min(shown) / 1.2, max(shown) * 1.2
    scatter.plot([low, high], [low, high], "k--", lw=1, label="y = x")
    scatter.set(
        xscale="log",
        yscale="log",
        xlabel="true length $L_{GT}$ (tokens, value-space mean)",
        ylabel=r"predicted length $\hat{L}$ from $V(s_0)$",
        xlim=(low, high),
        ylim=(low, high),
        title=f"Prompt boundary ({results['num_prompts']} prompts)",
    )
    scatter.legend(fontsize=8)

    labels = list(results["relative_length_error"])
    errors = [math.nan if v is None else v for v in results["relative_length_error"].values()]
    bars = by_position.bar(labels, errors, color="tab:blue")
    by_position.bar_label(bars, labels=[_percent(v) for v in results["relative_length_error"].values()])
    by_position.set(
        xlabel="position in the completion (fraction of its length)",
        ylabel="mean relative error of the remaining length",
        title="Per-token error (single realisations)",
    )
    figure.savefig(path, dpi=120)
