"""What lenvm-rl does before a vLLM engine exists: the CPU environment, the import and its errors, the rollout
engine checks. Runs in the default suite (no engine); the engine itself is tested in tests/test_vllm_engine.py."""

import json
import sys

import pytest
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl import vllm_engine
from lenvm_rl.rollouts import SamplingConfig, sample_rollouts


def test_cpu_environment_is_set_unless_the_user_set_it(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # the user's choice
    monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: False)
    applied = vllm_engine.configure_vllm_environment()
    assert applied == {"VLLM_CPU_KVCACHE_SPACE": "2"}
    assert vllm_engine.os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    assert vllm_engine.configure_vllm_environment() == {}  # idempotent


def test_a_broken_torchvision_gives_the_fix(tmp_path, monkeypatch):
    """vllm-cpu pulls a CUDA torchvision whose operators do not load beside the CPU torch; `import vllm` then fails
    with a RuntimeError deep in torchvision. A package that fails the same way stands in for it."""
    package = tmp_path / "vllm"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    with pytest.raises(ImportError, match="pip uninstall -y torchvision torchaudio torchcodec"):
        vllm_engine.import_vllm()


def test_engine_dtype_is_checked():
    with pytest.raises(ValueError, match="dtype"):
        vllm_engine.check_vllm_dtype("auto")


def make_prompts():
    return Dataset.from_list([{"prompt_id": "p0", "prompt": [{"role": "user", "content": "how many apples ?"}]}])


def test_the_engine_of_the_records_must_be_the_engine_that_samples(tmp_path):
    model, tokenizer = make_tiny_causal_lm("llama"), make_tiny_tokenizer()
    sampling = SamplingConfig(num_samples=1, max_new_tokens=3, engine="vllm")
    with pytest.raises(ValueError, match="engine='transformers'"):
        sample_rollouts(model, tokenizer, make_prompts(), tmp_path, sampling)


def test_rollout_directories_without_an_engine_field_resume_as_the_builtin_sampler(tmp_path):
    """Directories written before the engine was recorded hold the built-in sampler's records."""
    model, tokenizer = make_tiny_causal_lm("llama"), make_tiny_tokenizer()
    sampling = SamplingConfig(num_samples=1, max_new_tokens=3)
    sample_rollouts(model, tokenizer, make_prompts(), tmp_path, sampling)
    config = json.loads((tmp_path / "rollouts_config.json").read_text())
    del config["engine"]
    (tmp_path / "rollouts_config.json").write_text(json.dumps(config))
    sample_rollouts(model, tokenizer, make_prompts(), tmp_path, sampling)  # resumes: nothing left to sample
