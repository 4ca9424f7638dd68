import json
from pathlib import Path

import pytest
from datasets import Dataset

import lenvm_rl.data
from lenvm_rl.data import DEFAULT_INSTRUCTION, load_gsm8k, make_conversational_prompt, prepare_prompt_dataset
from lenvm_rl.rewards import gsm8k_accuracy_reward

GSM8K_DIR = Path(__file__).parents[1] / ".." / "shared" / "data" / "gsm8k"
ROWS = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A pen costs $2. How much do 4 pens cost?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_shared_gsm8k_jsonl():
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.skip(f"GSM8K data not found at {GSM8K_DIR.resolve()}")
    dataset = load_gsm8k(str(GSM8K_DIR / "test.jsonl"))
    assert len(dataset) == 1319
    assert dataset.column_names == ["question", "answer"]
    assert dataset[0]["answer"].endswith("#### 18")
    # a directory resolves `{split}.jsonl`
    assert len(load_gsm8k(str(GSM8K_DIR), split="test")) == 1319


def test_load_local_directory_layouts(tmp_path):
    write_jsonl(tmp_path / "flat" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "flat" / "test.jsonl", ROWS[:1])
    assert load_gsm8k(str(tmp_path / "flat"))["answer"] == [row["answer"] for row in ROWS]
    assert len(load_gsm8k(str(tmp_path / "flat"), split="test")) == 1

    # the hub repository's layout: `{config}/{split}-00000-of-00001.parquet`
    (tmp_path / "hub" / "main").mkdir(parents=True)
    Dataset.from_list(ROWS).to_parquet(tmp_path / "hub" / "main" / "train-00000-of-00001.parquet")
    dataset = load_gsm8k(str(tmp_path / "hub"), split="train", config_name="main")
    assert dataset["question"] == [row["question"] for row in ROWS]


def test_load_missing_split_or_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match="No 'validation' split"):
        load_gsm8k(str(tmp_path), split="validation")
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        load_gsm8k(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        load_gsm8k("./no/such/dir")  # a relative path is never taken for a hub id


def test_load_rejects_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "1 + 1?", "solution": "#### 2"}])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['question', 'answer'\]"):
        load_gsm8k(str(path))
    path = write_jsonl(tmp_path / "half.jsonl", [{"question": "1 + 1?", "solution": "#### 2"}])
    with pytest.raises(ValueError, match=r"\['answer'\]"):
        load_gsm8k(str(path))


def test_load_refuses_empty_files_and_duplicate_ids(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.jsonl'} holds no rows"):  # was a bare StopIteration
        load_gsm8k(str(tmp_path))
    rows = [{"id": "a", **ROWS[0]}, {"id": "b", **ROWS[0]}, {"id": "a", **ROWS[0]}]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(ValueError, match=r"1 ids on several rows, e.g. \['a'\]"):  # was blamed on mixed shards later
        load_gsm8k(str(path))


def test_load_unsupported_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("question,answer\n1 + 1?,#### 2\n")
    with pytest.raises(ValueError, match="use a .jsonl, .json or .parquet file"):
        load_gsm8k(str(path))


def test_load_hub_id_goes_to_load_dataset(monkeypatch):
    """A name that is not a local path is read from the hub with the config and split (no network here)."""
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_list(ROWS)

    monkeypatch.setattr(lenvm_rl.data, "load_dataset", fake_load_dataset)
    assert len(load_gsm8k()) == 2
    assert len(load_gsm8k("openai/gsm8k", split="test", config_name="socratic")) == 2
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"}), (("openai/gsm8k", "socratic"), {"split": "test"})]


def test_make_conversational_prompt():
    question = ROWS[0]["question"]
    assert make_conversational_prompt(question) == [{"role": "user", "content": question}]
    assert make_conversational_prompt(question, system_prompt="You are a tutor.", instruction="Show your work.") == [
        {"role": "system", "content": "You are a tutor."},
        {"role": "user", "content": question + "\n\nShow your work."},
    ]


def test_prepare_prompt_dataset_default_instruction():
    dataset = prepare_prompt_dataset(Dataset.from_list(ROWS))
    assert dataset.column_names == ["question", "answer", "prompt"]  # `answer` stays for the reward functions
    assert dataset["answer"] == [row["answer"] for row in ROWS]
    for row, prompt in zip(ROWS, dataset["prompt"]):
        assert prompt == [{"role": "user", "content": row["question"] + "\n\n" + DEFAULT_INSTRUCTION}]
    assert "step by step" in DEFAULT_INSTRUCTION and "#### <number>" in DEFAULT_INSTRUCTION


def test_prepare_prompt_dataset_options():
    dataset = prepare_prompt_dataset(Dataset.from_list(ROWS), system_prompt="Be concise.", instruction=None)
    assert dataset[1]["prompt"] == [
        {"role": "system", "content": "Be concise."},
        {"role": "user", "content": ROWS[1]["question"]},
    ]


def test_prepare_prompt_dataset_renders_with_chat_template(tiny_tokenizer):
    """The prompt column is what TRL renders with `apply_chat_template`."""
    prompt = prepare_prompt_dataset(Dataset.from_list(ROWS), system_prompt="Be concise.")[0]["prompt"]
    text = tiny_tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|system|> Be concise. <|end|> <|user|> Tom has 3 apples")
    assert text.endswith('"#### <number>". <|end|> <|assistant|> ')


def test_prepare_prompt_dataset_rejects_missing_question():
    with pytest.raises(ValueError, match="'question' column"):
        prepare_prompt_dataset(Dataset.from_list([{"problem": "1 + 1?", "answer": "#### 2"}]))


def test_columns_reach_the_reward_function():
    """What GRPO does with a batch: every column but `prompt` becomes a reward-function keyword argument."""
    batch = prepare_prompt_dataset(Dataset.from_list(ROWS))[:]
    columns = {key: value for key, value in batch.items() if key != "prompt"}
    rewards = gsm8k_accuracy_reward(prompts=batch["prompt"], completions=["#### 5", "#### 9"], **columns)
    assert rewards == [1.0, 0.0]


def test_prompt_format_round_trip_and_the_rl_check(caplog):
    import logging

    from lenvm_rl.data import check_prompt_format, prompt_format_of

    messages = make_conversational_prompt("What is 2 + 3?", None, "End with #### N.")
    lenvm_format = prompt_format_of(messages, "What is 2 + 3?")
    assert lenvm_format == {"system_prompt": None, "instruction": "End with #### N."}
    assert prompt_format_of("a text prompt", "q") is None and prompt_format_of(messages, "Another question") is None
    with caplog.at_level(logging.WARNING, logger="lenvm_rl.data"):
        check_prompt_format(lenvm_format, None, "End with #### N.")
        assert not caplog.text
        check_prompt_format(lenvm_format, None, None)  # the RL prompts drop the instruction
    assert "--instruction (LenVM: 'End with #### N.', here: None)" in caplog.text
