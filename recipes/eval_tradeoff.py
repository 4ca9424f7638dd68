"""Accuracy versus mean tokens: LenVM exponential tilting against a hard token budget (paper section 5).

    # the offline demo world (after `bash recipes/demo.sh`)
    python recipes/eval_tradeoff.py --policy_path outputs/demo/world/policy --lenvm_path outputs/demo/lenvm \
        --dataset_name outputs/demo/world/data --output_dir outputs/demo/tradeoff

Each held-out problem gets `num_samples` completions per tilt strength `beta` (``p'(x) ∝ p(x) exp(beta u(x))``,
`lenvm_rl.guidance`; `beta = 0` is the untilted policy). The baseline cuts the `beta = 0` completions at a budget
of `B` tokens and counts a cut answer as wrong (`lenvm_rl.length_metrics.token_budget_curve`). Each tilt point is compared
with the budget curve at the same mean number of tokens (linear interpolation; `matched_budget` is the budget `B`
whose mean tokens equal the tilt point's). Each run keeps its per-completion `lengths` and `correct` flags (for
confidence intervals) and its first `num_examples` decoded completions. Writes `tradeoff.json` and
`tradeoff.png` in the format of `recipes/eval_gsm8k.py` (`lenvm_rl.evaluation.write_tradeoff_results`): one run per
beta, joined as the "LenVM tilt" series, the `beta = 0` run carrying the budget curve; `tilt` adds the comparison at
matched tokens. Here a completion is correct only if it also stopped with EOS before the cap.
"""

from dataclasses import asdict

import numpy as np
import torch
from trl import TrlParser

from lenvm_rl.configs import EvalTradeoffArguments
from lenvm_rl.evaluation import accuracy_length_stats, load_guided_eval, start_evaluation, write_tradeoff_results
from lenvm_rl.guidance import guided_generate_completions
from lenvm_rl.length_metrics import token_budget_curve
from lenvm_rl.rewards import extract_gsm8k_answer

RESULTS_NAME = "tradeoff"  # tradeoff.json and tradeoff.png


def main(script_args: EvalTradeoffArguments) -> dict:
    inputs = {key: getattr(script_args, key) for key in ("policy_path", "lenvm_path", "dataset_name")}
    run_record, finished = start_evaluation(script_args, RESULTS_NAME, inputs)
    if finished is not None:
        return finished
    torch.set_num_threads(script_args.num_threads)
    policy, tokenizer, lenvm, dataset = load_guided_eval(script_args)
    prompts = [p for p in dataset["prompt"] for _ in range(script_args.num_samples)]
    golds = [extract_gsm8k_answer(a) for a in dataset["answer"] for _ in range(script_args.num_samples)]

    # 1. One run per beta (beta = 0 is the untilted policy).
    tilt = {}
    for beta in sorted(script_args.betas, reverse=True):
        config = script_args.guidance_config("tilt", beta)
        out = guided_generate_completions(
            policy, tokenizer, prompts, lenvm, config, batch_size=script_args.batch_size, seed=script_args.seed,
            progress=True,
        )  # fmt: skip
        lengths = [len(c) for c in out.completion_ids]
        correct = [
            extract_gsm8k_answer(tokenizer.decode(c, skip_special_tokens=True)) == gold and reason == "stop"
            for c, gold, reason in zip(out.completion_ids, golds, out.finish_reasons)
        ]
        truncated = [reason == "length" for reason in out.finish_reasons]
        tilt[beta] = {
            "lengths": lengths,
            "correct": correct,
            "stats": accuracy_length_stats(lengths, correct, truncated),
            "examples": [tokenizer.decode(c) for c in out.completion_ids[: script_args.num_examples]],
        }
        print(f"beta={beta}: accuracy {np.mean(correct):.3f}, mean tokens {np.mean(lengths):.1f}")

    # 2. Token-budget baseline from the untilted completions.
    base = tilt[0.0]
    budget = token_budget_curve(base["lengths"], base["correct"], script_args.budgets).to_dict()

    # 3. Compare at matched mean tokens.
    points, runs = [], []
    for beta, run in tilt.items():
        mean_tokens, accuracy = run["stats"]["mean_tokens"], run["stats"]["accuracy"]
        matched = float(np.interp(mean_tokens, budget["mean_tokens"], budget["accuracy"]))
        point = {
            "beta": beta,
            "mean_tokens": mean_tokens,
            "accuracy": accuracy,
            "matched_budget": float(np.interp(mean_tokens, budget["mean_tokens"], budget["budgets"])),
            "budget_accuracy_at_same_tokens": matched,
            "accuracy_gain_over_budget": accuracy - matched,
        }
        points.append(point)
        per_completion = {key: run[key] for key in ("lengths", "correct", "examples")}
        runs.append({"label": f"β={beta:g}", **point, **run["stats"], "series": "LenVM tilt", **per_completion})
        if beta == 0.0:
            runs[-1]["budget_curve"] = budget
    results = {
        "title": f"Accuracy vs length ({len(prompts)} completions, gamma={lenvm.gamma:.4g})",
        "args": asdict(script_args),
        "gamma": lenvm.gamma,
        "num_completions": len(prompts),
        "tilt": points,
        "runs": runs,
    }
    json_path, png_path = write_tradeoff_results(results, script_args.output_dir, RESULTS_NAME)
    print(f"{'beta':>7} {'mean tokens':>11} {'accuracy':>8} {'budget B':>8} {'budget acc.':>11}")
    for p in points:
        print(
            f"{p['beta']:>7g} {p['mean_tokens']:>11.1f} {p['accuracy']:>8.3f} {p['matched_budget']:>8.1f} "
            f"{p['budget_accuracy_at_same_tokens']:>11.3f}"
        )
    print(f"Wrote {json_path} and {png_path}")
    run_record.complete()
    return results


if __name__ == "__main__":
    (script_args,) = TrlParser(EvalTradeoffArguments).parse_args_and_config()
    main(script_args)
