"""Length-control ablation for GRPO at matched steps: no length term, sequence-level penalties, the LenVM advantage.

    python recipes/ablate_grpo_length.py --base_config recipes/configs/grpo_demo.yaml \
        --output_dir outputs/demo/ablation_grpo

Each row trains `recipes/grpo_gsm8k.py` from the same config for the same number of steps and seeds, changing only
the length term (the LenVM stays loaded in every row, so every run is a `LenVMGRPOTrainer`; `length_coef: 0` is plain
GRPO, as tests/test_lenvm_grpo_trainer.py proves):

- `grpo`: no length term.
- `grpo+penalty`: the sequence-level reward `-alpha * L` (method doc section 6, "why not a sequence-level penalty").
- `grpo+overlong`: TRL's soft overlong punishment (DAPO eq. 13), which only acts within `cache` tokens of the cap.
- `grpo+lenvm`: the per-token LenVM advantage with coefficient `s`.

Runs go one after another as subprocesses (a finished run's `results.json` is reused, so an interrupted ablation
resumes). Writes `ablation.json` (every run and the mean/std over seeds of held-out accuracy and mean completion
tokens after training) and `ablation.png` (accuracy against mean tokens) into `output_dir`.
"""

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import TrlParser

RECIPE = Path(__file__).with_name("grpo_gsm8k.py")


@dataclass
class AblationArguments:
    """Arguments of `recipes/ablate_grpo_length.py`."""

    base_config: str = field(
        metadata={"help": "YAML of recipes/grpo_gsm8k.py every row starts from (with a LenVM and num_eval_problems)."}
    )
    output_dir: str = field(metadata={"help": "Where each run's directory, ablation.json and ablation.png go."})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "Seeds of every row."})
    length_coef: float = field(default=0.3, metadata={"help": "s of the grpo+lenvm row."})
    length_penalty_coef: float = field(default=0.002, metadata={"help": "alpha of the grpo+penalty row (per token)."})
    soft_overlong_cache: int = field(default=128, metadata={"help": "Cache of the grpo+overlong row (tokens)."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Overrides the base config's max_steps in every row."}
    )


def rows(args: AblationArguments) -> dict[str, list[str]]:
    return {
        "grpo": ["--length_coef", "0"],
        "grpo+penalty": ["--length_coef", "0", "--length_penalty_coef", str(args.length_penalty_coef)],
        "grpo+overlong": ["--length_coef", "0", "--soft_overlong_cache", str(args.soft_overlong_cache)],
        "grpo+lenvm": ["--length_coef", str(args.length_coef)],
    }


def run(args: AblationArguments, name: str, overrides: list[str], seed: int) -> dict:
    run_dir = Path(args.output_dir) / f"{name}-seed{seed}"
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        command = [sys.executable, str(RECIPE), "--config", args.base_config, "--output_dir", str(run_dir)]
        command += ["--seed", str(seed), *overrides]
        if args.max_steps is not None:
            command += ["--max_steps", str(args.max_steps)]
        print("running:", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(results_file.read_text())


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plot(summary: dict, before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter(before["mean_tokens"], before["accuracy"], marker="*", s=150, color="black", label="before RL")
    for name, row in summary.items():
        tokens, accuracy = row["after"]["mean_tokens"], row["after"]["accuracy"]
        ax.errorbar(
            tokens["mean"], accuracy["mean"], xerr=tokens["std"], yerr=accuracy["std"], fmt="o", capsize=3, label=name
        )
        for run in row["runs"]:
            ax.scatter(run["after"]["mean_tokens"], run["after"]["accuracy"], s=12, alpha=0.4, color="gray")
    ax.set_xlabel("mean completion tokens (held-out, EOS included)")
    ax.set_ylabel("accuracy (held-out, 1 sample per problem)")
    ax.set_title("GRPO length control at matched steps (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: AblationArguments) -> dict:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, overrides in rows(args).items():
        runs = [run(args, name, overrides, seed) for seed in args.seeds]
        summary[name] = {
            "after": {key: summarise([r["after"][key] for r in runs]) for key in runs[0]["after"]},
            "global_step": runs[0]["global_step"],
            "runs": [{key: r[key] for key in ("seed", "before", "after", "train_seconds")} for r in runs],
        }
    before = summary["grpo"]["runs"][0]["before"]
    result = {
        "base_config": args.base_config,
        "max_steps": summary["grpo"]["global_step"],
        "seeds": args.seeds,
        "before": before,
        "rows": summary,
    }
    (output_dir / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, before, output_dir / "ablation.png")
    for name, row in summary.items():
        accuracy, tokens = row["after"]["accuracy"], row["after"]["mean_tokens"]
        print(
            f"{name:14s} accuracy {accuracy['mean']:.3f} ± {accuracy['std']:.3f}   "
            f"tokens {tokens['mean']:6.1f} ± {tokens['std']:.1f}"
        )
    return result


if __name__ == "__main__":
    (ablation_args,) = TrlParser((AblationArguments,)).parse_args_and_config()
    main(ablation_args)
