"""Length baselines at matched updates: PPO or GRPO rows over length methods and coefficient sweeps, several seeds.

    # PPO (recipes/ppo_gsm8k.py): none, sequence penalty, correct-only penalty, LenVM advantage, LenVM shaping,
    # a length critic without pretraining, the LenVM refreshed online
    python recipes/ablate_length.py --base_config recipes/configs/demo.yaml --output_dir outputs/demo/ablation \
        --world_dir outputs/demo/world
    # GRPO (recipes/grpo_gsm8k.py): the same plus Kimi k1.5's length reward and TRL's soft overlong punishment
    python recipes/ablate_length.py --trainer grpo --base_config recipes/configs/grpo_demo.yaml \
        --output_dir outputs/demo/ablation_grpo --world_dir outputs/demo/world
    # a summary of the runs finished so far (while the ablation runs in another shell)
    python recipes/ablate_length.py --base_config recipes/configs/demo.yaml --output_dir outputs/demo/ablation \
        --world_dir outputs/demo/world --collect_only true

Every run trains the recipe from the same base config for the same number of updates and rollouts, changing only the
length term and the seed; the base config's LenVM stays loaded in the rows without a LenVM term (with
`length_coef: 0` it only feeds the `length/` metrics, and training is bit-for-bit the plain trainer's, as
tests/test_lenvm_ppo_trainer.py and tests/test_lenvm_grpo_trainer.py prove). Runs are subprocesses, `--num_parallel`
at a time (each with `OMP_NUM_THREADS=1`), seed by seed (every row of the first seed, then the next seed), so a
partial ablation already has one seed of every row. A run whose `results.json` holds its final evaluation is reused,
so an interrupted ablation resumes.

Statistics ([`lenvm_rl.ablation_stats`]): every figure is the mean over seeds with a 95% bootstrap interval over seeds
and held-out problems (completions of one problem stay together), and the seeds' spread. Each method's coefficient
sweep, with the row without length term as its coefficient 0, is an accuracy-versus-tokens frontier; the tokens at
matched accuracy are where it crosses the start accuracy minus 2 points. With `--world_dir`, the share of removable
verbosity removed is `(start - tokens) / (start - floor)`, the floor being the demo world's most concise reference
style on the same held-out problems. Outputs in `output_dir`: `ablation.json` (every run and every statistic),
`ablation.md` (the tables), `ablation.png` (the frontiers) and, for PPO, `stop_advantage.png` (the stop token's
advantage against the other tokens' per update, for the rows without a LenVM).
"""

import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from transformers import AutoTokenizer
from trl import TrlParser

from lenvm_rl.ablation_stats import format_interval, matched_accuracy_tokens, row_statistics, run_problem_values
from lenvm_rl.configs import AblationArguments
from lenvm_rl.demo import DEMO_STYLES, generate_demo_problems, write_demo_solution
from lenvm_rl.io import write_json_atomic, write_text_atomic
from lenvm_rl.lenvm_checkpoint import read_lenvm_config
from lenvm_rl.trainers.checkpointing import last_complete_checkpoint

RECIPES = {"ppo": Path(__file__).with_name("ppo_gsm8k.py"), "grpo": Path(__file__).with_name("grpo_gsm8k.py")}
MATCHED_ACCURACY_DROP = 0.02  # the research target: fewer tokens at no more than 2 points of accuracy lost
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
POLL_SECONDS = 2.0  # how often run_all checks its subprocesses
BASE_METHODS = ("none", "grpo")  # the row without length term: coefficient 0 of every method's sweep
# Per-update PPO metrics (LenVMPPOTrainer) that test why the sequence penalty lengthens responses.
ADVANTAGE_KEYS = {
    "stop_token_advantage": "length/stop_token_advantage_mean",
    "other_token_advantage": "length/other_token_advantage_mean",
}
TRAINING_TOKENS_KEY = "length/response_tokens_mean"  # mean tokens of each update's rollouts, next to them
STOP_ADVANTAGE_METHODS = ("none", "penalty", "correct_only_penalty")
LENVM_METHODS = ("advantage", "shaping", "unpretrained", "online")  # rows whose length term is a LenVM critic


# ---------------------------------------------------------------------- rows


def ablation_rows(args: AblationArguments, lenvm_gamma: float | None = None) -> dict[str, dict]:
    """The rows: name -> `{"method", "coef", "flags"}`, the flags being what differs from the base config.

    `lenvm_gamma` (the gamma of the base config's LenVM) is needed by the rows of the length critic without
    pretraining, which start from a fresh value head instead of that LenVM.
    """
    sweeps = _ppo_sweeps(args) if args.trainer == "ppo" else _grpo_sweeps(args)
    if "unpretrained" in args.methods and args.unpretrained_coefs:
        if lenvm_gamma is None:
            raise ValueError("The `unpretrained` rows need the gamma of the base config's LenVM: pass lenvm_gamma.")
        unpretrained = ["--lenvm_init", "policy", "--lenvm_update", "online", "--lenvm_gamma", repr(lenvm_gamma)]
        # The base config's LenVM must be unset: `none` reads as None (LengthCriticConfigMixin).
        unpretrained += ["--lenvm_model_name_or_path", "none"]
        sweeps["unpretrained"] = [(name, s, flags + unpretrained) for name, s, flags in sweeps["unpretrained"]]
    rows = {}
    for method in AblationArguments.METHODS[args.trainer]:  # the canonical order, whatever the order of --methods
        if method in args.methods:
            rows |= {name: {"method": method, "coef": coef, "flags": flags} for name, coef, flags in sweeps[method]}
    return rows


def _ppo_sweeps(args: AblationArguments) -> dict[str, list[tuple[str, float, list[str]]]]:
    """(name, coefficient, flags) of every PPO row, by method."""

    def flags(mode: str, coef: float, *extra: str) -> list[str]:
        return ["--length_mode", mode, "--length_coef", f"{coef:g}", *extra]

    return {
        "none": [("none", 0.0, flags("none", 0.0))],
        "penalty": [(f"penalty a={a:g}", a, flags("penalty", a)) for a in args.penalty_coefs],
        "correct_only_penalty": [
            (f"correct-only penalty a={a:g}", a, flags("penalty", a, "--length_penalty_correct_only", "true"))
            for a in args.correct_only_penalty_coefs
        ],
        "advantage": [(f"advantage s={s:g}", s, flags("advantage", s)) for s in args.advantage_coefs],
        "shaping": [(f"shaping b={b:g}", b, flags("shaping", b)) for b in args.shaping_coefs],
        "unpretrained": [(f"unpretrained s={s:g}", s, flags("advantage", s)) for s in args.unpretrained_coefs],
        "online": [
            (f"online s={s:g}", s, flags("advantage", s, "--lenvm_update", "online")) for s in args.online_coefs
        ],
    }


def _grpo_sweeps(args: AblationArguments) -> dict[str, list[tuple[str, float, list[str]]]]:
    """(name, coefficient, flags) of every GRPO row, by method; the sequence-level baselines run without LenVM term."""

    def baseline(flag: str, value: float, *extra: str) -> list[str]:
        return ["--length_coef", "0", flag, f"{value:g}", *extra]

    return {
        "grpo": [("grpo", 0.0, ["--length_coef", "0"])],
        "penalty": [(f"grpo+penalty a={a:g}", a, baseline("--length_penalty_coef", a)) for a in args.penalty_coefs],
        "correct_only_penalty": [
            (
                f"grpo+correct-only penalty a={a:g}",
                a,
                baseline("--length_penalty_coef", a, "--length_penalty_correct_only", "true"),
            )
            for a in args.correct_only_penalty_coefs
        ],
        "kimi": [(f"grpo+kimi c={k:g}", k, baseline("--kimi_length_coef", k)) for k in args.kimi_coefs],
        "overlong": [
            (
                f"grpo+overlong L={n}",
                float(n),
                baseline("--soft_overlong_max_length", n, "--soft_overlong_cache", str(n // 3)),
            )
            for n in args.overlong_max_lengths
        ],
        "advantage": [(f"grpo+lenvm s={s:g}", s, ["--length_coef", f"{s:g}"]) for s in args.advantage_coefs],
        "unpretrained": [
            (f"grpo+unpretrained s={s:g}", s, ["--length_coef", f"{s:g}"]) for s in args.unpretrained_coefs
        ],
        "online": [
            (f"grpo+online s={s:g}", s, ["--length_coef", f"{s:g}", "--lenvm_update", "online"])
            for s in args.online_coefs
        ],
    }


def base_lenvm_gamma(base_config: dict) -> float | None:
    """The gamma of the base config's LenVM: its `lenvm_gamma`, else the one stored in the LenVM's directory."""
    if base_config.get("lenvm_gamma") is not None:
        return float(base_config["lenvm_gamma"])
    path = base_config.get("lenvm_model_name_or_path")
    if path is None or not Path(path).is_dir():
        return None
    return read_lenvm_config(Path(path)).get("gamma")


# ---------------------------------------------------------------------- the floor


def reference_floor(world_dir: str | os.PathLike, base_config: dict) -> dict:
    """Mean tokens of the demo world's most concise reference style on the held-out problems the runs evaluate.

    The held-out problems are the first `num_eval_problems` of `world_dir/data/test.jsonl`, regenerated from the
    world's seed (`generate_demo_problems` extends the test split's list) and checked against the file; every style
    of `write_demo_solution` is tokenized with the tokenizer of the base config's policy (the world's own, or a real
    model's fine-tuned on the world, e.g. `ppo_demo_smollm2.yaml`), counted as the evaluation counts completions
    (EOS included). Every style is correct by construction; the floor is the style with the fewest tokens.

    Returns:
        `dict`: ``style``, ``mean_tokens``, ``tokens`` (per problem, of that style), ``style_mean_tokens`` (every
        style) and ``num_problems``.
    """
    world_dir = Path(world_dir)
    data_dir = Path(base_config.get("dataset_name", ""))
    if data_dir.resolve() != (world_dir / "data").resolve():
        raise ValueError(
            f"--world_dir {world_dir} is not the world the base config evaluates on (dataset_name: {data_dir}): pass "
            f"--world_dir {data_dir.parent}, or drop --world_dir to skip the removable-verbosity column."
        )
    split = base_config.get("dataset_test_split", "test")
    rows = [json.loads(line) for line in (world_dir / "data" / f"{split}.jsonl").read_text().splitlines() if line]
    rows = rows[: base_config.get("num_eval_problems", len(rows))]
    seed = json.loads((world_dir / "build_info.json").read_text())["seed"]
    problems = generate_demo_problems(len(rows), seed=seed)
    if [problem.question for problem in problems] != [row["question"] for row in rows]:
        raise ValueError(f"{world_dir}/data/{split}.jsonl does not hold the problems of the world's seed {seed}.")
    tokenizer = AutoTokenizer.from_pretrained(base_config.get("model_name_or_path") or world_dir / "policy")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the EOS that ends a completion

    rng = random.Random(0)  # only the longer styles draw from it (their re-checks)
    tokens = {style: [count(write_demo_solution(p, rng, style=style)[0]) for p in problems] for style in DEMO_STYLES}
    means = {style: statistics.fmean(lengths) for style, lengths in tokens.items()}
    style = min(means, key=means.get)
    return {
        "style": style,
        "mean_tokens": means[style],
        "tokens": tokens[style],
        "style_mean_tokens": means,
        "num_problems": len(problems),
    }


# ---------------------------------------------------------------------- runs


def _run_dir(args: AblationArguments, name: str, seed: int) -> Path:
    slug = name.replace(" ", "_").replace("=", "").replace("+", "_")
    return Path(args.output_dir) / "runs" / f"{slug}-seed{seed}"


def _command(args: AblationArguments, flags: list[str], seed: int, run_dir: Path) -> list[str]:
    command = [sys.executable, str(RECIPES[args.trainer]), "--config", args.base_config]
    command += ["--output_dir", str(run_dir), "--seed", str(seed), *flags]
    if args.max_steps is not None:
        command += _max_steps_flags(args)
    if args.recipe_flags:
        command += shlex.split(args.recipe_flags)
    return command


def _max_steps_flags(args: AblationArguments) -> list[str]:
    """`--max_steps` updates in every run. PPO counts its updates in rollouts (`total_episodes`; it ignores
    `max_steps`, as TRL's did), so there it becomes `total_episodes = max_steps x rollouts per update` of one process."""
    if args.trainer != "ppo":
        return ["--max_steps", str(args.max_steps)]
    base = yaml.safe_load(Path(args.base_config).read_text()) or {}
    per_update = base.get("per_device_train_batch_size", 8) * base.get("gradient_accumulation_steps", 1)
    return ["--total_episodes", str(args.max_steps * per_update)]


def _evaluations(results: dict) -> tuple[dict | None, dict | None]:
    """(before, after) evaluations of a run, whichever recipe wrote it."""
    if "start" in results:
        return results["start"], results.get("final")
    return results.get("before"), results.get("after")


def read_finished_run(run_dir: Path) -> dict | None:
    """A run's `results.json` if the run finished: both evaluations, with their per-completion lists.

    The PPO recipe writes `results.json` with the start evaluation before training, and an older GRPO recipe kept
    no per-completion lists: such runs count as not finished (run again, they resume or restart).
    """
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    evaluations = _evaluations(results)
    if any(evaluation is None or "lengths" not in evaluation for evaluation in evaluations):
        return None
    return results


def pending_runs(args: AblationArguments, rows: dict[str, dict]) -> list[tuple[str, int]]:
    """The (row, seed) pairs without a finished run, seed by seed: every row of the first seed comes first."""
    return [
        (name, seed) for seed in args.seeds for name in rows if read_finished_run(_run_dir(args, name, seed)) is None
    ]


def run_all(args: AblationArguments, rows: dict[str, dict]) -> None:
    """Run every missing (row, seed), `num_parallel` at a time; a failed run stops the ablation with its log."""
    pending = pending_runs(args, rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, int, subprocess.Popen, Path]] = []
    done, total = 0, len(pending)
    print(f"[ablation] {total} runs to go ({len(rows)} rows x {len(args.seeds)} seeds)", flush=True)
    while pending or running:
        while pending and len(running) < args.num_parallel:
            name, seed = pending.pop(0)
            run_dir = _run_dir(args, name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path = run_dir.with_name(f"{run_dir.name}.log")  # next to the run: its directory holds the run only
            with log_path.open("a") as log:
                command = _command(args, rows[name]["flags"], seed, run_dir)
                process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
            running.append((name, seed, process, log_path))
            print(f"[ablation] started {name} seed {seed} (log: {log_path})", flush=True)
        time.sleep(POLL_SECONDS)
        for entry in list(running):
            name, seed, process, log_path = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            error = run_error(args, rows[name], process.returncode, _run_dir(args, name, seed))
            if error is not None:
                for _, _, other, _ in running:
                    other.terminate()
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"{name} seed {seed} {error}; end of {log_path}:\n{tail}")
            done += 1
            print(f"[ablation] {done}/{total} finished {name} seed {seed}", flush=True)


def run_error(args: AblationArguments, row: dict, returncode: int, run_dir: Path) -> str | None:
    """Why a run that exited does not count (`None` when it does)."""
    if returncode != 0:
        return f"failed (exit {returncode})"
    results = read_finished_run(run_dir)
    if results is None:
        return "exited without both evaluations in results.json (the base config needs num_eval_problems > 0)"
    return wrong_trainer(args, row, results)


def wrong_trainer(args: AblationArguments, row: dict, results: dict) -> str | None:
    """A GRPO row with a length critic that ran without it: the recipe trains plain GRPO when it sees no LenVM path."""
    trainer = results.get("trainer")
    if args.trainer == "grpo" and row["method"] in LENVM_METHODS and trainer != "LenVMGRPOTrainer":
        return (
            f"ran {trainer}, not LenVMGRPOTrainer, so its length critic never acted (recipes/grpo_gsm8k.py must pick "
            "LenVMGRPOTrainer for --lenvm_init policy too); fix the recipe and delete the run's directory"
        )
    return None


def advantage_series(run_dir: Path) -> dict[str, list[float]]:
    """The per-update stop-token / other-token advantage means of a PPO run (and its rollouts' mean tokens,
    `response_tokens`, when every update logged them), from the `trainer_state.json` of its last complete checkpoint
    (the trainer saves one at the last update); empty without a checkpoint."""
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is None:
        return {}
    history = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["log_history"]
    logs = [log for log in history if ADVANTAGE_KEYS["stop_token_advantage"] in log]
    series = {"steps": [log["step"] for log in logs]} | {
        name: [log[key] for log in logs] for name, key in ADVANTAGE_KEYS.items()
    }
    if logs and all(TRAINING_TOKENS_KEY in log for log in logs):
        series["response_tokens"] = [log[TRAINING_TOKENS_KEY] for log in logs]
    return series


# ---------------------------------------------------------------------- statistics


def _rng(name: str) -> np.random.Generator:
    """A bootstrap generator per row, the same whichever rows run."""
    return np.random.default_rng([0, zlib.crc32(name.encode())])


def _without_lists(evaluation: dict) -> dict:
    return {key: value for key, value in evaluation.items() if key not in ("lengths", "correct")}


def collect(args: AblationArguments, rows: dict[str, dict], floor: dict | None = None) -> dict:
    """Every finished run and every statistic (missing runs are left out: each row reports its number of seeds)."""
    floor_tokens = floor["tokens"] if floor else None
    summary, starts, samples = {}, {}, {}
    for name, row in rows.items():
        runs, values = [], []
        for seed in args.seeds:
            run_dir = _run_dir(args, name, seed)
            results = read_finished_run(run_dir)
            if results is None:
                continue
            error = wrong_trainer(args, row, results)
            if error is not None:
                raise ValueError(f"{run_dir}: {error}.")
            before, after = _evaluations(results)
            starts.setdefault(seed, before)  # every row of a seed evaluates the same start with the same sampling
            run = {
                "seed": seed,
                "run_dir": str(run_dir),
                "before": _without_lists(before),
                "after": _without_lists(after),
            }
            if args.trainer == "ppo":
                run["advantage_series"] = advantage_series(run_dir)
            runs.append(run)
            values.append(run_problem_values(before, after, floor_tokens))
        stats = None
        if values:
            stats, samples[name] = row_statistics(values, BOOTSTRAP_RESAMPLES, CONFIDENCE, _rng(name))
        summary[name] = {
            **row,
            "n_seeds": len(runs),
            "seeds": [run["seed"] for run in runs],
            "statistics": stats,
            "runs": runs,
        }
    start = None
    if starts:
        values = [run_problem_values(before, before, floor_tokens) for _, before in sorted(starts.items())]
        start, _ = row_statistics(values, BOOTSTRAP_RESAMPLES, CONFIDENCE, _rng("start"))
        start["seeds"] = sorted(starts)
    target = start["accuracy"]["mean"] - MATCHED_ACCURACY_DROP if start else None
    return {
        "arguments": asdict(args),
        "bootstrap": {
            "num_resamples": BOOTSTRAP_RESAMPLES,
            "confidence": CONFIDENCE,
            "resampled": "seeds, then problems within each seed (completions of a problem together)",
        },
        "start": start,
        "floor": floor,
        "matched_accuracy": target,
        "rows": summary,
        "methods": method_frontiers(args, summary, samples, target),
    }


def method_frontiers(args: AblationArguments, rows: dict, samples: dict, target: float | None) -> dict:
    """Each method's frontier (its rows with statistics, plus the row without length term as coefficient 0) and its
    tokens at matched accuracy ([`~lenvm_rl.ablation_stats.matched_accuracy_tokens`])."""
    base = [name for name, row in rows.items() if row["method"] in BASE_METHODS and row["statistics"]]
    methods = {}
    for method in args.methods:
        names = [name for name, row in rows.items() if row["method"] == method and row["statistics"]]
        if names and method not in BASE_METHODS:
            names = base + names
        if not names or target is None:  # none of the method's own rows has finished yet
            methods[method] = {"rows": names, "matched": None}
            continue
        points = [
            (rows[n]["statistics"]["mean_tokens"]["mean"], rows[n]["statistics"]["accuracy"]["mean"]) for n in names
        ]
        row_samples = [(samples[n]["mean_tokens"], samples[n]["accuracy"]) for n in names]
        methods[method] = {"rows": names, "matched": matched_accuracy_tokens(points, row_samples, target, CONFIDENCE)}
    return methods


# ---------------------------------------------------------------------- outputs


def table(result: dict) -> str:
    """The markdown tables: every row, the tokens at matched accuracy per method, and (PPO) the stop-token advantage."""
    start, floor, rows = result["start"], result["floor"], result["rows"]
    header = ["row", "n seeds", "accuracy", "mean tokens", "seed sd (accuracy / tokens)", "tokens vs start"]
    if floor:
        header.append("removable verbosity removed")
    trainer = result["arguments"]["trainer"].upper()
    lines = [
        f"{trainer} rows: mean [95% CI] over seeds and held-out problems (bootstrap); seed sd: the standard deviation "
        "of the per-seed means.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def cells(name: str, n: int, stats: dict | None, change: str = "", share: str = "") -> str:
        if stats is None:
            values = [name, str(n), "not run yet", "", "", ""]
        else:
            spread = f"{stats['accuracy']['seed_std']:.3f} / {stats['mean_tokens']['seed_std']:.1f}"
            values = [
                name,
                str(n),
                format_interval(stats["accuracy"], ".3f"),
                format_interval(stats["mean_tokens"], ".1f"),
                spread,
                change,
            ]
        return "| " + " | ".join(values + ([share] if floor else [])) + " |"

    if start:
        lines.append(cells("start (before RL)", start["n_seeds"], start, "", "0%" if floor else ""))
    if floor:
        change = f"{floor['mean_tokens'] / start['start_tokens']['mean'] - 1:+.0%}" if start else ""
        values = [
            f"floor ({floor['style']} reference style)",
            "",
            "1.000",
            f"{floor['mean_tokens']:.1f}",
            "",
            change,
            "100%",
        ]
        lines.append("| " + " | ".join(values) + " |")
    for name, row in rows.items():
        stats = row["statistics"]
        change = format_interval(stats["tokens_vs_start"], "+.0f", percent=True) if stats else ""
        share = format_interval(stats.get("removable_share"), ".0f", percent=True) if stats else ""
        lines.append(cells(name, row["n_seeds"], stats, change, share))

    if result["matched_accuracy"] is not None:
        lines += [
            "",
            f"Tokens at matched accuracy (start accuracy - {100 * MATCHED_ACCURACY_DROP:g} points = "
            f"{result['matched_accuracy']:.3f}): where each method's frontier (its sweep plus the row without length "
            "term, in order of mean tokens) crosses that accuracy, linearly interpolated; the interval is over the "
            "bootstrap resamples that cross it.",
            "",
            "| method | rows | tokens at matched accuracy | vs start | resamples that cross |",
            "|---|---|---|---|---|",
        ]
        start_tokens = start["mean_tokens"]["mean"]
        for method, frontier in result["methods"].items():
            matched = frontier["matched"]
            if matched is None:
                lines.append(f"| {method} | | not run yet | | |")
                continue
            if matched["reached"]:
                tokens = format_interval(
                    {"mean": matched["tokens"], **{k: matched[k] for k in ("ci_low", "ci_high")}}, ".1f"
                )
                change = f"{matched['tokens'] / start_tokens - 1:+.0%}"
            elif matched["side"] == "above":
                tokens = f"not reached (accuracy above it down to {matched['bound']:.1f} tokens)"
                change = ""
            else:
                tokens, change = "not reached (accuracy below it at every coefficient)", ""
            rows_text = ", ".join(frontier["rows"])
            lines.append(f"| {method} | {rows_text} | {tokens} | {change} | {matched['reached_fraction']:.0%} |")

    series_rows = {name: row for name, row in rows.items() if any(run.get("advantage_series") for run in row["runs"])}
    if series_rows:
        lines += [
            "",
            "PPO stop-token advantage: the final advantage of the stop token (finished responses) against that of the "
            "other response tokens, mean over updates and seeds (`length/stop_token_advantage_mean`, "
            "`length/other_token_advantage_mean`; per update in ablation.json and stop_advantage.png).",
            "",
            "| row | stop token | other tokens |",
            "|---|---|---|",
        ]
        for name, row in series_rows.items():
            means = [
                statistics.fmean(v for run in row["runs"] for v in run.get("advantage_series", {}).get(key, []))
                for key in ADVANTAGE_KEYS
            ]
            lines.append(f"| {name} | {means[0]:+.4f} | {means[1]:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Accuracy versus mean tokens: one frontier per method (95% CI bars), the start, the floor, the matched accuracy."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, without touching pyplot's backend

    figure = Figure(figsize=(8, 5.5), layout="constrained")
    ax = figure.subplots()
    start, floor, rows = result["start"], result["floor"], result["rows"]

    def errorbar(stats: dict, **kwargs) -> None:
        x, y = stats["mean_tokens"], stats["accuracy"]
        xerr = [[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]]
        yerr = [[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]]
        ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, capsize=2, **kwargs)

    if start:
        errorbar(start, fmt="*", ms=14, color="black", label="start (before RL)", zorder=4)
    if floor:
        ax.axvline(
            floor["mean_tokens"], color="gray", ls="--", lw=1, label=f"floor ({floor['style']} reference style)"
        )
    if result["matched_accuracy"] is not None:
        ax.axhline(result["matched_accuracy"], color="gray", ls=":", lw=1, label="matched accuracy (start - 2 points)")
    for k, (method, frontier) in enumerate(result["methods"].items()):
        names = frontier["rows"]
        if not names or method in BASE_METHODS:  # the row without length term is drawn below, in black
            continue
        color = f"C{k % 10}"
        stats = sorted((rows[n]["statistics"] for n in names), key=lambda s: s["mean_tokens"]["mean"])
        tokens = [s["mean_tokens"]["mean"] for s in stats]
        ax.plot(tokens, [s["accuracy"]["mean"] for s in stats], "-", color=color, lw=1.2, label=method)
        for name in names:
            if rows[name]["method"] == method:
                errorbar(rows[name]["statistics"], fmt="o", ms=4, color=color)
                coef = rows[name]["coef"]
                ax.annotate(
                    f"{coef:g}",
                    (rows[name]["statistics"]["mean_tokens"]["mean"], rows[name]["statistics"]["accuracy"]["mean"]),
                    fontsize=6,
                    color=color,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    for name, row in rows.items():
        if row["method"] in BASE_METHODS and row["statistics"]:
            errorbar(row["statistics"], fmt="s", ms=6, color="black", label=f"{name} (no length term)", zorder=3)
    trainer = result["arguments"]["trainer"].upper()
    seeds = len(result["arguments"]["seeds"])
    ax.set(
        xlabel="mean completion tokens (held-out, EOS included)",
        ylabel="accuracy (held-out)",
        title=f"{trainer} length methods at matched updates (mean, 95% CI over up to {seeds} seeds and problems)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="best")
    figure.savefig(path, dpi=120)


def plot_stop_advantage(result: dict, path: Path) -> bool:
    """Per-update stop-token and other-token advantage means (mean over seeds) of the rows without a LenVM.

    Returns whether there was anything to plot.
    """
    from matplotlib.figure import Figure

    rows = {
        name: row
        for name, row in result["rows"].items()
        if row["method"] in STOP_ADVANTAGE_METHODS and any(run.get("advantage_series") for run in row["runs"])
    }
    if not rows:
        return False
    with_tokens = all(run["advantage_series"].get("response_tokens") for row in rows.values() for run in row["runs"]
                      if run.get("advantage_series"))  # fmt: skip
    figure = Figure(figsize=(13.5 if with_tokens else 9, 3.8), layout="constrained")
    axes = figure.subplots(1, 3 if with_tokens else 2)
    axes[1].sharey(axes[0])
    keys = [*ADVANTAGE_KEYS, "response_tokens"] if with_tokens else list(ADVANTAGE_KEYS)
    for k, (name, row) in enumerate(rows.items()):
        series = [run["advantage_series"] for run in row["runs"] if run.get("advantage_series")]
        steps = min((s["steps"] for s in series), key=len)
        for ax, key in zip(axes, keys):
            mean = np.mean([s[key][: len(steps)] for s in series], axis=0)
            ax.plot(steps, mean, color=f"C{k % 10}", lw=1.2, label=name)
    for ax, title in zip(axes, ("stop token (finished responses)", "other response tokens")):
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set(xlabel="update", title=title)
    axes[0].set_ylabel("mean advantage (mean over seeds)")
    if with_tokens:
        axes[2].set(xlabel="update", ylabel="mean tokens (mean over seeds)", title="training rollouts' length")
    axes[0].legend(fontsize=7)
    figure.savefig(path, dpi=120)
    return True


def main(args: AblationArguments) -> dict:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base_config = yaml.safe_load(Path(args.base_config).read_text()) or {}
    rows = ablation_rows(args, base_lenvm_gamma(base_config))
    floor = reference_floor(args.world_dir, base_config) if args.world_dir else None
    if not args.collect_only:
        run_all(args, rows)
    result = collect(args, rows, floor)
    write_json_atomic(output_dir / "ablation.json", result)
    markdown = table(result)
    write_text_atomic(output_dir / "ablation.md", markdown)
    if result["start"]:
        plot(result, output_dir / "ablation.png")
    if args.trainer == "ppo":
        plot_stop_advantage(result, output_dir / "stop_advantage.png")
    print(markdown)
    return result


if __name__ == "__main__":
    (ablation_args,) = TrlParser((AblationArguments,)).parse_args_and_config()
    main(ablation_args)
