"""Tests of `lenvm_rl.modeling`: both checkpoint formats, padding invariance, freezing, LoRA, dtypes, errors."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import make_pad_past_vocabulary_tokenizer, make_tiny_causal_lm, make_tiny_tokenizer
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config

import lenvm_rl.lenvm_checkpoint as lenvm_checkpoint
from lenvm_rl.core import values_to_lengths
from lenvm_rl.modeling import (
    LengthValueModel,
    check_tokenizers_compatible,
    fill_padding,
    freeze_model,
    load_frozen_lenvm,
)
from lenvm_rl.transformers_compat import is_activation_checkpointing

H = 32  # hidden size of the tiny models in conftest
HEAD_SHAPES = {
    "v_head.fc.weight": [H, H],
    "v_head.fc.bias": [H],
    "v_head.summary.weight": [1, H],
    "v_head.summary.bias": [1],
}


def random_head(seed=0):
    """A value head as the reference implementation saves it: four float32 tensors, nothing else."""
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.3 * torch.randn(shape, generator=generator) for key, shape in HEAD_SHAPES.items()}


def values_by_hand(hidden_states, head):
    """V = -sigmoid(summary(silu(fc(h)))), written out from the paper's equation."""
    hidden = F.silu(hidden_states @ head["v_head.fc.weight"].T + head["v_head.fc.bias"])
    return -torch.sigmoid(hidden @ head["v_head.summary.weight"].T + head["v_head.summary.bias"]).squeeze(-1)


def token_ids(*lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 150, (n,), generator=generator) for n in lengths]


def pad(sequences, side, length=None):
    """Pad 1-D id tensors with id 0 to `length`; returns (input_ids, attention_mask), both (B, T)."""
    length = length or max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
        input_ids[row, span] = sequence
        attention_mask[row, span] = 1
    return input_ids, attention_mask


@pytest.fixture
def reference_dir(tmp_path, tiny_causal_lm_dir):
    """A reference-format LenVM written independently: plain backbone directory + hand-written head."""
    path = tmp_path / "reference"
    shutil.copytree(tiny_causal_lm_dir, path)
    save_file(random_head(), path / "value_head.safetensors")
    return path


@pytest.fixture
def lenvm():
    return LengthValueModel.from_backbone(make_tiny_causal_lm("llama"), gamma=0.99).eval()


# ---------------------------------------------------------------------- reference format
def test_reference_checkpoint_values_match_hand_computation(reference_dir, tiny_arch):
    model = LengthValueModel.from_pretrained(reference_dir, gamma=0.997)
    input_ids = token_ids(9)[0][None]  # (1, 9)
    hidden_states = AutoModel.from_pretrained(reference_dir)(input_ids).last_hidden_state
    expected = values_by_hand(hidden_states, load_file(reference_dir / "value_head.safetensors"))

    with torch.no_grad():
        output = model(input_ids)
    torch.testing.assert_close(output.values, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(output.values, -torch.sigmoid(output.value_logits))
    assert output.values.shape == (1, 9) and output.values.dtype == torch.float32
    assert model.gamma == 0.997 and not model.training
    assert model.config.hidden_size == H
    assert json.loads((reference_dir / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")


def test_tied_checkpoint_with_only_lm_head_weight(tmp_path):
    causal_lm = make_tiny_causal_lm("qwen2", tie=True)
    causal_lm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    embeddings = weights.pop("model.embed_tokens.weight")
    weights["lm_head.weight"] = embeddings.clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    save_file(random_head(), tmp_path / "value_head.safetensors")

    model = LengthValueModel.from_pretrained(tmp_path, gamma=0.997)
    assert torch.equal(model.backbone.get_input_embeddings().weight, embeddings)
    input_ids = token_ids(6)[0][None]
    with torch.no_grad():
        expected = values_by_hand(causal_lm.model(input_ids).last_hidden_state, random_head())
        torch.testing.assert_close(model(input_ids).values, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- our format
def test_save_load_round_trip_and_reference_loaders_read_it(tmp_path, lenvm, tiny_tokenizer):
    lenvm.generator_model, lenvm.data_description = "tiny-policy", "toy prompts"
    input_ids, attention_mask = pad(token_ids(5, 8), "left")
    with torch.no_grad():
        expected = lenvm(input_ids, attention_mask=attention_mask).values
    lenvm.save_pretrained(tmp_path / "lenvm", tokenizer=tiny_tokenizer)
    path = tmp_path / "lenvm"

    loaded = LengthValueModel.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids, attention_mask=attention_mask).values, expected, atol=1e-6, rtol=0
        )
    assert (loaded.gamma, loaded.generator_model, loaded.data_description) == (0.99, "tiny-policy", "toy prompts")
    assert LengthValueModel.from_pretrained(path, gamma=0.99).gamma == 0.99

    # What the reference loaders see: a causal-LM directory and exactly the four head tensors.
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    head = load_file(path / "value_head.safetensors")
    assert {key: list(value.shape) for key, value in head.items()} == HEAD_SHAPES
    assert all(value.dtype == torch.float32 for value in head.values())
    causal_lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        hidden_states = causal_lm.model(input_ids[:1, -5:]).last_hidden_state
    torch.testing.assert_close(values_by_hand(hidden_states, head), expected[:1, -5:], atol=1e-5, rtol=0)
    assert (path / "tokenizer.json").is_file()
    assert json.loads((path / "lenvm_config.json").read_text())["format_version"] == 1


def test_sharded_save_round_trip(tmp_path, lenvm):
    lenvm.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    input_ids = token_ids(4)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(
            LengthValueModel.from_pretrained(tmp_path)(input_ids).values, lenvm(input_ids).values
        )


def test_save_overwrites_atomically_and_keeps_foreign_files(tmp_path, lenvm):
    target = tmp_path / "out"
    lenvm.save_pretrained(target, max_shard_size="20KB")  # leaves shards a later unsharded save must remove
    (target / "runs").mkdir()
    (target / "runs" / "events.log").write_text("kept")
    with torch.no_grad():
        lenvm.v_head.summary.bias.fill_(1.0)
    lenvm.save_pretrained(target)

    assert (target / "runs" / "events.log").read_text() == "kept"
    assert not (target / "model.safetensors.index.json").exists()
    assert not list(target.glob("model-*.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directories left behind
    assert LengthValueModel.from_pretrained(target).v_head.summary.bias.item() == 1.0


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, lenvm, monkeypatch):
    target = tmp_path / "out"
    lenvm.save_pretrained(target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lenvm_checkpoint, "save_file", crash)
    with torch.no_grad():
        lenvm.v_head.summary.bias.fill_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        lenvm.save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------- bad input
def test_missing_value_head_is_a_clear_error(tiny_causal_lm_dir):
    with pytest.raises(ValueError, match=r"no value_head\.safetensors.*from_backbone"):
        LengthValueModel.from_pretrained(tiny_causal_lm_dir, gamma=0.997)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda head: head.pop("v_head.summary.bias"),
            r"missing key 'v_head\.summary\.bias' \(expected shape \[1\]\)",
        ),
        (lambda head: head.update(extra=torch.zeros(1)), r"unexpected key 'extra'"),
        (
            lambda head: head.update({"v_head.fc.weight": torch.zeros(H, 2 * H)}),
            r"'v_head\.fc\.weight' has shape \[32, 64\], expected \[32, 32\]",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_bad_value_head_keys_are_named(reference_dir, edit, message):
    head = random_head()
    edit(head)
    save_file(head, reference_dir / "value_head.safetensors")
    with pytest.raises(ValueError, match=message):
        LengthValueModel.from_pretrained(reference_dir, gamma=0.997)


# Gamma errors name the flags of both kinds of recipes as well as the Python argument.
GAMMA_FLAGS = r"--lenvm_gamma in the RL recipes \(ppo_gsm8k.py, grpo_gsm8k.py\), --gamma in the others"


def test_gamma_must_be_passed_for_reference_checkpoints(reference_dir):
    with pytest.raises(
        ValueError, match=rf"does not store gamma.*{GAMMA_FLAGS}.*from_pretrained\(path, gamma=0\.997\)"
    ):
        LengthValueModel.from_pretrained(reference_dir)


def test_gamma_passed_must_match_stored(tmp_path, lenvm):
    lenvm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"gamma=0\.997 was passed but .* gamma=0\.99.*{GAMMA_FLAGS}.*`gamma=`"):
        LengthValueModel.from_pretrained(tmp_path, gamma=0.997)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, -0.1])
def test_gamma_outside_unit_interval(reference_dir, gamma):
    with pytest.raises(ValueError, match=rf"gamma must be in \(0, 1\).*{GAMMA_FLAGS}; `gamma=` in Python"):
        LengthValueModel.from_pretrained(reference_dir, gamma=gamma)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\)"):
        LengthValueModel.from_backbone(make_tiny_causal_lm("llama"), gamma=gamma)


def test_a_plain_language_model_is_not_a_lenvm(tmp_path):
    make_tiny_causal_lm("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"plain language model.*recipes/train_lenvm.py --model_name_or_path"):
        LengthValueModel.from_pretrained(tmp_path, gamma=0.99)


@pytest.mark.parametrize("config", [BertConfig(), T5Config()], ids=["bert", "t5"])
def test_non_causal_backbone_is_rejected(tmp_path, config):
    config.save_pretrained(tmp_path)
    save_file(random_head(), tmp_path / "value_head.safetensors")
    message = f"model_type '{config.model_type}' .* is not a decoder-only causal LM"
    with pytest.raises(ValueError, match=message):
        LengthValueModel.from_pretrained(tmp_path, gamma=0.997)
    with pytest.raises(ValueError, match=message):
        LengthValueModel.from_backbone(tmp_path, gamma=0.997)


def test_encoder_instance_is_rejected():
    bert = BertModel(BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=H))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        LengthValueModel.from_backbone(bert, gamma=0.997)


def test_incomplete_backbone_and_bad_paths(tmp_path, lenvm):
    lenvm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights, e\.g\. \['layers\.1\.mlp\.up_proj\.weight'\]"):
        LengthValueModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a local directory"):
        LengthValueModel.from_pretrained(tmp_path / "absent", gamma=0.997)
    (tmp_path / "lenvm_config.json").write_text(json.dumps({"format_version": 99, "gamma": 0.99}))
    with pytest.raises(ValueError, match="format_version 99.*upgrade lenvm-rl"):
        LengthValueModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- forward semantics
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_values_do_not_depend_on_padding_or_batch(arch):
    # Rotary models (Llama, Qwen2) are nearly shift-invariant anyway; GPT-2's absolute position embeddings
    # shift every value of a left-padded row unless positions count real tokens only.
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=160, n_embd=H, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1
        )
        torch.manual_seed(0)
        causal_lm = GPT2LMHeadModel(config)
    else:
        causal_lm = make_tiny_causal_lm(arch)
    model = LengthValueModel.from_backbone(causal_lm, gamma=0.99).eval()
    model.v_head.load_state_dict({key.removeprefix("v_head."): value for key, value in random_head().items()})
    short, sequence, long = token_ids(3, 5, 8)
    with torch.no_grad():
        alone = model(sequence[None]).values[0]  # (5,)
        variants = {}
        for side in ("left", "right"):
            input_ids, attention_mask = pad([sequence], side, length=9)
            values = model(input_ids, attention_mask=attention_mask).values
            variants[f"{side}-padded"] = values[0][attention_mask[0].bool()]
            input_ids, attention_mask = pad([long, sequence, short], side)
            values = model(input_ids, attention_mask=attention_mask).values
            assert torch.isfinite(values).all()
            variants[f"{side}-padded batch"] = values[1][attention_mask[1].bool()]
        for name, values in variants.items():
            torch.testing.assert_close(values, alone, atol=1e-5, rtol=0, msg=name)


def test_pad_id_past_the_vocabulary(lenvm):
    """TRL's `[PAD]` recipe puts the pad id one past the vocabulary: the forward embeds padding as id 0 (either side,
    with or without a cache), so the values are those of the same batch padded with a valid id."""
    vocab = lenvm.backbone.get_input_embeddings().num_embeddings
    short, sequence, long = token_ids(3, 5, 8)
    with torch.no_grad():
        for side in ("left", "right"):
            input_ids, attention_mask = pad([long, sequence, short], side)
            past_vocabulary = input_ids.masked_fill(attention_mask == 0, vocab)
            expected = lenvm(input_ids, attention_mask=attention_mask).values
            assert torch.equal(lenvm(past_vocabulary, attention_mask=attention_mask).values, expected)
        # A prefill, then two tokens against its cache (the mask then covers past and new columns).
        input_ids, attention_mask = pad([long, sequence, short], "left")
        past_vocabulary = input_ids.masked_fill(attention_mask == 0, vocab)
        expected = lenvm(input_ids, attention_mask=attention_mask).values
        outputs = lenvm(past_vocabulary[:, :-2], attention_mask=attention_mask[:, :-2], use_cache=True)
        cached = lenvm(past_vocabulary[:, -2:], attention_mask=attention_mask, cache=outputs.cache, use_cache=True)
        torch.testing.assert_close(cached.values, expected[:, -2:], atol=1e-5, rtol=0)
    assert fill_padding(past_vocabulary, attention_mask).max() < vocab
    load_frozen_lenvm(lenvm, make_pad_past_vocabulary_tokenizer())  # the pad id is not read: accepted


def test_predicted_lengths(lenvm):
    prompts = token_ids(4, 7)
    with torch.no_grad():
        expected = torch.stack([values_to_lengths(lenvm(p[None]).values[0, -1], lenvm.gamma) for p in prompts])
    for side in ("left", "right"):
        input_ids, attention_mask = pad(prompts, side)
        torch.testing.assert_close(lenvm.predict_prompt_lengths(input_ids, attention_mask), expected)
    remaining = lenvm.predict_remaining_lengths(*pad(prompts, "right"))
    assert remaining.shape == (2, 7) and (remaining > 0).all()
    # A fresh head starts near V = -0.5, i.e. log(2) / -log(gamma) ~ 69 tokens for gamma = 0.99.
    torch.testing.assert_close(expected, torch.full((2,), 69.0), atol=5.0, rtol=0)


def test_bf16_backbone_keeps_float32_head(reference_dir):
    input_ids, attention_mask = pad(token_ids(4, 6), "left")
    with torch.no_grad():
        reference = LengthValueModel.from_pretrained(reference_dir, gamma=0.997)(input_ids, attention_mask).values
        model = LengthValueModel.from_pretrained(reference_dir, gamma=0.997, dtype=torch.bfloat16)
        assert next(model.backbone.parameters()).dtype == torch.bfloat16
        assert all(param.dtype == torch.float32 for param in model.v_head.parameters())
        values = model(input_ids, attention_mask=attention_mask).values
        assert values.dtype == torch.float32
        torch.testing.assert_close(values, reference, atol=2e-2, rtol=0)
        # Wrappers that cast everything (DeepSpeed bf16, autocast) still get a float32 head output.
        model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(input_ids, attention_mask=attention_mask).values.dtype == torch.float32


# ---------------------------------------------------------------------- training helpers
def test_freeze_model(lenvm):
    lenvm.train()
    assert freeze_model(lenvm) is lenvm
    assert not any(param.requires_grad for param in lenvm.parameters())
    assert not any(module.training for module in lenvm.modules())
    assert not lenvm(token_ids(4)[0][None]).values.requires_grad


def test_load_frozen_lenvm_checks_what_the_trainers_need(tmp_path, lenvm, tiny_tokenizer, caplog):
    wider = LengthValueModel.from_backbone(
        make_tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer) + 2), gamma=0.99
    )
    wider.save_pretrained(tmp_path / "ours", tokenizer=make_tiny_tokenizer(("x", "y")))
    loaded = load_frozen_lenvm(tmp_path / "ours", make_tiny_tokenizer(("x", "y")))
    assert loaded.gamma == 0.99 and not any(param.requires_grad for param in loaded.parameters())
    with pytest.raises(ValueError, match="mappings differ"):  # the tokenizer saved with the LenVM is compared
        load_frozen_lenvm(tmp_path / "ours", make_tiny_tokenizer(("y", "x")))
    with pytest.raises(ValueError, match=r"--lenvm_gamma / `lenvm_gamma=`.*`gamma=`.* differs from the given LenVM's"):
        load_frozen_lenvm(lenvm, tiny_tokenizer, gamma=0.9)
    with pytest.raises(ValueError, match="must be a LengthValueModel"):
        load_frozen_lenvm(make_tiny_causal_lm("llama"), tiny_tokenizer)
    bigger = make_tiny_tokenizer(extra_words=tuple(f"w{i}" for i in range(lenvm.backbone.config.vocab_size)))
    with pytest.raises(ValueError, match="embeds"):
        load_frozen_lenvm(lenvm, bigger)
    with caplog.at_level("WARNING"):
        load_frozen_lenvm(lenvm, tiny_tokenizer)  # no tokenizer to compare: only the embedding size is checked
    assert "only its embedding size was checked" in caplog.text


def test_lora_trains_adapters_and_head_only_and_saves_merged(tmp_path, lenvm):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lenvm.apply_lora(config).train()
    before = {name: param.detach().clone() for name, param in lenvm.named_parameters()}
    trainable = {name for name, param in lenvm.named_parameters() if param.requires_grad}
    assert trainable == {name for name in before if "lora_" in name or name.startswith("v_head.")}

    input_ids, attention_mask = pad(token_ids(5, 7), "right")
    optimizer = torch.optim.SGD([param for param in lenvm.parameters() if param.requires_grad], lr=1.0)
    values = lenvm(input_ids, attention_mask=attention_mask).values
    ((values + 0.9) ** 2)[attention_mask.bool()].mean().backward()
    optimizer.step()

    for name, param in lenvm.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name

    lenvm.eval()
    with torch.no_grad():
        expected = lenvm(input_ids, attention_mask=attention_mask).values
    lenvm.save_pretrained(tmp_path)
    assert isinstance(lenvm.backbone, PeftModel)  # saving merged a copy, not the live model
    for name, param in lenvm.named_parameters():
        assert name in trainable or torch.equal(param, before[name]), name
    assert not any("lora" in key for key in load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        reloaded = LengthValueModel.from_pretrained(tmp_path)(input_ids, attention_mask=attention_mask).values
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=0)


def test_activation_checkpointing_passthrough(lenvm):
    input_ids = token_ids(6)[0][None]
    with torch.no_grad():
        expected = lenvm(input_ids).values
    lenvm.train()
    lenvm.activation_checkpointing_enable()
    assert is_activation_checkpointing(lenvm.backbone)
    values = lenvm(input_ids).values
    values.sum().backward()
    torch.testing.assert_close(values.detach(), expected)
    assert lenvm.backbone.layers[0].self_attn.q_proj.weight.grad is not None
    lenvm.activation_checkpointing_disable()
    assert not is_activation_checkpointing(lenvm.backbone)


def test_from_backbone_copies_the_policy():
    policy = make_tiny_causal_lm("qwen2")
    model = LengthValueModel.from_backbone(policy, gamma=0.997, generator_model="policy")
    assert model.training and all(param.requires_grad for param in model.parameters())
    assert model.backbone.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.backbone.embed_tokens.weight.zero_()
    assert policy.model.embed_tokens.weight.abs().sum() > 0


# ---------------------------------------------------------------------- tokenizers
def test_tokenizer_compatibility(tiny_tokenizer):
    check_tokenizers_compatible(tiny_tokenizer, make_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"vocabulary size 153 \(policy\) vs 154 \(LenVM\).*'zebra': None vs 153"):
        check_tokenizers_compatible(tiny_tokenizer, make_tiny_tokenizer(extra_words=("zebra",)))
    with pytest.raises(ValueError, match=r"2 token->id mappings differ .*'x': 153 vs 154.*trained with the policy's"):
        check_tokenizers_compatible(make_tiny_tokenizer(("x", "y")), make_tiny_tokenizer(("y", "x")))
    other_eos = make_tiny_tokenizer()
    other_eos.eos_token = "<|end|>"
    with pytest.raises(ValueError, match=r"eos_token_id 1 \(policy\) vs 6 \(LenVM\)"):
        check_tokenizers_compatible(tiny_tokenizer, other_eos)


def test_prompt_format_travels_with_the_checkpoint(tmp_path, lenvm):
    lenvm.prompt_format = {"system_prompt": None, "instruction": "End with #### N."}
    lenvm.save_pretrained(tmp_path / "lenvm")
    assert LengthValueModel.from_pretrained(tmp_path / "lenvm").prompt_format == lenvm.prompt_format
