"""Saving an evaluation: its JSON results (written atomically) and the figure drawn from them, side by side.

The figure is drawn from the results dictionary alone, so a saved JSON can be re-plotted without the models.
"""

import os
from collections.abc import Callable
from pathlib import Path

from ..io import write_json_atomic

__all__ = ["write_results"]


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
