"""`recipes/summarize_seeds.py` on real runs of the guided-decoding recipes (tiny models, two seeds)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_causal_lm, write_guided_eval_world

from lenvm_rl.metrics import length_score
from lenvm_rl.modeling import LengthValueModel

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import eval_length_control  # noqa: E402
import eval_tradeoff  # noqa: E402
import summarize_seeds  # noqa: E402


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """Length control (targets 4, 8) and tilt (beta 0, -5) on 6 problems, each at seeds 0 and 1."""
    root = tmp_path_factory.mktemp("seeds")
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm(seed=1), gamma=0.9).eval()
    common = write_guided_eval_world(root, lenvm)
    dirs = {"length_control": [], "tradeoff": []}
    for seed in (0, 1):
        out = str(root / f"lc{seed}")
        eval_length_control.main(
            eval_length_control.EvalLengthControlArguments(output_dir=out, target_lengths=[4, 8], seed=seed, **common)
        )
        dirs["length_control"].append(out)
        out = str(root / f"to{seed}")
        eval_tradeoff.main(
            eval_tradeoff.EvalTradeoffArguments(output_dir=out, betas=[0.0, -5.0], num_samples=2, seed=seed, **common)
        )
        dirs["tradeoff"].append(out)
    return root, dirs


def test_summary_is_the_mean_over_seeds_with_intervals(seed_runs, tmp_path):
    _, dirs = seed_runs
    results = summarize_seeds.main(
        summarize_seeds.SeedSummaryArguments(
            output_dir=str(tmp_path), length_control_dirs=dirs["length_control"], tradeoff_dirs=dirs["tradeoff"],
            num_resamples=200,
        )
    )  # fmt: skip
    runs = [json.loads((Path(d) / "length_control.json").read_text()) for d in dirs["length_control"]]
    row = results["length_control"]["constraints"]["at_most"]["per_target"]["8"]
    by_seed = [run["constraints"]["at_most"]["per_target"]["8"]["guided"]["length_score"] for run in runs]
    assert row["guided"]["mean"] == pytest.approx(np.mean(by_seed))
    lengths = runs[1]["constraints"]["equal_to"]["per_target"]["4"]["guided"]["lengths"]
    assert float(length_score(lengths, 4, "equal_to").mean()) == pytest.approx(
        runs[1]["constraints"]["equal_to"]["per_target"]["4"]["guided"]["length_score"]
    )  # the summary recomputes the recipe's own score from the stored lengths
    for value in (row["guided"], row["unguided"], row["guided_mean_length"]):
        assert value["ci_low"] <= value["mean"] <= value["ci_high"]
    difference = row["guided_minus_unguided"]["mean"]
    assert difference == pytest.approx(row["guided"]["mean"] - row["unguided"]["mean"])

    tradeoffs = [json.loads((Path(d) / "tradeoff.json").read_text()) for d in dirs["tradeoff"]]
    tilt = results["tradeoff"]["per_beta"][1]
    assert tilt["beta"] == -5.0
    assert tilt["accuracy"]["mean"] == pytest.approx(np.mean([t["runs"][1]["accuracy"] for t in tradeoffs]))
    assert tilt["mean_tokens"]["mean"] == pytest.approx(np.mean([t["runs"][1]["mean_tokens"] for t in tradeoffs]))
    budget = [t["runs"][1]["budget_accuracy_at_same_tokens"] for t in tradeoffs]
    assert tilt["budget_accuracy_at_same_tokens"] == {"mean": pytest.approx(np.mean(budget)), "min": min(budget),
                                                      "max": max(budget)}  # fmt: skip
    assert results["tradeoff"]["seeds"] == [0, 1]
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"inference_seeds.{suffix}").is_file()
    assert "| at_most | 8 |" in (tmp_path / "inference_seeds.md").read_text()


def test_runs_that_are_not_one_evaluation_at_distinct_seeds_are_refused(seed_runs, tmp_path):
    root, dirs = seed_runs
    summarize = summarize_seeds.SeedSummaryArguments
    with pytest.raises(ValueError, match="distinct seeds"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path), tradeoff_dirs=[dirs["tradeoff"][0]] * 2))
    other = root / "other"
    other.mkdir(exist_ok=True)
    results = json.loads((Path(dirs["tradeoff"][1]) / "tradeoff.json").read_text())
    results["args"]["temperature"] = 0.5
    (other / "tradeoff.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"another evaluation.*\['temperature'\]"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path), tradeoff_dirs=[dirs["tradeoff"][0], str(other)]))
    del results["runs"][1]["lengths"]
    results["args"]["temperature"] = 1.0
    (other / "tradeoff.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="no per-completion lengths"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path), tradeoff_dirs=[dirs["tradeoff"][0], str(other)]))
    with pytest.raises(FileNotFoundError, match="eval_length_control.py"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path), length_control_dirs=[str(root / "missing")]))
    with pytest.raises(ValueError, match="--length_control_dirs and/or --tradeoff_dirs"):
        summarize(output_dir=str(tmp_path))
    assert not (tmp_path / "inference_seeds.json").exists()  # nothing written by a refused summary
