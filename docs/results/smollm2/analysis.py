"""How much of the prompt-boundary MRE any predictor can remove on the SmolLM2 held-out rollouts, and whether the
LenVM's lead over the baselines is larger than the sampling noise of 64 prompts x ~7 finished completions.

    .venv/bin/python docs/results/smollm2/analysis.py --eval_json outputs/smollm2/eval_length_prediction.json \
        --rollouts outputs/smollm2/rollouts_train outputs/smollm2/rollouts_eval --output docs/results/smollm2/analysis.json

1. Variance components (one-way random effects on log lengths of the finished completions): how much of the length
   variance the prompt explains (ICC).
2. Noise floor: a simulation matched to the held-out rollouts (prompt effects ~ Normal(0, sd_prompt) in log space,
   the pooled within-prompt log residuals, the same number of finished completions per prompt, lengths clipped to
   [1, 384]) scores, with the paper's MRE, an oracle that knows every prompt's expected length and the best constant.
3. Paired bootstrap over held-out prompts of MRE(LenVM) - MRE(baseline), from a saved eval_length_prediction.json.
4. Value MSE of two predictors that do not read the text, on the same held-out targets as the eval's `value_mse`
   (every state s_0 .. s_L of the finished completions): the mean training return, and the mean training return of
   completions still running at the same position t (the value-space "mean remaining length given t" baseline).
"""

import argparse
import json
from pathlib import Path

import numpy as np


def finished_lengths(rollouts: Path) -> list[np.ndarray]:
    groups: dict[str, list[int]] = {}
    for file in sorted(rollouts.glob("shard-*/chunk-*.jsonl")):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            if record["finish_reason"] == "stop":
                groups.setdefault(record["prompt_id"], []).append(len(record["completion_ids"]))
    return [np.array(v, dtype=float) for v in groups.values() if len(v) >= 2]


def variance_components(groups: list[np.ndarray]) -> dict:
    logs = [np.log(g) for g in groups]
    k = float(np.mean([len(g) for g in groups]))
    within = float(np.mean([x.var(ddof=1) for x in logs]))
    between = float(np.var([x.mean() for x in logs], ddof=1))
    prompt = max(between - within / k, 0.0)
    return {
        "num_prompts": len(groups),
        "mean_finished_per_prompt": k,
        "log_within_sd": within**0.5,
        "log_prompt_sd": prompt**0.5,
        "icc": prompt / (prompt + within),
    }


def value_space_length(lengths: np.ndarray, gamma: float) -> float:
    return float(np.log(np.mean(gamma**lengths)) / np.log(gamma))  # L_GT of the paper (section 5)


def noise_floor(groups: list[np.ndarray], gamma: float, cap: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    components = variance_components(groups)
    logs = [np.log(g) for g in groups]
    residuals = np.concatenate([x - x.mean() for x in logs])
    center = float(np.mean([x.mean() for x in logs]))
    counts = [len(g) for g in groups]
    oracle, constant = [], []
    for _ in range(repeats):
        effects = center + components["log_prompt_sd"] * rng.standard_normal(len(counts))
        expected, truth = [], []
        for effect, k in zip(effects, counts):
            population = np.clip(np.exp(effect + rng.choice(residuals, 4000)), 1, cap)
            expected.append(value_space_length(population, gamma))
            truth.append(value_space_length(np.clip(np.exp(effect + rng.choice(residuals, k)), 1, cap), gamma))
        expected, truth = np.array(expected), np.array(truth)
        best_constant = value_space_length(expected, gamma)  # the pooled expected length, in value space
        oracle.append(np.mean(np.abs(expected - truth) / truth))
        constant.append(np.mean(np.abs(best_constant - truth) / truth))
    oracle, constant = np.array(oracle), np.array(constant)
    return {
        "repeats": repeats,
        "oracle_mre": float(oracle.mean()),
        "oracle_mre_sd": float(oracle.std()),
        "constant_mre": float(constant.mean()),
        "constant_mre_sd": float(constant.std()),
        "oracle_minus_constant": float((oracle - constant).mean()),
        "oracle_minus_constant_sd": float((oracle - constant).std()),
    }


def paired_bootstrap(eval_json: dict, resamples: int, seed: int) -> dict:
    per_prompt = eval_json["per_prompt"]
    truth = np.array(per_prompt["true_length"])
    errors = {
        key: np.abs(np.array(per_prompt[column]) - truth) / truth
        for key, column in [
            ("lenvm", "predicted_length"),
            ("constant", "constant_length"),
            ("prompt_length_regression", "regression_length"),
            ("linear_prompt_length", "linear_length"),
        ]
        if column in per_prompt
    }
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(truth), (resamples, len(truth)))
    out = {}
    for key, error in errors.items():
        if key == "lenvm":
            continue
        difference = errors["lenvm"] - error
        boots = difference[index].mean(axis=1)
        out[key] = {
            "lenvm_minus_baseline": float(difference.mean()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        }
    return out


def position_value_baselines(train: list[np.ndarray], held_out: list[np.ndarray], gamma: float) -> dict:
    train_lengths = np.concatenate(train).astype(int)
    horizon = int(max(train_lengths.max(), max(g.max() for g in held_out))) + 1
    sums, counts = np.zeros(horizon), np.zeros(horizon)
    all_targets = []
    for length in train_lengths:
        targets = -(1 - gamma ** np.arange(length, -1, -1))  # G_0 .. G_L
        sums[: length + 1] += targets
        counts[: length + 1] += 1
        all_targets.append(targets)
    constant = float(np.concatenate(all_targets).mean())
    by_position = np.divide(sums, counts, out=np.zeros(horizon), where=counts > 0)  # 0 = finished beyond the data
    squared_constant, squared_position, n = 0.0, 0.0, 0
    for length in np.concatenate(held_out).astype(int):
        targets = -(1 - gamma ** np.arange(length, -1, -1))
        squared_constant += float(((targets - constant) ** 2).sum())
        squared_position += float(((targets - by_position[: length + 1]) ** 2).sum())
        n += length + 1
    return {
        "num_targets": int(n),
        "constant_value_mse": squared_constant / n,
        "position_value_mse": squared_position / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval_json", required=True)
    parser.add_argument("--rollouts", nargs="+", required=True, help="training, then held-out rollout directories")
    parser.add_argument("--output", required=True)
    parser.add_argument("--cap", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    evaluation = json.loads(Path(args.eval_json).read_text())
    gamma = evaluation["gamma"]
    held_out = finished_lengths(Path(args.rollouts[-1]))
    result = {
        "gamma": gamma,
        "variance_components": {path: variance_components(finished_lengths(Path(path))) for path in args.rollouts},
        "noise_floor_held_out": noise_floor(held_out, gamma, args.cap, args.repeats, args.seed),
        "observed_prompt_mre": evaluation["prompt_mre"],
        "paired_bootstrap": paired_bootstrap(evaluation, 5000, args.seed),
        "lenvm_value_mse": evaluation["value_mse"],
        "value_mse_baselines": position_value_baselines(finished_lengths(Path(args.rollouts[0])), held_out, gamma),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
