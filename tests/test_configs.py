"""Every YAML in recipes/configs parses into its recipe's dataclasses with no unknown key."""

import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser
from trl import ModelConfig, SFTConfig, TrlParser

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from eval_gsm8k import EvalGSM8KArguments  # noqa: E402
from eval_length_control import EvalLengthControlArguments  # noqa: E402
from eval_length_prediction import EvalLengthPredictionArguments  # noqa: E402
from eval_tradeoff import EvalTradeoffArguments  # noqa: E402
from grpo_gsm8k import GRPOScriptArguments  # noqa: E402
from ppo_gsm8k import PPOScriptArguments  # noqa: E402
from sample_rollouts import SampleRolloutsArguments  # noqa: E402
from sft import SFTScriptArguments  # noqa: E402
from train_lenvm import TrainLenVMScriptArguments  # noqa: E402

from lenvm_rl.trainers.lenvm import LenVMConfig  # noqa: E402
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig  # noqa: E402
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig  # noqa: E402

# Config name prefix -> the dataclasses its recipe parses.
RECIPES = {
    "rollouts_": (SampleRolloutsArguments,),
    "lenvm_": (TrainLenVMScriptArguments, LenVMConfig, ModelConfig),
    "eval_length_": (EvalLengthPredictionArguments,),
    "eval_gsm8k_": (EvalGSM8KArguments,),
    "grpo_": (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig),
    "ppo_": (PPOScriptArguments, LenVMPPOConfig, ModelConfig),
    "demo.yaml": (PPOScriptArguments, LenVMPPOConfig, ModelConfig),  # the offline demo world's PPO run
    "demo_vllm.yaml": (PPOScriptArguments, LenVMPPOConfig, ModelConfig),  # the same with vLLM rollouts
    "length_control_": (EvalLengthControlArguments,),
    "tradeoff_": (EvalTradeoffArguments,),
    "sft_": (SFTScriptArguments, SFTConfig, ModelConfig),
}
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def dataclasses_for(path):
    for prefix, types in RECIPES.items():
        if path.name.startswith(prefix):
            return types
    raise AssertionError(f"{path.name}: no recipe registered for this config name in tests/test_configs.py")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_known_keys_only(path):
    types = dataclasses_for(path)
    # GPU-scale configs ask for bf16, which TrainingArguments only accepts on a CPU machine with use_cpu.
    cpu = ["--use_cpu", "true"] if any(hasattr(t, "use_cpu") for t in types) else []
    parsed = TrlParser(types).parse_args_and_config(["--config", str(path), *cpu])
    assert all(parsed)


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "rollouts_bad.yaml"
    bad.write_text("model_name_or_path: x\noutput_dir: y\nnum_sampels: 3\n")
    with pytest.raises(ValueError, match="num_sampels"):
        TrlParser(dataclasses_for(bad)).parse_args_and_config(["--config", str(bad)])


@pytest.mark.parametrize("arguments_class", [PPOScriptArguments, GRPOScriptArguments, SampleRolloutsArguments])
def test_instruction_null_on_the_command_line_disables_it(arguments_class):
    required = ["--model_name_or_path", "m", "--output_dir", "o"] if arguments_class is SampleRolloutsArguments else []
    (args,) = HfArgumentParser(arguments_class).parse_args_into_dataclasses(
        [*required, "--instruction", "null", "--system_prompt", "None"]
    )
    assert args.instruction is None and args.system_prompt is None


# Sizes and counts of 0 (or below a field's minimum) failed later with an error naming neither the flag nor the
# problem (ZeroDivisionError, StopIteration, `range() arg 3 must not be zero`), or trained on nothing.
SIZES = [
    (PPOScriptArguments, {}, "max_train_samples", 0),
    (PPOScriptArguments, {}, "eval_batch_size", 0),
    (PPOScriptArguments, {}, "num_eval_problems", -1),
    (GRPOScriptArguments, {}, "max_train_samples", 0),
    (GRPOScriptArguments, {}, "eval_batch_size", 0),
    (SampleRolloutsArguments, {"model_name_or_path": "m", "output_dir": "o"}, "num_prompts", 0),
    (SampleRolloutsArguments, {"model_name_or_path": "m", "output_dir": "o"}, "chunk_size", 0),
    (SampleRolloutsArguments, {"model_name_or_path": "m", "output_dir": "o"}, "num_samples", 0),
    (SampleRolloutsArguments, {"model_name_or_path": "m", "output_dir": "o"}, "batch_size", -4),
    (EvalGSM8KArguments, {"model_name_or_path": "m", "output_dir": "o"}, "num_problems", 0),
    (EvalGSM8KArguments, {"model_name_or_path": "m", "output_dir": "o"}, "batch_size", 0),
    (EvalLengthPredictionArguments, {"lenvm_path": "l", "eval_rollouts": "e", "output_dir": "o"}, "max_length", 1),
    (EvalLengthControlArguments, {"policy_path": "p", "lenvm_path": "l", "output_dir": "o"}, "num_problems", 0),
    (EvalTradeoffArguments, {"policy_path": "p", "lenvm_path": "l", "output_dir": "o"}, "num_samples", 0),
]


@pytest.mark.parametrize(
    "arguments_class, required, name, value", SIZES, ids=[f"{c.__name__}-{n}" for c, _, n, _ in SIZES]
)
def test_sizes_and_counts_below_their_minimum_name_the_flag(arguments_class, required, name, value):
    with pytest.raises(ValueError, match=f"--{name} must be at least"):
        arguments_class(**required, **{name: value})


def test_lenvm_windows_without_a_completion_token_are_refused():
    for max_length in (0, 1):  # 0 targets: an untrained LenVM would have been saved
        with pytest.raises(ValueError, match="--max_length must be at least 2"):
            LenVMConfig(output_dir="o", max_length=max_length)
    with pytest.raises(ValueError, match="--max_prompt_length must be at least 1"):
        LenVMConfig(output_dir="o", max_prompt_length=0)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("top_p", 0.0, "--top_p must be in"),
        ("top_p", 1.5, "--top_p must be in"),
        ("vllm_gpu_memory_utilization", 0.0, "--vllm_gpu_memory_utilization must be in"),
        ("vllm_gpu_memory_utilization", 1.2, "--vllm_gpu_memory_utilization must be in"),
        ("vllm_tensor_parallel_size", 0, "--vllm_tensor_parallel_size must be at least 1"),
        ("vllm_max_model_length", 1024, "--vllm_max_model_length \\(1024\\) must exceed --max_new_tokens"),
    ],
)
def test_sampler_engine_settings_out_of_range_are_refused_before_an_engine_starts(name, value, message):
    with pytest.raises(ValueError, match=message):
        SampleRolloutsArguments(model_name_or_path="m", output_dir="o", max_new_tokens=1024, **{name: value})


def test_non_finite_sampling_parameters_are_refused():
    with pytest.raises(ValueError, match="--temperature must be a finite number"):
        SampleRolloutsArguments(model_name_or_path="m", output_dir="o", temperature=float("nan"))
    with pytest.raises(ValueError, match="--top_p must be in"):
        SampleRolloutsArguments(model_name_or_path="m", output_dir="o", top_p=float("nan"))
    with pytest.raises(ValueError, match="--betas must be finite"):
        EvalTradeoffArguments(policy_path="p", lenvm_path="l", output_dir="o", betas=[0.0, float("-inf")])
