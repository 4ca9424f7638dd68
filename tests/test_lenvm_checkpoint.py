"""lenvm_rl.lenvm_checkpoint: malformed LenVM files give errors that name the file, saves never delete a user's files
and an interrupted save is detected at load."""

import json
import os
import stat

import pytest
import torch
from conftest import make_tiny_causal_lm
from safetensors.torch import save_file

from lenvm_rl.lenvm_checkpoint import LENVM_CONFIG_NAME, SAVE_IN_PROGRESS_NAME, VALUE_HEAD_NAME
from lenvm_rl.modeling import LengthValueModel


@pytest.fixture
def lenvm():
    torch.manual_seed(0)
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama"), gamma=0.9)


@pytest.fixture
def saved(tmp_path, lenvm):
    path = tmp_path / "lenvm"
    lenvm.save_pretrained(path)
    return path


def test_truncated_lenvm_config_names_the_file(saved):
    text = (saved / LENVM_CONFIG_NAME).read_text()
    (saved / LENVM_CONFIG_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{LENVM_CONFIG_NAME} is not valid JSON.*--lenvm_gamma"):
        LengthValueModel.from_pretrained(saved)


def test_lenvm_config_of_the_wrong_shape_names_the_file(saved):
    (saved / LENVM_CONFIG_NAME).write_text(json.dumps({"gamma": "0.9"}))
    with pytest.raises(ValueError, match=f"{LENVM_CONFIG_NAME} must hold a JSON object with a numeric 'gamma'"):
        LengthValueModel.from_pretrained(saved)


def test_truncated_value_head_names_the_file(saved):
    data = (saved / VALUE_HEAD_NAME).read_bytes()
    (saved / VALUE_HEAD_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{VALUE_HEAD_NAME} is not a readable safetensors file"):
        LengthValueModel.from_pretrained(saved)


def test_value_head_of_nan_is_refused(saved):
    head = {key: value.clone() for key, value in LengthValueModel.from_pretrained(saved).v_head.state_dict().items()}
    head = {f"v_head.{key}": value for key, value in head.items()}
    head["v_head.summary.bias"][0] = float("nan")
    save_file(head, saved / VALUE_HEAD_NAME)
    with pytest.raises(ValueError, match=r"v_head.summary.bias.*NaN or inf"):
        LengthValueModel.from_pretrained(saved)


def test_interrupted_save_into_an_existing_directory_is_refused_at_load(tmp_path, lenvm, monkeypatch):
    target = tmp_path / "lenvm"
    lenvm.save_pretrained(target)
    real_replace = os.replace
    moved = []

    def crash_after_two(src, dst):
        if moved and len(moved) >= 2:
            raise KeyboardInterrupt("killed mid-save")
        moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        lenvm.save_pretrained(target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (target / SAVE_IN_PROGRESS_NAME).exists()
    with pytest.raises(ValueError, match="unfinished save"):
        LengthValueModel.from_pretrained(target)
    lenvm.save_pretrained(target)  # saving again repairs it
    assert not (target / SAVE_IN_PROGRESS_NAME).exists()
    LengthValueModel.from_pretrained(target)


def test_save_into_an_existing_directory_keeps_every_foreign_file(tmp_path, lenvm):
    target = tmp_path / "out"
    (target / "checkpoint-500").mkdir(parents=True)
    (target / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (target / "trainer_state.json").write_text("{}")
    (target / "notes.safetensors").write_bytes(b"user data")  # a weight-like file the save did not write
    lenvm.save_pretrained(target)
    lenvm.save_pretrained(target, max_shard_size="20KB")  # a second, sharded save replaces the first one's weights
    assert (target / "checkpoint-500" / "trainer_state.json").read_text() == "{}"
    assert (target / "trainer_state.json").read_text() == "{}"
    assert (target / "notes.safetensors").read_bytes() == b"user data"
    manifest = json.loads((target / LENVM_CONFIG_NAME).read_text())["files"]
    assert "model.safetensors" not in manifest and not (target / "model.safetensors").exists()  # its own stale file
    assert not [p for p in target.iterdir() if p.name.startswith(".") and p.is_dir()]  # no leftover staging folder
    LengthValueModel.from_pretrained(target)


def test_save_into_a_directory_that_cannot_be_renamed(tmp_path, lenvm, monkeypatch):
    """A mount point cannot be renamed (EBUSY) nor replaced across file systems (EXDEV): the save must not try."""
    target = tmp_path / "mount"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    real_replace = os.replace

    def refuse_target(src, dst):
        if os.path.abspath(dst) == str(target) or os.path.abspath(src) == str(target):
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_target)
    lenvm.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left next to it
    torch.testing.assert_close(
        LengthValueModel.from_pretrained(target).v_head.summary.weight, lenvm.v_head.summary.weight
    )


def test_saved_files_and_directories_follow_the_umask(tmp_path, lenvm):
    old = os.umask(0o022)
    try:
        lenvm.save_pretrained(tmp_path / "lenvm")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "lenvm").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "lenvm" / LENVM_CONFIG_NAME).stat().st_mode) == 0o644
