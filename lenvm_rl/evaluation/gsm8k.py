"""Accuracy versus tokens: how often a policy answers GSM8K-style problems right, and at what length.

[`evaluate_gsm8k`] samples a policy on the problems and returns its accuracy, its length distribution
([`accuracy_length_stats`]) and the per-completion lengths and correctness, from which
[`~lenvm_rl.length_metrics.token_budget_curve`] computes the hard token-budget baseline (each completion cut at ``B``
tokens, a cut answer counted wrong). [`write_tradeoff_results`] writes the JSON + PNG format shared by
``recipes/eval_gsm8k.py`` and ``recipes/eval_tradeoff.py`` (one run per checkpoint or tilt strength, each with an
optional budget curve); [`plot_tradeoff`] and [`format_tradeoff_table`] render it.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import load_gsm8k, prepare_prompt_dataset
from ..generation import generate_completions
from ..rewards import gsm8k_accuracy_reward
from .results import write_results

__all__ = [
    "accuracy_length_stats",
    "evaluate_gsm8k",
    "format_tradeoff_table",
    "load_eval_problems",
    "plot_tradeoff",
    "write_tradeoff_results",
]


def accuracy_length_stats(lengths: Sequence[int], correct: Sequence[bool], truncated: Sequence[bool]) -> dict:
    """Accuracy and the distribution of completion lengths of a set of sampled completions.

    Args:
        lengths (`Sequence[int]`): ``(N,)`` completion lengths in tokens, EOS included.
        correct (`Sequence[bool]`): ``(N,)`` whether each completion's answer is right.
        truncated (`Sequence[bool]`): ``(N,)`` whether each completion was cut at the length cap (no EOS).

    Returns:
        `dict`: ``accuracy`` (a fraction), ``mean_tokens``, ``median_tokens``, ``p90_tokens``, ``p99_tokens``
        (linear interpolation between order statistics, numpy's default) and ``fraction_truncated``.

    Example:
        >>> stats = accuracy_length_stats([2, 4, 6, 8], [True, False, True, True], [False, False, False, True])
        >>> {key: round(value, 4) for key, value in stats.items()}
        {'accuracy': 0.75, 'mean_tokens': 5.0, 'median_tokens': 5.0, 'p90_tokens': 7.4, 'p99_tokens': 7.94, 'fraction_truncated': 0.25}
    """
    if not len(lengths) == len(correct) == len(truncated) or not len(lengths):
        raise ValueError(
            "Need as many lengths as correct and truncated flags, at least one; got "
            f"{len(lengths)}, {len(correct)} and {len(truncated)}."
        )
    array = np.asarray(lengths, dtype=np.float64)
    return {
        "accuracy": float(np.mean(np.asarray(correct, dtype=bool))),
        "mean_tokens": float(array.mean()),
        "median_tokens": float(np.median(array)),
        "p90_tokens": float(np.percentile(array, 90)),
        "p99_tokens": float(np.percentile(array, 99)),
        "fraction_truncated": float(np.mean(np.asarray(truncated, dtype=bool))),
    }


def load_eval_problems(
    dataset_name: str,
    split: str,
    num_problems: int | None,
    system_prompt: str | None,
    instruction: str | None,
    config_name: str = "main",
):
    """
    The first `num_problems` problems of a GSM8K-format split, with their chat prompts: what every evaluation
    recipe evaluates ([`~lenvm_rl.data.load_gsm8k`], then [`~lenvm_rl.data.prepare_prompt_dataset`]).

    Args:
        dataset_name (`str`): Hub id or local path of GSM8K-format data (`question`, `answer`).
        split (`str`): The split.
        num_problems (`int` or `None`): Keep the first N problems; `None` keeps all.
        system_prompt (`str` or `None`): Content of a leading system message.
        instruction (`str` or `None`): Text appended to each question.
        config_name (`str`, *optional*, defaults to `"main"`): Hub configuration.

    Returns:
        [`~datasets.Dataset`]: the problems with a `prompt` column of chat messages.
    """
    dataset = load_gsm8k(dataset_name, split, config_name)
    if num_problems is not None:
        dataset = dataset.select(range(min(num_problems, len(dataset))))
    return prepare_prompt_dataset(dataset, system_prompt, instruction)


@torch.no_grad()
def evaluate_gsm8k(
    model,
    tokenizer,
    prompts: list,
    answers: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int,
    seed: int,
    progress: bool = False,
) -> dict:
    """Sample completions of GSM8K-style problems and score their final answers and lengths.

    Completions come from [`~lenvm_rl.generation.generate_completions`] (continuous batching, one seeded generator);
    a completion is correct when [`~lenvm_rl.rewards.gsm8k_accuracy_reward`] gives it 1, the training reward, so a
    completion cut at `max_new_tokens` after writing the right final answer counts as correct (a hard token budget,
    [`~lenvm_rl.length_metrics.token_budget_curve`], counts it wrong at any budget below its length).

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The policy, a causal LM (a PEFT model works too); evaluated in eval mode, no gradients.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer, with EOS and pad tokens.
        prompts (`list`):
            Conversational prompts (lists of messages) or rendered prompt strings, one per problem.
        answers (`list[str]`):
            The reference solutions (GSM8K `answer` column, ending in `#### N`) or bare numbers, one per problem.
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per problem.
        max_new_tokens (`int`):
            Length cap.
        temperature (`float`):
            Sampling temperature; `0` is greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filtering; `0` disables it.
        batch_size (`int`):
            Rows decoded together.
        seed (`int`):
            Seed of the sampling generator.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar.

    Returns:
        `dict`: the keys of [`accuracy_length_stats`] (lengths in tokens, EOS included), ``num_problems``,
        ``num_samples`` and the per-completion lists ``lengths`` and ``correct`` (ordered by problem, then sample),
        from which [`~lenvm_rl.length_metrics.token_budget_curve`] computes the hard token-budget baseline.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained("outputs/demo/world/policy")  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained("outputs/demo/world/policy")  # doctest: +SKIP
        >>> prompts = [[{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many does he have?"}]]
        >>> out = evaluate_gsm8k(model, tokenizer, prompts, ["#### 7"], max_new_tokens=64, temperature=1.0,
        ...                      batch_size=8, seed=0)  # doctest: +SKIP
        >>> sorted(out)  # doctest: +SKIP
        ['accuracy', 'correct', 'fraction_truncated', 'lengths', 'mean_tokens', 'median_tokens', 'num_problems', 'num_samples', 'p90_tokens', 'p99_tokens']
    """
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers: pass one answer per prompt.")
    completions = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens, temperature, top_p, top_k, batch_size, seed, progress
    )
    references = [answer for answer in answers for _ in range(num_samples)]  # completions are ordered the same way
    correct = [reward == 1.0 for reward in gsm8k_accuracy_reward([c.text for c in completions], references)]
    lengths = [len(c.completion_ids) for c in completions]
    truncated = [c.finish_reason == "length" for c in completions]
    return {
        **accuracy_length_stats(lengths, correct, truncated),
        "num_problems": len(prompts),
        "num_samples": num_samples,
        "lengths": lengths,
        "correct": correct,
    }


def write_tradeoff_results(results: dict, output_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write an accuracy-versus-tokens result as ``{name}.json`` and ``{name}.png`` ([`plot_tradeoff`]).

    The format shared by ``recipes/eval_gsm8k.py`` and ``recipes/eval_tradeoff.py``: a dictionary with a ``runs``
    list, each run a dictionary with at least ``label``, ``accuracy`` and ``mean_tokens``, optionally
    ``budget_curve`` (``token_budget_curve(...).to_dict()``, [`~lenvm_rl.length_metrics.token_budget_curve`]) and
    ``series`` (runs of one series are joined by a line); a ``title`` and any other JSON-ready keys (the recipe's
    arguments, ...). The JSON is written atomically ([`~lenvm_rl.evaluation.results.write_results`]).

    Args:
        results (`dict`): The results, in the format above.
        output_dir (`str` or `os.PathLike`): Created if needed.
        name (`str`): Base name of the two files.

    Returns:
        `tuple[Path, Path]`: the JSON and PNG paths.
    """
    return write_results(results, output_dir, name, plot_tradeoff)


def plot_tradeoff(results: dict, path: str | os.PathLike) -> None:
    """Save accuracy versus mean tokens per completion as a PNG: one marker per run, its hard token-budget curve
    (cut = wrong) as a dashed line of the same colour, and a line through the runs of each ``series``.

    Args:
        results (`dict`): Results in the format of [`write_tradeoff_results`] (or its saved JSON).
        path (`str` or `os.PathLike`): Where to write the PNG.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    figure = Figure(figsize=(7, 4.8), layout="constrained")
    ax = figure.subplots()
    colors = [f"C{i % 10}" for i in range(len(results["runs"]))]
    series: dict[str, list] = {}
    for run, color in zip(results["runs"], colors):
        if run.get("budget_curve"):
            curve = run["budget_curve"]
            label = f"{run['label']}: hard token budget"
            ax.plot(curve["mean_tokens"], curve["accuracy"], "--", color=color, lw=1, alpha=0.8, label=label)
        ax.plot(run["mean_tokens"], run["accuracy"], "o", color=color, ms=7, label=run["label"])
        if run.get("series"):
            series.setdefault(run["series"], []).append(run)
    for name, runs in series.items():
        runs = sorted(runs, key=lambda run: run["mean_tokens"])
        ax.plot([r["mean_tokens"] for r in runs], [r["accuracy"] for r in runs], "-", color="k", lw=1, label=name)
    ax.set(xlabel="mean tokens per completion", ylabel="accuracy", ylim=(0, 1), title=results.get("title", ""))
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def format_tradeoff_table(results: dict) -> str:
    """The runs of [`write_tradeoff_results`]'s format as a text table: label, accuracy, mean and p90 tokens."""
    rows = [("run", "accuracy", "mean tokens", "p90 tokens")]
    for run in results["runs"]:
        p90 = "n/a" if run.get("p90_tokens") is None else f"{run['p90_tokens']:.1f}"
        rows.append((run["label"], f"{run['accuracy']:.3f}", f"{run['mean_tokens']:.1f}", p90))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        f"{row[0]:<{widths[0]}}  " + "  ".join(f"{cell:>{w}}" for cell, w in zip(row[1:], widths[1:])) for row in rows
    )
