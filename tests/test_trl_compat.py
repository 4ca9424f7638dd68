"""The TRL-compatible surface of our trainers: half-swapped GRPO scripts, and the members TRL 1.12's PPOTrainer had."""

import logging
from dataclasses import dataclass

import pytest
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from trl import GRPOConfig

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.trainers import lenvm_grpo
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def word_count_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def prompt_dataset(num=4):
    return Dataset.from_list([{"prompt": f"what is {i} + {i} ?"} for i in range(num)])


# ---------------------------------------------------------------------------------------------------------------- GRPO


def test_grpo_trainer_converts_a_plain_grpo_config(tmp_path, tokenizer, caplog):
    """Swapping only the trainer: TRL's config is kept value for value, the length fields take their defaults."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,  # GRPOConfig fills in generation_batch_size; re-running its checks would refuse both
        max_completion_length=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    with caplog.at_level(logging.WARNING, logger="lenvm_rl"):
        trainer = LenVMGRPOTrainer(
            model=make_tiny_causal_lm("llama"),
            reward_funcs=word_count_reward,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
            lenvm=LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=3), gamma=0.9),
            lenvm_processing_class=tokenizer,
        )
    assert isinstance(trainer.args, LenVMGRPOConfig)
    assert (trainer.args.learning_rate, trainer.args.generation_batch_size) == (1e-2, 8)
    assert (trainer.args.length_coef, trainer.args.lenvm_model_name_or_path, trainer.args.length_lam) == (
        0.0,
        None,
        1.0,
    )
    assert "length fields at their defaults" in caplog.text and "LenVMGRPOConfig" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 1


@dataclass
class CPUConfig(LenVMGRPOConfig):
    use_cpu: bool = True
    bf16: bool = False


def test_grpo_trainer_without_args_uses_trl_default(tmp_path, tokenizer, monkeypatch):
    """`args=None` gives `LenVMGRPOConfig("<model name>-GRPO")`, as GRPOTrainer gives `GRPOConfig(...)`."""
    policy_dir = tmp_path / "tiny-policy"
    make_tiny_causal_lm("llama").save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    monkeypatch.chdir(tmp_path)
    # GRPOConfig's default bf16=True refuses a machine without a bf16 GPU; GRPOTrainer(args=None) fails there too.
    monkeypatch.setattr(lenvm_grpo, "LenVMGRPOConfig", CPUConfig)
    trainer = LenVMGRPOTrainer(
        model=str(policy_dir),
        reward_funcs=word_count_reward,
        train_dataset=prompt_dataset(8),
        lenvm=LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=3), gamma=0.9),
        lenvm_processing_class=tokenizer,
    )
    assert type(trainer.args) is CPUConfig
    assert trainer.args.output_dir == "tiny-policy-GRPO"


def test_grpo_trainer_refuses_a_config_of_another_trainer(tmp_path, tokenizer):
    from transformers import TrainingArguments

    with pytest.raises(
        ValueError, match="Expected a LenVMGRPOConfig .or a GRPOConfig. as `args`, got TrainingArguments"
    ):
        LenVMGRPOTrainer(
            model=make_tiny_causal_lm("llama"),
            reward_funcs=word_count_reward,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
