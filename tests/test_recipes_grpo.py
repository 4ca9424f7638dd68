"""recipes/grpo_gsm8k.py end to end on tiny offline models, and its YAML configs."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import LoadingThePolicy, make_tiny_causal_lm, make_tiny_tokenizer, prompt_check_setup
from safetensors import safe_open
from trl import ModelConfig, TrlParser

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import grpo_gsm8k  # noqa: E402
from grpo_gsm8k import GRPOScriptArguments, length_penalty_reward, main  # noqa: E402

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("grpo_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_configs_parse_with_known_keys_only(path):
    # GPU-scale configs ask for bf16, which TrainingArguments only accepts on a CPU machine with use_cpu.
    parser = TrlParser((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "true"])
    assert training_args.lenvm_model_name_or_path and training_args.length_coef > 0
    assert model_args.model_name_or_path


def test_length_penalty_reward():
    assert length_penalty_reward(0.5)(completion_ids=[[1, 2, 3], [4]]) == [-1.5, -0.5]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A policy, a LenVM and GSM8K-format train/test files, all tiny and offline."""
    root = tmp_path_factory.mktemp("grpo_world")
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm("llama")
    policy.generation_config.eos_token_id = 1
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(7)
    LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=7), gamma=0.9).save_pretrained(
        root / "lenvm", tokenizer=tokenizer
    )
    for split, numbers in (("train", range(1, 9)), ("test", range(20, 24))):
        rows = [{"question": f"what is {i} + {i} ?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in numbers]
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_main_trains_saves_and_writes_results(tiny_world, tmp_path):
    output_dir = tmp_path / "run"
    config = tmp_path / "grpo_tiny.yaml"
    config.write_text(
        f"""
model_name_or_path: {tiny_world / "policy"}
dataset_name: {tiny_world / "data"}
instruction: null
num_eval_problems: 4
length_penalty_coef: 0.01
soft_overlong_cache: 2
soft_overlong_max_length: 4
lenvm_model_name_or_path: {tiny_world / "lenvm"}
length_coef: 0.5
output_dir: {output_dir}
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 6
max_steps: 2
learning_rate: 1.0e-2
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
disable_tqdm: true
"""
    )
    parser = TrlParser((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(config)])
    assert script_args.instruction is None
    trainer, results = main(script_args, training_args, model_args)

    assert type(trainer).__name__ == "LenVMGRPOTrainer" and trainer.state.global_step == 2
    assert json.loads((output_dir / "results.json").read_text()) == results
    for stage in ("before", "after"):
        assert set(results[stage]) == {
            "accuracy",
            "mean_tokens",
            "truncated_frac",
            "lengths",
            "correct",
            "num_problems",
            "num_samples",
        }
        assert 1 <= results[stage]["mean_tokens"] <= 6
    rewards = {key for key in results["last_log"] if key.startswith("rewards/")}
    assert {"rewards/gsm8k_accuracy_reward/mean", "rewards/length_penalty_reward/mean"} <= rewards
    assert "rewards/soft_overlong_punishment_reward/mean" in rewards
    assert (results["soft_overlong_cache"], results["soft_overlong_max_length"]) == (2, 4)
    assert "length/coef" in results["last_log"]
    with safe_open(output_dir / "model.safetensors", framework="pt") as handle:
        assert not [key for key in handle.keys() if "v_head" in key]  # the policy only
    assert not (output_dir / "value_head.safetensors").exists()

    # Finished: a re-run does nothing; --reevaluate evaluates the saved policy again (the same numbers).
    stamp = (output_dir / "model.safetensors").stat().st_mtime_ns
    assert main(*parser.parse_args_and_config(["--config", str(config)])) == (None, results)
    again = main(*parser.parse_args_and_config(["--config", str(config), "--reevaluate", "true"]))[1]
    assert again["after"] == results["after"] and again["global_step"] == 2
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == stamp


def write_launch_config(path, tiny_world, output_dir, **overrides):
    settings = {
        "model_name_or_path": tiny_world / "policy",
        "dataset_name": tiny_world / "data",
        "instruction": "null",
        "num_eval_problems": 4,
        "lenvm_model_name_or_path": tiny_world / "lenvm",
        "length_coef": 0.5,
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "max_steps": 2,
        "learning_rate": 1.0e-2,
        "save_strategy": '"no"',
        "report_to": "none",
        "use_cpu": "true",
        "bf16": "false",
        "disable_tqdm": "true",
        **overrides,
    }
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items() if value != "<unset>"))
    return path


def check_two_process_run(output_dir, distributed_type):
    """Two processes trained together and the main process alone evaluated (the whole policy) and wrote results."""
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2 and results["distributed_type"] == distributed_type
    assert results["trainer"] == "LenVMGRPOTrainer" and results["global_step"] == 2
    for stage in ("before", "after"):
        assert 0.0 <= results[stage]["accuracy"] <= 1.0 and 1 <= results[stage]["mean_tokens"] <= 6


@pytest.mark.distributed
def test_accelerate_launch_ddp(tiny_world, tmp_path):
    from test_recipes_ppo import launch

    output_dir = tmp_path / "run"
    launch("cpu_ddp.yaml", write_launch_config(tmp_path / "grpo_ddp.yaml", tiny_world, output_dir), use_cpu=True,
           recipe="grpo_gsm8k.py")  # fmt: skip
    check_two_process_run(output_dir, "DistributedType.MULTI_CPU")


@pytest.mark.distributed
def test_accelerate_launch_zero3(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")  # in the `dev` extra
    from test_recipes_ppo import launch

    output_dir = tmp_path / "run"
    config = write_launch_config(tmp_path / "grpo_zero3.yaml", tiny_world, output_dir, use_cpu="<unset>",
                                 ddp_backend="gloo")  # fmt: skip
    launch("cpu_zero3.yaml", config, use_cpu=False, recipe="grpo_gsm8k.py")
    check_two_process_run(output_dir, "DistributedType.DEEPSPEED")
    # The policy was gathered from its ZeRO-3 shards into a whole, loadable checkpoint.
    with safe_open(output_dir / "model.safetensors", framework="pt") as handle:
        assert all(handle.get_slice(key).get_shape() != [0] for key in handle.keys())


# ---------------------------------------------------------------------------------------------------------------------
# The prompt-format check


@pytest.mark.parametrize("instruction, warned", [("End.", False), ("Think first.", True), ("null", True)])
def test_main_warns_when_its_prompts_are_not_the_lenvms(tmp_path, monkeypatch, caplog, instruction, warned):
    flags = prompt_check_setup(tmp_path, monkeypatch, grpo_gsm8k)
    parser = TrlParser((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig))
    args = parser.parse_args_and_config([*flags, f"--instruction={instruction}", "--use_cpu=true", "--bf16=false"])
    with caplog.at_level("WARNING", logger="lenvm_rl.data"), pytest.raises(LoadingThePolicy):
        main(*args)
    assert ("not built like the LenVM's training prompts" in caplog.text) == warned
    assert ("--instruction (LenVM: 'End.'" in caplog.text) == warned


def test_soft_overlong_arguments_are_checked():
    assert GRPOScriptArguments(soft_overlong_cache=16, soft_overlong_max_length=48).soft_overlong_max_length == 48
    with pytest.raises(ValueError, match="needs --soft_overlong_cache"):
        GRPOScriptArguments(soft_overlong_max_length=48)
    with pytest.raises(ValueError, match="must exceed --soft_overlong_cache"):
        GRPOScriptArguments(soft_overlong_cache=48, soft_overlong_max_length=48)
    with pytest.raises(ValueError, match="--soft_overlong_cache must be >= 1"):
        GRPOScriptArguments(soft_overlong_cache=0)
