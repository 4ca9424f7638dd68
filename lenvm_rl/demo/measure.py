"""Measurement of the demo policy: accuracy and completion lengths on held-out problems, and their plot.

[`measure_demo_policy`] samples the policy of a built world on its test split, checks the figures against the
ranges the shipped policy should land in (`shipped.py`), and writes `demo_policy_stats.json` and
`demo_policy_lengths.png`. The length statistics of the reference solutions that
[`~lenvm_rl.demo.build_demo_world`] records in `build_info.json` ([`reference_length_stats`]) are computed here
too, with the same summary.
"""

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ..generation import GeneratedCompletion, generate_completions
from ..io import write_json_atomic
from ..length_metrics import length_variance_explained
from ..rewards import extract_gsm8k_answer
from .problems import DemoProblem, demo_prompt, write_demo_solution
from .shipped import check_demo_measurement, file_sha256, format_demo_check

logger = logging.getLogger(__name__)

__all__ = ["measure_demo_policy", "reference_length_stats"]


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


def _length_stats(lengths: list[int]) -> dict[str, float]:
    lengths = np.asarray(lengths, dtype=np.float64)
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }


def reference_length_stats(problems: list[DemoProblem], tokenizer: PreTrainedTokenizerFast, seed: int) -> dict:
    """Token lengths (with EOS) of reference solutions: 8 independent solutions for each of up to 1000 problems."""
    problems = problems[:1000]
    lengths = [
        [
            len(
                tokenizer(write_demo_solution(problem, random.Random(f"demo-stats-{seed}-{problem.id}-{k}"))[0])[
                    "input_ids"
                ]
            )
            + 1
            for k in range(8)
        ]
        for problem in problems
    ]
    return {
        **_length_stats([n for group in lengths for n in group]),
        "prompt_share": length_variance_explained(lengths),
    }


def measure_demo_policy(
    world_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_problems: int = 200,
    num_samples: int = 4,
    max_new_tokens: int = 384,
    batch_size: int = 32,
    seed: int = 0,
    num_threads: int = 2,
) -> dict:
    """
    Measure the demo policy on held-out problems: accuracy and the distribution of its own completion lengths.

    Samples `num_samples` completions per problem at temperature 1.0 (top-p 1, top-k 0) plus one greedy completion,
    scores them with [`~lenvm_rl.rewards.extract_gsm8k_answer`], and writes `demo_policy_stats.json` and
    `demo_policy_lengths.png` (histogram of sampled lengths next to the reference solutions') into `output_dir`.
    Lengths are in tokens and include EOS. When the policy is the shipped one and the settings are the reference
    ones (200 problems x 4 samples, 384 new tokens), the `check` entry compares the accuracies and the mean length
    with the ranges in the shipped manifest (see [`~lenvm_rl.demo.shipped.check_demo_measurement`]); a figure out
    of range also logs a warning.

    Args:
        world_dir (`str` or `os.PathLike`):
            A world built by [`build_demo_world`].
        output_dir (`str` or `os.PathLike`):
            Where the JSON and the PNG go.
        num_problems (`int`, *optional*, defaults to `200`):
            The first `num_problems` problems of `data/test.jsonl`.
        num_samples (`int`, *optional*, defaults to `4`):
            Sampled completions per problem (at least 2 for the within-prompt statistics).
        max_new_tokens (`int`, *optional*, defaults to `384`):
            Length cap.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows decoded together.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed.
        num_threads (`int`, *optional*, defaults to `2`):
            `torch.set_num_threads` while measuring.

    Returns:
        `dict`: the statistics written to `demo_policy_stats.json`.
    """
    world_dir, output_dir = Path(world_dir), Path(output_dir)
    torch.set_num_threads(num_threads)
    policy_sha256 = file_sha256(world_dir / "policy" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(world_dir / "policy").eval()
    tokenizer = AutoTokenizer.from_pretrained(world_dir / "policy")
    rows = _read_jsonl(world_dir / "data" / "test.jsonl")[:num_problems]
    prompts = [demo_prompt(row["question"]) for row in rows]
    golds = [extract_gsm8k_answer(row["answer"]) for row in rows]

    start_time = time.perf_counter()
    sampled = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens, 1.0, 1.0, 0, batch_size, seed, progress=True
    )
    sample_seconds = time.perf_counter() - start_time
    greedy = generate_completions(
        model, tokenizer, prompts, 1, max_new_tokens, 0.0, 1.0, 0, batch_size, seed, progress=True
    )

    def accuracies(completions: list[GeneratedCompletion]) -> dict:
        correct = [extract_gsm8k_answer(c.text) == golds[c.prompt_index] for c in completions]
        by_steps = {}
        for steps in sorted({row["num_steps"] for row in rows}):
            hits = [ok for ok, c in zip(correct, completions) if rows[c.prompt_index]["num_steps"] == steps]
            by_steps[str(steps)] = float(np.mean(hits))
        return {"overall": float(np.mean(correct)), "by_num_steps": by_steps}

    lengths = [len(c.completion_ids) for c in sampled]
    by_prompt = [lengths[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]
    reference_lengths = [len(tokenizer(row["answer"])["input_ids"]) + 1 for row in rows]
    # Sampling noise of the mean length with the problems fixed: sqrt(mean within-problem variance / samples).
    within_variance = np.mean([np.var(group, ddof=1) for group in by_prompt]) if num_samples > 1 else float("nan")
    mean_length_standard_error = math.sqrt(within_variance / len(lengths))
    stats = {
        "world_dir": str(world_dir),
        "policy_sha256": policy_sha256,
        "num_parameters": model.num_parameters(),
        "num_problems": len(rows),
        "num_samples": num_samples,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens, "seed": seed},
        "accuracy": accuracies(sampled),
        "greedy_accuracy": accuracies(greedy),
        "lengths": _length_stats(lengths),
        "mean_length_standard_error": mean_length_standard_error,
        "fraction_truncated": float(np.mean([c.finish_reason == "length" for c in sampled])),
        "mean_within_prompt_std": float(np.mean([np.std(group, ddof=1) for group in by_prompt]))
        if num_samples > 1
        else float("nan"),
        "prompt_explained_variance": length_variance_explained(by_prompt) if num_samples > 1 else float("nan"),
        "greedy_lengths": _length_stats([len(c.completion_ids) for c in greedy]),
        "reference_lengths": _length_stats(reference_lengths),
        "sampling_seconds": round(sample_seconds, 1),
        "sampled_tokens_per_second": round(sum(lengths) / sample_seconds, 1),
        "num_threads": num_threads,
    }
    stats["check"] = check_demo_measurement(stats)
    if not stats["check"].get("ok", True):
        logger.warning(
            "The shipped demo policy measured out of range: %s", "; ".join(format_demo_check(stats["check"]))
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "demo_policy_stats.json", stats)
    _plot_lengths(lengths, reference_lengths, output_dir / "demo_policy_lengths.png")
    return stats


def _plot_lengths(lengths: list[int], reference_lengths: list[int], path: Path) -> None:
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no backend switch

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    bins = np.arange(0, max(max(lengths), max(reference_lengths)) + 10, 8)
    ax.hist(lengths, bins=bins, alpha=0.6, density=True, label=f"policy, T=1.0 (n={len(lengths)})")
    ax.hist(
        reference_lengths,
        bins=bins,
        alpha=0.6,
        density=True,
        label=f"reference solutions (n={len(reference_lengths)})",
    )
    for name, value in (("median", np.median(lengths)), ("p99", np.percentile(lengths, 99))):
        ax.axvline(value, color="k", linestyle="--", linewidth=0.8)
        ax.text(value, ax.get_ylim()[1] * 0.9, f" {name} {value:.0f}", fontsize=8)
    ax.set_xlabel("completion length (tokens, with EOS)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title("Demo policy: completion lengths on held-out problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
