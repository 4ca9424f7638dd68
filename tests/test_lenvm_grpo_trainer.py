"""LenVMGRPOTrainer: the method doc's advantages on hand-built rollouts, equivalence with GRPOTrainer, frozen LenVM,
checkpoints, refused options, and every supported GRPO feature on tiny models."""

import logging
import math

import pytest
import torch
from conftest import make_pad_past_vocabulary_tokenizer, make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from safetensors import safe_open
from trl import GRPOConfig, GRPOTrainer

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rl_math import scheduled_length_coef
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer

GAMMA = 0.9


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer):
    """A saved tiny policy: with beta > 0 GRPO rebuilds its reference model from `config._name_or_path`."""
    path = tmp_path_factory.mktemp("policy")
    model = make_tiny_causal_lm("llama")
    # A random tiny policy almost never samples <eos>: 40 more stop ids make completions of mixed lengths, some
    # finished and some cut (GRPO ends a completion at any id of `generation_config.eos_token_id`).
    model.generation_config.eos_token_id = [1, *range(10, 50)]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lenvm_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("lenvm")
    make_lenvm().save_pretrained(path, tokenizer=tokenizer)
    return str(path)


def make_lenvm(seed=7):
    """A tiny LenVM with its own backbone weights; values start near -0.5."""
    torch.manual_seed(seed)
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=seed), gamma=GAMMA)


def make_dataset(num=8):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "answer": str(2 * i)} for i in range(num)]
    )


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def make_args(tmp_path, config_class=LenVMGRPOConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # GRPOConfig defaults to bf16 (autocast on CPU too); tests compare float32 numbers
        seed=0,
    )
    return config_class(**{**defaults, **kwargs})


def make_trainer(tmp_path, tokenizer, model=None, lenvm="model", **kwargs):
    trainer_kwargs = {key: kwargs.pop(key) for key in ("peft_config", "rollout_func") if key in kwargs}
    args = make_args(tmp_path, **kwargs)
    if lenvm == "model":
        lenvm = None if args.lenvm_model_name_or_path else make_lenvm()
    return LenVMGRPOTrainer(
        model=model if model is not None else make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        lenvm=lenvm,
        lenvm_processing_class=tokenizer if isinstance(lenvm, LengthValueModel) else None,
        **trainer_kwargs,
    )


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


# ---------------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "option, flag",
    [
        ({"loss_type": "vespo"}, "--loss_type vespo"),
        ({"off_policy_mask_threshold": 0.5}, "--off_policy_mask_threshold"),
    ],
)
def test_sign_dependent_sequence_options_are_refused(tmp_path, option, flag):
    with pytest.raises(ValueError, match=flag):
        make_args(tmp_path, length_coef=0.1, **option)
    make_args(tmp_path, length_coef=0.0, **option)  # plain GRPO keeps them


@pytest.mark.parametrize(
    "option, flag",
    [
        ({"length_lam": 1.5}, "--length_lam"),
        ({"length_gamma": 1.0}, "--length_gamma"),
        ({"lenvm_gamma": 0.0}, "--lenvm_gamma"),
        ({"length_coef_schedule": "cosine"}, "--length_coef_schedule"),
        ({"length_coef_warmup_steps": -1}, "--length_coef_warmup_steps"),
        ({"length_coef": float("nan")}, "--length_coef"),
        ({"max_completion_length": 0}, "--max_completion_length"),
        ({"lenvm_learning_rate": 0.0}, "--lenvm_learning_rate"),
    ],
)
def test_bad_length_options_name_the_flag(tmp_path, option, flag):
    with pytest.raises(ValueError, match=flag):
        make_args(tmp_path, **option)


def construct(args, tokenizer, lenvm, **kwargs):
    return LenVMGRPOTrainer(
        model=make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        lenvm=lenvm,
        **kwargs,
    )


def test_lenvm_must_read_the_policy_ids(tmp_path, tokenizer):
    args = make_args(tmp_path)
    other = make_tiny_tokenizer(extra_words=("zebra",))
    with pytest.raises(ValueError, match="vocabulary size"):
        construct(args, tokenizer, make_lenvm(), lenvm_processing_class=other)
    small = LengthValueModel.from_backbone(make_tiny_causal_lm("llama", vocab_size=len(tokenizer) - 1), GAMMA)
    with pytest.raises(ValueError, match="embeds"):  # fewer embeddings than the policy's vocabulary
        construct(args, tokenizer, small)
    with pytest.raises(ValueError, match="needs a LenVM"):
        construct(args, tokenizer, None)
    with pytest.raises(ValueError, match="tools"):
        construct(args, tokenizer, make_lenvm(), tools=[len])


def test_lenvm_values_with_a_pad_id_past_the_vocabulary(tmp_path):
    """TRL's `[PAD]` recipe (a pad id equal to the embedding size) is accepted with a LenVM of the policy's vocabulary,
    and the LenVM embeds padding as a valid id: its values are those of the same rows padded with an in-vocabulary id.
    (TRL's own `GRPOTrainer` embeds the pad id in its `generate` and log-probability forwards; docs/trl_compatibility.md.)"""
    tokenizer = make_pad_past_vocabulary_tokenizer()
    trainer = make_trainer(tmp_path, tokenizer, length_coef=1.0)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompt_ids = torch.tensor([[pad, pad, 20, 21], [22, 23, 24, 25]])  # left-padded prompts
    completion_ids = torch.tensor([[30, 31, eos], [32, eos, pad]])  # right-padded completions
    prompt_mask, response_mask = (prompt_ids != pad).long(), completion_ids != pad
    values = trainer.compute_length_values(prompt_ids, prompt_mask, completion_ids, response_mask)
    in_vocabulary = trainer.compute_length_values(
        prompt_ids.masked_fill(prompt_ids == pad, 5), prompt_mask, completion_ids.masked_fill(~response_mask, 5),
        response_mask,
    )  # fmt: skip
    assert values.shape == (2, 4) and torch.equal(values, in_vocabulary)


# ------------------------------------------------------------------------------------------ hand-built rollouts


# Completion token ids (the tiny tokenizer: 0 = <pad>, 1 = <eos>); max_completion_length = 4.
EOS = 1
HAND_BUILT = [[30, 31, EOS], [32, 33, 34, 35], [EOS], [36, EOS]]  # finished, cut at the cap, EOS only, finished
HAND_BUILT_LOGPROBS = [[-1.0] * len(ids) for ids in HAND_BUILT]


def expected_length_advantages(lenvm, prompt_ids, completions, gamma, lam, in_loss):
    """The method doc's length advantage, one unpadded sequence at a time, by the explicit sums:

    delta_t = -(1 - gamma) + gamma * v(s_{t+1}) - v(s_t)  (v after EOS = 0, the LenVM's value after a cut otherwise),
    A_t = sum_{k >= t} (gamma * lam)^(k - t) delta_k, then divided by the root mean square over the loss tokens."""
    rows = []
    for prompt, completion in zip(prompt_ids, completions):
        with torch.no_grad():
            values = lenvm(torch.tensor([prompt + completion])).values[0, len(prompt) - 1 :].double().tolist()
        L = len(completion)
        if completion[-1] == EOS:
            values[L] = 0.0
        deltas = [-(1 - gamma) + gamma * values[t + 1] - values[t] for t in range(L)]
        rows.append([sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, L)) for t in range(L)])
    loss_tokens = [a for row, keep in zip(rows, in_loss) if keep for a in row]
    rms = math.sqrt(sum(a * a for a in loss_tokens) / len(loss_tokens))
    return [[a / rms if keep else 0.0 for a in row] for row, keep in zip(rows, in_loss)], rows


@pytest.mark.parametrize(
    "seam, lam, mask_truncated",
    [("generate_single_turn", 1.0, False), ("rollout_func", 0.5, True)],
)
def test_hand_built_rollouts_give_the_method_advantages(tmp_path, tokenizer, monkeypatch, seam, lam, mask_truncated):
    """Completions injected where vLLM returns them (`_generate_single_turn`: token-id lists with EOS, no padding,
    sampler logprobs) or through `rollout_func` give the method doc's advantages: left-padded prompts of different
    lengths, bootstrap after the cut row, 0 after EOS, RMS over the loss tokens."""
    prompts = [[{"role": "user", "content": "what is 2 + 2 ?"}], [{"role": "user", "content": "how many apples ?"}]]
    inputs = [{"prompt": prompts[i // 2], "answer": "4"} for i in range(4)]  # 2 prompts x 2 generations

    def rollout_func(prompts, trainer):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "completion_ids": HAND_BUILT, "logprobs": HAND_BUILT_LOGPROBS}

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    kwargs = {"rollout_func": rollout_func} if seam == "rollout_func" else {}
    lenvm = make_lenvm()
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        lenvm=lenvm,
        num_generations=2,
        max_completion_length=4,
        length_coef=0.5,
        length_lam=lam,
        mask_truncated_completions=mask_truncated,
        **kwargs,
    )
    if seam == "generate_single_turn":
        trainer._generate_single_turn = lambda *args, **kwargs: (HAND_BUILT, HAND_BUILT_LOGPROBS)
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)

    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(out["prompt_ids"], out["prompt_mask"])]
    assert len(set(map(len, prompt_ids))) == 2  # the two prompts differ in length: left padding is exercised
    in_loss = [not (mask_truncated and completion[-1] != EOS) for completion in HAND_BUILT]
    expected, raw = expected_length_advantages(lenvm, prompt_ids, HAND_BUILT, GAMMA, lam, in_loss)
    T = out["completion_ids"].shape[1]
    expected = torch.tensor([row + [0.0] * (T - len(row)) for row in expected], dtype=torch.float32)
    torch.testing.assert_close(out["length_advantages"], expected, atol=2e-5, rtol=1e-4)
    assert out["advantages"].shape == (4,)  # the sequence advantage stays a separate key

    if lam == 1.0:  # A_len_t = G_t - v(s_t) for a finished completion: G_t = -(1 - gamma^(L - t))
        with torch.no_grad():
            values = lenvm(torch.tensor([prompt_ids[0] + HAND_BUILT[0]])).values[0].double()
        v = values[len(prompt_ids[0]) - 1 :].tolist()
        assert raw[0] == pytest.approx([-(1 - 0.9**3) - v[0], -(1 - 0.9**2) - v[1], -(1 - 0.9) - v[2]], abs=1e-6)

    metrics = trainer._metrics["train"]
    assert metrics["length/truncated_frac"] == [0.25]
    assert metrics["length/response_tokens_mean"] == [2.5]  # (3 + 4 + 1 + 2) / 4
    assert metrics["length/response_tokens_max"] == [4.0]
    loss_tokens = [a for row, keep in zip(raw, in_loss) if keep for a in row]
    assert metrics["length/advantages_mean"][0] == pytest.approx(sum(loss_tokens) / len(loss_tokens), abs=1e-6)


def test_compute_loss_combines_on_a_copy(tmp_path, tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, tokenizer, length_coef=0.5, length_coef_warmup_steps=2, max_steps=4)
    trainer.model.train()
    seen = []
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, model, inputs: seen.append(inputs) or 0.0)
    inputs = {"advantages": torch.tensor([1.0, -1.0]), "length_advantages": torch.tensor([[0.5, 2.0], [1.0, 0.0]])}
    trainer.state.global_step = 1  # warm-up: s = 0.5 * 1 / 2 = 0.25
    trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(seen[-1]["advantages"], torch.tensor([[1.125, 1.5], [-0.75, -1.0]]))
    assert inputs["advantages"].shape == (2,)  # the buffered batch keeps the separate terms
    trainer.state.global_step = 0  # s = 0: passed through untouched
    trainer.compute_loss(trainer.model, inputs)
    assert seen[-1] is inputs
    assert trainer._metrics["train"]["length/coef"] == [0.25, 0.0]


# ------------------------------------------------------------------------------------------------- training


def run_grpo(trainer_class, tmp_path, tokenizer, **kwargs):
    config_class = GRPOConfig if trainer_class is GRPOTrainer else LenVMGRPOConfig
    args = make_args(tmp_path, config_class=config_class, **kwargs)
    extra = {"lenvm": make_lenvm(), "lenvm_processing_class": tokenizer} if trainer_class is LenVMGRPOTrainer else {}
    trainer = trainer_class(
        model=make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        **extra,
    )
    trainer.train()
    return trainer


def test_coef_zero_reproduces_grpo_trainer_exactly(tmp_path, tokenizer):
    """Same seed, same data: identical losses, gradient norms and parameters; with s = 0 the LenVM never runs."""
    common = dict(max_steps=2, num_iterations=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    plain = run_grpo(GRPOTrainer, tmp_path / "plain", tokenizer, **common)
    lenvm = run_grpo(LenVMGRPOTrainer, tmp_path / "lenvm", tokenizer, length_coef=0.0, **common)
    timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
    plain_logs = [{k: v for k, v in log.items() if k not in timing} for log in plain.state.log_history]
    lenvm_logs = [{k: log[k] for k in plain_log} for plain_log, log in zip(plain_logs, lenvm.state.log_history)]
    assert plain_logs == lenvm_logs  # every TRL metric: loss, grad_norm, reward, entropy, clip ratios, ...
    assert len([log for log in plain_logs if "loss" in log]) == 2
    plain_state, lenvm_state = plain.model.state_dict(), lenvm.model.state_dict()
    assert plain_state.keys() == lenvm_state.keys()
    assert all(torch.equal(plain_state[k], lenvm_state[k]) for k in plain_state)
    assert "length/predicted_tokens_mean" not in lenvm.state.log_history[0]  # the LenVM did not run ...
    assert "length/response_tokens_mean" in lenvm.state.log_history[0]  # ... the lengths are still logged

    # ... and a non-zero coefficient changes the update.
    shorter = run_grpo(LenVMGRPOTrainer, tmp_path / "coef", tokenizer, length_coef=1.0, **common)
    assert any(not torch.equal(plain_state[k], v) for k, v in shorter.model.state_dict().items())


def test_lenvm_stays_frozen_and_out_of_the_checkpoint(tmp_path, tokenizer, lenvm_dir):
    trainer = make_trainer(
        tmp_path, tokenizer, lenvm_model_name_or_path=lenvm_dir, length_coef=1.0, save_strategy="steps", save_steps=1
    )
    lenvm_before, policy_before = snapshot(trainer.lenvm), snapshot(trainer.model)
    trainer.train()
    assert not changed(lenvm_before, trainer.lenvm)  # byte-identical ...
    assert all(not p.requires_grad for p in trainer.lenvm.parameters()) and not trainer.lenvm.training
    assert changed(policy_before, trainer.model)  # ... while the policy trained
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert not any(id(param) in optimized for param in trainer.lenvm.parameters())

    checkpoint = tmp_path / "grpo" / "checkpoint-1"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        saved = set(handle.keys())
    assert saved == set(trainer.model.state_dict()) - {"lm_head.weight"}  # tied embeddings are saved once
    assert not list(checkpoint.rglob("value_head.safetensors")) and not list(checkpoint.rglob("lenvm_config.json"))


FEATURES = [
    *(pytest.param({"loss_type": t}, id=t) for t in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")),
    pytest.param({"loss_type": "luspo", "importance_sampling_level": "sequence"}, id="luspo"),
    pytest.param(
        {
            "num_iterations": 2,
            "mask_truncated_completions": True,
            "max_steps": 3,
            "length_coef_schedule": "linear",
            "length_coef_warmup_steps": 1,
        },
        id="num_iterations-mask_truncated-schedule",
    ),
    pytest.param({"beta": 0.1}, id="kl"),
    pytest.param({"beta": 0.1, "lora": True}, id="kl-lora"),
]


@pytest.mark.parametrize("feature", FEATURES)
def test_supported_features_train(tmp_path, tokenizer, policy_dir, feature):
    """Every supported GRPO option trains with a non-zero coefficient on a saved policy (the KL reference is rebuilt
    from its path), with finished and cut completions in the batches and the scheduled coefficient logged."""
    feature = dict(feature)
    if feature.pop("lora", False):
        from peft import LoraConfig

        feature["peft_config"] = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(tmp_path, tokenizer, model=policy_dir, length_coef=0.5, max_completion_length=4, **feature)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == trainer.args.max_steps and all(math.isfinite(log["loss"]) for log in logs)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    args = trainer.args
    expected = [
        scheduled_length_coef(u, args.max_steps, 0.5, args.length_coef_schedule, args.length_coef_warmup_steps)
        for u in range(args.max_steps)
    ]
    assert [log["length/coef"] for log in logs] == pytest.approx(expected)
    truncated = [log["length/truncated_frac"] for log in logs if "length/truncated_frac" in log]
    assert any(0 < frac < 1 for frac in truncated)  # finished and cut completions in the same batch
    if args.beta:
        assert all(log["kl"] >= 0 for log in logs)


# ---------------------------------------------------------------------------------------------- refreshed length critics


def test_online_lenvm_moves_only_the_lenvm(tmp_path, tokenizer):
    lenvm = make_lenvm()
    before = snapshot(lenvm)
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        lenvm=lenvm,
        length_coef=1.0,
        lenvm_update="online",
        lenvm_learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    assert changed(before, trainer.lenvm)
    optimized = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert not any(id(param) in optimized for param in trainer.lenvm.parameters())
    assert any("length/lenvm_loss" in log for log in trainer.state.log_history)
    checkpoint = next((tmp_path / "grpo").glob("checkpoint-*"))
    assert (checkpoint / "lenvm" / "value_head.safetensors").is_file() and (
        checkpoint / "lenvm_optimizer.pt"
    ).is_file()


def test_frozen_lenvm_is_byte_identical(tmp_path, tokenizer):
    lenvm = make_lenvm()
    before = snapshot(lenvm)
    make_trainer(tmp_path, tokenizer, lenvm=lenvm, length_coef=1.0).train()
    assert not changed(before, lenvm)


def test_a_length_critic_without_pretraining_starts_from_the_policy(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, lenvm=None, length_coef=1.0, lenvm_init="policy", lenvm_update="online", lenvm_gamma=0.9
    )
    policy_embeddings = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings().weight
    assert torch.equal(trainer.lenvm.backbone.get_input_embeddings().weight, policy_embeddings)
    trainer.train()
    assert any("length/lenvm_loss" in log for log in trainer.state.log_history)


def test_a_task_reward_without_variance_warns_that_only_the_length_term_trains(tmp_path, tokenizer, caplog):
    args = make_args(tmp_path, length_coef=1.0)
    trainer = LenVMGRPOTrainer(
        model=make_tiny_causal_lm("llama"),
        reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        lenvm=make_lenvm(),
        lenvm_processing_class=tokenizer,
    )
    with caplog.at_level(logging.WARNING, logger="lenvm_rl.trainers.lenvm_grpo"):
        trainer.train()
    assert "only the length term trains the policy" in caplog.text
