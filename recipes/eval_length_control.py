"""Length control with a LenVM (paper section 5, LIFEBench token-level): Length Score with versus without guidance.

    # the offline demo world (after `bash recipes/demo.sh`)
    python recipes/eval_length_control.py --policy_path outputs/demo/world/policy --lenvm_path outputs/demo/lenvm \
        --dataset_name outputs/demo/world/data --output_dir outputs/demo/length_control

For every constraint (Equal To, At Most, At Least) and target length ``T`` (default 16 to 256 tokens, doubling:
the demo policy's completions are ~50-300 tokens, so the grid straddles them), each held-out problem gets one
completion

- unguided: the policy's own sampling from the same candidate set (it cannot read a length instruction, so
  this is what length control would be without the LenVM; one run serves every target);
- guided: `lenvm_rl.guidance` with the constraint's mode and target ``T``;

scored with the LIFEBench Length Score and Length Deviation (`lenvm_rl.length_metrics.length_score`,
`length_deviation`), the fraction of completions that satisfy the constraint (At Most: ``L <= T``; At Least:
``L >= T``; Equal To: ``|L - T| <= 10% of T``) and answer accuracy. The JSON keeps every run's lengths (for
confidence intervals) and its first `num_examples` decoded completions. Writes `length_control.json` and
`length_control.png`.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from trl import TrlParser

from lenvm_rl.configs import EvalLengthControlArguments
from lenvm_rl.evaluation import load_guided_eval, start_evaluation, write_results
from lenvm_rl.guidance import guided_generate_completions
from lenvm_rl.length_metrics import length_deviation, length_score
from lenvm_rl.rewards import extract_gsm8k_answer

RESULTS_NAME = "length_control"  # length_control.json and length_control.png


EQUAL_TO_TOLERANCE = 0.1  # Equal To counts as satisfied within 10% of the target


def fraction_satisfied(lengths: torch.Tensor, target: int, constraint: str) -> float:
    """Share of completions meeting the constraint: `L <= T`, `L >= T`, or `|L - T| <= 10% T` for Equal To."""
    if constraint == "at_most":
        ok = lengths <= target
    elif constraint == "at_least":
        ok = lengths >= target
    else:
        ok = (lengths - target).abs() <= EQUAL_TO_TOLERANCE * target
    return float(ok.double().mean())


def summarize(tokenizer, completions, finish_reasons, golds, targets, constraint, num_examples=0) -> dict:
    """LIFEBench Length Score / Deviation, constraint satisfaction, mean length, accuracy and truncated fraction of
    one run, with its lengths and its first `num_examples` decoded completions."""
    lengths = torch.tensor([len(c) for c in completions])
    scores, deviations = length_score(lengths, targets, constraint), length_deviation(lengths, targets)
    return {
        "length_score": float(scores.mean()),
        "length_deviation": float(deviations.mean()),
        "abs_length_deviation": float(deviations.abs().mean()),
        "fraction_satisfied": fraction_satisfied(lengths, targets, constraint),
        "mean_length": float(lengths.double().mean()),
        "accuracy": sum(a == g for a, g in zip(decode_answers(tokenizer, completions), golds)) / len(golds),
        "fraction_truncated": sum(r == "length" for r in finish_reasons) / len(finish_reasons),
        "lengths": lengths.tolist(),
        "examples": [tokenizer.decode(c) for c in completions[:num_examples]],
    }


def decode_answers(tokenizer, completions):
    return [extract_gsm8k_answer(tokenizer.decode(c, skip_special_tokens=True)) for c in completions]


def main(script_args: EvalLengthControlArguments) -> dict:
    inputs = {key: getattr(script_args, key) for key in ("policy_path", "lenvm_path", "dataset_name")}
    run_record, finished = start_evaluation(script_args, RESULTS_NAME, inputs)
    if finished is not None:
        return finished
    torch.set_num_threads(script_args.num_threads)
    policy, tokenizer, lenvm, dataset = load_guided_eval(script_args)
    prompts = dataset["prompt"]
    golds = [extract_gsm8k_answer(a) for a in dataset["answer"]]
    run = dict(batch_size=script_args.batch_size, seed=script_args.seed, progress=True)

    # 1. Unguided: one run, scored against every target.
    unguided = guided_generate_completions(
        policy, tokenizer, prompts, None, script_args.guidance_config("none"), **run
    )
    # 2. Guided: one run per constraint and target.
    results = {"args": asdict(script_args), "gamma": lenvm.gamma, "num_problems": len(prompts), "constraints": {}}
    for constraint in script_args.constraints:
        per_target = {}
        for target in script_args.target_lengths:
            config = script_args.guidance_config(constraint)
            guided = guided_generate_completions(
                policy, tokenizer, prompts, lenvm, config, [target] * len(prompts), **run
            )
            n = script_args.num_examples
            per_target[str(target)] = {
                "unguided": summarize(
                    tokenizer, unguided.completion_ids, unguided.finish_reasons, golds, target, constraint, n
                ),
                "guided": summarize(
                    tokenizer, guided.completion_ids, guided.finish_reasons, golds, target, constraint, n
                ),
            }
            brief = {
                side: {k: v for k, v in r.items() if k not in ("lengths", "examples")}
                for side, r in per_target[str(target)].items()
            }
            print(constraint, target, json.dumps(brief))
        results["constraints"][constraint] = {
            "per_target": per_target,
            "mean_length_score": {
                side: sum(r[side]["length_score"] for r in per_target.values()) / len(per_target)
                for side in ("unguided", "guided")
            },
        }

    json_path, png_path = write_results(results, script_args.output_dir, RESULTS_NAME, plot_length_control)
    print(format_table(results))
    print(f"Wrote {json_path} and {png_path}")
    run_record.complete()
    return results


def format_table(results: dict) -> str:
    lines = [
        f"{'constraint':<10} {'T':>5}  {'LS unguided':>11} {'LS guided':>9}  {'len unguided':>12} {'len guided':>10}"
        f"  {'met unguided':>12} {'met guided':>10}"
    ]
    for constraint, block in results["constraints"].items():
        for target, r in block["per_target"].items():
            u, g = r["unguided"], r["guided"]
            lines.append(
                f"{constraint:<10} {target:>5}  {u['length_score']:>11.1f} {g['length_score']:>9.1f}  "
                f"{u['mean_length']:>12.1f} {g['mean_length']:>10.1f}"
                f"  {u['fraction_satisfied']:>12.2f} {g['fraction_satisfied']:>10.2f}"
            )
        mean = block["mean_length_score"]
        lines.append(f"{constraint:<10} {'mean':>5}  {mean['unguided']:>11.1f} {mean['guided']:>9.1f}")
    return "\n".join(lines)


def plot_length_control(results: dict, path: Path) -> None:
    """Length Score (top) and mean output length (bottom) against the target, one column per constraint."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    constraints = list(results["constraints"])
    figure = Figure(figsize=(4.5 * len(constraints), 7), layout="constrained")
    axes = figure.subplots(2, len(constraints), squeeze=False)
    for col, constraint in enumerate(constraints):
        per_target = results["constraints"][constraint]["per_target"]
        targets = [int(t) for t in per_target]
        for side, style in (("unguided", "o--"), ("guided", "s-")):
            scores = [per_target[str(t)][side]["length_score"] for t in targets]
            lengths = [per_target[str(t)][side]["mean_length"] for t in targets]
            axes[0, col].plot(targets, scores, style, label=side)
            axes[1, col].plot(targets, lengths, style, label=side)
        axes[1, col].plot(targets, targets, ":", color="gray", label="target")
        for row in (0, 1):
            axes[row, col].set_xscale("log", base=2)
            axes[row, col].set_xlabel("target length T (tokens)")
        axes[0, col].set(title=constraint.replace("_", " ").title(), ylabel="Length Score", ylim=(0, 105))
        axes[1, col].set_yscale("log", base=2)
        axes[1, col].set_ylabel("mean output length (tokens)")
        axes[0, col].legend()
    figure.suptitle(f"LenVM length control ({results['num_problems']} problems, gamma={results['gamma']:.4g})")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    (script_args,) = TrlParser(EvalLengthControlArguments).parse_args_and_config()
    main(script_args)
