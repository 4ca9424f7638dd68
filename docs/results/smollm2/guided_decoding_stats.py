"""Tables with 95% bootstrap CIs for LenVM-guided decoding on SmolLM2-135M-Instruct (issue 16 item 4), from the
JSON files of `recipes/eval_length_control.py` (one or more seeds on the same prompts) and `recipes/eval_tradeoff.py`.

    .venv/bin/python docs/results/smollm2/guided_decoding_stats.py \
        --length_control outputs/smollm2/length_control/seed0/length_control.json \
                         outputs/smollm2/length_control/seed1/length_control.json \
        --tradeoff outputs/smollm2/tradeoff/tradeoff.json --output docs/results/smollm2/guided_decoding_stats.json

Intervals are percentile intervals of a bootstrap over prompts (2,000 resamples, seed 0): a resampled prompt keeps
all its completions (every seed, every sample), so guided and unguided figures and the tilt and budget figures are
paired. Length Score and satisfaction are recomputed per completion from the stored lengths with
`lenvm_rl.length_metrics.length_score` and the recipe's rule (At Most `L <= T`, At Least `L >= T`, Equal To within 10%).
The length-control JSON keeps accuracy only as a mean per run, so its accuracy is given as a count without CI.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lenvm_rl.length_metrics import length_score

RESAMPLES = 2000
CONSTRAINT_NAMES = {"equal_to": "Equal To", "at_most": "At Most", "at_least": "At Least"}


def satisfied(lengths: np.ndarray, target: int, constraint: str) -> np.ndarray:
    if constraint == "at_most":
        return lengths <= target
    if constraint == "at_least":
        return lengths >= target
    return np.abs(lengths - target) <= 0.1 * target


def bootstrap_rows(num_prompts: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(num_prompts, size=(RESAMPLES, num_prompts))


def ci(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def length_control_tables(paths: list[Path]) -> dict:
    runs = [json.loads(p.read_text()) for p in paths]
    num_prompts = runs[0]["num_problems"]
    rng = np.random.default_rng(0)
    rows = bootstrap_rows(num_prompts, rng)
    out = {"num_prompts": num_prompts, "num_seeds": len(runs), "constraints": {}}
    for constraint in runs[0]["constraints"]:
        per_target = {}
        for target in runs[0]["constraints"][constraint]["per_target"]:
            T = int(target)
            entry = {}
            for side in ("unguided", "guided"):
                # (num_prompts, num_seeds) per-completion quantities
                lengths = np.stack(
                    [np.asarray(r["constraints"][constraint]["per_target"][target][side]["lengths"]) for r in runs], 1
                ).astype(float)
                scores = length_score(torch.tensor(lengths.ravel()), T, constraint).numpy().reshape(lengths.shape)
                met = satisfied(lengths, T, constraint).astype(float)
                deviation = (lengths - T) / T
                accuracy = [r["constraints"][constraint]["per_target"][target][side]["accuracy"] for r in runs]
                truncated = [
                    r["constraints"][constraint]["per_target"][target][side]["fraction_truncated"] for r in runs
                ]
                per_prompt = {
                    "length_score": scores.mean(1),
                    "fraction_satisfied": met.mean(1),
                    "mean_length": lengths.mean(1),
                    "abs_length_deviation": np.abs(deviation).mean(1),
                }
                entry[side] = {
                    key: {"mean": float(v.mean()), "ci": ci(v[rows].mean(1))} for key, v in per_prompt.items()
                }
                entry[side]["median_length"] = float(np.median(lengths))
                entry[side]["correct"] = int(round(float(np.sum(accuracy)) * num_prompts))
                entry[side]["num_completions"] = int(lengths.size)
                entry[side]["fraction_truncated"] = float(np.mean(truncated))
                entry[side]["_scores"] = scores.mean(1)
            diff = entry["guided"].pop("_scores") - entry["unguided"].pop("_scores")
            entry["length_score_gain"] = {"mean": float(diff.mean()), "ci": ci(diff[rows].mean(1))}
            per_target[target] = entry
        out["constraints"][constraint] = per_target
    return out


def budget_at(lengths: np.ndarray, correct: np.ndarray, mean_tokens: float, cap: int = 0) -> dict:
    """The hard budget B (real-valued, linear between integer budgets) whose mean min(L, B) equals `mean_tokens`,
    with its accuracy (correct and L <= B) and the share of completions that end without EOS: cut at B, or already
    cut at the sampling cap (`L >= cap`)."""
    budgets = np.arange(1, int(lengths.max()) + 1)
    means = np.minimum(lengths[None, :], budgets[:, None]).mean(1)
    accs = (correct[None, :] & (lengths[None, :] <= budgets[:, None])).mean(1)
    cut = ((lengths[None, :] > budgets[:, None]) | (cap > 0) & (lengths[None, :] >= cap)).mean(1)
    return {
        "budget": float(np.interp(mean_tokens, means, budgets)),
        "accuracy": float(np.interp(mean_tokens, means, accs)),
        "fraction_cut": float(np.interp(mean_tokens, means, cut)),
    }


def tradeoff_table(path: Path) -> dict:
    results = json.loads(path.read_text())
    samples = results["args"]["num_samples"]
    runs = {run["beta"]: run for run in results["runs"]}
    base_lengths = np.asarray(runs[0.0]["lengths"], dtype=float)
    base_correct = np.asarray(runs[0.0]["correct"], dtype=bool)
    num_prompts = len(base_lengths) // samples
    rng = np.random.default_rng(0)
    rows = bootstrap_rows(num_prompts, rng)
    out = {"num_prompts": num_prompts, "num_samples": samples, "rows": []}
    for beta in sorted(runs, reverse=True):
        run = runs[beta]
        lengths = np.asarray(run["lengths"], dtype=float)
        correct = np.asarray(run["correct"], dtype=bool)
        mean_tokens = float(lengths.mean())
        matched = budget_at(base_lengths, base_correct, mean_tokens, results["args"]["max_new_tokens"])
        # bootstrap over prompts: a completion's index is prompt * samples + sample
        index = (rows[..., None] * samples + np.arange(samples)).reshape(RESAMPLES, -1)
        boot_tokens = lengths[index].mean(1)
        boot_change = (lengths[index].mean(1) - base_lengths[index].mean(1)) / base_lengths[index].mean(1)
        boot_gain = np.array(
            [
                correct[i].mean() - budget_at(base_lengths[i], base_correct[i], lengths[i].mean())["accuracy"]
                for i in index[:500]
            ]
        )  # 500 resamples: budget_at is the slow part
        out["rows"].append(
            {
                "beta": beta,
                "mean_tokens": {"mean": mean_tokens, "ci": ci(boot_tokens)},
                "median_tokens": float(np.median(lengths)),
                "tokens_vs_beta0": {"mean": mean_tokens / float(base_lengths.mean()) - 1, "ci": ci(boot_change)},
                "correct": int(correct.sum()),
                "num_completions": int(correct.size),
                "fraction_truncated": run["fraction_truncated"],
                "matched_budget": matched["budget"],
                "budget_accuracy": matched["accuracy"],
                "budget_fraction_cut": matched["fraction_cut"],
                "accuracy_gain_over_budget": {
                    "mean": float(correct.mean() - matched["accuracy"]),
                    "ci": ci(boot_gain),
                },
            }
        )
    return out


def plot_tradeoff_lengths(path: Path, to: dict, tradeoff_json: Path) -> None:
    """Share of completions ending without EOS against mean tokens: the tilt points and the hard budget's curve (the
    beta = 0 completions cut at every B), plus each beta's length distribution."""
    from matplotlib.figure import Figure

    results = json.loads(tradeoff_json.read_text())
    cap = results["args"]["max_new_tokens"]
    runs = {run["beta"]: run for run in results["runs"]}
    base = np.asarray(runs[0.0]["lengths"], dtype=float)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    budgets = np.arange(1, cap + 1)
    left.plot(
        np.minimum(base[None, :], budgets[:, None]).mean(1),
        100 * ((base[None, :] > budgets[:, None]) | (base[None, :] >= cap)).mean(1),
        "--",
        color="gray",
        label="hard budget B on the beta = 0 completions",
    )
    for i, r in enumerate(to["rows"]):
        left.plot(r["mean_tokens"]["mean"], 100 * r["fraction_truncated"], "o", color=f"C{i}", ms=8, clip_on=False,
                  zorder=3, label=f"tilt β={r['beta']:g}")  # fmt: skip
        lengths = np.asarray(runs[r["beta"]]["lengths"], dtype=float)
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, lengths.size)
        right.plot(i + jitter, lengths, ".", color=f"C{i}", alpha=0.7)
        right.plot([i - 0.3, i + 0.3], [lengths.mean()] * 2, "-", color="black", lw=1.5)
    left.set(xlabel="mean tokens per completion", ylabel="completions ending without EOS (%)", ylim=(0, 100))
    left.legend(fontsize=8)
    right.set_xticks(range(len(to["rows"])), [f"β={r['beta']:g}" for r in to["rows"]])
    right.axhline(cap, color="gray", ls=":", lw=1)
    right.set(ylabel="completion tokens (EOS included)", title="lengths per beta (bar: mean; dotted: the cap)")
    figure.suptitle(
        f"SmolLM2-135M + LenVM tilting vs a hard token budget ({to['num_prompts']} GSM8K test prompts x "
        f"{to['num_samples']}, T = {results['args']['temperature']}, top-k {results['args']['top_k']})"
    )
    figure.savefig(path, dpi=110)


def fmt(entry: dict, digits: int = 1, scale: float = 1.0) -> str:
    low, high = entry["ci"]
    return f"{entry['mean'] * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def markdown(lc: dict | None, to: dict | None) -> str:
    lines = []
    if lc:
        lines += [
            f"Length control: {lc['num_prompts']} prompts x {lc['num_seeds']} seed(s); 95% bootstrap CIs over prompts.",
            "",
            "| constraint | T | Length Score unguided | Length Score guided | satisfied unguided | satisfied guided "
            "| mean length unguided | mean length guided | correct unguided / guided |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for constraint, per_target in lc["constraints"].items():
            for target, e in per_target.items():
                u, g = e["unguided"], e["guided"]
                lines.append(
                    f"| {CONSTRAINT_NAMES[constraint]} | {target} | {fmt(u['length_score'])} | "
                    f"**{fmt(g['length_score'])}** | {fmt(u['fraction_satisfied'], 0, 100)}% | "
                    f"**{fmt(g['fraction_satisfied'], 0, 100)}%** | {u['mean_length']['mean']:.0f} | "
                    f"{g['mean_length']['mean']:.0f} [{g['mean_length']['ci'][0]:.0f}, {g['mean_length']['ci'][1]:.0f}]"
                    f" | {u['correct']}/{u['num_completions']} / {g['correct']}/{g['num_completions']} |"
                )
        lines.append("")
    if to:
        lines += [
            f"Tilting: {to['num_prompts']} prompts x {to['num_samples']} samples per beta.",
            "",
            "| beta | mean tokens (both) | vs beta = 0 | tilt: median tokens | tilt: no EOS | budget B | budget: no EOS | "
            "correct, tilt | correct, budget | accuracy, tilt minus budget |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in to["rows"]:
            n = r["num_completions"]
            lines.append(
                f"| {r['beta']:g} | {fmt(r['mean_tokens'])} | {fmt(r['tokens_vs_beta0'], 0, 100)}% | "
                f"{r['median_tokens']:.0f} | "
                f"{r['fraction_truncated']:.0%} | {r['matched_budget']:.0f} | {r['budget_fraction_cut']:.0%} | "
                f"{r['correct']}/{n} | {r['budget_accuracy'] * n:.0f}/{n} | "
                f"{fmt(r['accuracy_gain_over_budget'], 3)} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length_control", nargs="*", type=Path, default=[])
    parser.add_argument("--tradeoff", type=Path)
    parser.add_argument("--output", type=Path, help="JSON of the tables; a PNG of the tilt lengths next to it")
    args = parser.parse_args()
    lc = length_control_tables(args.length_control) if args.length_control else None
    to = tradeoff_table(args.tradeoff) if args.tradeoff else None
    print(markdown(lc, to))
    if args.output:
        args.output.write_text(json.dumps({"length_control": lc, "tradeoff": to}, indent=1) + "\n")
        if to:
            plot_tradeoff_lengths(args.output.with_name("tradeoff_lengths.png"), to, args.tradeoff)


if __name__ == "__main__":
    main()
