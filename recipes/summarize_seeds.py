"""LenVM results at inference over seeds: mean and bootstrap 95% interval over seeds and problems.

    # the demo world's figures over 3 seeds: LenVMs trained with --seed 0 / 1 / 2 and evaluated by
    # recipes/eval_length_prediction.py; guided decoding (recipes/eval_length_control.py / eval_tradeoff.py) sampled
    # with --seed 0 / 1 / 2
    python recipes/summarize_seeds.py --output_dir outputs/demo/inference_seeds \
        --length_prediction_dirs outputs/demo outputs/demo/lenvm_seed1/eval outputs/demo/lenvm_seed2/eval \
        --length_control_dirs outputs/demo/inference_seeds/length_control_seed{0,1,2} \
        --tradeoff_dirs outputs/demo/inference_seeds/tradeoff_seed{0,1,2}

Every run must be the same evaluation but for its seed (the other arguments are checked; for length prediction, the
LenVM differs and the held-out prompts must be the same). The intervals come from
`lenvm_rl.ablation_stats.hierarchical_bootstrap`: seeds resampled, then problems (prompts) within each seed, every
quantity of a problem resampled together (so guided and unguided, LenVM and baseline, stay paired).

- Length prediction: the prompt-boundary MRE of the LenVM and of the three baselines (the baselines are fitted on the
  training rollouts, so they are the same for every LenVM seed), the LenVM's difference with the prompt-length
  regression, and the relative error of the predicted remaining length at 25 / 50 / 75% of each completion (the
  seeds' mean and range: the evaluation keeps no per-completion errors).
- Length control: per constraint and target, the Length Score of the guided and unguided completions (recomputed per
  completion from the stored lengths with `lenvm_rl.length_metrics.length_score`), the guided mean length and accuracy, and
  the mean Length Score over the targets.
- Tradeoff: per tilt strength beta, accuracy and mean tokens; the token-budget accuracy at the same mean tokens is a
  property of each seed's whole beta = 0 sample, so it is given as the seeds' mean and range.

Writes `inference_seeds.json`, `inference_seeds.md` (the tables) and `inference_seeds.png` (the MRE per predictor,
Length Score against the target per constraint, accuracy against tokens for the tilt, with intervals).
"""

import json
from pathlib import Path

import numpy as np
from trl import TrlParser

from lenvm_rl.ablation_stats import (
    PROMPT_PREDICTORS,
    format_interval,
    hierarchical_bootstrap,
    interval,
    per_problem_means,
    prompt_mre_statistics,
)
from lenvm_rl.configs import SeedSummaryArguments
from lenvm_rl.io import write_json_atomic, write_text_atomic
from lenvm_rl.length_metrics import length_score

RESULTS_NAME = "inference_seeds"
# Arguments that may differ between the seeds' runs of one evaluation.
PER_RUN_ARGS = ("seed", "output_dir", "num_threads", "batch_size", "num_examples")
# eval_length_prediction.py has no seed of its own: its runs differ by the LenVM (trained with another seed).
LENGTH_PREDICTION_PER_RUN_ARGS = ("lenvm_path", "output_dir", "batch_size")


def load_seed_runs(
    directories: list[str], name: str, per_run: tuple[str, ...] = PER_RUN_ARGS, identity: str = "seed"
) -> list[dict]:
    """The `{name}.json` of each directory, checked to be one evaluation (every argument but `per_run` equal) at
    distinct values of `identity` (the seed, or the LenVM)."""
    runs = []
    for directory in directories:
        path = Path(directory) / f"{name}.json"
        if not path.is_file():
            recipe = name if name.startswith("eval_") else f"eval_{name}"
            raise FileNotFoundError(f"{path} does not exist: run recipes/{recipe}.py with --output_dir {directory}.")
        runs.append(json.loads(path.read_text()))
    settings = [{k: v for k, v in run["args"].items() if k not in per_run} for run in runs]
    for directory, setting in zip(directories[1:], settings[1:]):
        differing = sorted(k for k in setting.keys() | settings[0].keys() if setting.get(k) != settings[0].get(k))
        if differing:
            raise ValueError(f"{directory} is another evaluation than {directories[0]}: {differing} differ.")
    seeds = [run["args"][identity] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"The runs must have distinct {identity}s, got {seeds} ({directories}).")
    return runs


def length_prediction_summary(runs: list[dict], num_resamples: int) -> dict:
    """Prompt-boundary MRE of the LenVM and the baselines, the LenVM's paired difference with the prompt-length
    regression (mean and interval over LenVM seeds and prompts), and the remaining-length errors (mean and range)."""
    prompt_ids = runs[0]["per_prompt"]["prompt_id"]
    for run in runs:
        if run["per_prompt"]["prompt_id"] != prompt_ids:
            raise ValueError(
                f"{run['args']['lenvm_path']} was evaluated on other held-out prompts than the first LenVM."
            )
    stats = prompt_mre_statistics([run["per_prompt"] for run in runs], num_resamples)
    mre = {**stats["mre"], "lenvm_minus_regression": stats["lenvm_minus"]["prompt_length_regression"]}
    remaining = {}
    for position in runs[0]["relative_length_error"]:
        values = [run["relative_length_error"][position] for run in runs]
        baseline = [run["relative_length_error_remaining_baseline"][position] for run in runs]
        remaining[position] = {
            "mean": float(np.mean(values)),
            "min": min(values),
            "max": max(values),
            "baseline": float(np.mean(baseline)),
        }
    return {
        "lenvms": [run["args"]["lenvm_path"] for run in runs],
        "num_prompts": len(prompt_ids),
        "prompt_mre": mre,
        "prompt_mre_per_seed": [run["prompt_mre"]["lenvm"] for run in runs],
        "relative_length_error": remaining,
    }


def _lengths(run_side: dict, where: str) -> np.ndarray:
    if "lengths" not in run_side:
        raise ValueError(f"{where} keeps no per-completion lengths (an older recipe's JSON): run it again.")
    return np.asarray(run_side["lengths"], dtype=np.float64)


def length_control_summary(runs: list[dict], num_resamples: int) -> dict:
    """Length Score (guided, unguided, their difference), guided mean length and accuracy per constraint and target,
    and the Length Score averaged over the targets; each as mean and interval over seeds and problems."""
    first = runs[0]
    summary = {
        "seeds": [run["args"]["seed"] for run in runs],
        "num_problems": first["num_problems"],
        "constraints": {},
    }
    for constraint, block in first["constraints"].items():
        targets = list(block["per_target"])
        per_run = []  # one {key: (N,) per-problem values} per seed
        for run in runs:
            values = {}
            for target in targets:
                entry = run["constraints"][constraint]["per_target"][target]
                where = f"length_control seed {run['args']['seed']} {constraint} {target}"
                lengths = {side: _lengths(entry[side], where) for side in ("unguided", "guided")}
                for side, side_lengths in lengths.items():
                    values[f"{side}/{target}"] = length_score(side_lengths, int(target), constraint).numpy()
                values[f"guided_length/{target}"] = lengths["guided"]
            for side in ("unguided", "guided"):
                values[f"{side}/mean"] = np.mean([values[f"{side}/{t}"] for t in targets], axis=0)
            per_run.append(values)
        samples = hierarchical_bootstrap(per_run, num_resamples)
        points = {key: float(np.mean([run[key].mean() for run in per_run])) for key in per_run[0]}
        rows = {}
        for target in targets:
            accuracies = [run["constraints"][constraint]["per_target"][target]["guided"]["accuracy"] for run in runs]
            rows[target] = {
                "unguided": interval(points[f"unguided/{target}"], samples[f"unguided/{target}"]),
                "guided": interval(points[f"guided/{target}"], samples[f"guided/{target}"]),
                "guided_minus_unguided": _difference(points, samples, target),
                "guided_mean_length": interval(points[f"guided_length/{target}"], samples[f"guided_length/{target}"]),
                "guided_accuracy_per_seed": accuracies,
            }
        mean = {side: interval(points[f"{side}/mean"], samples[f"{side}/mean"]) for side in ("unguided", "guided")}
        summary["constraints"][constraint] = {
            "per_target": rows,
            "mean": mean | {"guided_minus_unguided": _difference(points, samples, "mean")},
        }
    return summary


def _difference(points: dict, samples: dict, target: str) -> dict:
    """Guided minus unguided Length Score at `target`, paired within each bootstrap resample."""
    diff = samples[f"guided/{target}"] - samples[f"unguided/{target}"]
    return interval(points[f"guided/{target}"] - points[f"unguided/{target}"], diff)


def tradeoff_summary(runs: list[dict], num_resamples: int) -> dict:
    """Accuracy and mean tokens per beta (mean and interval over seeds and problems) and the token-budget accuracy at
    the same mean tokens (the seeds' mean and range)."""
    num_samples = runs[0]["args"]["num_samples"]
    betas = [run_point["beta"] for run_point in runs[0]["runs"]]
    summary = {"seeds": [run["args"]["seed"] for run in runs], "num_samples": num_samples, "per_beta": []}
    for index, beta in enumerate(betas):
        per_run = []
        for run in runs:
            point = run["runs"][index]
            if point["beta"] != beta:
                raise ValueError(f"tradeoff seed {run['args']['seed']} has betas in another order than seed 0.")
            where = f"tradeoff seed {run['args']['seed']} beta {beta:g}"
            per_run.append(
                {
                    "accuracy": per_problem_means(np.asarray(point["correct"], dtype=np.float64), num_samples),
                    "mean_tokens": per_problem_means(_lengths(point, where), num_samples),
                }
            )
        samples = hierarchical_bootstrap(per_run, num_resamples)
        budget = [run["runs"][index]["budget_accuracy_at_same_tokens"] for run in runs]
        gain = [run["runs"][index]["accuracy_gain_over_budget"] for run in runs]
        summary["per_beta"].append(
            {
                "beta": beta,
                **{
                    key: interval(float(np.mean([run[key].mean() for run in per_run])), samples[key])
                    for key in ("accuracy", "mean_tokens")
                },
                "budget_accuracy_at_same_tokens": {
                    "mean": float(np.mean(budget)),
                    "min": min(budget),
                    "max": max(budget),
                },
                "accuracy_gain_over_budget": {"mean": float(np.mean(gain)), "min": min(gain), "max": max(gain)},
            }
        )
    return summary


def format_markdown(results: dict) -> str:
    lines = []
    prediction = results.get("length_prediction")
    if prediction:
        per_seed = ", ".join(f"{100 * value:.1f}%" for value in prediction["prompt_mre_per_seed"])
        lines += [
            f"Length prediction, prompt-boundary MRE over {len(prediction['lenvms'])} LenVMs x "
            f"{prediction['num_prompts']} held-out prompts: mean [95% CI]; the LenVMs: {per_seed}",
            "",
            "| predictor | prompt-boundary MRE |",
            "|---|---|",
        ]
        for name in (*PROMPT_PREDICTORS.values(), "lenvm_minus_regression"):
            lines.append(f"| {name} | {format_interval(prediction['prompt_mre'][name], percent=True)} |")
        lines += [
            "",
            "| position | LenVM remaining-length error (mean, min-max) | mean-remaining baseline |",
            "|---|---|---|",
        ]
        for position, row in prediction["relative_length_error"].items():
            lines.append(
                f"| {position} | {100 * row['mean']:.1f}% ({100 * row['min']:.1f}-{100 * row['max']:.1f}%) | "
                f"{100 * row['baseline']:.1f}% |"
            )
        lines.append("")
    control = results.get("length_control")
    if control:
        lines += [
            f"Length control, Length Score (0-100) over seeds {control['seeds']} x {control['num_problems']} problems:"
            " mean [95% CI]",
            "",
            "| constraint | target | unguided | guided | guided - unguided | guided mean length | guided accuracy |",
            "|---|---|---|---|---|---|---|",
        ]
        for constraint, block in control["constraints"].items():
            for target, row in block["per_target"].items():
                accuracy = np.mean(row["guided_accuracy_per_seed"])
                lines.append(
                    f"| {constraint} | {target} | {format_interval(row['unguided'])} | {format_interval(row['guided'])} | "
                    f"{format_interval(row['guided_minus_unguided'])} | {format_interval(row['guided_mean_length'])} | {accuracy:.3f} |"
                )
            mean = block["mean"]
            lines.append(
                f"| {constraint} | **mean** | {format_interval(mean['unguided'])} | **{format_interval(mean['guided'])}** | "
                f"{format_interval(mean['guided_minus_unguided'])} | | |"
            )
        lines.append("")
    tradeoff = results.get("tradeoff")
    if tradeoff:
        lines += [
            f"Tilt against the token budget over seeds {tradeoff['seeds']} ({tradeoff['num_samples']} samples per "
            "problem): mean [95% CI]; the budget's accuracy at the same mean tokens as the seeds' mean (min-max)",
            "",
            "| beta | mean tokens | accuracy, tilted | accuracy, token budget at that length |",
            "|---|---|---|---|",
        ]
        for row in tradeoff["per_beta"]:
            budget = row["budget_accuracy_at_same_tokens"]
            lines.append(
                f"| {row['beta']:g} | {format_interval(row['mean_tokens'])} | {format_interval(row['accuracy'], '.3f')} | "
                f"{budget['mean']:.3f} ({budget['min']:.3f}-{budget['max']:.3f}) |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    prediction, control, tradeoff = (results.get(key) for key in ("length_prediction", "length_control", "tradeoff"))
    panels = (["prediction"] if prediction else []) + (list(control["constraints"]) if control else [])
    panels += ["tradeoff"] if tradeoff else []
    figure = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]

    def errorbar(axis, xs, values, style, label):
        means = np.array([v["mean"] for v in values])
        low = np.array([v["ci_low"] if v["ci_low"] is not None else v["mean"] for v in values])
        high = np.array([v["ci_high"] if v["ci_high"] is not None else v["mean"] for v in values])
        axis.errorbar(xs, means, yerr=[means - low, high - means], fmt=style, capsize=3, label=label)

    for axis, panel in zip(axes, panels):
        if panel == "prediction":
            names = list(PROMPT_PREDICTORS.values())
            values = [
                {k: 100 * v if v is not None else None for k, v in prediction["prompt_mre"][n].items()} for n in names
            ]
            errorbar(axis, range(len(names)), values, "o", "mean [95% CI] over LenVM seeds and prompts")
            axis.set_xticks(range(len(names)), ["LenVM", "constant", "log-p regression", "linear"])
            axis.set(title="Prompt-boundary MRE", ylabel="MRE (%)", ylim=(0, None))
        elif panel == "tradeoff":
            rows = tradeoff["per_beta"]
            tokens = [row["mean_tokens"]["mean"] for row in rows]
            errorbar(axis, tokens, [row["accuracy"] for row in rows], "s-", "LenVM tilt")
            budget = [row["budget_accuracy_at_same_tokens"]["mean"] for row in rows]
            axis.plot(tokens, budget, "o--", label="token budget, same tokens")
            axis.set(title="Tilt vs token budget", xlabel="mean tokens", ylabel="accuracy", ylim=(0, 1.02))
        else:
            rows = control["constraints"][panel]["per_target"]
            targets = [int(t) for t in rows]
            for side, style in (("unguided", "o--"), ("guided", "s-")):
                errorbar(axis, targets, [rows[str(t)][side] for t in targets], style, side)
            axis.set_xscale("log", base=2)
            axis.set(title=panel.replace("_", " ").title(), xlabel="target T (tokens)", ylabel="Length Score")
            axis.set_ylim(0, 105)
        axis.legend()
    figure.suptitle("LenVM at inference over seeds (95% CI over seeds and problems)")
    figure.savefig(path, dpi=120)


def main(script_args: SeedSummaryArguments) -> dict:
    results = {}
    if script_args.length_prediction_dirs:
        runs = load_seed_runs(
            script_args.length_prediction_dirs, "eval_length_prediction", LENGTH_PREDICTION_PER_RUN_ARGS, "lenvm_path"
        )
        results["length_prediction"] = length_prediction_summary(runs, script_args.num_resamples)
    if script_args.length_control_dirs:
        runs = load_seed_runs(script_args.length_control_dirs, "length_control")
        results["length_control"] = length_control_summary(runs, script_args.num_resamples)
    if script_args.tradeoff_dirs:
        runs = load_seed_runs(script_args.tradeoff_dirs, "tradeoff")
        results["tradeoff"] = tradeoff_summary(runs, script_args.num_resamples)
    output_dir = Path(script_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = format_markdown(results)
    write_json_atomic(output_dir / f"{RESULTS_NAME}.json", results)
    write_text_atomic(output_dir / f"{RESULTS_NAME}.md", table)
    plot(results, output_dir / f"{RESULTS_NAME}.png")
    print(table)
    print(f"Wrote {output_dir}/{RESULTS_NAME}.json, .md and .png")
    return results


if __name__ == "__main__":
    (script_args,) = TrlParser(SeedSummaryArguments).parse_args_and_config()
    main(script_args)
