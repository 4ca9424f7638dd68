"""recipes/sft.py on a tiny offline model: trains on the completions only, freezes all but the last layers when
asked, saves a plain (merged) model with a completion marker, and leaves a finished directory alone."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from safetensors.torch import load_file
from trl import ModelConfig, SFTConfig, TrlParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from sft import COMPLETE_NAME, SFTScriptArguments, main, sft_dataset  # noqa: E402


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_world")
    tokenizer = make_tiny_tokenizer()
    make_tiny_causal_lm("llama").save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rows = [{"question": f"what is {i} + {i} ?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 9)]
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def parse(tiny_world, output_dir, *extra):
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    return parser.parse_args_into_dataclasses(
        [
            "--model_name_or_path",
            str(tiny_world / "policy"),
            "--dataset_name",
            str(tiny_world / "data"),
            "--output_dir",
            str(output_dir),
            "--per_device_train_batch_size",
            "4",
            "--max_steps",
            "2",
            "--learning_rate",
            "1e-2",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            *extra,
        ]  # fmt: skip
    )


def test_rows_become_prompt_completion_pairs(tiny_world):
    args = SFTScriptArguments(dataset_name=str(tiny_world / "data"), instruction="Answer.", max_train_samples=3)
    dataset = sft_dataset(args)
    assert len(dataset) == 3 and dataset.column_names == ["prompt", "completion"]
    assert dataset[0]["prompt"] == [{"role": "user", "content": "what is 1 + 1 ?\n\nAnswer."}]
    assert dataset[0]["completion"] == [{"role": "assistant", "content": "1 + 1 = 2\n#### 2"}]


def test_trains_the_last_layers_only_and_saves_a_finished_model(tiny_world, tmp_path):
    output_dir = tmp_path / "sft"
    assert main(*parse(tiny_world, output_dir, "--trainable_layers", "1")) == output_dir
    before = load_file(tiny_world / "policy" / "model.safetensors")
    after = load_file(output_dir / "model.safetensors")
    num_layers = make_tiny_causal_lm("llama").config.num_hidden_layers
    last = f"model.layers.{num_layers - 1}."
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith(last) or name == "model.norm.weight" for name in moved)
    assert json.loads((output_dir / COMPLETE_NAME).read_text())["global_step"] == 2

    # A finished directory is left as it is (recipes/real.sh re-runs every step); another config is refused.
    stamp = (output_dir / "model.safetensors").stat().st_mtime_ns
    assert main(*parse(tiny_world, output_dir, "--trainable_layers", "1")) == output_dir
    with pytest.raises(ValueError, match="training_args.learning_rate: 0.01 -> 1.0"):
        main(*parse(tiny_world, output_dir, "--trainable_layers", "1", "--learning_rate", "1.0"))
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_lora_is_merged_into_a_plain_model(tiny_world, tmp_path):
    output_dir = tmp_path / "sft_lora"
    main(*parse(tiny_world, output_dir, "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj"))
    assert not (output_dir / "adapter_config.json").exists()
    after = load_file(output_dir / "model.safetensors")
    before = load_file(tiny_world / "policy" / "model.safetensors")
    assert set(after) == set(before)  # no lora_A / lora_B left
    assert any(not torch.equal(before[name], after[name]) for name in before if "q_proj" in name)


def test_bad_arguments_name_their_flag(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="--trainable_layers"):
        SFTScriptArguments(dataset_name="x", trainable_layers=0)
    with pytest.raises(ValueError, match="--use_peft"):
        main(*parse(tiny_world, tmp_path / "both", "--use_peft", "true", "--trainable_layers", "1"))
