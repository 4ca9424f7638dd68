"""recipes/train_lenvm.py on tiny offline models: its output directory is a run (never the policy's directory), gamma
is fixed at the first start, and a finished run is not trained again."""

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import make_rollout_records, make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from safetensors.torch import load_file
from trl import ModelConfig, TrlParser

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.trainers.lenvm import LenVMConfig, LenVMTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from train_lenvm import TrainLenVMScriptArguments, main  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lenvm_world")
    make_tiny_causal_lm("llama").save_pretrained(root / "policy")
    make_tiny_tokenizer().save_pretrained(root / "policy")
    chunk = root / "rollouts" / "shard-00000-of-00001" / "chunk-000000.jsonl"
    chunk.parent.mkdir(parents=True)
    chunk.write_text("".join(json.dumps(r) + "\n" for r in make_rollout_records(num_prompts=6, per_prompt=3)))
    return root


def parse(world, output_dir, *flags):
    parser = TrlParser((TrainLenVMScriptArguments, LenVMConfig, ModelConfig))
    return parser.parse_args_and_config(
        [
            f"--model_name_or_path={world / 'policy'}",
            f"--train_rollouts={world / 'rollouts'}",
            f"--output_dir={output_dir}",
            "--per_device_train_batch_size=4",
            "--num_train_epochs=1",
            "--learning_rate=1e-3",
            "--save_strategy=steps",
            "--save_steps=1",
            "--report_to=none",
            "--use_cpu=true",
            "--disable_tqdm=true",
            *flags,
        ]
    )


def test_output_dir_equal_to_the_policy_is_refused_up_front(world):
    before = (world / "policy" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is also --model_name_or_path: a run never writes into its own inputs"):
        main(*parse(world, world / "policy", "--gamma=0.9"))
    assert (world / "policy" / "model.safetensors").read_bytes() == before
    assert not (world / "policy" / "run_manifest.json").exists()


def test_a_lenvm_save_never_replaces_another_models_files(world, tmp_path):
    """In Python, without the recipe: a LenVM saved into a plain model's directory would replace its weights."""
    target = tmp_path / "policy"
    make_tiny_causal_lm("llama").save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=5), gamma=0.9)
    with pytest.raises(ValueError, match=r"Refusing to save a LenVM into .*\['config.json', 'model.safetensors'\]"):
        lenvm.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    trainer = LenVMTrainer(lenvm, args=LenVMConfig(output_dir=str(tmp_path / "x"), report_to="none", use_cpu=True),
                           train_dataset=Dataset.from_list(make_rollout_records()))  # fmt: skip
    with pytest.raises(ValueError, match="no lenvm-rl save wrote there"):
        trainer.save_model(str(target))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_gamma_is_fixed_at_the_first_start(world, tmp_path, monkeypatch, caplog):
    output_dir = tmp_path / "lenvm"
    real_save_checkpoint = LenVMTrainer._save_checkpoint

    def crash_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed before checkpoint-2")
        return real_save_checkpoint(self, model, trial)

    monkeypatch.setattr(LenVMTrainer, "_save_checkpoint", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        main(*parse(world, output_dir))  # gamma: null, chosen by the percentile rule
    monkeypatch.setattr(LenVMTrainer, "_save_checkpoint", real_save_checkpoint)
    gamma = json.loads((output_dir / "run_manifest.json").read_text())["runs"]["train_lenvm"]["resolved"]["gamma"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        main(*parse(world, output_dir))
    assert "percentile" not in caplog.text  # the rule did not run again
    assert LengthValueModel.from_pretrained(output_dir).gamma == gamma

    # Finished: a re-run neither trains nor saves.
    stamp = (output_dir / "value_head.safetensors").stat().st_mtime_ns
    assert main(*parse(world, output_dir)) is None
    assert (output_dir / "value_head.safetensors").stat().st_mtime_ns == stamp
    head = load_file(output_dir / "value_head.safetensors")
    assert head.keys() == {"v_head.fc.weight", "v_head.fc.bias", "v_head.summary.weight", "v_head.summary.bias"}
