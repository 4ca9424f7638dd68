"""Length-penalty ablation at matched updates: PPO or GRPO rows over modes and coefficients, several seeds each.

    # PPO (recipes/ppo_gsm8k.py): none, penalty alpha grid, LenVM advantage s grid, LenVM shaping beta grid
    python recipes/ablate_length.py --base_config recipes/configs/demo.yaml --output_dir outputs/demo/ablation
    # GRPO (recipes/grpo_gsm8k.py): grpo, sequence penalty, TRL's soft overlong punishment, LenVM advantage
    python recipes/ablate_length.py --trainer grpo --base_config recipes/configs/grpo_demo.yaml \
        --output_dir outputs/demo/ablation_grpo

Every run trains the recipe from the same base config for the same number of updates, changing only the length term
and the seed; the LenVM stays loaded in every row (with `length_coef: 0` it only feeds the `length/` metrics, and
training is bit-for-bit the plain trainer's, as tests/test_lenvm_ppo_trainer.py and tests/test_lenvm_grpo_trainer.py
prove). Runs are subprocesses, `--num_parallel` at a time (each with `OMP_NUM_THREADS=1`); a run whose
`results.json` exists is reused, so an interrupted ablation resumes. Writes `ablation.json` (every run, and the
mean / std over seeds of the held-out accuracy and mean completion tokens after training), `ablation.md` (the
table) and `ablation.png` (the accuracy-versus-tokens frontier) into `output_dir`.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from trl import TrlParser

from lenvm_rl.configs import AblationArguments

RECIPES = {"ppo": Path(__file__).with_name("ppo_gsm8k.py"), "grpo": Path(__file__).with_name("grpo_gsm8k.py")}


def ablation_rows(args: AblationArguments) -> dict[str, list[str]]:
    """The rows: name -> the recipe flags that differ from the base config."""
    if args.trainer == "ppo":
        rows = {"none": ["--length_mode", "none", "--length_coef", "0"]}
        rows |= {f"penalty a={c:g}": ["--length_mode", "penalty", "--length_coef", str(c)] for c in args.penalty_coefs}
        rows |= {
            f"advantage s={c:g}": ["--length_mode", "advantage", "--length_coef", str(c)] for c in args.advantage_coefs
        }
        rows |= {f"shaping b={c:g}": ["--length_mode", "shaping", "--length_coef", str(c)] for c in args.shaping_coefs}
        return rows
    rows = {"grpo": ["--length_coef", "0"]}
    rows |= {
        f"grpo+penalty a={c:g}": ["--length_coef", "0", "--length_penalty_coef", str(c)] for c in args.penalty_coefs
    }
    if args.overlong_cache:
        rows["grpo+overlong"] = ["--length_coef", "0", "--soft_overlong_cache", str(args.overlong_cache)]
    rows |= {f"grpo+lenvm s={c:g}": ["--length_coef", str(c)] for c in args.advantage_coefs}
    return rows


def _run_dir(args: AblationArguments, name: str, seed: int) -> Path:
    slug = name.replace(" ", "_").replace("=", "").replace("+", "_")
    return Path(args.output_dir) / "runs" / f"{slug}-seed{seed}"


def _command(args: AblationArguments, overrides: list[str], seed: int, run_dir: Path) -> list[str]:
    command = [sys.executable, str(RECIPES[args.trainer]), "--config", args.base_config]
    command += ["--output_dir", str(run_dir), "--seed", str(seed), *overrides]
    if args.max_steps is not None:
        command += ["--max_steps", str(args.max_steps)]
    return command


def run_all(args: AblationArguments, rows: dict[str, list[str]]) -> None:
    """Run every missing (row, seed), `num_parallel` at a time; a failed run stops the ablation with its log."""
    pending = [
        (name, seed)
        for name in rows
        for seed in args.seeds
        if not (_run_dir(args, name, seed) / "results.json").is_file()
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, int, subprocess.Popen, Path]] = []
    done, total = 0, len(pending)
    while pending or running:
        while pending and len(running) < args.num_parallel:
            name, seed = pending.pop(0)
            run_dir = _run_dir(args, name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir / "log.txt"
            with log_path.open("a") as log:
                process = subprocess.Popen(_command(args, rows[name], seed, run_dir), stdout=log, stderr=log, env=env)
            running.append((name, seed, process, log_path))
            print(f"[ablation] started {name} seed {seed} (log: {log_path})", flush=True)
        time.sleep(2)
        for entry in list(running):
            name, seed, process, log_path = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if process.returncode != 0:
                for _, _, other, _ in running:
                    other.terminate()
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(
                    f"{name} seed {seed} failed (exit {process.returncode}); end of {log_path}:\n{tail}"
                )
            done += 1
            print(f"[ablation] {done}/{total} finished {name} seed {seed}", flush=True)


def _evaluations(results: dict) -> tuple[dict, dict]:
    """(before, after) evaluations of a run, whichever recipe wrote it."""
    if "start" in results:
        return results["start"], results["final"]
    return results["before"], results["after"]


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def collect(args: AblationArguments, rows: dict[str, list[str]]) -> dict:
    """Read every run's results.json into the ablation summary."""
    summary = {}
    for name in rows:
        runs = []
        for seed in args.seeds:
            results = json.loads((_run_dir(args, name, seed) / "results.json").read_text())
            before, after = _evaluations(results)
            runs.append({"seed": seed, "before": before, "after": after, "run_dir": str(_run_dir(args, name, seed))})
        summary[name] = {
            "flags": rows[name],
            "after": {key: summarise([run["after"][key] for run in runs]) for key in ("accuracy", "mean_tokens")},
            "runs": runs,
        }
    return summary


def table(summary: dict, before: dict) -> str:
    """A markdown table: accuracy and mean tokens after training (mean ± std over seeds), and the change in tokens."""
    lines = [
        "| row | accuracy | mean tokens | tokens vs start |",
        "|---|---|---|---|",
        f"| start (before RL, mean of every run's evaluation) | {before['accuracy']:.3f} | {before['mean_tokens']:.1f} | |",
    ]
    for name, row in summary.items():
        accuracy, tokens = row["after"]["accuracy"], row["after"]["mean_tokens"]
        change = tokens["mean"] / before["mean_tokens"] - 1
        lines.append(
            f"| {name} | {accuracy['mean']:.3f} ± {accuracy['std']:.3f} | {tokens['mean']:.1f} ± {tokens['std']:.1f} "
            f"| {change:+.0%} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, before: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(before["mean_tokens"], before["accuracy"], marker="*", s=180, color="black", label="start", zorder=3)
    for name, row in summary.items():
        tokens, accuracy = row["after"]["mean_tokens"], row["after"]["accuracy"]
        ax.errorbar(
            tokens["mean"], accuracy["mean"], xerr=tokens["std"], yerr=accuracy["std"], fmt="o", capsize=3, label=name
        )
        for run in row["runs"]:
            ax.scatter(run["after"]["mean_tokens"], run["after"]["accuracy"], s=10, alpha=0.35, color="gray")
    ax.set_xlabel("mean completion tokens (held-out, EOS included)")
    ax.set_ylabel("accuracy (held-out)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: AblationArguments) -> dict:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = ablation_rows(args)
    run_all(args, rows)
    summary = collect(args, rows)
    # Every run evaluates the same starting policy (with its own sampling seed): the start is their mean.
    befores = [run["before"] for row in summary.values() for run in row["runs"]]
    before = {key: statistics.fmean(b[key] for b in befores) for key in ("accuracy", "mean_tokens")}
    result = {"arguments": asdict(args), "before": before, "rows": summary}
    tmp = output_dir / "ablation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, output_dir / "ablation.json")
    markdown = table(summary, before)
    (output_dir / "ablation.md").write_text(markdown)
    title = f"{args.trainer.upper()} length terms at matched updates (mean ± std over {len(args.seeds)} seeds)"
    plot(summary, before, title, output_dir / "ablation.png")
    print(markdown)
    return result


if __name__ == "__main__":
    (ablation_args,) = TrlParser((AblationArguments,)).parse_args_and_config()
    main(ablation_args)
