"""recipes/ablate_length.py: the rows it builds, and a real (tiny) GRPO ablation end to end, resumed."""

import json
import sys
from pathlib import Path

import pytest
from test_recipes_grpo import tiny_world  # noqa: F401  (the fixture)

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from ablate_length import AblationArguments, ablation_rows, main, table  # noqa: E402


def test_rows_cover_every_mode_and_coefficient():
    args = AblationArguments(
        base_config="x.yaml", output_dir="y", penalty_coefs=[0.1, 0.2], advantage_coefs=[1.0], shaping_coefs=[0.5]
    )
    rows = ablation_rows(args)
    assert list(rows) == ["none", "penalty a=0.1", "penalty a=0.2", "advantage s=1", "shaping b=0.5"]
    assert rows["shaping b=0.5"] == ["--length_mode", "shaping", "--length_coef", "0.5"]
    grpo = ablation_rows(AblationArguments(base_config="x", output_dir="y", trainer="grpo", shaping_coefs=[]))
    assert list(grpo) == ["grpo", "grpo+penalty a=0.003", "grpo+penalty a=0.01", "grpo+overlong", "grpo+lenvm s=0.3",
                          "grpo+lenvm s=1", "grpo+lenvm s=3"]  # fmt: skip


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="trainer"):
        AblationArguments(base_config="x", output_dir="y", trainer="dpo")
    with pytest.raises(ValueError, match="seeds"):
        AblationArguments(base_config="x", output_dir="y", seeds=[])


def test_table_reports_change_against_start():
    summary = {"r": {"after": {"accuracy": {"mean": 0.5, "std": 0.1}, "mean_tokens": {"mean": 30.0, "std": 2.0}}}}
    assert "| r | 0.500 ± 0.100 | 30.0 ± 2.0 | -25% |" in table(summary, {"accuracy": 0.6, "mean_tokens": 40.0})


def test_grpo_ablation_end_to_end_and_resume(tiny_world, tmp_path):  # noqa: F811
    config = tmp_path / "grpo_tiny.yaml"
    config.write_text(
        f"""
model_name_or_path: {tiny_world / "policy"}
dataset_name: {tiny_world / "data"}
instruction: null
num_eval_problems: 4
lenvm_model_name_or_path: {tiny_world / "lenvm"}
length_coef: 0.5
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 6
max_steps: 1
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
"""
    )
    args = AblationArguments(
        base_config=str(config),
        output_dir=str(tmp_path / "ablation"),
        trainer="grpo",
        seeds=[0],
        penalty_coefs=[0.01],
        advantage_coefs=[0.5],
        shaping_coefs=[],
        overlong_cache=None,
    )
    result = main(args)
    assert list(result["rows"]) == ["grpo", "grpo+penalty a=0.01", "grpo+lenvm s=0.5"]
    for row in result["rows"].values():
        (run,) = row["runs"]
        assert 0.0 <= run["after"]["accuracy"] <= 1.0 and run["after"]["mean_tokens"] > 0
    written = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert written["rows"].keys() == result["rows"].keys()
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 0
    assert "grpo+lenvm s=0.5" in (tmp_path / "ablation" / "ablation.md").read_text()

    # A second call reuses every finished run: nothing is retrained (the results files are untouched).
    results_files = sorted((tmp_path / "ablation" / "runs").glob("*/results.json"))
    mtimes = [path.stat().st_mtime_ns for path in results_files]
    main(args)
    assert [path.stat().st_mtime_ns for path in results_files] == mtimes

    # A failing run (here: a LenVM path that does not exist) stops the ablation with the end of its log.
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace(str(tiny_world / "lenvm"), str(tmp_path / "missing")))
    args.base_config, args.seeds = str(broken), [1]
    with pytest.raises(RuntimeError, match="failed"):
        main(args)
