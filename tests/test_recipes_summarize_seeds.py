"""`recipes/summarize_seeds.py` on real runs of the evaluation recipes (tiny models, two seeds or two LenVMs)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rollout_records, make_tiny_causal_lm, write_guided_eval_world

from lenvm_rl.length_metrics import length_score
from lenvm_rl.modeling import LengthValueModel

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import eval_length_control  # noqa: E402
import eval_length_prediction  # noqa: E402
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
    with pytest.raises(ValueError, match="--length_prediction_dirs, --length_control_dirs and/or --tradeoff_dirs"):
        summarize(output_dir=str(tmp_path))
    assert not (tmp_path / "inference_seeds.json").exists()  # nothing written by a refused summary


def test_length_prediction_over_lenvm_seeds(tmp_path):
    """Two LenVMs evaluated on the same held-out rollouts: the MRE is their mean, the baselines are shared, and a
    LenVM evaluated on other prompts is refused."""

    def write(path, records):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    write(tmp_path / "train" / "shard-00000-of-00001" / "chunk-000000.jsonl", make_rollout_records(6, 3, seed=2))
    write(tmp_path / "eval" / "a.jsonl", make_rollout_records(4, 4, seed=3))
    write(tmp_path / "other" / "a.jsonl", make_rollout_records(4, 4, seed=4))
    out_dirs = []
    for seed, held_out in ((1, "eval"), (2, "eval"), (3, "other")):
        lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm(seed=seed), gamma=0.9, generator_model="tiny")
        lenvm.save_pretrained(tmp_path / f"lenvm{seed}")
        out_dirs.append(str(tmp_path / f"out{seed}"))
        eval_length_prediction.main(
            eval_length_prediction.EvalLengthPredictionArguments(
                lenvm_path=str(tmp_path / f"lenvm{seed}"), train_rollouts=str(tmp_path / "train"),
                eval_rollouts=str(tmp_path / held_out / "*.jsonl"), output_dir=out_dirs[-1], batch_size=4,
            )
        )  # fmt: skip
    summarize = summarize_seeds.SeedSummaryArguments
    results = summarize_seeds.main(summarize(output_dir=str(tmp_path / "sum"), length_prediction_dirs=out_dirs[:2]))
    runs = [json.loads((Path(d) / "eval_length_prediction.json").read_text()) for d in out_dirs[:2]]
    mre = results["length_prediction"]["prompt_mre"]
    assert runs[0]["prompt_mre"]["lenvm"] != runs[1]["prompt_mre"]["lenvm"]
    assert mre["lenvm"]["mean"] == pytest.approx(np.mean([run["prompt_mre"]["lenvm"] for run in runs]))
    assert mre["constant"]["mean"] == pytest.approx(runs[0]["prompt_mre"]["constant"])
    assert mre["lenvm_minus_regression"]["mean"] == pytest.approx(
        mre["lenvm"]["mean"] - mre["prompt_length_regression"]["mean"]
    )
    assert mre["lenvm"]["ci_low"] <= mre["lenvm"]["mean"] <= mre["lenvm"]["ci_high"]
    remaining = results["length_prediction"]["relative_length_error"]["50%"]
    assert remaining["min"] <= remaining["mean"] <= remaining["max"]
    assert "| lenvm |" in (tmp_path / "sum" / "inference_seeds.md").read_text()
    with pytest.raises(ValueError, match=r"another evaluation.*\['eval_rollouts'\] differ"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path / "bad"), length_prediction_dirs=out_dirs[::2]))
    edited = json.loads((Path(out_dirs[2]) / "eval_length_prediction.json").read_text())
    edited["args"]["eval_rollouts"] = runs[0]["args"]["eval_rollouts"]  # same path, other files behind it
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "eval_length_prediction.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="other held-out prompts"):
        summarize_seeds.main(
            summarize(output_dir=str(tmp_path / "bad"), length_prediction_dirs=[out_dirs[0], str(tmp_path / "edited")])
        )
    with pytest.raises(ValueError, match="distinct lenvm_paths"):
        summarize_seeds.main(summarize(output_dir=str(tmp_path / "bad"), length_prediction_dirs=out_dirs[:1] * 2))
    assert not (tmp_path / "bad").exists()
