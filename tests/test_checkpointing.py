"""lenvm_rl.trainers.checkpointing: a checkpoint killed while being written is skipped by every resume path."""

import errno
import io
import json
import logging
import os
import shutil

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.trainers.checkpointing import (
    CHECKPOINT_COMPLETE_NAME,
    checkpoint_problem,
    last_complete_checkpoint,
    naming_disk_full,
)
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


def test_a_marked_checkpoint_whose_files_were_truncated_is_skipped(tmp_path, caplog):
    """The marker records every file's size and safetensors header: a checkpoint cut short after it was marked (a
    copy that stopped, a disk that filled) is skipped like a half-written one, naming the file."""
    make_trainer(tmp_path / "run", total_episodes=4).train()
    weights = tmp_path / "run" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-1")
    assert f"{weights} has {weights.stat().st_size} bytes" in caplog.text
    with pytest.raises(ValueError, match=rf"checkpoint-2 is not a complete checkpoint \({weights} has"):
        make_trainer(tmp_path / "run", total_episodes=4).train(resume_from_checkpoint=str(weights.parent))

    # Same size, another header (the file of another checkpoint copied over it).
    marker = json.loads((tmp_path / "run" / "checkpoint-1" / CHECKPOINT_COMPLETE_NAME).read_text())
    assert marker["files"]["model.safetensors"]["safetensors_header_sha256"]
    other = tmp_path / "run" / "checkpoint-1" / "value_model" / "model.safetensors"
    with open(other, "r+b") as file:
        file.seek(10)
        file.write(b"X")
    assert "has another safetensors header" in checkpoint_problem(tmp_path / "run" / "checkpoint-1")


class FullDiskFile(io.BytesIO):
    """A file on a full disk: every write fails with ENOSPC, as the kernel reports it (a real full file system is
    tests/test_fault_injection.py's, which needs a tmpfs mount)."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_the_intact_previous_checkpoint(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / CHECKPOINT_COMPLETE_NAME).write_text('{"global_step": 1}')
    with pytest.raises(OSError) as error:
        with naming_disk_full(tmp_path / "checkpoint-2", tmp_path):
            torch.save({"exp_avg": torch.zeros(1000)}, FullDiskFile())
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(
        f"[Errno 28] no space left on device while writing {tmp_path / 'checkpoint-2'}; the previous checkpoint "
        f"{tmp_path / 'checkpoint-1'} is intact."
    )
    with pytest.raises(KeyError):  # anything else passes through
        with naming_disk_full(tmp_path / "checkpoint-2", tmp_path):
            {}["missing"]
