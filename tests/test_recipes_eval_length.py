"""Length-prediction evaluation: `lenvm_rl.evaluation` against direct forwards, and the recipe end to end."""

import copy
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_rollout_records, make_tiny_causal_lm
from datasets import Dataset
from trl import TrlParser

from lenvm_rl.core import lengths_to_values
from lenvm_rl.evaluation import evaluate_length_prediction, format_length_prediction_table
from lenvm_rl.modeling import LengthValueModel

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))

from eval_length_prediction import EvalLengthPredictionArguments, main  # noqa: E402

GAMMA = 0.9


@pytest.fixture(scope="module")
def lenvm():
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=1), gamma=GAMMA, generator_model="tiny")


# ---------------------------------------------------------------- lenvm_rl.evaluation
def test_evaluation_matches_direct_forwards(lenvm):
    records = make_rollout_records(num_prompts=4, per_prompt=3, seed=0)
    results = evaluate_length_prediction(lenvm, Dataset.from_list(records), batch_size=5)
    assert lenvm.training  # the mode is restored

    # V(s_0) read from the completions equals the LenVM on the prompt alone.
    prompts = {r["prompt_id"]: r["prompt_ids"] for r in records}
    expected = [
        float(lenvm.predict_prompt_lengths(torch.tensor([prompts[p]]), torch.ones(1, len(prompts[p])))[0])
        for p in results["per_prompt"]["prompt_id"]
    ]
    torch.testing.assert_close(results["per_prompt"]["predicted_length"], expected, rtol=1e-4, atol=1e-4)

    # value_mse over every target position, one completion at a time: G_t = -(1 - gamma^(L - t)), t = 0 .. L.
    squared, count = 0.0, 0
    with torch.no_grad():
        lenvm.eval()
        for r in records:
            values = lenvm(torch.tensor([r["prompt_ids"] + r["completion_ids"]])).values[0].double()
            L, start = len(r["completion_ids"]), len(r["prompt_ids"]) - 1
            targets = lengths_to_values(torch.arange(L, -1, -1), GAMMA)
            squared += float(((values[start : start + L + 1] - targets) ** 2).sum())
            count += L + 1
        lenvm.train()
    assert results["num_value_targets"] == count
    assert results["value_mse"] == pytest.approx(squared / count, rel=1e-5)

    # Batching is invisible: one sequence per forward gives the same numbers.
    single = evaluate_length_prediction(lenvm, Dataset.from_list(records), batch_size=1)
    assert single["prompt_mre"]["lenvm"] == pytest.approx(results["prompt_mre"]["lenvm"], rel=1e-5)
    assert single["value_mse"] == pytest.approx(results["value_mse"], rel=1e-5)


def test_evaluation_excludes_and_counts_truncated_completions(lenvm):
    records = make_rollout_records(num_prompts=3, per_prompt=3, seed=1)
    for r in records[:3]:  # every completion of the first prompt hit the cap
        r["completion_ids"][-1], r["finish_reason"] = 42, "length"
    records[3]["finish_reason"] = "length"
    results = evaluate_length_prediction(lenvm, Dataset.from_list(records), train_dataset=Dataset.from_list(records))
    assert results["num_truncated_excluded"] == 4
    assert results["num_prompts_excluded"] == 1
    assert results["num_prompts"] == 2 and results["num_completions"] == 5
    assert results["per_prompt"]["num_completions"] == [2, 3]
    assert results["baselines"]["num_train_truncated_excluded"] == 4
    sampled = [len(r["completion_ids"]) for r in records if r["finish_reason"] == "stop"]
    assert results["mean_sampled_length"] == pytest.approx(sum(sampled) / len(sampled))
    with pytest.raises(ValueError, match="no ground truth"):
        evaluate_length_prediction(lenvm, Dataset.from_list(records[:3]))
    with pytest.raises(ValueError, match=r"lower min_completions_per_prompt \(--min_completions_per_prompt\)"):
        evaluate_length_prediction(lenvm, Dataset.from_list(records), min_completions_per_prompt=99)


def test_prompts_with_one_finished_completion_are_left_out(lenvm):
    """The paper's ground truth is a mean over several completions of a prompt: one draw is not enough."""
    records = make_rollout_records(num_prompts=3, per_prompt=3, seed=1)
    for r in records[:2]:  # prompt 0 keeps one finished completion
        r["completion_ids"][-1], r["finish_reason"] = 42, "length"
    results = evaluate_length_prediction(lenvm, Dataset.from_list(records))
    assert results["num_prompts"] == 2 and results["num_prompts_excluded"] == 1
    assert (
        evaluate_length_prediction(lenvm, Dataset.from_list(records), min_completions_per_prompt=1)["num_prompts"] == 3
    )


def test_evaluation_warns_about_another_generator(lenvm, caplog):
    records = make_rollout_records(num_prompts=2, per_prompt=2, seed=5)
    for r in records:
        r["generator_model"] = "another-policy"
    with caplog.at_level(logging.WARNING, logger="lenvm_rl.evaluation"):
        evaluate_length_prediction(lenvm, Dataset.from_list(records))
    assert "policy-dependent" in caplog.text


# ---------------------------------------------------------------- recipes/eval_length_prediction.py
def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_eval_length_prediction_recipe(tmp_path, lenvm, capsys):
    lenvm_dir = tmp_path / "lenvm"
    lenvm.save_pretrained(lenvm_dir)
    # Training rollouts in the sampler's directory layout, held-out ones as a glob of jsonl files.
    write_jsonl(tmp_path / "train" / "shard-00000-of-00001" / "chunk-000000.jsonl", make_rollout_records(6, 3, seed=2))
    write_jsonl(tmp_path / "eval" / "a.jsonl", make_rollout_records(3, 4, seed=3, cut_every=5))
    write_jsonl(tmp_path / "eval" / "b.jsonl", make_rollout_records(2, 4, seed=4))

    args = EvalLengthPredictionArguments(
        lenvm_path=str(lenvm_dir),
        train_rollouts=str(tmp_path / "train"),
        eval_rollouts=str(tmp_path / "eval" / "*.jsonl"),
        output_dir=str(tmp_path / "out"),
        batch_size=4,
    )
    main(args)

    results = json.loads((tmp_path / "out" / "eval_length_prediction.json").read_text())
    assert set(results) == {
        "args",
        "gamma",
        "generator_model",
        "min_completions_per_prompt",
        "num_prompts",
        "num_completions",
        "num_truncated_excluded",
        "num_prompts_excluded",
        "num_value_targets",
        "prompt_mre",
        "mean_true_length",
        "mean_predicted_length",
        "mean_sampled_length",
        "value_mse",
        "relative_length_error",
        "relative_length_error_counts",
        "relative_length_error_remaining_baseline",
        "baselines",
        "per_prompt",
    }
    assert set(results["prompt_mre"]) == {"lenvm", "constant", "prompt_length_regression", "linear_prompt_length"}
    assert list(results["relative_length_error_remaining_baseline"]) == ["0%", "25%", "50%", "75%"]
    assert list(results["relative_length_error"]) == ["0%", "25%", "50%", "75%"]
    assert results["gamma"] == GAMMA and results["args"]["batch_size"] == 4
    assert results["num_prompts"] == 5 and results["num_truncated_excluded"] == 3  # records 0, 5, 10 of file a
    assert results["num_completions"] == 5 * 4 - 3
    assert results["baselines"]["num_train_completions"] == 18
    assert set(results["per_prompt"]) >= {"prompt_id", "true_length", "predicted_length", "regression_length"}
    assert (tmp_path / "out" / "eval_length_prediction.png").stat().st_size > 0
    table = format_length_prediction_table(results)
    assert table in capsys.readouterr().out
    rule = next(line for line in table.splitlines() if line.startswith("prompts in the MRE"))
    assert rule.endswith("those with >= 2 finished completions (0 left out)")  # the paper's rule, said

    # The finished evaluation is not run again; a retrained LenVM at the same path is another evaluation.
    stamp = (tmp_path / "out" / "eval_length_prediction.json").stat().st_mtime_ns
    assert main(args) == results
    retrained = copy.deepcopy(lenvm)
    with torch.no_grad():
        retrained.v_head.summary.bias.add_(0.5)
    retrained.save_pretrained(lenvm_dir)
    with pytest.raises(ValueError, match=r"inputs.lenvm_path: the files at .*lenvm changed .*value_head"):
        main(args)
    assert (tmp_path / "out" / "eval_length_prediction.json").stat().st_mtime_ns == stamp
    args.overwrite_output_dir = True
    assert main(args)["prompt_mre"] != results["prompt_mre"]
    assert (tmp_path / "out" / "superseded").is_dir()


def test_eval_length_prediction_arguments_from_yaml(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("lenvm_path: lenvm\neval_rollouts: eval\noutput_dir: out\ngamma: 0.997\nmax_length: 64\n")
    (args,) = TrlParser(EvalLengthPredictionArguments).parse_args_and_config(["--config", str(config)])
    assert (args.gamma, args.max_length, args.train_rollouts, args.batch_size) == (0.997, 64, None, 16)
    with pytest.raises(ValueError, match="--batch_size"):
        EvalLengthPredictionArguments(lenvm_path="x", eval_rollouts="y", output_dir="z", batch_size=0)
