"""lenvm_rl.trainers.reward_funcs and PPOTrainer's scoring step: reward outputs are validated where they are produced."""

import logging

import numpy as np
import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer
from lenvm_rl.trainers.reward_funcs import rewards_to_tensor


def test_rewards_to_tensor_accepts_numbers_none_nan_and_arrays():
    expected = torch.tensor([1.0, float("nan"), 0.5, 1.0])
    for output in ([1, None, 0.5, True], (1.0, float("nan"), np.float64(0.5), 1), np.array([1.0, np.nan, 0.5, 1.0])):
        torch.testing.assert_close(rewards_to_tensor(output, 4, "f", "update 0"), expected, equal_nan=True)


@pytest.mark.parametrize(
    "output, message",
    [
        ([1.0, float("inf")], r"returned inf for completion 1 at update 3"),
        ([1.0, "1.0"], r"returned '1.0' \(str\) for completion 1"),
        ([1.0, [1.0]], r"returned \[1.0\] \(list\) for completion 1"),
        ([1.0], r"returned 1 rewards for 2 completions"),
        (None, r"returned NoneType None"),
        ("1.0", r"returned str"),
        (1.0, r"returned float 1.0"),
        (torch.ones(2, 1), r"returned Tensor"),
    ],
)
def test_rewards_to_tensor_rejects_bad_outputs_naming_function_row_and_update(output, message):
    with pytest.raises(ValueError, match=rf"Reward function 'my_reward' {message}"):
        rewards_to_tensor(output, 2, "my_reward", "update 3")


def make_trainer(tmp_path, reward, **kwargs):
    tokenizer = make_tiny_tokenizer()
    args = PPOConfig(
        output_dir=str(tmp_path / "ppo"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        total_episodes=4,
        response_length=4,
        num_ppo_epochs=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **kwargs,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} ?"}]} for i in range(4)])
    return PPOTrainer(args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[reward], train_dataset=dataset)


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_an_infinite_reward_stops_the_run_before_the_policy_changes(tmp_path):
    def one_inf(completions, **kwargs):
        return [float("inf")] + [1.0] * (len(completions) - 1)

    trainer = make_trainer(tmp_path, one_inf)
    before = snapshot(trainer.model)
    with pytest.raises(ValueError, match="Reward function 'one_inf' returned inf for completion 0 at update 0"):
        trainer.train()
    assert all(torch.equal(before[name], tensor) for name, tensor in trainer.model.state_dict().items())


def test_rows_no_reward_function_scored_warn_and_score_zero(tmp_path, caplog):
    def abstain(completions, **kwargs):
        return [None] * len(completions)

    trainer = make_trainer(tmp_path, abstain)
    with caplog.at_level(logging.WARNING, logger="lenvm_rl.trainers.ppo"):
        trainer.train()
    assert "Every reward function returned None for 2 of 2 completions at update 0" in caplog.text
    assert trainer.state.log_history[0]["objective/scores"] == 0.0


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(total_episodes=0), "--total_episodes"),
        (dict(total_episodes=-4), "--total_episodes"),
        (dict(stop_token_id=-1), "--stop_token_id"),
        (dict(kl_coef=float("nan")), "--kl_coef"),
        (dict(vf_coef=-1.0), "--vf_coef"),
        (dict(missing_eos_penalty=float("inf")), "--missing_eos_penalty"),
    ],
)
def test_config_rejects_values_that_make_no_sense(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        PPOConfig(output_dir=str(tmp_path), **kwargs)


def test_a_stop_token_outside_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--stop_token_id 99999 is not a token of the policy"):
        make_trainer(tmp_path, lambda completions, **kwargs: [1.0] * len(completions), stop_token_id=99999)


def test_a_task_reward_without_variance_warns(tmp_path, caplog):
    def always_one(completions, **kwargs):
        return [1.0] * len(completions)

    with caplog.at_level(logging.WARNING, logger="lenvm_rl.trainers.ppo"):
        make_trainer(tmp_path, always_one).train()
    assert "All 2 task scores of update 0 equal 1" in caplog.text and "no variance" in caplog.text
    assert caplog.text.count("no variance") == 1  # not repeated every update
