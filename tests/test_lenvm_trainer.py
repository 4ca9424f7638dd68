"""LenVM pretraining: rollout tokenisation, padded and packed batches, LenVMTrainer's loss, gamma, saving."""

import logging
import math

import pytest
import torch
from conftest import make_pad_past_vocabulary_tokenizer, make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.targets import LenVMDataCollator, tokenize_rollouts
from lenvm_rl.trainers.lenvm import LenVMConfig, LenVMTrainer

EOS, PAD = 1, 0


def make_records(num=12, seed=0, truncated_every=0, vocab=(10, 150)):
    """Rollout records in the sampler's format, with long-tailed lengths and real token ids."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(num):
        prompt_len = int(torch.randint(3, 9, (1,), generator=g))
        length = int(torch.clamp(torch.exp(torch.randn(1, generator=g) * 0.8 + 2.0), 1, 40))
        cut = truncated_every and i % truncated_every == 0
        completion = torch.randint(*vocab, (length,), generator=g).tolist()
        if not cut:
            completion[-1] = EOS
        records.append(
            {
                "prompt_id": i // 2,
                "prompt_ids": torch.randint(*vocab, (prompt_len,), generator=g).tolist(),
                "completion_ids": completion,
                "finish_reason": "length" if cut else "stop",
            }
        )
    return Dataset.from_list(records)


def targets_by_hand(example, gamma):
    """Every (position, target) pair of one example, from the method doc: G_t = -(1 - gamma^(L - t))."""
    start, L = example["completion_start"], example["completion_length"]
    n = len(example["input_ids"])
    return [(start - 1 + t, -(1 - gamma ** (L - t))) for t in range(L + 1) if start - 1 + t < n]


@pytest.fixture()
def lenvm():
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=1), gamma=0.9)


def test_tokenize_rollouts_drops_and_counts_truncated(caplog):
    records = make_records(num=10, truncated_every=3)  # rows 0, 3, 6, 9 were cut at the cap
    with caplog.at_level(logging.INFO, logger="lenvm_rl.targets"):
        examples = tokenize_rollouts(records)
    assert len(examples) == 6
    assert all(examples["terminated"])
    # Dropping data is worth a warning, with the fraction (a user sees how much of the sampling was lost).
    assert any(r.levelno == logging.WARNING and "4 (40%) cut at the sampling cap" in r.message for r in caplog.records)
    kept = tokenize_rollouts(records, include_truncated=True)
    assert len(kept) == 10 and sum(not t for t in kept["terminated"]) == 4


def test_tokenize_rollouts_prompt_truncation_keeps_targets():
    records = Dataset.from_list(
        [{"prompt_ids": list(range(10, 30)), "completion_ids": [40, 41, EOS], "finish_reason": "stop"}]
    )
    full = tokenize_rollouts(records)[0]
    cut = tokenize_rollouts(records, max_prompt_length=5)[0]
    assert cut["input_ids"] == list(range(25, 30)) + [40, 41, EOS]  # the end of the prompt (assistant header) stays
    assert cut["completion_length"] == full["completion_length"] == 3
    # The completion window: the first tokens keep exact targets computed from the true length.
    window = tokenize_rollouts(records, max_prompt_length=5, max_length=7)[0]
    assert window["input_ids"] == list(range(25, 30)) + [40, 41] and window["completion_length"] == 3
    batch = LenVMDataCollator(gamma=0.5, pad_token_id=PAD)([window])
    g = 0.5
    expected = [0, 0, 0, 0, -(1 - g**3), -(1 - g**2), -(1 - g**1)]
    torch.testing.assert_close(batch["length_targets"][0], torch.tensor(expected, dtype=torch.float64))


def test_tokenize_rollouts_retokenises_text_with_the_lenvm_tokenizer():
    tokenizer = make_tiny_tokenizer()
    records = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "how many apples ?"}],
                "completion": "he has 3 apples . #### 3",
                "finish_reason": "stop",
            }
        ]
    )
    example = tokenize_rollouts(records, tokenizer=tokenizer, reuse_token_ids=False)[0]
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how many apples ?"}], add_generation_prompt=True
    )["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == list(prompt_ids)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert example["completion_length"] == 8  # seven words + EOS
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize_rollouts(records, reuse_token_ids=False)


def test_tokenize_rollouts_counts_empty_prompts(caplog):
    records = make_records(num=4).to_list()
    records[1]["prompt_ids"] = []  # no state s_0 to give a value to
    with caplog.at_level(logging.WARNING):
        examples = tokenize_rollouts(Dataset.from_list(records))
    assert len(examples) == 3
    assert "3 kept of 4" in caplog.text and "0 empty completions and 1 records with an empty prompt dropped" in (
        caplog.text
    )


def test_tokenize_rollouts_nothing_left_is_a_clear_error():
    with pytest.raises(ValueError, match="include_truncated"):
        tokenize_rollouts(make_records(num=3, truncated_every=1))
    with pytest.raises(ValueError, match=r"max_prompt_length \(8, --max_prompt_length\) .* \(8, --max_length\)"):
        tokenize_rollouts(make_records(num=3), max_prompt_length=8, max_length=8)


def test_collator_targets_match_the_method_doc():
    examples = tokenize_rollouts(make_records(num=5))
    batch = LenVMDataCollator(gamma=0.9, pad_token_id=PAD)(list(examples))
    for i, example in enumerate(examples):
        pairs = targets_by_hand(example, 0.9)
        assert batch["target_mask"][i].sum() == len(pairs)
        for position, target in pairs:
            assert batch["target_mask"][i, position]
            assert math.isclose(float(batch["length_targets"][i, position]), target, rel_tol=1e-12, abs_tol=1e-15)


def test_loss_is_token_average_over_the_batch(lenvm):
    gamma = 0.9
    examples = list(tokenize_rollouts(make_records(num=6)))
    assert len({e["completion_length"] for e in examples}) > 2  # sequences of different lengths
    batch = LenVMDataCollator(gamma=gamma, pad_token_id=PAD)(examples)
    trainer = LenVMTrainer(lenvm, args=tiny_args(), train_dataset=Dataset.from_list(examples))
    loss = trainer.compute_loss(lenvm, batch, num_items_in_batch=batch["target_mask"].sum())

    squared, count = 0.0, 0
    for example in examples:
        ids = torch.tensor([example["input_ids"]])
        values = lenvm(input_ids=ids).values[0].double().detach()
        for position, target in targets_by_hand(example, gamma):
            squared += (float(values[position]) - target) ** 2
            count += 1
    assert math.isclose(float(loss.detach()), squared / count, rel_tol=1e-5)
    with torch.no_grad():  # what a per-sequence average would give: must differ on this batch
        per_sequence_mean = sum(
            sum((float(lenvm(input_ids=torch.tensor([e["input_ids"]])).values[0, p]) - t) ** 2 for p, t in pairs)
            / len(pairs)
            for e in examples
            for pairs in [targets_by_hand(e, gamma)]
        ) / len(examples)
    assert not math.isclose(per_sequence_mean, squared / count, rel_tol=1e-3)


def test_packed_batches_equal_padded_batches(lenvm):
    examples = list(tokenize_rollouts(make_records(num=6, truncated_every=4), include_truncated=True))
    padded = LenVMDataCollator(gamma=0.9, pad_token_id=PAD)(examples)
    packed = LenVMDataCollator(gamma=0.9, pad_token_id=PAD, padding_free=True)(examples)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # fewer rows, less padding
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]
    assert packed["target_mask"].sum() == padded["target_mask"].sum()
    assert "attention_mask" not in packed and "bootstrap_index" in packed
    trainer = LenVMTrainer(lenvm, args=tiny_args(), train_dataset=Dataset.from_list(examples))

    def loss_and_grads(batch):
        lenvm.zero_grad()
        loss = trainer.compute_loss(lenvm, batch, num_items_in_batch=batch["target_mask"].sum())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lenvm.parameters()]

    loss_padded, grads_padded = loss_and_grads(padded)
    loss_packed, grads_packed = loss_and_grads(packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_packed, grads_padded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_censored_rows_bootstrap_from_the_detached_value(lenvm):
    gamma = 0.9
    examples = list(tokenize_rollouts(make_records(num=4, truncated_every=2), include_truncated=True))
    censored = [e for e in examples if not e["terminated"]][0]
    batch = LenVMDataCollator(gamma=gamma, pad_token_id=PAD)([censored])
    trainer = LenVMTrainer(lenvm, args=tiny_args(), train_dataset=Dataset.from_list(examples))
    loss = trainer.compute_loss(lenvm, batch, num_items_in_batch=batch["target_mask"].sum())
    values = lenvm(input_ids=torch.tensor([censored["input_ids"]])).values[0].detach().double()
    start, L = censored["completion_start"], censored["completion_length"]
    tail = float(values[-1])  # V(s_L): the state after the last sampled token
    errors = [
        (float(values[start - 1 + t]) - (-(1 - gamma ** (L - t)) + gamma ** (L - t) * tail)) ** 2 for t in range(L + 1)
    ]
    assert math.isclose(float(loss.detach()), sum(errors) / len(errors), rel_tol=1e-5)


def tiny_args(tmp_path="unused", **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=1e9,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return LenVMConfig(**{**defaults, **kwargs})


@pytest.mark.parametrize("padding_free", [False, True])
def test_gradient_accumulation_1_vs_4_gives_the_same_step(tmp_path, padding_free):
    records = make_records(num=8)

    def one_step(batch_size, accumulation):
        model = LengthValueModel.from_backbone(make_tiny_causal_lm("qwen2", seed=3), gamma=0.9)
        args = tiny_args(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            padding_free=padding_free,
        )
        LenVMTrainer(model, args=args, train_dataset=records).train()
        return [p.detach().clone() for p in model.parameters()]

    before = [
        p.detach().clone()
        for p in LengthValueModel.from_backbone(make_tiny_causal_lm("qwen2", seed=3), 0.9).parameters()
    ]
    full, accumulated = one_step(4, 1), one_step(1, 4)
    assert any(not torch.equal(a, b) for a, b in zip(full, before))
    for a, b in zip(full, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_free", [False, True])
def test_pad_id_past_the_vocabulary(tmp_path, padding_free):
    """A LenVM tokenizer with TRL's `[PAD]` recipe (a pad id equal to the embedding size): padded and packed batches
    embed padding as a valid id, so the step is the one taken with an in-vocabulary pad token."""

    def one_step(tokenizer):
        model = LengthValueModel.from_backbone(make_tiny_causal_lm("qwen2", seed=3), gamma=0.9)
        args = tiny_args(tmp_path, per_device_train_batch_size=4, max_steps=1, padding_free=padding_free)
        LenVMTrainer(model, args=args, train_dataset=make_records(num=8), processing_class=tokenizer).train()
        return [p.detach().clone() for p in model.parameters()]

    tokenizer = make_pad_past_vocabulary_tokenizer()
    assert tokenizer.pad_token_id == make_tiny_causal_lm("qwen2").get_input_embeddings().num_embeddings
    for a, b in zip(one_step(tokenizer), one_step(make_tiny_tokenizer()), strict=True):
        assert torch.equal(a, b)


def test_gamma_percentile_rule_is_logged_and_stored(tmp_path, caplog):
    records = make_records(num=20)
    lengths = sorted(len(r) for r in records["completion_ids"])
    with caplog.at_level(logging.WARNING):
        trainer = LenVMTrainer(str(_saved_backbone(tmp_path)), args=tiny_args(tmp_path), train_dataset=records)
    quantile = float(torch.quantile(torch.tensor(lengths, dtype=torch.float64), 0.99))
    assert math.isclose(trainer.model.gamma, 0.01 ** (1 / quantile), rel_tol=1e-9)
    assert "percentile" in caplog.text


def test_mismatched_gamma_is_a_clear_error(lenvm):
    with pytest.raises(ValueError, match="gamma"):
        LenVMTrainer(lenvm, args=tiny_args(gamma=0.99), train_dataset=make_records())
    with pytest.raises(ValueError, match="gamma"):
        LenVMConfig(output_dir="x", gamma=1.0)


def test_the_value_head_built_from_a_backbone_is_seeded(tmp_path):
    # The head is initialised before Trainer.__init__ seeds the run: the same seed must give the same head (and the
    # same run), another seed another head.
    def head(seed):
        torch.manual_seed(1000 + seed)  # whatever the global RNG state was before
        args = tiny_args(tmp_path, gamma=0.9, seed=seed)
        trainer = LenVMTrainer(str(_saved_backbone(tmp_path)), args=args, train_dataset=make_records())
        return trainer.model.v_head.state_dict()

    first, again, other = head(0), head(0), head(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_train_save_and_reload(tmp_path):
    tokenizer = make_tiny_tokenizer()
    records = make_records(num=16)
    args = tiny_args(tmp_path, num_train_epochs=2, learning_rate=1e-3, optim="adamw_torch", gamma=0.9)
    trainer = LenVMTrainer(
        str(_saved_backbone(tmp_path)), args=args, train_dataset=records, processing_class=tokenizer
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    assert result.training_loss > 0 and math.isfinite(result.training_loss)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    trainer.save_model(str(tmp_path / "lenvm"))
    reloaded = LengthValueModel.from_pretrained(tmp_path / "lenvm")
    assert reloaded.gamma == 0.9
    ids = torch.tensor([records[0]["prompt_ids"] + records[0]["completion_ids"]])
    torch.testing.assert_close(reloaded(input_ids=ids).values, trainer.model.eval()(input_ids=ids).values)


def test_trainable_layers_trains_only_the_head_and_the_last_layers(tmp_path):
    args = tiny_args(
        tmp_path, num_train_epochs=1, learning_rate=1e-3, optim="adamw_torch", gamma=0.9, trainable_layers=1
    )
    trainer = LenVMTrainer(str(_saved_backbone(tmp_path)), args=args, train_dataset=make_records(num=8))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert moved and all(name.startswith(("v_head.", "backbone.layers.1.", "backbone.norm.")) for name in moved)
    assert any(name.startswith("backbone.layers.1.") for name in moved) and any("v_head" in n for n in moved)
    with pytest.raises(ValueError, match="exceeds the backbone's 2 layers"):
        LenVMTrainer(
            str(_saved_backbone(tmp_path)),
            args=tiny_args(tmp_path, gamma=0.9, trainable_layers=3),
            train_dataset=make_records(num=8),
        )


def _saved_backbone(tmp_path):
    path = tmp_path / "backbone"
    if not path.exists():
        make_tiny_causal_lm("llama", seed=2).save_pretrained(path)
        make_tiny_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- malformed records


def record(**overrides):
    return {
        "prompt_id": "p0",
        "prompt_ids": [10, 11],
        "completion_ids": [40, 41, EOS],
        "finish_reason": "stop",
        **overrides,
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(completion_ids=[40, 5.7, EOS]), r"completion_ids\[1\] is 5.7, not a token id in \[0, "),
        (dict(completion_ids=[40, -1, EOS]), r"completion_ids\[1\] is -1"),
        (dict(completion_ids=[40, 10_000, EOS]), r"completion_ids\[1\] is 10000"),
        (dict(completion_ids=[40, float("nan"), EOS]), r"completion_ids\[1\] is nan"),
        (dict(completion_ids=None), r"completion_ids is missing or not a list"),
        (dict(prompt_ids=None), r"prompt_ids is missing or not a list"),
        (dict(finish_reason="STOP"), r"finish_reason must be 'stop' .* got 'STOP'"),
        (dict(finish_reason=None), r"finish_reason must be 'stop' .* got None"),
    ],
)
def test_malformed_records_name_the_record_and_field(overrides, message):
    records = Dataset.from_list([record(prompt_id="p1"), record(prompt_id="p2")])
    records = Dataset.from_list([record(prompt_id="p1"), {**record(prompt_id="p2"), **overrides}])
    with pytest.raises(ValueError, match=rf"rollout record 1 \(prompt_id 'p2'\): {message}"):
        tokenize_rollouts(records, tokenizer=make_tiny_tokenizer())


def test_stop_without_eos_warns(caplog):
    records = Dataset.from_list([record(), record(completion_ids=[40, 41])])
    with caplog.at_level(logging.WARNING, logger="lenvm_rl.targets"):
        tokenize_rollouts(records, tokenizer=make_tiny_tokenizer())
    assert "1 of 2 records are marked finish_reason='stop' but their completion_ids do not end with EOS" in caplog.text


def test_max_length_holds_without_max_prompt_length():
    records = Dataset.from_list([record(prompt_ids=list(range(10, 30)))])
    example = tokenize_rollouts(records, max_length=8)[0]
    assert len(example["input_ids"]) == 8 and example["input_ids"][:7] == list(range(23, 30))
    assert example["completion_length"] == 3  # the true length still sets the targets
