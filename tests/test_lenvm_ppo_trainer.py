"""LenVMPPOTrainer: the length steps by hand in every mode, equivalence with PPOTrainer, frozen LenVM, checkpoints."""

import math
import time

import pytest
import torch
from conftest import (
    make_eos_prone_causal_lm,
    make_pad_past_vocabulary_tokenizer,
    make_tiny_causal_lm,
    make_tiny_tokenizer,
)
from datasets import Dataset
from safetensors import safe_open
from transformers import TrainerCallback

from lenvm_rl.modeling import LENVM_CONFIG_NAME, LengthValueModel
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer
from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def make_dataset(num=8):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "answer": str(2 * i)} for i in range(num)]
    )


def make_args(tmp_path, config_class=LenVMPPOConfig, **kwargs):
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
    return config_class(**{**defaults, **kwargs})


def make_lenvm(gamma=0.9, seed=7):
    """A tiny LenVM (a policy-sized backbone with its own weights); values start near -0.5."""
    torch.manual_seed(seed)
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=seed), gamma=gamma)


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def make_trainer(tmp_path, tokenizer, lenvm=None, **kwargs):
    args = make_args(tmp_path, **kwargs)
    return LenVMPPOTrainer(
        args,
        tokenizer,
        make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        train_dataset=make_dataset(),
        lenvm=lenvm,
        lenvm_processing_class=tokenizer if lenvm is not None else None,
    )


# ---------------------------------------------------------------------------------------------- config and schedules


def test_config_defaults(tmp_path):
    args = LenVMPPOConfig(output_dir=str(tmp_path))
    expected = dict(
        lenvm_model_name_or_path=None,
        lenvm_gamma=None,
        length_mode="advantage",
        length_coef=0.0,
        length_coef_schedule="constant",
        length_coef_warmup_steps=0,
        length_gamma=None,
        length_lam=1.0,
    )
    assert {name: getattr(args, name) for name in expected} == expected
    assert isinstance(args, PPOConfig) and args.kl_coef == 0.05  # PPO's defaults are untouched


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(length_mode="reward"), "--length_mode"),
        (dict(length_coef_schedule="cosine"), "--length_coef_schedule"),
        (dict(length_coef_warmup_steps=-1), "--length_coef_warmup_steps"),
        (dict(length_lam=1.5), "--length_lam"),
        (dict(length_gamma=1.0), "--length_gamma"),
        (dict(lenvm_gamma=0.0), "--lenvm_gamma"),
        (dict(length_coef=float("nan")), "--length_coef"),
        (dict(length_coef=float("inf")), "--length_coef"),
        (dict(length_mode="none", length_coef=0.5), "--length_coef"),
    ],
)
def test_config_rejects_bad_values_naming_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        LenVMPPOConfig(output_dir=str(tmp_path), **kwargs)


# ---------------------------------------------------------------------------------------------- one update, by hand

G = 0.5  # the hand LenVM's gamma


def hand_batch(length_coef):
    """Two rollouts of width 3: row 0 stops at index 1 (L = 2), row 1 is cut at the maximum length (L = 3)."""
    return {
        "response_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "sequence_lengths": torch.tensor([1, 2]),
        "terminated": torch.tensor([True, False]),
        "logprobs": torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]]),
        "ref_logprobs": torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -2.0, -1.0]]),
        "scores": torch.tensor([1.0, 2.0]),
        "values": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]),
        # v(s_0..s_3); row 0's entries after its stop token (-0.2, -0.9) must be ignored
        "length_values": torch.tensor([[-0.7, -0.5, -0.2, -0.9], [-0.8, -0.6, -0.7, -0.4]]),
        "length_coef": length_coef,
    }


def hand_length_advantages():
    """Method doc section 6 with gamma = 0.5, lam = 1, written out."""
    d00 = -(1 - G) + G * -0.5 - -0.7
    d01 = -(1 - G) + G * 0.0 - -0.5  # v after the stop token is 0
    d10 = -(1 - G) + G * -0.6 - -0.8
    d11 = -(1 - G) + G * -0.7 - -0.6
    d12 = -(1 - G) + G * -0.4 - -0.7  # cut row: bootstraps from v(s_3)
    return torch.tensor([[d00 + G * d01, d01, 0.0], [d10 + G * d11 + G**2 * d12, d11 + G * d12, d12]])


@pytest.fixture()
def hand_trainer(tmp_path, tokenizer):
    def build(length_mode, gamma=1.0):
        return make_trainer(
            tmp_path, tokenizer, make_lenvm(gamma=G), length_mode=length_mode, kl_coef=0.5, gamma=gamma, lam=1.0
        )

    return build


def test_advantage_mode_by_hand(hand_trainer):
    trainer = hand_trainer("advantage")
    batch = hand_batch(length_coef=0.3)
    batch.update(trainer.compute_rewards(batch))
    base_rewards = PPOTrainer.compute_rewards(trainer, batch)["rewards"]
    torch.testing.assert_close(batch["rewards"], base_rewards)  # the rewards are the task's
    task = PPOTrainer.compute_advantages(trainer, batch)  # whitened task GAE (checked by hand in test_ppo_trainer)
    out = trainer.compute_advantages(batch)

    a_len = hand_length_advantages()
    torch.testing.assert_close(out["length_advantages"], a_len)
    real = a_len[batch["response_mask"]]
    expected = task["advantages"] + 0.3 * a_len / torch.sqrt((real**2).mean())
    torch.testing.assert_close(out["advantages"], expected * batch["response_mask"])
    torch.testing.assert_close(out["returns"], task["returns"])  # the task critic's targets are unchanged

    batch["terminated"] = torch.tensor([True, True])  # the same cut row treated as finished: v(s_3) -> 0
    finished = trainer.compute_advantages(batch)["length_advantages"]
    torch.testing.assert_close(a_len - finished, G * -0.4 * torch.tensor([[0.0, 0.0, 0.0], [G**2, G, 1.0]]))


def test_shaping_mode_by_hand(hand_trainer):
    trainer = hand_trainer("shaping", gamma=0.9)  # shaping uses PPO's gamma (0.9), not the LenVM's (0.5)
    batch = hand_batch(length_coef=0.5)
    out = trainer.compute_rewards(batch)
    base = PPOTrainer.compute_rewards(trainer, batch)
    shaping = torch.tensor(
        [
            [0.9 * -0.5 - -0.7, 0.9 * 0.0 - -0.5, 0.0],  # Phi after the stop token is 0
            [0.9 * -0.6 - -0.8, 0.9 * -0.7 - -0.6, 0.9 * -0.4 - -0.7],  # cut row keeps Phi(s_3)
        ]
    )
    torch.testing.assert_close(out["length_rewards"], 0.5 * shaping)
    torch.testing.assert_close(out["rewards"], base["rewards"] + 0.5 * shaping)
    torch.testing.assert_close(out["kl"], base["kl"])
    # Potential-based: the discounted shaping of the finished row telescopes to -Phi(s_0).
    assert shaping[0, 0] + 0.9 * shaping[0, 1] == pytest.approx(0.7)
    batch.update(out)
    advantages = trainer.compute_advantages(batch)
    torch.testing.assert_close(advantages["advantages"], PPOTrainer.compute_advantages(trainer, batch)["advantages"])


def test_penalty_mode_by_hand(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, length_mode="penalty", kl_coef=0.5, gamma=1.0, lam=1.0)
    assert trainer.lenvm is None  # the penalty needs no LenVM
    batch = hand_batch(length_coef=0.1)
    del batch["length_values"]
    out = trainer.compute_rewards(batch)
    expected = PPOTrainer.compute_rewards(trainer, batch)["rewards"]
    expected[0, 1] -= 0.1 * 2  # score - alpha * tokens, on the stop token of the 2-token row
    expected[1, 2] -= 0.1 * 3  # and on the last token of the cut row
    torch.testing.assert_close(out["rewards"], expected)
    batch.update(out)
    assert "length_advantages" not in trainer.compute_advantages(batch)


def test_none_mode_is_ppo_and_keeps_length_diagnostics(hand_trainer):
    trainer = hand_trainer("none")
    batch = hand_batch(length_coef=0.7)  # ignored in "none" mode
    out = trainer.compute_rewards(batch)
    assert out.keys() == PPOTrainer.compute_rewards(trainer, batch).keys()
    torch.testing.assert_close(out["rewards"], PPOTrainer.compute_rewards(trainer, batch)["rewards"])
    batch.update(out)
    advantages = trainer.compute_advantages(batch)
    assert torch.equal(advantages["advantages"], PPOTrainer.compute_advantages(trainer, batch)["advantages"])
    torch.testing.assert_close(advantages["length_advantages"], hand_length_advantages())


def test_length_metrics_by_hand(hand_trainer):
    trainer = hand_trainer("shaping")
    batch = hand_batch(length_coef=0.5)
    batch.update(trainer.compute_rewards(batch))
    batch.update(trainer.compute_advantages(batch))
    batch["rewards_per_func"] = torch.tensor([[1.0], [2.0]])
    stats = {key: torch.zeros(2) for key in ("ratio", "approxkl", "pg_clipfrac", "pg_loss", "vf_loss")}
    stats.update({key: torch.zeros(2) for key in ("vf_clipfrac", "entropy")}, lr=torch.tensor(1e-3))
    trainer._start_time = time.time()
    metrics = trainer.gather_metrics(batch, stats)

    assert metrics["length/response_tokens_mean"] == 2.5 and metrics["length/response_tokens_max"] == 3.0
    assert metrics["length/truncated_frac"] == 0.5 and metrics["length/coef"] == 0.5
    assert metrics["length/rewards_mean"] == pytest.approx(batch["length_rewards"].sum(1).mean().item())
    length = lambda v: math.log(1 + v) / math.log(G)  # noqa: E731
    assert metrics["length/predicted_tokens_mean"] == pytest.approx((length(-0.7) + length(-0.8)) / 2)
    realised = [-(1 - G**2), -(1 - G**3) + G**3 * -0.4]  # the cut row keeps the LenVM's value after the cut
    drift = length(sum(realised) / 2) / length((-0.7 - 0.8) / 2)  # averaged in value space
    assert metrics["length/drift_ratio"] == pytest.approx(drift)
    real = hand_length_advantages()[batch["response_mask"]]
    assert metrics["length/advantages_mean"] == pytest.approx(real.mean().item())
    assert metrics["length/advantages_std"] == pytest.approx(real.std().item())


# ---------------------------------------------------------------------------------------------- LenVM values in the rollout


def test_length_values_read_the_state_before_each_token(tmp_path, tokenizer):
    lenvm = make_lenvm()
    trainer = make_trainer(tmp_path, tokenizer, lenvm, length_coef=0.2, local_rollout_forward_batch_size=3)
    dataset = make_dataset(4)
    batch = trainer.generate_rollouts([dataset[i] for i in range(4)])
    out = trainer.compute_values(batch)
    T, C = trainer.args.response_length, batch["context_length"]
    assert out["length_values"].shape == (4, T + 1) and out["length_values"].dtype == torch.float32
    assert out["length_coef"] == 0.2
    lengths = batch["response_mask"].sum(1)
    for row in range(4):
        keep = batch["attention_mask"][row].bool()
        prompt_length = int(batch["attention_mask"][row, :C].sum())
        alone = lenvm(batch["query_responses"][row][keep][None]).values[0]  # unpadded, unbatched
        L = int(lengths[row])
        # column t is the state in which token t is chosen: position prompt_length - 1 + t of the unpadded row
        torch.testing.assert_close(
            out["length_values"][row, : L + 1], alone[prompt_length - 1 : prompt_length + L], atol=1e-5, rtol=1e-5
        )
    trainer.args.local_rollout_forward_batch_size = 64
    torch.testing.assert_close(trainer.compute_length_values(batch), out["length_values"], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- training


def run(tmp_path, tokenizer, trainer_class, lenvm=None, **kwargs):
    config_class = LenVMPPOConfig if trainer_class is LenVMPPOTrainer else PPOConfig
    args = make_args(tmp_path, config_class=config_class, **kwargs)
    extra = dict(lenvm=lenvm, lenvm_processing_class=tokenizer) if trainer_class is LenVMPPOTrainer else {}
    trainer = trainer_class(
        args,
        tokenizer,
        make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        train_dataset=make_dataset(),
        **extra,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss/policy_avg" in entry]
    losses = [(entry["loss/policy_avg"], entry["loss/value_avg"]) for entry in logs]
    return trainer, snapshot(trainer.model), losses


@pytest.mark.parametrize(
    "length_mode, length_coef",
    [("none", 0.0), ("advantage", 0.0), ("shaping", 0.0), ("penalty", 0.0)],
)
def test_no_length_term_is_bit_identical_to_ppo(tmp_path, tokenizer, length_mode, length_coef):
    _, expected_params, expected_losses = run(tmp_path, tokenizer, PPOTrainer)
    lenvm = make_lenvm() if length_mode != "penalty" else None
    trainer, params, losses = run(
        tmp_path, tokenizer, LenVMPPOTrainer, lenvm, length_mode=length_mode, length_coef=length_coef
    )
    assert len(losses) == 2 and losses == expected_losses
    assert params.keys() == expected_params.keys()
    assert all(torch.equal(params[name], expected_params[name]) for name in params)
    assert trainer.state.log_history[-2]["length/coef"] == (0.0 if length_mode == "none" else length_coef)


@pytest.mark.parametrize("length_mode", ["advantage", "shaping"])
def test_lenvm_stays_frozen_and_out_of_checkpoints(tmp_path, tokenizer, length_mode):
    lenvm = make_lenvm()
    before_lenvm = snapshot(lenvm)
    trainer = make_trainer(
        tmp_path, tokenizer, lenvm, length_mode=length_mode, length_coef=0.5, save_strategy="steps", save_steps=1
    )
    before_policy = snapshot(trainer.model.policy)
    trainer.train()

    assert trainer.lenvm is lenvm and not lenvm.training
    assert not any(param.requires_grad or param.grad is not None for param in lenvm.parameters())
    assert not changed(before_lenvm, lenvm)  # byte-identical
    assert changed(before_policy, trainer.model.policy)
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert not optimized & {id(param) for param in lenvm.parameters()}

    checkpoint = tmp_path / "ppo" / "checkpoint-2"
    assert not list(checkpoint.rglob("value_head.safetensors")) and not list(checkpoint.rglob(LENVM_CONFIG_NAME))
    for file in checkpoint.rglob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            assert not any("v_head" in key or "lenvm" in key for key in handle.keys()), file
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        assert set(handle.keys()) <= set(trainer.model.policy.state_dict())

    logs = [entry for entry in trainer.state.log_history if "length/coef" in entry]
    assert len(logs) == 2
    for name in (
        "length/response_tokens_mean",
        "length/response_tokens_max",
        "length/truncated_frac",
        "length/predicted_tokens_mean",
        "length/drift_ratio",
        "length/advantages_mean",
        "length/advantages_std",
        "length/coef",
        "length/stop_token_advantage_mean",
        "length/other_token_advantage_mean",
    ):
        assert all(math.isfinite(entry[name]) for entry in logs), name


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, tokenizer):
    def build(output_dir):
        return make_trainer(
            tmp_path,
            tokenizer,
            make_lenvm(),
            output_dir=str(output_dir),
            total_episodes=12,
            save_strategy="steps",
            save_steps=2,
            length_coef=1.0,
            length_coef_schedule="linear",
            length_coef_warmup_steps=1,
        )

    uninterrupted = build(tmp_path / "a")
    uninterrupted.train()
    resumed = build(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.state.global_step == uninterrupted.state.global_step == 3
    expected, actual = snapshot(uninterrupted.model), snapshot(resumed.model)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    coefs = [e["length/coef"] for e in uninterrupted.state.log_history if "length/coef" in e]
    assert coefs == pytest.approx([0.0, 1.0, 0.5])  # warm-up 1 update, then linear decay over 3 - 1 updates
    assert [e["length/coef"] for e in resumed.state.log_history if "length/coef" in e][-1] == coefs[-1]


@pytest.mark.parametrize("lenvm_update", ["frozen", "online"])
def test_pad_id_past_the_vocabulary(tmp_path, lenvm_update):
    """TRL's `[PAD]` recipe (a pad id equal to the embedding size): the LenVM embeds padding as a valid id, in its
    frozen forward and in its online refresh, so the run is the one with an in-vocabulary pad token."""

    def run_with(tokenizer):
        dataset = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?" + " and" * (i % 3)}]} for i in range(8)]
        )
        args = make_args(tmp_path, length_coef=1.0, lenvm_update=lenvm_update, total_episodes=4, response_length=6)
        trainer = LenVMPPOTrainer(
            args,
            tokenizer,
            make_eos_prone_causal_lm(),
            reward_funcs=[word_count_reward],
            train_dataset=dataset,
            lenvm=make_lenvm(),
            lenvm_processing_class=tokenizer,
        )
        trainer.train()
        batch = trainer.generate_rollouts([dataset[i] for i in range(8)])
        metrics = [{k: v for k, v in e.items() if k != "eps" and "runtime" not in k and "per_second" not in k}
                   for e in trainer.state.log_history]  # fmt: skip
        return batch, metrics, snapshot(trainer.lenvm)

    tokenizer = make_pad_past_vocabulary_tokenizer()
    batch, metrics, lenvm = run_with(tokenizer)
    pad = tokenizer.pad_token_id
    assert (batch["queries"] == pad).any() and (batch["responses"] == pad).any()  # left and right padding
    _, in_vocabulary_metrics, in_vocabulary_lenvm = run_with(make_tiny_tokenizer())
    assert "length/predicted_tokens_mean" in metrics[0] and metrics == in_vocabulary_metrics
    assert all(torch.equal(lenvm[name], in_vocabulary_lenvm[name]) for name in lenvm)


# ---------------------------------------------------------------------------------------------- loading and checks


def test_lenvm_from_a_directory_with_its_tokenizer(tmp_path, tokenizer):
    lenvm = make_lenvm()
    lenvm.save_pretrained(tmp_path / "lenvm", tokenizer=tokenizer)
    args = make_args(tmp_path, lenvm_model_name_or_path=str(tmp_path / "lenvm"), length_coef=0.1)
    trainer = LenVMPPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[word_count_reward], train_dataset=make_dataset()
    )
    assert trainer.lenvm_gamma == trainer.length_gamma == 0.9 and not trainer.lenvm.training
    assert all(torch.equal(a, b) for a, b in zip(trainer.lenvm.state_dict().values(), lenvm.state_dict().values()))

    (tmp_path / "lenvm" / LENVM_CONFIG_NAME).unlink()  # the reference format stores no gamma
    with pytest.raises(ValueError, match="gamma"):
        LenVMPPOTrainer(
            args,
            tokenizer,
            make_tiny_causal_lm("llama"),
            reward_funcs=[word_count_reward],
            train_dataset=make_dataset(),
        )
    args = make_args(tmp_path, lenvm_model_name_or_path=str(tmp_path / "lenvm"), lenvm_gamma=0.997, length_gamma=0.99)
    trainer = LenVMPPOTrainer(
        args, tokenizer, make_tiny_causal_lm("llama"), reward_funcs=[word_count_reward], train_dataset=make_dataset()
    )
    assert trainer.lenvm_gamma == 0.997 and trainer.length_gamma == 0.99


def test_tokenizer_mismatch_is_a_value_error(tmp_path, tokenizer):
    other = make_tiny_tokenizer(extra_words=["banana"])
    lenvm = make_lenvm()
    lenvm.save_pretrained(tmp_path / "lenvm", tokenizer=other)
    args = make_args(tmp_path, lenvm_model_name_or_path=str(tmp_path / "lenvm"))
    with pytest.raises(ValueError, match="tokenizers are incompatible"):
        LenVMPPOTrainer(
            args,
            tokenizer,
            make_tiny_causal_lm("llama"),
            reward_funcs=[word_count_reward],
            train_dataset=make_dataset(),
        )

    def build(lenvm, lenvm_processing_class):
        return LenVMPPOTrainer(
            make_args(tmp_path),
            tokenizer,
            make_tiny_causal_lm("llama"),
            reward_funcs=[word_count_reward],
            train_dataset=make_dataset(),
            lenvm=lenvm,
            lenvm_processing_class=lenvm_processing_class,
        )

    with pytest.raises(ValueError, match="tokenizers are incompatible"):
        build(lenvm, other)
    small = LengthValueModel.from_backbone(make_tiny_causal_lm("llama", vocab_size=20), gamma=0.9)
    with pytest.raises(ValueError, match="embeds 20 token ids"):
        build(small, None)
    assert build(lenvm, tokenizer).lenvm is lenvm


def test_modes_that_need_a_lenvm_say_so(tmp_path, tokenizer):
    for mode in ("advantage", "shaping"):
        with pytest.raises(ValueError, match="--lenvm_model_name_or_path"):
            make_trainer(tmp_path, tokenizer, None, length_mode=mode)
    with pytest.raises(ValueError, match="not both"):
        make_trainer(tmp_path, tokenizer, make_lenvm(), lenvm_model_name_or_path="somewhere")


# ---------------------------------------------------------------------------------------------- non-finite values


def nan_lenvm():
    lenvm = make_lenvm()
    with torch.no_grad():
        lenvm.v_head.summary.bias.fill_(float("nan"))
    return lenvm


@pytest.mark.parametrize("length_mode", ["advantage", "shaping"])
def test_coefficient_zero_never_runs_a_nan_lenvm(tmp_path, tokenizer, length_mode):
    """length_coef=0 is plain PPO even with a broken LenVM: it is never run, so 0 * NaN cannot reach the policy."""
    _, expected_params, expected_losses = run(tmp_path, tokenizer, PPOTrainer)
    _, params, losses = run(
        tmp_path, tokenizer, LenVMPPOTrainer, nan_lenvm(), length_mode=length_mode, length_coef=0.0
    )
    assert losses == expected_losses
    assert all(torch.equal(params[name], expected_params[name]) for name in params)


def test_nan_lenvm_values_stop_the_run_before_any_optimizer_step(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, nan_lenvm(), length_coef=0.5, save_strategy="steps", save_steps=1)
    before = snapshot(trainer.model)
    with pytest.raises(FloatingPointError, match="LenVM values at update 0"):
        trainer.train()
    assert not changed(before, trainer.model)
    assert not list((tmp_path / "ppo").glob("checkpoint-*"))


# ---------------------------------------------------------------------------------------------- refreshed length critics


def test_online_lenvm_moves_only_the_lenvm_and_is_saved(tmp_path, tokenizer):
    lenvm = make_lenvm()
    before_lenvm = snapshot(lenvm)
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        lenvm,
        length_coef=0.5,
        lenvm_update="online",
        lenvm_learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert not optimized & {id(param) for param in lenvm.parameters()}  # the policy's optimizer never sees it
    assert changed(before_lenvm, lenvm)
    losses = [entry["length/lenvm_loss"] for entry in trainer.state.log_history if "length/lenvm_loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    saved = LengthValueModel.from_pretrained(tmp_path / "ppo" / "checkpoint-2" / "lenvm")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in lenvm.state_dict().items())
    assert (tmp_path / "ppo" / "checkpoint-2" / "lenvm_optimizer.pt").is_file()


class StopAfterFirstUpdate(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == 1


def test_online_lenvm_resumes_exactly(tmp_path, tokenizer):
    kwargs = dict(
        length_coef=0.5, lenvm_update="online", lenvm_learning_rate=1e-3, save_strategy="steps", save_steps=1
    )
    reference = make_trainer(tmp_path / "a", tokenizer, make_lenvm(), **kwargs)
    reference.train()
    first = make_trainer(tmp_path / "b", tokenizer, make_lenvm(), **kwargs)
    first.add_callback(StopAfterFirstUpdate())  # one update and its checkpoint, then "killed"
    first.train()
    assert first.state.global_step == 1
    resumed = make_trainer(tmp_path / "b", tokenizer, make_lenvm(), **kwargs)
    resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(v, resumed.lenvm.state_dict()[k]) for k, v in reference.lenvm.state_dict().items())
    assert not changed(snapshot(reference.model), resumed.model)


def test_a_length_critic_without_pretraining_starts_from_the_policy(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, length_coef=0.5, lenvm_init="policy", lenvm_update="online", lenvm_gamma=0.9
    )
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    lenvm_embeddings = trainer.lenvm.backbone.get_input_embeddings().weight
    assert torch.equal(lenvm_embeddings, policy.get_input_embeddings().weight)
    assert lenvm_embeddings.data_ptr() != policy.get_input_embeddings().weight.data_ptr()  # a copy
    trainer.train()
    assert "length/lenvm_loss" in trainer.state.log_history[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lenvm_init="policy", lenvm_update="frozen", lenvm_gamma=0.9),
        dict(lenvm_init="policy", lenvm_update="online"),
        dict(lenvm_update="online", length_mode="penalty"),
    ],
)
def test_refresh_options_that_do_not_fit_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match="--lenvm"):
        LenVMPPOConfig(output_dir=str(tmp_path), **kwargs)


def test_penalty_on_correct_answers_only(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, length_mode="penalty", length_coef=0.5, length_penalty_correct_only=True
    )
    out = trainer.compute_rewards({**hand_batch(0.5), "scores": torch.tensor([1.0, 0.0])})
    assert out["length_rewards"][0, 1] == -0.5 * 2 and out["length_rewards"][1].abs().sum() == 0
