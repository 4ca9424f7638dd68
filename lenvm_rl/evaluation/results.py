"""Saving an evaluation: its JSON results (written atomically) and the figure drawn from them, side by side, and the
run that records which evaluation produced them ([`start_evaluation`]).

The figure is drawn from the results dictionary alone, so a saved JSON can be re-plotted without the models.
"""

import os
from collections.abc import Callable
from pathlib import Path

from ..io import read_json, write_json_atomic
from ..run_manifest import Run, start_run

__all__ = ["start_evaluation", "write_results"]


def start_evaluation(
    script_args, name: str, inputs: dict, outputs: list[str] | None = None
) -> tuple[Run, dict | None]:
    """
    Start the evaluation `name` in `script_args.output_dir` as a run that owns its files there
    ([`~lenvm_rl.run_manifest.start_run`]; evaluations may share a directory). The same evaluation already finished
    is not run again unless `--reevaluate`; another one (other arguments or inputs) is refused unless
    `--overwrite_output_dir`.

    Args:
        script_args: The recipe's arguments ([`~lenvm_rl.configs.RunArguments`] and an `output_dir`).
        name (`str`): The evaluation's name, also the base name of its files.
        inputs (`dict`): Its input paths by flag (models, rollouts, data).
        outputs (`list[str]`, *optional*): Its files; by default `{name}.json` (the results) and `{name}.png`.

    Returns:
        `tuple[Run, dict | None]`: the run (call `run.complete()` after writing), and the saved results when the
        evaluation had already finished (the recipe then returns them).
    """
    run = start_run(
        script_args.output_dir,
        name,
        {"script_args": script_args},
        inputs,
        overwrite=script_args.overwrite_output_dir,
        reevaluate=script_args.reevaluate,
        outputs=outputs or [f"{name}.json", f"{name}.png"],
    )
    if not run.done:
        return run, None
    return run, read_json(run.output_dir / f"{name}.json", fix="restore it, or re-run with --reevaluate")


def write_results(
    results: dict, output_dir: str | os.PathLike, name: str, plot: Callable[[dict, Path], None]
) -> tuple[Path, Path]:
    """
    Write `results` as `{name}.json` (atomically) and `plot(results, path)` as `{name}.png` in `output_dir`.

    Args:
        results (`dict`): JSON-ready results.
        output_dir (`str` or `os.PathLike`): Created if needed.
        name (`str`): Base name of the two files.
        plot (`Callable[[dict, Path], None]`): Draws the results to a PNG path.

    Returns:
        `tuple[Path, Path]`: the JSON and PNG paths.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output_dir / f"{name}.json", output_dir / f"{name}.png"
    write_json_atomic(json_path, results)
    plot(results, png_path)
    return json_path, png_path
