"""PPO on the demo world with vLLM rollouts against the built-in sampler: the two `recipes/ablate_length.py` runs of
one row (same base config, same seeds, `--recipe_flags "--use_vllm false"` for the built-in arm), paired by seed and
held-out problem.

    python docs/results/demo/engines.py --builtin outputs/demo/engines/builtin --vllm outputs/demo/engines/vllm \
        --output docs/results/demo/engines.json

For each arm: accuracy and mean tokens after PPO and the change against the start; then vLLM minus built-in, with a
95% bootstrap interval over seeds and problems (`lenvm_rl.ablation_stats.hierarchical_bootstrap`: both arms of a
resample take the same seeds and problems, so the difference is paired).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from lenvm_rl.ablation_stats import hierarchical_bootstrap, interval, run_problem_values

QUANTITIES = ("accuracy", "mean_tokens", "start_accuracy", "start_tokens")


def seed_runs(ablation_dir: Path) -> dict[int, dict]:
    """{seed: per-problem values} of the one row of an ablation directory."""
    runs = {}
    for results_path in sorted((ablation_dir / "runs").glob("*-seed*/results.json")):
        results = json.loads(results_path.read_text())
        seed = int(results_path.parent.name.rsplit("-seed", 1)[1])
        runs[seed] = run_problem_values(results["start"], results["final"])
    if not runs:
        raise ValueError(f"No finished run in {ablation_dir}/runs.")
    return runs


def compare(builtin: dict[int, dict], vllm: dict[int, dict], resamples: int = 5000) -> dict:
    if sorted(builtin) != sorted(vllm):
        raise ValueError(f"The arms ran other seeds: {sorted(builtin)} and {sorted(vllm)}.")
    paired = []
    for seed in sorted(builtin):
        values = {f"builtin/{k}": builtin[seed][k] for k in QUANTITIES}
        values |= {f"vllm/{k}": vllm[seed][k] for k in QUANTITIES}
        paired.append(values)
    samples = hierarchical_bootstrap(paired, resamples)
    point = {key: float(np.mean([run[key].mean() for run in paired])) for key in paired[0]}
    out = {"seeds": sorted(builtin), "num_problems": len(paired[0]["builtin/accuracy"])}
    for arm in ("builtin", "vllm"):
        change = samples[f"{arm}/mean_tokens"] / samples[f"{arm}/start_tokens"] - 1
        out[arm] = {
            "accuracy": interval(point[f"{arm}/accuracy"], samples[f"{arm}/accuracy"]),
            "mean_tokens": interval(point[f"{arm}/mean_tokens"], samples[f"{arm}/mean_tokens"]),
            "accuracy_change": interval(
                point[f"{arm}/accuracy"] - point[f"{arm}/start_accuracy"],
                samples[f"{arm}/accuracy"] - samples[f"{arm}/start_accuracy"],
            ),
            "tokens_vs_start": interval(point[f"{arm}/mean_tokens"] / point[f"{arm}/start_tokens"] - 1, change),
        }
    out["vllm_minus_builtin"] = {
        key: interval(point[f"vllm/{key}"] - point[f"builtin/{key}"], samples[f"vllm/{key}"] - samples[f"builtin/{key}"])
        for key in ("accuracy", "mean_tokens")
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builtin", type=Path, required=True)
    parser.add_argument("--vllm", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    result = compare(seed_runs(args.builtin), seed_runs(args.vllm))
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
