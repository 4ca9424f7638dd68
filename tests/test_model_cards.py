"""Model cards: the text builders, the LenVM card written by save_pretrained / push_to_hub, LenVMTrainer's metrics."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.model_cards import lenvm_model_card, policy_model_card
from lenvm_rl.modeling import LENVM_CONFIG_NAME, LengthValueModel
from lenvm_rl.trainers.lenvm import LenVMConfig, LenVMTrainer


@pytest.fixture()
def lenvm():
    return LengthValueModel.from_backbone(
        make_tiny_causal_lm("qwen2", seed=1), gamma=0.99, generator_model="Qwen/Qwen2.5-0.5B", data_description="gsm8k"
    )


def test_policy_card_links_hub_ids_and_names_local_paths(tmp_path):
    common = dict(model_name="run", dataset_name=None, model_id="me/run", tags=["ppo"], trainer_name="PPOTrainer")
    card = policy_model_card(base_model="Qwen/Qwen2.5-0.5B", facts={"gamma": 1.0}, **common)
    assert "base_model: Qwen/Qwen2.5-0.5B" in card and "[Qwen/Qwen2.5-0.5B](https://huggingface.co/Qwen" in card
    assert "| gamma | 1 |" in card and 'model="me/run"' in card and "datasets:" not in card
    local = policy_model_card(base_model=str(tmp_path), facts={}, **common)
    assert "base_model" not in local and f"fine-tuned version of `{tmp_path}`" in local


def test_lenvm_card_facts():
    card = lenvm_model_card("lenvm", "Qwen/Qwen2.5-0.5B", "qwen2", "policy-x", 0.997, None, {"mre": 0.25})
    assert "base_model: Qwen/Qwen2.5-0.5B" in card and "| gamma | 0.997 |" in card
    assert "| horizon `1 / (1 - gamma)` | 333 tokens |" in card and "| training data | not recorded |" in card
    assert "## Evaluation" in card and "| mre | 0.25 |" in card and "2604.27039" in card
    assert 'from_pretrained("path/to/lenvm")' in card


def test_save_pretrained_writes_the_card_and_records_metrics(tmp_path, lenvm):
    target = tmp_path / "my-lenvm"
    lenvm.save_pretrained(target, tokenizer=make_tiny_tokenizer(), metrics={"prompt_mre": torch.tensor(0.125)})
    metadata = json.loads((target / LENVM_CONFIG_NAME).read_text())
    assert metadata["metrics"] == {"prompt_mre": 0.125} and "README.md" in metadata["files"]
    card = (target / "README.md").read_text()
    assert (
        "# Length Value Model my-lenvm" in card
        and "| generator model (whose completion lengths it predicts) | Qwen/Qwen2.5-0.5B |" in card
    )
    assert "(qwen2)" in card and "| training data | gsm8k |" in card and "| prompt_mre | 0.125 |" in card

    reloaded = LengthValueModel.from_pretrained(target)  # the card and metrics do not disturb loading
    reloaded.save_pretrained(target)  # metrics describe the weights they were measured on: not carried over
    assert "metrics" not in json.loads((target / LENVM_CONFIG_NAME).read_text())
    assert "## Evaluation" not in (target / "README.md").read_text()


def test_bad_metrics_are_refused_before_anything_is_written(tmp_path, lenvm):
    with pytest.raises(ValueError, match="`metrics` must map names to numbers"):
        lenvm.save_pretrained(tmp_path / "out", metrics={"mre": "low"})
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_saved_folder(lenvm, monkeypatch):
    """huggingface_hub mocked at its two network calls; everything else is the real save."""
    from huggingface_hub import HfApi, RepoUrl

    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private, exist_ok)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["upload_folder"] = (repo_id, folder, commit_message, revision, files, (folder / "README.md").read_text())
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    result = lenvm.push_to_hub("me/tiny-lenvm", tokenizer=make_tiny_tokenizer(), metrics={"eval_loss": 0.5})

    assert result == "commit-info" and calls["create_repo"] == ("me/tiny-lenvm", None, True)
    repo_id, folder, message, revision, files, card = calls["upload_folder"]
    assert (repo_id, message, revision) == ("me/tiny-lenvm", "Upload Length Value Model", None)
    assert {"README.md", LENVM_CONFIG_NAME, "value_head.safetensors", "model.safetensors", "tokenizer.json"} <= set(
        files
    )
    assert 'snapshot_download("me/tiny-lenvm")' in card and "| eval_loss | 0.5 |" in card
    assert not folder.exists()  # the temporary folder is gone


def test_lenvm_trainer_saves_its_last_evaluation(tmp_path):
    g = torch.Generator().manual_seed(0)
    records = Dataset.from_list(
        [
            {
                "prompt_id": i,
                "prompt_ids": torch.randint(10, 150, (4,), generator=g).tolist(),
                "completion_ids": [*torch.randint(10, 150, (2 + i % 3,), generator=g).tolist(), 1],
                "finish_reason": "stop",
            }
            for i in range(8)
        ]
    )
    args = LenVMConfig(
        output_dir=str(tmp_path / "run"),
        gamma=0.9,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        num_train_epochs=1,
        eval_strategy="epoch",
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm("llama"), gamma=0.9)
    trainer = LenVMTrainer(lenvm, args=args, train_dataset=records, eval_dataset=records)
    trainer.train()
    trainer.save_model(str(tmp_path / "lenvm"))
    metrics = json.loads((tmp_path / "lenvm" / LENVM_CONFIG_NAME).read_text())["metrics"]
    assert metrics["eval_loss"] == pytest.approx(trainer.state.log_history[-2]["eval_loss"])
    assert "| eval_loss |" in (tmp_path / "lenvm" / "README.md").read_text()
