"""Data-scaling curve of LenVM pretraining: prompt-boundary MRE and value MSE versus the number of training completions.

    # SmolLM2-135M-Instruct on GSM8K (after recipes/configs/rollouts_gsm8k_smollm2*.yaml), one CPU core
    OMP_NUM_THREADS=1 python recipes/lenvm_scaling.py --lenvm_config recipes/configs/lenvm_smollm2.yaml \
        --eval_config recipes/configs/eval_length_smollm2.yaml --output_dir outputs/smollm2/scaling \
        --num_completions 256 512 1024
    # the table and the figure of the subsets finished so far, without training anything
    python recipes/lenvm_scaling.py ... --collect_only true

Every subset holds whole prompts: the first prompts of the training rollouts (in the order they were sampled: chunk
files in order, records in file order) with all their completions, until `N` completions are reached, so a larger
subset contains every smaller one. Each subset is trained with `recipes/train_lenvm.py` and the same hyper-parameters
(the `--lenvm_config`; only `train_rollouts`, `output_dir` and `gamma` change) and evaluated with
`recipes/eval_length_prediction.py` (the `--eval_config`; only `lenvm_path`, `train_rollouts` and `output_dir`
change) on the same held-out rollouts. The baselines (constant, log-prompt-length value regression, linear
`L ~ p`, mean remaining length) are fitted on the subset itself, so every point compares predictors that saw the
same data.

Gamma is the same for every subset (value MSE is only comparable at one gamma): `--gamma`, else the LenVM config's
`gamma`, else the config's percentile rule applied to the largest subset (= the gamma `train_lenvm.py` picks on it).
The number of epochs is the config's, so smaller subsets take fewer optimizer steps.

Layout of `output_dir`::

    n256/rollouts/                 the subset, in the sampler's layout (rollouts_config.json copied)
    n256/lenvm/                    its LenVM (`--keep_models false` deletes the weights once evaluated)
    n256/train_summary.json        wall time, load average, final training loss, steps
    n256/eval_length_prediction.json / .png
    scaling.json, scaling.png      every subset's numbers, and MRE / value MSE versus completions

Resumable: a subset whose `eval_length_prediction.json` exists is not run again, and a complete LenVM directory is
evaluated without retraining, both only if the subset was trained on the same records, gamma and configs (its
`train_summary.json` records them; another run's subset is refused, never silently mixed into the curve). Runs one job at a time, in-process.
"""

import gc
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from trl import ModelConfig, TrlParser

from lenvm_rl.ablation_stats import format_interval, prompt_mre_statistics
from lenvm_rl.configs import EvalLengthPredictionArguments, TrainLenVMScriptArguments
from lenvm_rl.core import gamma_for_length
from lenvm_rl.io import write_json_atomic, write_jsonl_atomic
from lenvm_rl.lenvm_checkpoint import SAVE_IN_PROGRESS_NAME
from lenvm_rl.modeling import VALUE_HEAD_NAME
from lenvm_rl.rollouts import ROLLOUTS_CONFIG_NAME, load_rollouts
from lenvm_rl.trainers.lenvm import LenVMConfig

sys.path.insert(0, str(Path(__file__).parent))

import eval_length_prediction  # noqa: E402
import train_lenvm  # noqa: E402

logger = logging.getLogger(__name__)

RESULTS_NAME = "scaling"  # scaling.json and scaling.png
EVAL_NAME = eval_length_prediction.RESULTS_NAME + ".json"
TRAIN_SUMMARY_NAME = "train_summary.json"
BOOTSTRAP_RESAMPLES = 5000
MRE_KEYS = {  # prompt_mre key -> label in the table and the figure
    "lenvm": "LenVM",
    "constant": "constant",
    "prompt_length_regression": "prompt-length regression (V ~ log p)",
    "linear_prompt_length": "linear L ~ p",
}


@dataclass
class LenVMScalingArguments:
    """Arguments of `recipes/lenvm_scaling.py`.

    Parameters:
        lenvm_config (`str`): YAML of `recipes/train_lenvm.py`: the hyper-parameters of every subset.
        eval_config (`str`): YAML of `recipes/eval_length_prediction.py`: the held-out rollouts and windows.
        output_dir (`str`): One directory per subset, `scaling.json` and `scaling.png`.
        num_completions (`list[int]`): Subset sizes in completions; each must end on a prompt boundary.
        train_rollouts (`str` or `None`): Training rollouts to draw the subsets from (default: the LenVM config's).
        eval_rollouts (`str` or `None`): Held-out rollouts (default: the eval config's).
        gamma (`float` or `None`): Discount of every subset (default: the LenVM config's, else its percentile rule on
            the largest subset).
        eval_bf16 (`bool`): Run the evaluation forwards under bfloat16 autocast (CPU with avx512_bf16 / AMX: ~2.5x
            faster; the value head stays float32).
        keep_models (`bool`): Keep each subset's LenVM weights after its evaluation.
        collect_only (`bool`): Train and evaluate nothing; summarise the subsets finished so far.
    """

    lenvm_config: str = field(metadata={"help": "YAML of recipes/train_lenvm.py (hyper-parameters of every subset)."})
    eval_config: str = field(metadata={"help": "YAML of recipes/eval_length_prediction.py (held-out rollouts)."})
    output_dir: str = field(metadata={"help": "One directory per subset, scaling.json and scaling.png."})
    num_completions: list[int] = field(
        default_factory=lambda: [256, 512, 1024],
        metadata={"help": "Subset sizes in completions (whole prompts: multiples of the completions per prompt)."},
    )
    train_rollouts: str | None = field(
        default=None, metadata={"help": "Training rollouts to draw the subsets from (default: the LenVM config's)."}
    )
    eval_rollouts: str | None = field(
        default=None, metadata={"help": "Held-out rollouts (default: the eval config's)."}
    )
    gamma: float | None = field(
        default=None,
        metadata={
            "help": "Discount of every subset (default: the config's, else its percentile rule on the largest)."
        },
    )
    eval_bf16: bool = field(default=False, metadata={"help": "Evaluate under bfloat16 autocast (CPU: ~2.5x faster)."})
    keep_models: bool = field(default=True, metadata={"help": "Keep each subset's LenVM weights once evaluated."})
    collect_only: bool = field(default=False, metadata={"help": "Run nothing; summarise the finished subsets."})

    def __post_init__(self):
        if not self.num_completions or any(n < 1 for n in self.num_completions):
            raise ValueError(f"--num_completions must be positive integers, got {self.num_completions}")
        if len(set(self.num_completions)) != len(self.num_completions):
            raise ValueError(f"--num_completions has duplicates: {self.num_completions}")
        self.num_completions = sorted(self.num_completions)
        if self.gamma is not None and not 0 < self.gamma < 1:
            raise ValueError(f"--gamma must be in (0, 1), got {self.gamma}")


# ---------------------------------------------------------------------- subsets and gamma (pure)


def first_prompts(prompt_ids: list[str], num_completions: int) -> list[int]:
    """Record indices of the first prompts (in order of first appearance) holding exactly `num_completions` records.

    Whole prompts only: a size that falls inside a prompt's completions is an error naming the two nearest sizes.

    Example:
        >>> first_prompts(["a", "a", "b", "b", "c", "c"], 4)
        [0, 1, 2, 3]
    """
    groups: dict[str, list[int]] = {}
    for index, prompt_id in enumerate(prompt_ids):
        groups.setdefault(prompt_id, []).append(index)
    selected: list[int] = []
    for members in groups.values():
        if len(selected) == num_completions:
            break
        if len(selected) + len(members) > num_completions:
            raise ValueError(
                f"{num_completions} completions do not end on a prompt boundary: whole prompts give "
                f"{len(selected)} or {len(selected) + len(members)}."
            )
        selected += members
    if len(selected) < num_completions:
        raise ValueError(
            f"Only {len(prompt_ids)} training completions ({len(groups)} prompts) exist; {num_completions} were "
            "asked for. Sample more or lower --num_completions."
        )
    return selected


def percentile_gamma(lengths: list[int], finished: list[bool], percentile: float, coverage: float) -> float:
    """The percentile rule of `LenVMTrainer` (`1 - gamma^L_q = coverage`, `L_q` the percentile of the finished,
    non-empty completion lengths), so that every subset gets the gamma `train_lenvm.py` would pick on the largest.

    Example:
        >>> round(percentile_gamma([100, 50, 400], [True, True, False], 100.0, 0.99), 6)  # L_q = 100
        0.954993
    """
    kept = [n for n, done in zip(lengths, finished) if done and n > 0]
    if not kept:
        raise ValueError("Cannot choose gamma: no finished completion in the subset. Pass --gamma.")
    quantile = float(torch.quantile(torch.tensor(kept, dtype=torch.float64), percentile / 100))
    return gamma_for_length(max(quantile, 1.0), coverage)


def write_subset(records: list[dict], rollouts_dir: Path, target: Path) -> Path:
    """Write `records` as a rollout directory (one shard, one chunk) with the source's `rollouts_config.json`, so
    the LenVM records the generator model. Rewriting the same subset gives the same files."""
    chunk = target / "shard-00000-of-00001" / "chunk-000000.jsonl"
    chunk.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(chunk, records)
    source_config = Path(rollouts_dir) / ROLLOUTS_CONFIG_NAME
    if source_config.is_file():
        write_json_atomic(target / ROLLOUTS_CONFIG_NAME, json.loads(source_config.read_text()))
    return target


def lenvm_is_complete(path: Path) -> bool:
    """A LenVM directory whose save finished (head, config, no in-progress marker)."""
    return (
        (path / VALUE_HEAD_NAME).is_file()
        and (path / "lenvm_config.json").is_file()
        and not (path / SAVE_IN_PROGRESS_NAME).exists()
    )


def subset_dir(output_dir: str | os.PathLike, num_completions: int) -> Path:
    return Path(output_dir) / f"n{num_completions}"


# ---------------------------------------------------------------------- training and evaluation


def _train(args: LenVMScalingArguments, rollouts: Path, lenvm_dir: Path, gamma: float) -> dict:
    parser = TrlParser((TrainLenVMScriptArguments, LenVMConfig, ModelConfig))
    flags = ["--train_rollouts", str(rollouts), "--output_dir", str(lenvm_dir), "--gamma", repr(gamma)]
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", args.lenvm_config, *flags])
    load, start = os.getloadavg(), time.time()
    trainer = train_lenvm.main(script_args, training_args, model_args)
    if trainer is None:  # its run manifest says it finished: there is no training to summarise
        raise RuntimeError(
            f"{lenvm_dir} holds a finished LenVM run but its training summary is missing; delete {lenvm_dir} to train "
            "it again."
        )
    seconds = time.time() - start
    history = trainer.state.log_history
    losses = [log["loss"] for log in history if "loss" in log]
    summary = {
        "wall_seconds": seconds,
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "num_train_examples": len(trainer.train_dataset),
        "global_steps": trainer.state.global_step,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_loss": next((log["train_loss"] for log in reversed(history) if "train_loss" in log), None),
        "gamma": gamma,
        "command_flags": flags,
    }
    del trainer
    gc.collect()
    return summary


def _evaluate(args: LenVMScalingArguments, rollouts: Path, lenvm_dir: Path, out: Path) -> dict:
    flags = ["--lenvm_path", str(lenvm_dir), "--train_rollouts", str(rollouts), "--output_dir", str(out)]
    if args.eval_rollouts:
        flags += ["--eval_rollouts", args.eval_rollouts]
    (eval_args,) = TrlParser(EvalLengthPredictionArguments).parse_args_and_config(
        ["--config", args.eval_config, *flags]
    )
    load, start = os.getloadavg(), time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.eval_bf16):
        results = eval_length_prediction.main(eval_args)
    gc.collect()
    return {
        "wall_seconds": time.time() - start,
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "bf16_autocast": args.eval_bf16,
        "num_prompts": results["num_prompts"],
    }


def subset_identity(args: LenVMScalingArguments, records: list[dict], gamma: float) -> dict:
    """What a finished subset must share with the run that reuses it: its training records, gamma, both configs'
    settings (parsed, so comments may change) and the held-out rollouts override."""

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {
        "records_sha256": digest([(r["prompt_id"], r["completion_ids"], r["finish_reason"]) for r in records]),
        "gamma": gamma,
        "lenvm_config_sha256": digest(yaml.safe_load(Path(args.lenvm_config).read_text())),
        "eval_config_sha256": digest(yaml.safe_load(Path(args.eval_config).read_text())),
        "eval_rollouts": args.eval_rollouts,
    }


def check_subset_identity(out: Path, identity: dict) -> None:
    """Refuse to reuse a subset directory trained or evaluated under other data, gamma or configs."""
    summary_path = out / TRAIN_SUMMARY_NAME
    stored = json.loads(summary_path.read_text()).get("identity") if summary_path.is_file() else None
    if stored is None:
        raise ValueError(
            f"{out} holds results without the record of what they were trained on ({summary_path} has no "
            "'identity'), so they cannot be reused safely: move it aside or pass another --output_dir."
        )
    differing = sorted(key for key in identity if stored.get(key) != identity[key])
    if differing:
        raise ValueError(
            f"{out} was trained and evaluated with other {', '.join(differing)} than this run asks for; its numbers "
            "would not be comparable. Move it aside, pass another --output_dir, or run with the settings it used "
            f"({ {key: stored.get(key) for key in differing} })."
        )


def run_subset(args: LenVMScalingArguments, dataset, rollouts_dir: Path, num_completions: int, gamma: float) -> None:
    """Train and evaluate one subset unless its evaluation exists; a complete LenVM is not retrained. A subset
    finished before is reused only under the same training records, gamma and configs."""
    out = subset_dir(args.output_dir, num_completions)
    indices = first_prompts(dataset["prompt_id"], num_completions)
    records = dataset.select(indices).to_list()
    identity = subset_identity(args, records, gamma)
    lenvm_dir = out / "lenvm"
    summary_path = out / TRAIN_SUMMARY_NAME
    if (out / EVAL_NAME).is_file() or summary_path.is_file():
        check_subset_identity(out, identity)
    if (out / EVAL_NAME).is_file():
        logger.warning("n=%d: %s exists, skipped.", num_completions, out / EVAL_NAME)
        return
    rollouts = write_subset(records, rollouts_dir, out / "rollouts")
    if not (lenvm_is_complete(lenvm_dir) and summary_path.is_file()):
        summary = _train(args, rollouts, lenvm_dir, gamma)
        summary["identity"] = identity
        summary["num_completions"] = num_completions
        summary["num_prompts"] = len(set(dataset.select(indices)["prompt_id"]))
        write_json_atomic(summary_path, summary)
    summary = json.loads(summary_path.read_text())
    summary["eval"] = _evaluate(args, rollouts, lenvm_dir, out)
    write_json_atomic(summary_path, summary)
    if not args.keep_models:
        for weights in lenvm_dir.glob("*.safetensors"):
            weights.unlink()


# ---------------------------------------------------------------------- results


def collect(args: LenVMScalingArguments, gamma: float | None) -> dict:
    """Every finished subset's numbers, smallest first (missing subsets are listed in `pending`)."""
    rows, pending = [], []
    for n in args.num_completions:
        out = subset_dir(args.output_dir, n)
        if not (out / EVAL_NAME).is_file():
            pending.append(n)
            continue
        results = json.loads((out / EVAL_NAME).read_text())
        summary = json.loads((out / TRAIN_SUMMARY_NAME).read_text()) if (out / TRAIN_SUMMARY_NAME).is_file() else {}
        rows.append(
            {
                "num_completions": n,
                "num_prompts": summary.get("num_prompts"),
                "num_train_finished": (results.get("baselines") or {}).get("num_train_completions"),
                "gamma": results["gamma"],
                "prompt_mre": results["prompt_mre"],
                # the LenVM's MRE and its paired difference with each baseline, prompts resampled
                "prompt_mre_intervals": prompt_mre_statistics([results["per_prompt"]], BOOTSTRAP_RESAMPLES),
                "value_mse": results["value_mse"],
                "relative_length_error": results["relative_length_error"],
                "relative_length_error_remaining_baseline": results["relative_length_error_remaining_baseline"],
                "mean_true_length": results["mean_true_length"],
                "mean_predicted_length": results["mean_predicted_length"],
                "num_eval_prompts": results["num_prompts"],
                "num_eval_completions": results["num_completions"],
                "train": {k: v for k, v in summary.items() if k != "eval"},
                "eval": summary.get("eval"),
            }
        )
    gammas = sorted({row["gamma"] for row in rows})
    if len(gammas) > 1:  # value MSEs at different gammas are not one curve
        raise ValueError(f"The finished subsets of {args.output_dir} were trained with different gammas: {gammas}.")
    return {"args": asdict(args), "gamma": gamma, "rows": rows, "pending": pending}


def format_table(result: dict) -> str:
    """Markdown tables, one row per subset: the MREs, value MSE and remaining-length errors, then the LenVM's paired
    differences with the baselines (95% bootstrap intervals over held-out prompts)."""
    header = ["completions", "prompts", *MRE_KEYS.values(), "value MSE", "rel. err 25/50/75% (mean-remaining)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in result["rows"]:
        mre = [_percent(row["prompt_mre"].get(key)) for key in MRE_KEYS]
        errors = row["relative_length_error"]
        baseline = row["relative_length_error_remaining_baseline"] or {}
        positions = " / ".join(_percent(errors.get(k)) for k in ("25%", "50%", "75%"))
        positions += " (" + " / ".join(_percent(baseline.get(k)) for k in ("25%", "50%", "75%")) + ")"
        mse = "n/a" if row["value_mse"] is None else f"{row['value_mse']:.4f}"
        cells = [str(row["num_completions"]), str(row["num_prompts"]), *mre, mse, positions]
        lines.append("| " + " | ".join(cells) + " |")
    baselines = [key for key in MRE_KEYS if key != "lenvm"]
    header = ["completions", *(f"LenVM minus {MRE_KEYS[key]}" for key in baselines)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in result["rows"]:
        differences = (row.get("prompt_mre_intervals") or {}).get("lenvm_minus", {})
        cells = [format_interval(differences.get(key), ".1f", percent=True) or "n/a" for key in baselines]
        lines.append("| " + " | ".join([str(row["num_completions"]), *cells]) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1%}"


def plot_scaling(result: dict, path: str | os.PathLike) -> None:
    """Two panels against the training completions (log axis): prompt-boundary MRE of the LenVM and of the baselines,
    and the LenVM's value MSE."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    rows = result["rows"]
    sizes = [row["num_completions"] for row in rows]
    figure = Figure(figsize=(10, 4), layout="constrained")
    mre_axis, mse_axis = figure.subplots(1, 2)
    styles = {
        "lenvm": ("o-", 2.0),
        "constant": ("s--", 1.0),
        "prompt_length_regression": ("x--", 1.0),
        "linear_prompt_length": ("^--", 1.0),
    }
    for key, label in MRE_KEYS.items():
        values = [row["prompt_mre"].get(key) for row in rows]
        if any(v is not None for v in values):
            style, width = styles[key]
            mre_axis.plot(sizes, [math.nan if v is None else 100 * v for v in values], style, lw=width, label=label)
    lenvm_intervals = [(row.get("prompt_mre_intervals") or {}).get("mre", {}).get("lenvm") for row in rows]
    if all(stat and stat["ci_low"] is not None for stat in lenvm_intervals):
        low = [100 * stat["ci_low"] for stat in lenvm_intervals]
        high = [100 * stat["ci_high"] for stat in lenvm_intervals]
        mre_axis.fill_between(sizes, low, high, alpha=0.15, color="C0", label="LenVM 95% interval (prompts)")
    mre_axis.set(
        xscale="log",
        xlabel="training completions (whole prompts)",
        ylabel="prompt-boundary MRE (%)",
        title="Length prediction on held-out prompts",
    )
    mre_axis.minorticks_off()  # log-axis minor labels (2 x 10^2, ...) would overprint the sizes
    mre_axis.set_xticks(sizes, [str(n) for n in sizes])
    mre_axis.set_ylim(bottom=0)
    mre_axis.legend(fontsize=8)
    mse_axis.plot(sizes, [math.nan if row["value_mse"] is None else row["value_mse"] for row in rows], "o-")
    gamma = result.get("gamma")
    mse_axis.set(
        xscale="log",
        xlabel="training completions (whole prompts)",
        ylabel="value MSE (held-out tokens)",
        title="LenVM value MSE" + (f" (gamma {gamma:.4f})" if gamma else ""),
    )
    mse_axis.minorticks_off()
    mse_axis.set_xticks(sizes, [str(n) for n in sizes])
    mse_axis.set_ylim(bottom=0)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------------- main


def resolve_gamma(args: LenVMScalingArguments, dataset) -> float:
    """`--gamma`, else the LenVM config's gamma, else its percentile rule on the largest subset."""
    if args.gamma is not None:
        return args.gamma
    config = yaml.safe_load(Path(args.lenvm_config).read_text()) or {}
    if config.get("gamma") is not None:
        return float(config["gamma"])
    largest = first_prompts(dataset["prompt_id"], args.num_completions[-1])
    subset = dataset.select(largest)
    return percentile_gamma(
        [len(ids) for ids in subset["completion_ids"]],
        [reason == "stop" for reason in subset["finish_reason"]],
        float(config.get("gamma_percentile", 99.0)),
        float(config.get("gamma_coverage", 0.99)),
    )


def main(args: LenVMScalingArguments) -> dict:
    config = yaml.safe_load(Path(args.lenvm_config).read_text()) or {}
    rollouts_dir = Path(args.train_rollouts or config["train_rollouts"])
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    gamma = None
    if not args.collect_only:
        dataset = load_rollouts(rollouts_dir)
        for n in args.num_completions:  # fail before any training if a size is impossible
            first_prompts(dataset["prompt_id"], n)
        gamma = resolve_gamma(args, dataset)
        logger.warning("gamma=%.6f for every subset.", gamma)
        for n in args.num_completions:
            run_subset(args, dataset, rollouts_dir, n, gamma)
    result = collect(args, gamma)
    if gamma is None and result["rows"]:
        result["gamma"] = result["rows"][-1]["gamma"]
    write_json_atomic(output_dir / f"{RESULTS_NAME}.json", result)
    if result["rows"]:
        plot_scaling(result, output_dir / f"{RESULTS_NAME}.png")
    print(format_table(result))
    if result["pending"]:
        print(f"pending subsets: {result['pending']}")
    return result


if __name__ == "__main__":
    (script_args,) = TrlParser(LenVMScalingArguments).parse_args_and_config()
    main(script_args)
