"""The offline demo world: problems, solutions, tokenizer, the cached atomic build (training path) and the measurement.

The default build copies the shipped policy; tests/test_demo_shipped.py covers that path.
"""

import json
import operator
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenvm_rl import demo
from lenvm_rl.demo import (
    DEMO_STYLES,
    DemoWorldConfig,
    build_demo_tokenizer,
    build_demo_world,
    demo_prompt,
    demo_rows,
    generate_demo_problems,
    write_demo_solution,
)
from lenvm_rl.demo import world as demo_world
from lenvm_rl.demo.__main__ import main as demo_main
from lenvm_rl.demo.measure import reference_length_stats
from lenvm_rl.demo.tokenizer import demo_vocabulary_texts
from lenvm_rl.rewards import extract_gsm8k_answer, gsm8k_format_reward

# A world small enough to build in seconds: a few SFT steps of a one-layer model (trained: no shipped policy for it).
TINY_CONFIG = dict(
    num_train_problems=64,
    num_test_problems=8,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    max_steps=2,
    per_device_train_batch_size=8,
    warmup_steps=1,
    number_embedding_frequencies=8,
    rebuild=True,
)
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


@pytest.fixture(scope="module")
def problems():
    return generate_demo_problems(400, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer(demo_vocabulary_texts())


# ---------------------------------------------------------------------------------------------------------------------
# Problems and solutions


def test_problems_are_deterministic_distinct_and_extend(problems):
    assert generate_demo_problems(400, seed=0) == problems
    assert generate_demo_problems(50, seed=0) == problems[:50]
    assert generate_demo_problems(50, seed=1) != problems[:50]
    assert len({problem.question for problem in problems}) == len(problems)
    assert len({problem.id for problem in problems}) == len(problems)


def test_problem_steps_and_ranges(problems):
    assert {problem.num_steps for problem in problems} == {2, 3, 4}
    assert {op for problem in problems for op, _ in problem.operations} == {"+", "-", "*", "/"}
    for problem in problems:
        value = problem.start
        for op, operand in problem.operations:
            assert op != "/" or value % operand == 0  # exact division only
            new_value = OPERATORS[op](value, operand)
            assert 1 <= new_value and (new_value <= demo.DEMO_MAX_VALUE or new_value < value)
            value = new_value
        assert 2 <= problem.start <= 40


def test_question_states_the_steps(problems):
    """The numbers of the question, in order, are the start value and the operands."""
    for problem in problems:
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        assert numbers == [problem.start] + [operand for _, operand in problem.operations]


@pytest.mark.parametrize("style", DEMO_STYLES)
def test_solutions_end_with_the_true_answer(problems, style):
    """`#### N` equals the value computed here from the problem's start and operations, in every style."""
    rng = random.Random(0)
    for problem in problems:
        expected = problem.start
        for op, operand in problem.operations:
            expected = OPERATORS[op](expected, operand)
        text, written_style, _ = write_demo_solution(problem, rng, style)
        assert written_style == style
        assert extract_gsm8k_answer(text) == str(expected)
        assert gsm8k_format_reward([text]) == [1.0]
        # Every computation line is right: "a op b = c".
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", text):
            assert OPERATORS[op](int(a), int(b)) == int(c)


def test_solutions_are_deterministic_per_seed(problems):
    rows = demo_rows(problems[:50], seed=0)
    assert rows == demo_rows(problems[:50], seed=0)
    assert [row["answer"] for row in rows] != [row["answer"] for row in demo_rows(problems[:50], seed=1)]
    assert set(rows[0]) >= {"id", "question", "answer", "num_steps", "style", "theme", "num_checks"}
    assert {row["style"] for row in demo_rows(problems, seed=0)} == set(DEMO_STYLES)


def test_data_lengths_are_long_tailed_and_partly_explained_by_the_prompt(problems, tokenizer):
    stats = reference_length_stats(problems, tokenizer, seed=0)
    assert stats["p99"] >= 4 * stats["median"]
    assert 0.15 <= stats["prompt_share"] <= 0.45


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_every_demo_text(problems, tokenizer):
    for row in demo_rows(problems, seed=0):
        for text in (row["question"], row["answer"]):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_every_integer_is_one_token(tokenizer):
    for n in range(demo.DEMO_MAX_INTEGER + 1):
        assert tokenizer.tokenize(f"#### {n}") == ["####", str(n)]
        assert len(tokenizer(f"{n}")["input_ids"]) == 1


def test_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    prompt = demo_prompt("Ava has 3 apples. How many apples does Ava have now?")
    assert prompt == [{"role": "user", "content": "Ava has 3 apples. How many apples does Ava have now?"}]
    encoding = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    prompt_ids = encoding["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids[:2]) == ["<|user|>", "Ava"]
    assert tokenizer.convert_ids_to_tokens(prompt_ids[-2:]) == [demo.DEMO_EOS_TOKEN, "<|assistant|>"]
    # The assistant turn ends with EOS, and the rendered prompt is a prefix of the full conversation.
    full_ids = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": "#### 3"}], tokenize=True)[
        "input_ids"
    ]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[len(prompt_ids) :] == [*tokenizer("#### 3")["input_ids"], tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------------------------------------
# Build: loadable, cached, atomic


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return build_demo_world(tmp_path_factory.mktemp("worlds") / "tiny", seed=0, config=DemoWorldConfig(**TINY_CONFIG))


def test_tiny_world_is_loadable(tiny_world):
    info = json.loads((tiny_world / "build_info.json").read_text())
    assert info["seed"] == 0 and info["config"]["max_steps"] == 2
    assert info["policy"] == {"source": "trained"}
    assert set(info["versions"]) >= {"torch", "transformers", "trl", "tokenizers"}
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "policy")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "policy")
    assert model.num_parameters() == info["num_parameters"]
    assert tokenizer.chat_template == demo.DEMO_CHAT_TEMPLATE
    assert model.config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    train = [json.loads(line) for line in (tiny_world / "data" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tiny_world / "data" / "test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (64, 8)
    assert not {row["question"] for row in train} & {row["question"] for row in test}
    ids = tokenizer.apply_chat_template(demo_prompt(test[0]["question"]), add_generation_prompt=True, tokenize=True)
    assert model(torch.tensor([ids["input_ids"]])).logits.shape[-1] == len(tokenizer)


def test_second_build_reuses_the_world(tiny_world, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached world must not be retrained")

    monkeypatch.setattr(demo_world, "_train_policy", no_training)
    weights = tiny_world / "policy" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_demo_world(tiny_world, seed=0, config=DemoWorldConfig(**TINY_CONFIG)) == tiny_world
    assert weights.stat().st_mtime_ns == mtime


def test_build_with_other_arguments_is_refused(tiny_world):
    with pytest.raises(ValueError, match="other arguments"):
        build_demo_world(tiny_world, seed=1, config=DemoWorldConfig(**TINY_CONFIG))
    with pytest.raises(ValueError, match="other arguments"):
        build_demo_world(tiny_world, seed=0, config=DemoWorldConfig(**{**TINY_CONFIG, "max_steps": 3}))


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_world, "_train_policy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_demo_world(tmp_path / "world", config=DemoWorldConfig(**TINY_CONFIG))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(hidden_size=30, num_attention_heads=4), r"--hidden_size \(30\) must be a multiple of --num_attention"),
        (dict(num_test_problems=0), "--num_test_problems"),
        (dict(hidden_size=16, number_embedding_frequencies=9), "--number_embedding_frequencies"),
        (dict(max_steps=0), "--max_steps"),
    ],
)
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        DemoWorldConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Command line and measurement


def test_cli_build_hits_the_cache_and_measure_writes_stats(tiny_world, tmp_path, capsys):
    flags = [f"--{key}={value}" for key, value in TINY_CONFIG.items()]
    demo_main(["build", "--output_dir", str(tiny_world), *flags])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_parameters"] > 0 and summary["policy"] == "trained"

    out = tmp_path / "stats"
    demo_main(
        ["measure", "--world_dir", str(tiny_world), "--output_dir", str(out), "--num_problems", "4"]
        + ["--num_samples", "2", "--max_new_tokens", "8", "--batch_size", "3"]
    )
    stats = json.loads((out / "demo_policy_stats.json").read_text())
    assert (out / "demo_policy_lengths.png").stat().st_size > 0
    assert stats["num_problems"] == 4 and stats["num_samples"] == 2
    assert 0.0 <= stats["accuracy"]["overall"] <= 1.0
    assert set(stats["accuracy"]["by_num_steps"]) <= {"2", "3", "4"}
    assert stats["lengths"]["max"] <= 8
    assert {"mean", "median", "p90", "p99", "max"} <= set(stats["lengths"])
    assert {"fraction_truncated", "mean_within_prompt_std", "prompt_explained_variance"} <= set(stats)
    # Not the shipped policy: nothing to check against, and the output says so.
    assert stats["check"] == {"skipped": "the measured policy is not the one shipped with lenvm-rl"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("expected ranges not checked")
