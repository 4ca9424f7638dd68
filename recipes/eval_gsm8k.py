"""Accuracy versus tokens of one or more policy checkpoints on GSM8K-style problems, with hard token-budget curves.

    # the offline demo world: the demo policy before and after recipes/configs/demo.yaml's PPO run
    python recipes/eval_gsm8k.py --config recipes/configs/eval_gsm8k_demo.yaml
    # any checkpoints, on the hub's GSM8K test split
    python recipes/eval_gsm8k.py --model_name_or_path Qwen/Qwen2.5-1.5B-Instruct outputs/ppo-gsm8k-qwen2.5-1.5b \
        --labels start ppo --dataset_name openai/gsm8k --output_dir outputs/eval-gsm8k --dtype bfloat16

Each checkpoint (a causal LM directory or hub id, or a PEFT adapter directory, merged into its base for decoding)
samples `num_samples` completions per problem ([`~lenvm_rl.evaluation.evaluate_gsm8k`]). Its hard token-budget curve
cuts those completions at `B` tokens and counts a cut answer as wrong ([`~lenvm_rl.length_metrics.token_budget_curve`]).
Writes `eval_gsm8k.json` (one run per checkpoint: accuracy, mean / median / p90 / p99 tokens, fraction truncated,
the budget curve and, with `save_completion_stats`, the per-completion lengths and correctness) and
`eval_gsm8k.png` (accuracy versus mean tokens), the format of `recipes/eval_tradeoff.py`.
"""

import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import TrlParser

from lenvm_rl.configs import EvalGSM8KArguments
from lenvm_rl.evaluation import (
    evaluate_gsm8k,
    format_tradeoff_table,
    load_eval_problems,
    start_evaluation,
    write_tradeoff_results,
)
from lenvm_rl.io import write_json_atomic
from lenvm_rl.length_metrics import token_budget_curve

RESULTS_NAME = "eval_gsm8k"  # eval_gsm8k.json and eval_gsm8k.png


def load_policy(name_or_path: str, dtype: str = "float32"):
    """A causal LM in eval mode from a model directory or hub id, or from a PEFT adapter directory (loaded on the base
    model its `adapter_config.json` names, then merged so that decoding runs at full speed)."""
    if os.path.isfile(os.path.join(name_or_path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).eval()


def main(script_args: EvalGSM8KArguments) -> dict:
    inputs = {f"model_name_or_path[{i}]": path for i, path in enumerate(script_args.model_name_or_path)}
    run, finished = start_evaluation(script_args, RESULTS_NAME, {**inputs, "dataset_name": script_args.dataset_name})
    if finished is not None:
        return finished
    if script_args.num_threads is not None:
        torch.set_num_threads(script_args.num_threads)
    dataset = load_eval_problems(
        script_args.dataset_name,
        script_args.dataset_split,
        script_args.num_problems,
        script_args.system_prompt,
        script_args.instruction,
        script_args.dataset_config,
    )
    labels = script_args.labels or script_args.model_name_or_path

    runs = []
    for label, path in zip(labels, script_args.model_name_or_path):
        model = load_policy(path, script_args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        out = evaluate_gsm8k(
            model,
            tokenizer,
            dataset["prompt"],
            dataset["answer"],
            num_samples=script_args.num_samples,
            max_new_tokens=script_args.max_new_tokens,
            temperature=script_args.temperature,
            top_p=script_args.top_p,
            top_k=script_args.top_k,
            batch_size=script_args.batch_size,
            seed=script_args.seed,
            progress=True,
        )
        curve = token_budget_curve(out["lengths"], out["correct"], script_args.budgets).to_dict()
        if not script_args.save_completion_stats:
            del out["lengths"], out["correct"]
        runs.append({"label": label, "model_name_or_path": path, **out, "budget_curve": curve})
        print(f"{label}: accuracy {out['accuracy']:.3f}, mean tokens {out['mean_tokens']:.1f}")
        del model

    num_completions = len(dataset) * script_args.num_samples
    results = {
        "title": (
            f"{script_args.task_name}: accuracy vs length "
            f"({num_completions} completions per checkpoint, T={script_args.temperature:g})"
        ),
        "args": asdict(script_args),
        "runs": runs,
    }
    json_path, png_path = write_tradeoff_results(results, script_args.output_dir, RESULTS_NAME)
    if script_args.summary_file:
        keys = ("accuracy", "mean_tokens", "median_tokens", "p90_tokens", "p99_tokens", "fraction_truncated")
        summary = {run["label"]: {key: run[key] for key in keys} for run in runs}
        summary["eval_gsm8k"] = str(json_path)
        Path(script_args.summary_file).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(script_args.summary_file, summary)
    print(format_tradeoff_table(results))
    print(f"Wrote {json_path} and {png_path}")
    run.complete()
    return results


if __name__ == "__main__":
    (script_args,) = TrlParser(EvalGSM8KArguments).parse_args_and_config()
    main(script_args)
