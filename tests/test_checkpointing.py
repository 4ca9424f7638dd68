"""lenvm_rl.trainers.checkpointing: a checkpoint killed while being written is skipped by every resume path."""

import logging
import os
import shutil

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.trainers.checkpointing import CHECKPOINT_COMPLETE_NAME, last_complete_checkpoint
from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer


def reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def make_trainer(output_dir, total_episodes=6):
    args = PPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        total_episodes=total_episodes,
        response_length=4,
        num_ppo_epochs=1,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} ?"}]} for i in range(6)])
    return PPOTrainer(
        args, make_tiny_tokenizer(), make_tiny_causal_lm("llama"), reward_funcs=[reward], train_dataset=dataset
    )


def params(trainer):
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def kill_while_writing(checkpoint):
    """What a SIGKILL during `_save_checkpoint` leaves: the model written, the states and the marker not."""
    for name in ("trainer_state.json", "rng_state.pth", "scheduler.pt", CHECKPOINT_COMPLETE_NAME):
        (checkpoint / name).unlink(missing_ok=True)


def test_every_checkpoint_is_marked_complete_and_resume_skips_a_half_written_one(tmp_path, caplog):
    reference = make_trainer(tmp_path / "reference")
    reference.train()
    expected = params(reference)
    assert all((tmp_path / "reference" / f"checkpoint-{n}" / CHECKPOINT_COMPLETE_NAME).is_file() for n in (1, 2, 3))

    run = tmp_path / "run"
    shutil.copytree(tmp_path / "reference", run)
    kill_while_writing(run / "checkpoint-3")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(run) == str(run / "checkpoint-2")
    assert "Skipping incomplete checkpoint(s)" in caplog.text and "checkpoint-3" in caplog.text

    resumed = make_trainer(run)
    resumed.train(resume_from_checkpoint=True)  # transformers alone would pick checkpoint-3 and fail
    assert resumed.state.global_step == 3
    assert all(torch.equal(expected[name], tensor) for name, tensor in params(resumed).items())
    assert (run / "checkpoint-3" / CHECKPOINT_COMPLETE_NAME).is_file()  # rewritten whole


def test_an_explicit_incomplete_checkpoint_is_refused(tmp_path):
    trainer = make_trainer(tmp_path / "run", total_episodes=2)
    trainer.train()
    kill_while_writing(tmp_path / "run" / "checkpoint-1")
    with pytest.raises(ValueError, match="checkpoint-1 is not a complete checkpoint"):
        make_trainer(tmp_path / "run", total_episodes=2).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1")
        )


def test_no_complete_checkpoint_starts_from_scratch(tmp_path, caplog):
    os.makedirs(tmp_path / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path) is None
    assert "No complete checkpoint" in caplog.text
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_older_checkpoints_are_rotated_out_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    """save_total_limit=1: a crash between writing checkpoint-N and marking it complete keeps checkpoint-(N-1)."""
    from lenvm_rl.trainers import checkpointing

    trainer = make_trainer(tmp_path / "run", total_episodes=4)
    trainer.args.save_total_limit = 1
    real_write = checkpointing.write_json_atomic

    def crash_on_second_marker(path, obj, *args, **kwargs):
        if obj["global_step"] == 2:
            raise KeyboardInterrupt("killed before the marker")
        return real_write(path, obj, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "write_json_atomic", crash_on_second_marker)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-1")
