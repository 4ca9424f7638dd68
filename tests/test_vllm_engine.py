"""vLLM as the rollout engine, run for real on the CPU (vLLM's CPU build, float32): the rollout sampler, PPO with
`use_vllm`, the weight-sync seam and LenVMGRPOTrainer's vLLM path.

These tests need vLLM, which cannot share a virtualenv with the default suite's transformers: they carry the `vllm`
marker, the default run deselects them, and `make test-vllm` runs them in `.venv-vllm` (`make test` runs both). In
an environment without vLLM they fail instead of skipping, so a broken engine install cannot pass unnoticed.
"""

import json
import math
import os

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from test_lenvm_grpo_trainer import make_args as make_grpo_args
from test_ppo_trainer import make_args, make_dataset, word_count_reward
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer as grpo_trainer_module

from lenvm_rl.generation import generate_completions
from lenvm_rl.head_padding import pad_head_dim
from lenvm_rl.rollouts import SamplingConfig, load_rollouts, sample_rollouts
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer
from lenvm_rl.trainers.ppo import PPOTrainer
from lenvm_rl.vllm_engine import (
    generate_completions_vllm,
    is_vllm_available,
    make_vllm_engine,
    vllm_generation_class_of,
)

pytestmark = pytest.mark.vllm
# Several tiny engines live at once in this module: 1 GiB of KV cache each is plenty.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# vLLM's CPU attention kernels take head sizes of 32 and more: 4 heads of 64.
HIDDEN = 256


def test_vllm_is_installed():
    assert is_vllm_available(), "the vllm-marked tests run in .venv-vllm (make test-vllm), where vLLM is installed"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    """A saved tiny policy (vLLM loads weights from disk) whose generation config stops at EOS only."""
    path = tmp_path_factory.mktemp("policy")
    model = make_tiny_causal_lm("llama", hidden_size=HIDDEN, seed=3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(policy_dir):
    return make_vllm_engine(policy_dir, dtype="float32", max_model_len=128)


def make_prompts(num=4):
    return Dataset.from_list(
        [
            {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"how many apples ? {i}"}], "answer": str(i)}
            for i in range(num)
        ]
    )


# ------------------------------------------------------------------------------------------------- rollout sampler


def test_greedy_completions_equal_the_builtin_samplers(engine, policy_dir, tokenizer):
    """Same stop rule (the tokenizer's EOS, included in the completion), same cap, same chat-template prompts: at
    temperature 0 both samplers return the same tokens (float32 on both sides)."""
    prompts = list(make_prompts()["prompt"])
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    kwargs = dict(num_samples=1, max_new_tokens=10, temperature=0.0)
    # A random policy never samples <eos>: the stop token is the one greedy decoding of the first prompt emits
    # third, so that some completions stop early and others reach the cap.
    first = generate_completions(model, tokenizer, prompts[:1], batch_size=4, **kwargs)[0].completion_ids
    stopping = make_tiny_tokenizer()
    stopping.eos_token = stopping.convert_ids_to_tokens(first[2])
    builtin = generate_completions(model, stopping, prompts, batch_size=4, **kwargs)
    from_engine = generate_completions_vllm(engine, stopping, prompts, **kwargs)
    assert [c.completion_ids for c in from_engine] == [c.completion_ids for c in builtin]
    assert [c.finish_reason for c in from_engine] == [c.finish_reason for c in builtin]
    assert builtin[0].finish_reason == "stop" and len(builtin[0].completion_ids) <= 3
    assert [c.prompt_ids for c in from_engine] == [c.prompt_ids for c in builtin]


def test_a_head_size_vllm_cannot_run_is_padded_and_samples_as_the_original(tmp_path, tokenizer):
    """The demo policy's shape (hidden 96, 4 heads of 24: no CPU kernel) padded to heads of 32: vLLM's greedy
    completions equal the built-in sampler's on the original, unpadded model."""
    model = make_tiny_causal_lm("llama", hidden_size=96, seed=7)
    model.config.head_dim = 24
    model.config.initializer_range = 0.3  # weights large enough that greedy decoding depends on the prompt
    torch.manual_seed(7)
    model = type(model)(model.config).eval()  # re-initialised with explicit heads of 24, as the demo policy
    padded_dir = tmp_path / "padded"
    pad_head_dim(model, 32).save_pretrained(padded_dir)
    tokenizer.save_pretrained(padded_dir)
    prompts = list(make_prompts()["prompt"])
    kwargs = dict(num_samples=1, max_new_tokens=24, temperature=0.0)
    builtin = generate_completions(model, tokenizer, prompts, batch_size=4, **kwargs)
    padded_engine = make_vllm_engine(str(padded_dir), dtype="float32", max_model_len=128)
    from_engine = generate_completions_vllm(padded_engine, tokenizer, prompts, **kwargs)
    assert [c.completion_ids for c in from_engine] == [c.completion_ids for c in builtin]
    assert len({tuple(c.completion_ids) for c in builtin}) > 1  # the prompts lead to different completions


def test_sample_rollouts_writes_the_same_records_and_resumes(engine, tmp_path, tokenizer):
    sampling = SamplingConfig(num_samples=3, max_new_tokens=8, seed=1, generator_model="tiny", engine="vllm")
    sample_rollouts(engine, tokenizer, make_prompts(), tmp_path, sampling, chunk_size=2)
    records = load_rollouts(tmp_path)
    assert len(records) == 4 * 3
    for record in records:
        assert record["length"] == len(record["completion_ids"]) >= 1
        ends_with_eos = record["completion_ids"][-1] == tokenizer.eos_token_id
        assert record["finish_reason"] == ("stop" if ends_with_eos else "length")
        assert record["finish_reason"] == "stop" or record["length"] == 8
        assert record["engine"] == "vllm" and record["answer"] == record["prompt_id"][1:]
        assert record["completion"] == tokenizer.decode(record["completion_ids"], skip_special_tokens=True)
    # samples of one prompt differ (seeded per prompt, n samples per request)
    assert len({tuple(r["completion_ids"]) for r in records if r["prompt_id"] == "p0"}) > 1

    # An interrupted run (its second chunk lost) resumes to exactly the uninterrupted records.
    before = {f.name: f.read_text() for f in sorted(tmp_path.glob("shard-*/chunk-*.jsonl"))}
    next(tmp_path.glob("shard-*/chunk-000001.jsonl")).unlink()
    sample_rollouts(engine, tokenizer, make_prompts(), tmp_path, sampling, chunk_size=2)
    assert {f.name: f.read_text() for f in sorted(tmp_path.glob("shard-*/chunk-*.jsonl"))} == before

    # The other engine cannot resume this directory.
    model = make_tiny_causal_lm("llama", hidden_size=HIDDEN, seed=3)
    transformers_sampling = SamplingConfig(**{**json.loads((tmp_path / "rollouts_config.json").read_text())})
    transformers_sampling.engine = "transformers"
    with pytest.raises(ValueError, match="engine"):
        sample_rollouts(model, tokenizer, make_prompts(), tmp_path, transformers_sampling, chunk_size=2)
    with pytest.raises(ValueError, match="one process"):
        sample_rollouts(engine, tokenizer, make_prompts(), tmp_path / "two", sampling, num_processes=2)


# ------------------------------------------------------------------------------------------------------------ PPO


def make_ppo_args(tmp_path, **kwargs):
    """test_ppo_trainer's PPO arguments, sampled by a vLLM engine."""
    return make_args(tmp_path, **{"response_length": 6, "use_vllm": True, "vllm_max_model_length": 128, **kwargs})


def engine_logprobs(generation, token_ids):
    """The engine's log-probabilities of `token_ids[1:]`, each given its prefix (temperature 1)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    output = generation.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
    return torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], token_ids[1:])])


def policy_logprobs(model, token_ids):
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].float()
    return logits.log_softmax(-1)[torch.arange(len(token_ids) - 1), torch.tensor(token_ids[1:])]


@pytest.fixture(scope="module")
def ppo_trainer(tmp_path_factory, policy_dir, tokenizer):
    """Two PPO updates on vLLM rollouts (the engine is built once per module: an engine start takes seconds)."""
    args = make_ppo_args(tmp_path_factory.mktemp("ppo"))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    trainer = PPOTrainer(args, tokenizer, policy, reward_funcs=[word_count_reward], train_dataset=make_dataset())
    before = {name: p.detach().clone() for name, p in trainer.model.policy.named_parameters()}
    trainer.train()
    return trainer, before


def test_ppo_trains_on_vllm_rollouts_with_the_engine_in_sync(ppo_trainer):
    trainer, before = ppo_trainer
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert len(logs) == 2
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.policy.named_parameters())
    for entry in logs:
        # The engine samples with the policy's current weights at every update (the second one after a sync,
        # including the tied LM head): the trainer re-scores the same tokens to within float32 rounding.
        assert entry["vllm/logprob_diff_mean"] < 1e-4 and entry["vllm/logprob_diff_max"] < 1e-3, entry
        assert entry["vllm/importance_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32  # not vLLM's "auto" bf16


def test_weight_sync_seam_gives_the_engine_the_policys_weights(ppo_trainer):
    trainer, _ = ppo_trainer
    generation, policy = trainer.vllm_generation, trainer.model.policy
    ids = [5, 9, 12, 40, 41, 42, 43, 44]
    with torch.no_grad():  # a large change in every kind of weight: linear layers, norms and the tied embedding
        for name, parameter in policy.named_parameters():
            parameter.mul_(1.5 if "norm" in name else 3.0)
    stale = (engine_logprobs(generation, ids) - policy_logprobs(policy, ids)).abs().max()
    generation.sync_weights()
    synced = (engine_logprobs(generation, ids) - policy_logprobs(policy, ids)).abs().max()
    assert stale > 0.1 and synced < 1e-4, (stale, synced)


def test_trls_per_tensor_load_is_what_fails_on_a_cpu(ppo_trainer):
    """Why the seam is chosen by device: the GPU path (TRL's `model.load_weights`) cannot write into the CPU
    backend's packed linear weights. If vLLM lifts this, the seam can take one path everywhere."""
    trainer, _ = ppo_trainer
    generation = trainer.vllm_generation
    assert generation.weight_sync_method == "reload_weights"
    generation.weight_sync_method = "load_weights"
    try:
        with pytest.raises(AttributeError, match="weight_loader"):
            generation.sync_weights()
    finally:
        generation.weight_sync_method = "reload_weights"
        generation.sync_weights()


def test_importance_weights_enter_the_policy_loss(ppo_trainer, tmp_path):
    trainer, _ = ppo_trainer
    mask = torch.tensor([[True, True, False]])
    logprobs = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])
    sampler = torch.tensor([[math.log(0.1), math.log(0.2), math.nan]])  # NaN on padding is ignored
    out = trainer.compare_sampler_logprobs(sampler, logprobs, mask)
    torch.testing.assert_close(out["importance_weights"], torch.tensor([[3.0, 1.0, 1.0]]))
    torch.testing.assert_close(out["sampler_logprob_diff"], torch.tensor([[math.log(5.0), 0.0, 0.0]]))
    with pytest.raises(FloatingPointError, match="vLLM log-probabilities"):
        trainer.compare_sampler_logprobs(torch.tensor([[math.nan, 0.0, 0.0]]), logprobs, mask)


# ----------------------------------------------------------------------------------------------------------- GRPO


def grpo_args(tmp_path, config_class=LenVMGRPOConfig, **kwargs):
    """test_lenvm_grpo_trainer's GRPO arguments, one step, with a colocated vLLM engine."""
    vllm = {"max_steps": 1, "use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 128}
    return make_grpo_args(tmp_path, config_class, **{**vllm, **kwargs})


def test_lenvm_grpo_on_vllm_records_true_lengths_and_the_method_advantages(tmp_path, policy_dir, tokenizer):
    from test_lenvm_grpo_trainer import GAMMA, expected_length_advantages, make_lenvm

    lenvm = make_lenvm()
    args = grpo_args(tmp_path, length_coef=1.0)
    trainer = LenVMGRPOTrainer(
        model=policy_dir,
        reward_funcs=[word_count_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        lenvm=lenvm,
        lenvm_processing_class=tokenizer,
    )
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32
    outputs, recorded = [], []
    score = trainer._generate_and_score_completions

    def score_and_keep(inputs):
        outputs.append(score(inputs))
        return outputs[-1]

    generate = trainer._generate

    def generate_and_keep(prompts):
        result = generate(prompts)
        recorded.append(trainer._rollout_lengths)  # what _generate recorded, before scoring consumes it
        return result

    trainer._generate_and_score_completions, trainer._generate = score_and_keep, generate_and_keep
    trainer.train()

    out = outputs[0]
    lengths, terminated = recorded[0]
    completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(out["completion_ids"], out["completion_mask"])]
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(out["prompt_ids"], out["prompt_mask"])]
    assert lengths.tolist() == [len(ids) for ids in completion_ids]  # the engine's completions, EOS included
    assert terminated.tolist() == [ids[-1] == tokenizer.eos_token_id for ids in completion_ids]
    expected, _ = expected_length_advantages(lenvm, prompt_ids, completion_ids, GAMMA, 1.0, [True] * 4)
    T = out["completion_ids"].shape[1]
    expected = torch.tensor([row + [0.0] * (T - len(row)) for row in expected], dtype=torch.float32)
    torch.testing.assert_close(out["length_advantages"], expected, atol=2e-5, rtol=1e-4)
    assert "length/advantages_mean" in trainer.state.log_history[0]


def test_lenvm_grpo_at_coef_zero_on_vllm_is_trls_grpo(tmp_path, policy_dir, tokenizer):
    """Same engine (TRL's GRPOTrainer is given the float32 engine too), same seeds: identical metrics and weights."""
    from test_lenvm_grpo_trainer import make_lenvm

    common = dict(max_steps=2, per_device_train_batch_size=4, num_generations=4)
    with vllm_generation_class_of(grpo_trainer_module, "float32"):
        plain = GRPOTrainer(model=policy_dir, reward_funcs=[word_count_reward],
                            args=grpo_args(tmp_path / "plain", GRPOConfig, **common),
                            train_dataset=make_dataset(), processing_class=tokenizer)  # fmt: skip
    plain.train()
    lenvm = LenVMGRPOTrainer(model=policy_dir, reward_funcs=[word_count_reward],
                             args=grpo_args(tmp_path / "lenvm", length_coef=0.0, **common), train_dataset=make_dataset(),
                             processing_class=tokenizer, lenvm=make_lenvm(), lenvm_processing_class=tokenizer)  # fmt: skip
    lenvm.train()
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    plain_logs = [
        {k: v for k, v in log.items() if k not in timing and "time" not in k} for log in plain.state.log_history
    ]
    lenvm_logs = [{k: log[k] for k in plain_log} for plain_log, log in zip(plain_logs, lenvm.state.log_history)]
    assert plain_logs == lenvm_logs
    assert len([log for log in plain_logs if "loss" in log]) == 2
    plain_state, lenvm_state = plain.model.state_dict(), lenvm.model.state_dict()
    assert all(torch.equal(plain_state[k], lenvm_state[k]) for k in plain_state)
