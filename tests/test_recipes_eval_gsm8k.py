"""`lenvm_rl.evaluation.evaluate_gsm8k` and the accuracy-versus-tokens format on tiny offline models, and
recipes/eval_gsm8k.py end to end."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from trl import TrlParser

from lenvm_rl.evaluation import accuracy_length_stats, evaluate_gsm8k, write_tradeoff_results
from lenvm_rl.generation import generate_completions
from lenvm_rl.length_metrics import token_budget_curve
from lenvm_rl.rewards import extract_gsm8k_answer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from eval_gsm8k import EvalGSM8KArguments, load_policy, main  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"what is {i} + {i} ?"}] for i in range(5)]


@pytest.fixture(scope="module")
def policy():
    model = make_tiny_causal_lm("llama", seed=1)
    model.generation_config.eos_token_id = 1
    return model


def test_accuracy_length_stats_by_hand():
    stats = accuracy_length_stats([3, 1, 2, 10], [True, False, False, True], [False, False, False, True])
    assert stats["accuracy"] == 2 / 4 and stats["mean_tokens"] == (3 + 1 + 2 + 10) / 4
    assert stats["median_tokens"] == (2 + 3) / 2
    assert stats["p90_tokens"] == pytest.approx(3 + 0.7 * (10 - 3))  # rank 0.9 * 3 = 2.7 between 3 and 10
    assert stats["fraction_truncated"] == 1 / 4
    with pytest.raises(ValueError, match="as many"):
        accuracy_length_stats([1, 2], [True], [False, False])


def test_budget_curve_counts_cut_answers_as_wrong():
    curve = token_budget_curve([2, 4, 8], [True, True, False], budgets=[1, 4, 100]).to_dict()
    assert curve["budgets"] == [1, 4, 100]
    assert curve["mean_tokens"] == pytest.approx([1.0, (2 + 4 + 4) / 3, (2 + 4 + 8) / 3])
    assert curve["accuracy"] == pytest.approx([0.0, 2 / 3, 2 / 3])
    assert token_budget_curve([3, 17], [True, True]).budgets.tolist() == [
        8,
        16,
        24,
    ]  # every 8 tokens up to the longest


def test_evaluate_gsm8k_scores_every_sample_against_its_own_problem(policy):
    tokenizer = make_tiny_tokenizer()
    kwargs = dict(max_new_tokens=8, temperature=1.0, batch_size=3, seed=5)
    completions = generate_completions(policy, tokenizer, PROMPTS, 2, kwargs["max_new_tokens"], 1.0, 1.0, 0, 3, 5)
    # A reference for each problem that its first sample matches exactly (or a number no sample writes).
    answers = [extract_gsm8k_answer(completions[2 * i].text) or "123456" for i in range(len(PROMPTS))]
    out = evaluate_gsm8k(policy, tokenizer, PROMPTS, answers, num_samples=2, **kwargs)

    expected_correct = [extract_gsm8k_answer(c.text) == answers[c.prompt_index] for c in completions]
    assert out["correct"] == expected_correct and any(expected_correct)
    assert out["lengths"] == [len(c.completion_ids) for c in completions]  # EOS included
    assert out["num_problems"] == 5 and out["num_samples"] == 2
    assert out["accuracy"] == sum(expected_correct) / 10
    assert out["mean_tokens"] == pytest.approx(sum(out["lengths"]) / 10)
    assert out["fraction_truncated"] == sum(c.finish_reason == "length" for c in completions) / 10
    assert out["median_tokens"] == pytest.approx(float(torch.tensor(out["lengths"]).double().quantile(0.5)))
    assert out["p90_tokens"] <= out["p99_tokens"] <= max(out["lengths"]) <= 8
    with pytest.raises(ValueError, match="one answer per prompt"):
        evaluate_gsm8k(policy, tokenizer, PROMPTS, answers[:2], **kwargs)


def test_write_tradeoff_results_writes_json_and_png(tmp_path):
    curve = token_budget_curve([2, 4, 8], [True, True, False], budgets=[2, 4, 8]).to_dict()
    results = {"title": "t", "runs": [{"label": "a", "accuracy": 0.5, "mean_tokens": 4.0, "budget_curve": curve},
                                      {"label": "b", "accuracy": 0.4, "mean_tokens": 3.0, "series": "s"}]}  # fmt: skip
    json_path, png_path = write_tradeoff_results(results, tmp_path / "out", "x")
    assert json.loads(json_path.read_text()) == results and json_path.name == "x.json"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, policy):
    root = tmp_path_factory.mktemp("eval_gsm8k")
    tokenizer = make_tiny_tokenizer()
    eos_prone = make_tiny_causal_lm("llama", seed=2, tie=False)
    with torch.no_grad():
        eos_prone.lm_head.weight[1] *= 20  # EOS (id 1) becomes frequent: lengths differ from "a"'s
    for name, model in (("a", policy), ("b", eos_prone)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"question": f"what is {i} + {i} ?", "answer": f"#### {2 * i}"} for i in range(6)]
    (root / "data").mkdir()
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_main_evaluates_each_checkpoint_with_its_budget_curve(checkpoints, tmp_path):
    config = tmp_path / "eval_gsm8k_tiny.yaml"
    config.write_text(
        f"""
model_name_or_path: [{checkpoints / "a"}, {checkpoints / "b"}]
labels: [start, final]
dataset_name: {checkpoints / "data"}
instruction: null
task_name: tiny world
num_problems: 5
num_samples: 2
max_new_tokens: 8
budgets: [2, 4, 8]
batch_size: 4
output_dir: {tmp_path / "out"}
summary_file: {tmp_path / "results.json"}
"""
    )
    (script_args,) = TrlParser(EvalGSM8KArguments).parse_args_and_config(["--config", str(config)])
    results = main(script_args)
    summary = json.loads((tmp_path / "results.json").read_text())
    for run in results["runs"]:
        assert summary[run["label"]]["accuracy"] == run["accuracy"]
        assert summary[run["label"]]["mean_tokens"] == run["mean_tokens"]

    assert json.loads((tmp_path / "out" / "eval_gsm8k.json").read_text()) == results
    assert (tmp_path / "out" / "eval_gsm8k.png").is_file()
    assert [run["label"] for run in results["runs"]] == ["start", "final"]
    assert results["title"].startswith("tiny world: accuracy vs length")  # the plot says which problems it shows
    for run in results["runs"]:
        assert run["num_problems"] == 5 and len(run["lengths"]) == len(run["correct"]) == 10
        assert run["budget_curve"]["budgets"] == [2, 4, 8]
        # The largest budget is the length cap: nothing is cut further, so the curve ends at the run itself.
        assert run["budget_curve"]["mean_tokens"][-1] == pytest.approx(run["mean_tokens"])
    # Each run is its own checkpoint's evaluation, with the same prompts and sampling settings.
    prompts = [[{"role": "user", "content": f"what is {i} + {i} ?"}] for i in range(5)]
    for run, name in zip(results["runs"], ("a", "b")):
        model = load_policy(str(checkpoints / name))
        direct = evaluate_gsm8k(model, make_tiny_tokenizer(), prompts, [f"#### {2 * i}" for i in range(5)],
                                num_samples=2, max_new_tokens=8, temperature=1.0, batch_size=4, seed=0)  # fmt: skip
        assert run["lengths"] == direct["lengths"] and run["correct"] == direct["correct"]
    assert results["runs"][0]["lengths"] != results["runs"][1]["lengths"]


def test_labels_must_match_the_checkpoints():
    with pytest.raises(ValueError, match="--labels"):
        EvalGSM8KArguments(model_name_or_path=["a", "b"], labels=["a"], output_dir="x")
