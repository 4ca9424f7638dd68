"""The demo policy shipped with the package: its files, their sha256, and the figures a measurement should land in.

An SFT build of the demo policy depends on the floating-point path of the machine and on the seed (the same
seed and config gave 89.5% accuracy at temperature 1 on one machine and 73.3% on another), so the package
carries one built policy under `assets/`: `policy/` (float32 safetensors weights, config, tokenizer) and
`manifest.json` with

- `files`: the sha256 of every file under `policy/`, checked before each copy into a world;
- `seed`, `config`, `fingerprint`: the arguments of the build and its training fingerprint (a world for other
  arguments has to be trained with `--rebuild`), and `data`: the sha256 of the problem files it was trained
  and measured on;
- `build`: what the build recorded (sizes, data length statistics, SFT metrics, time, threads, versions);
- `measurement` and `expected`: the reference measurements of `python -m lenvm_rl.demo measure` and the range
  each checked figure of a new measurement should land in.

Re-shipping (after a change to the generator, the tokenizer or the build; bump `DEMO_WORLD_FORMAT` if a seed
and config now produce something else):

    python -m lenvm_rl.demo build --rebuild --output_dir /tmp/ship/world
    for seed in 0 1 2 3 4; do python -m lenvm_rl.demo measure --world_dir /tmp/ship/world \\
        --output_dir /tmp/ship/seed$seed --seed $seed --num_threads 1; done
    python -m lenvm_rl.demo ship --world_dir /tmp/ship/world --stats_files /tmp/ship/seed{0..4}/demo_policy_stats.json

(the shipped policy: built with seed 0 and the defaults on one thread, measured with sampling seeds 0-4.)
"""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from ..io import write_json_atomic

__all__ = [
    "DEMO_ASSETS_DIR",
    "check_demo_measurement",
    "copy_shipped_policy",
    "file_sha256",
    "format_demo_check",
    "load_shipped_manifest",
    "ship_demo_policy",
]

DEMO_ASSETS_DIR = Path(__file__).parent / "assets"
_REINSTALL = "reinstall lenvm-rl, or pass --rebuild to train the demo policy instead"
# The figures checked against the manifest's ranges, with how `measure` prints them.
_FIGURE_LABELS = {"accuracy": "accuracy T=1", "greedy_accuracy": "greedy accuracy", "mean_length": "mean length T=1"}
_NUM_STANDARD_ERRORS = 3


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_shipped_manifest(assets_dir: str | os.PathLike | None = None) -> dict:
    """The manifest of the shipped policy (`assets/manifest.json`); a `ValueError` if it is missing."""
    path = Path(assets_dir or DEMO_ASSETS_DIR) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"The shipped demo policy has no manifest ({path} is missing): {_REINSTALL}.")
    return json.loads(path.read_text())


def copy_shipped_policy(world_dir: str | os.PathLike, assets_dir: str | os.PathLike | None = None) -> dict:
    """
    Copy the shipped policy into `world_dir/policy/`, after checking the sha256 of every file.

    Every file is read and checked before the first one is written, so a corrupted install leaves no partial
    policy behind.

    Args:
        world_dir (`str` or `os.PathLike`):
            The world being built; `policy/` must not exist yet.
        assets_dir (`str` or `os.PathLike`, *optional*):
            Where the shipped files are; defaults to the package's `DEMO_ASSETS_DIR`.

    Returns:
        `dict`: the manifest.

    Raises:
        `ValueError`: a file is missing or its sha256 differs from the manifest's; the message names the file.
    """
    assets_dir = Path(assets_dir or DEMO_ASSETS_DIR)
    manifest = load_shipped_manifest(assets_dir)
    contents = {}
    for name, expected in manifest["files"].items():
        path = assets_dir / name
        if not path.is_file():
            raise ValueError(f"The shipped demo policy file {path} is missing: {_REINSTALL}.")
        contents[name] = path.read_bytes()
        if hashlib.sha256(contents[name]).hexdigest() != expected:
            raise ValueError(
                f"The shipped demo policy file {path} is corrupted (its sha256 differs from manifest.json): "
                f"{_REINSTALL}."
            )
    for name, content in contents.items():
        target = Path(world_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return manifest


def _figures(stats: dict) -> dict[str, tuple[float, float]]:
    """
    The checked figures of a `measure` run, each with its standard error from sampling alone.

    The problems are fixed (the first `num_problems` of the test split), so only the sampling varies between runs:
    for an accuracy over N samples the binomial `sqrt(p (1 - p) / N)` bounds it (problems of different
    difficulty only lower it); for the mean length it is `sqrt(mean_p s_p^2 / N)`, `s_p^2` the within-problem
    sample variance. Greedy decoding does not sample; its binomial error stands for the flips a different
    floating-point path can cause in near ties.
    """
    num_sampled = stats["num_problems"] * stats["num_samples"]
    accuracy, greedy_accuracy = stats["accuracy"]["overall"], stats["greedy_accuracy"]["overall"]
    return {
        "accuracy": (accuracy, math.sqrt(accuracy * (1 - accuracy) / num_sampled)),
        "greedy_accuracy": (
            greedy_accuracy,
            math.sqrt(greedy_accuracy * (1 - greedy_accuracy) / stats["num_problems"]),
        ),
        "mean_length": (stats["lengths"]["mean"], stats["mean_length_standard_error"]),
    }


def _expected_ranges(measurements: list[dict]) -> dict[str, list[float]]:
    """
    The range a new measurement should land in, for each checked figure, from `k` reference measurements.

    Centre: the mean of the references. The standard error `se` of one measurement is the larger of the sampling
    one (the root mean square of the references', see `_figures`) and the standard deviation of the references
    themselves (when `k >= 2`), so a spread the formula does not foresee widens the range. Half-width: 3 standard
    errors of the difference between a new measurement and the centre, `3 * se * sqrt(1 + 1 / k)`. Accuracies are
    clipped to [0, 1]; bounds are rounded outwards to 3 decimals.
    """
    figures = [_figures(stats) for stats in measurements]
    k = len(figures)
    ranges = {}
    for name in _FIGURE_LABELS:
        values = [figure[name][0] for figure in figures]
        centre = sum(values) / k
        standard_error = math.sqrt(sum(figure[name][1] ** 2 for figure in figures) / k)
        if k >= 2:
            standard_error = max(standard_error, math.sqrt(sum((v - centre) ** 2 for v in values) / (k - 1)))
        half_width = _NUM_STANDARD_ERRORS * standard_error * math.sqrt(1 + 1 / k)
        low, high = centre - half_width, centre + half_width
        if name != "mean_length":
            low, high = max(low, 0.0), min(high, 1.0)
        ranges[name] = [math.floor(low * 1000) / 1000, math.ceil(high * 1000) / 1000]
    return ranges


def check_demo_measurement(stats: dict, assets_dir: str | os.PathLike | None = None) -> dict:
    """
    Compare a `measure` run with the shipped policy's expected ranges.

    The ranges hold for the shipped policy (`stats["policy_sha256"]` equal to the shipped weights') measured
    with the reference settings (number of problems and samples, `max_new_tokens`); for anything else the check
    is skipped and says why.

    Args:
        stats (`dict`):
            The statistics of [`~lenvm_rl.demo.measure_demo_policy`].
        assets_dir (`str` or `os.PathLike`, *optional*):
            Where the manifest is; defaults to the package's `DEMO_ASSETS_DIR`.

    Returns:
        `dict`: `{"ok": bool, "figures": {name: {"value", "low", "high", "ok"}}}`, or `{"skipped": reason}`.
    """
    path = Path(assets_dir or DEMO_ASSETS_DIR) / "manifest.json"
    if not path.is_file():  # before the first `ship`
        return {"skipped": f"no shipped policy manifest at {path}"}
    manifest = json.loads(path.read_text())
    reference = manifest["measurement"]
    if stats["policy_sha256"] != manifest["files"]["policy/model.safetensors"]:
        return {"skipped": "the measured policy is not the one shipped with lenvm-rl"}
    settings = (stats["num_problems"], stats["num_samples"], stats["sampling"]["max_new_tokens"])
    if settings != (reference["num_problems"], reference["num_samples"], reference["max_new_tokens"]):
        return {
            "skipped": f"the expected ranges hold for {reference['num_problems']} problems x "
            f"{reference['num_samples']} samples with max_new_tokens {reference['max_new_tokens']}"
        }
    figures = {}
    for name, (value, _) in _figures(stats).items():
        low, high = manifest["expected"][name]
        figures[name] = {"value": value, "low": low, "high": high, "ok": low <= value <= high}
    return {"ok": all(figure["ok"] for figure in figures.values()), "figures": figures}


def format_demo_check(check: dict) -> list[str]:
    """
    One line per figure of [`check_demo_measurement`]'s result.

    Example:
        >>> format_demo_check({"ok": False, "figures": {"accuracy": {"value": 0.8, "low": 0.86, "high": 0.92, "ok": False}}})
        ['accuracy T=1 0.800, expected 0.860-0.920: OUT OF RANGE']
        >>> format_demo_check({"skipped": "the measured policy is not the one shipped with lenvm-rl"})
        ['expected ranges not checked: the measured policy is not the one shipped with lenvm-rl']
    """
    if "skipped" in check:
        return [f"expected ranges not checked: {check['skipped']}"]
    return [
        f"{_FIGURE_LABELS[name]} {figure['value']:.3f}, expected {figure['low']:.3f}-{figure['high']:.3f}: "
        + ("ok" if figure["ok"] else "OUT OF RANGE")
        for name, figure in check["figures"].items()
    ]


def ship_demo_policy(
    world_dir: str | os.PathLike, stats_files: list[str], assets_dir: str | os.PathLike | None = None
) -> dict:
    """
    Make the policy of a trained world the shipped one: copy `policy/` into `assets_dir` and write the manifest.

    Args:
        world_dir (`str` or `os.PathLike`):
            A world built with `rebuild=True`.
        stats_files (`list[str]`):
            `demo_policy_stats.json` of `measure` runs of that world's policy, all with the same settings (for
            example three sampling seeds); they set the reference measurement and the expected ranges.
        assets_dir (`str` or `os.PathLike`, *optional*):
            Defaults to the package's `DEMO_ASSETS_DIR`; its `policy/` and `manifest.json` are replaced.

    Returns:
        `dict`: the manifest.
    """
    world_dir, assets_dir = Path(world_dir), Path(assets_dir or DEMO_ASSETS_DIR)
    info = json.loads((world_dir / "build_info.json").read_text())
    if info.get("policy", {}).get("source", "trained") != "trained":
        raise ValueError(f"{world_dir} was not trained here (its policy is a copy): build it with --rebuild.")
    policy_sha256 = file_sha256(world_dir / "policy" / "model.safetensors")
    measurements = [json.loads(Path(path).read_text()) for path in stats_files]
    settings = {(s["num_problems"], s["num_samples"], s["sampling"]["max_new_tokens"]) for s in measurements}
    if len(settings) != 1 or any(s["policy_sha256"] != policy_sha256 for s in measurements):
        raise ValueError("Every stats file must measure this world's policy with the same settings.")
    ((num_problems, num_samples, max_new_tokens),) = settings
    manifest = {
        "seed": info["seed"],
        "config": {name: value for name, value in info["config"].items() if name != "rebuild"},
        "fingerprint": info["fingerprint"],
        "files": {f"policy/{path.name}": file_sha256(path) for path in sorted((world_dir / "policy").iterdir())},
        "data": {f"data/{name}": file_sha256(world_dir / "data" / name) for name in ("train.jsonl", "test.jsonl")},
        "build": {
            name: info[name]
            for name in (
                "num_parameters",
                "vocab_size",
                "data_lengths",
                "train_metrics",
                "build_seconds",
                "num_threads",
                "built_at",
                "versions",
            )
        },
        "measurement": {
            "num_problems": num_problems,
            "num_samples": num_samples,
            "max_new_tokens": max_new_tokens,
            "runs": [
                {
                    "seed": s["sampling"]["seed"],
                    "num_threads": s["num_threads"],
                    **{name: value for name, (value, _) in _figures(s).items()},
                }
                for s in measurements
            ],
        },
        "expected": _expected_ranges(measurements),
    }
    shutil.rmtree(assets_dir / "policy", ignore_errors=True)
    (assets_dir / "policy").mkdir(parents=True)
    for name in manifest["files"]:
        shutil.copyfile(world_dir / name, assets_dir / name)  # the bytes only: the weights are saved owner-only
    write_json_atomic(assets_dir / "manifest.json", manifest)
    return manifest
