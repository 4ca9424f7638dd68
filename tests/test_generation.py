"""Continuous-batching sampler: agrees with `model.generate`, does not depend on batching when greedy, stops on EOS.
The key/value cache it runs on appends in place and equals transformers' own."""

import pytest
import torch
from conftest import make_pad_past_vocabulary_tokenizer, make_tiny_causal_lm
from transformers import DynamicCache

from lenvm_rl.generation import generate_completions, left_pad, sample_next_tokens
from lenvm_rl.kv_cache import AppendInPlaceLayer, append_rows, forward_with_cache, keep_rows, prefill
from lenvm_rl.modeling import position_ids_from_mask
from lenvm_rl.transformers_compat import cache_kwargs

# The decoding loops hand the KV cache over as `cache` (transformers >= 5.24): the deprecated keyword must not return.
pytestmark = pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")

PROMPTS = [[{"role": "user", "content": " ".join(["how many apples"] * (i % 4 + 1)) + " ?"}] for i in range(7)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return make_tiny_causal_lm(request.param, hidden_size=64)


def test_greedy_matches_model_generate(model, tiny_tokenizer):
    completions = generate_completions(
        model, tiny_tokenizer, PROMPTS, max_new_tokens=12, temperature=0.0, batch_size=3
    )
    for completion, prompt in zip(completions, PROMPTS):
        inputs = tiny_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt")
        output = model.generate(
            **inputs,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tiny_tokenizer.eos_token_id,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
        assert completion.prompt_ids == inputs["input_ids"][0].tolist()
        assert completion.completion_ids == output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_greedy_does_not_depend_on_batching(model, tiny_tokenizer, batch_size):
    reference = generate_completions(model, tiny_tokenizer, PROMPTS, 2, 10, temperature=0.0, batch_size=4)
    completions = generate_completions(model, tiny_tokenizer, PROMPTS, 2, 10, temperature=0.0, batch_size=batch_size)
    assert [c.completion_ids for c in completions] == [c.completion_ids for c in reference]
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(i, j) for i in range(7) for j in range(2)]


def test_pad_id_past_the_vocabulary(model, tiny_tokenizer):
    """TRL's `[PAD]` recipe (a pad id equal to the embedding size): prefills embed padding as a valid id, so the samples
    are those drawn with an in-vocabulary pad token."""
    tokenizer = make_pad_past_vocabulary_tokenizer()
    assert tokenizer.pad_token_id == model.get_input_embeddings().num_embeddings
    completions = generate_completions(model, tokenizer, PROMPTS, 2, 10, temperature=1.0, batch_size=3)
    expected = generate_completions(model, tiny_tokenizer, PROMPTS, 2, 10, temperature=1.0, batch_size=3)
    assert [c.completion_ids for c in completions] == [c.completion_ids for c in expected]


def test_sampling_is_seeded_and_returns_one_record_per_sample(model, tiny_tokenizer):
    def sample(seed):
        return generate_completions(model, tiny_tokenizer, PROMPTS, 3, 10, temperature=1.0, batch_size=4, seed=seed)

    first, again, other = sample(0), sample(0), sample(1)
    assert len(first) == 3 * len(PROMPTS)
    assert [c.completion_ids for c in first] == [c.completion_ids for c in again]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in other]
    for completion in first:
        assert completion.text == tiny_tokenizer.decode(completion.completion_ids, skip_special_tokens=True)


def _with_eos_bias(model, eos_token_id, bias):
    """An untied copy of `model` whose LM head adds `bias` to the EOS logit."""
    biased = make_tiny_causal_lm(model.config.model_type, hidden_size=64, tie=False)
    biased.load_state_dict(model.state_dict(), strict=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.data.copy_(model.get_output_embeddings().weight.data)
    head.bias.data.zero_()
    head.bias.data[eos_token_id] = bias
    biased.lm_head = head
    return biased.eval()


def test_finish_reasons_and_eos_included(model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    always_stop = _with_eos_bias(model, eos, 100.0)
    for completion in generate_completions(always_stop, tiny_tokenizer, PROMPTS, max_new_tokens=5, temperature=1.0):
        assert completion.completion_ids == [eos] and completion.finish_reason == "stop" and completion.text == ""

    never_stop = _with_eos_bias(model, eos, -100.0)
    for completion in generate_completions(never_stop, tiny_tokenizer, PROMPTS, max_new_tokens=5, temperature=1.0):
        assert len(completion.completion_ids) == 5 and completion.finish_reason == "length"
        assert eos not in completion.completion_ids

    # Mixed lengths: rows finish at different steps while new prompts are spliced into the batch.
    sometimes = _with_eos_bias(model, eos, 3.0)
    completions = generate_completions(sometimes, tiny_tokenizer, PROMPTS, 4, 12, temperature=1.0, batch_size=4)
    lengths = {len(c.completion_ids) for c in completions}
    assert len(lengths) > 2
    for completion in completions:
        ids = completion.completion_ids
        assert (ids[-1] == eos) == (completion.finish_reason == "stop")
        assert eos not in ids[:-1]


def test_string_prompts_are_tokenized_as_is(model, tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, tokenize=False)
    from_text = generate_completions(model, tiny_tokenizer, [text], max_new_tokens=6, temperature=0.0)
    from_messages = generate_completions(model, tiny_tokenizer, PROMPTS[:1], max_new_tokens=6, temperature=0.0)
    assert from_text[0].completion_ids == from_messages[0].completion_ids


def test_sample_next_tokens_filters():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 200)
    generator = torch.Generator().manual_seed(0)
    assert sample_next_tokens(logits, 0.0, 1.0, 0).tolist() == [1] * 200
    assert sample_next_tokens(logits, 1.0, 1.0, 1, generator).tolist() == [1] * 200  # top-1 is greedy
    assert set(sample_next_tokens(logits, 1.0, 1.0, 2, generator).tolist()) == {1, 2}
    # p(1) = e^2 / (1 + e^2 + e + e^-1) = 0.64 < 0.7 <= p(1) + p(2) = 0.88: the nucleus is {1, 2}.
    assert set(sample_next_tokens(logits, 1.0, 0.7, 0, generator).tolist()) == {1, 2}
    assert set(sample_next_tokens(logits, 1.0, 0.5, 0, generator).tolist()) == {1}
    assert set(sample_next_tokens(logits, 1.0, 1.0, 0, generator).tolist()) == {0, 1, 2, 3}


def test_sample_next_tokens_draws_from_the_softmax():
    """Frequencies over 40,000 draws match softmax(logits / T) within 4 standard errors; a filtered (probability 0)
    token is never drawn, whatever its place in the vocabulary; non-finite logits are refused."""
    n = 40_000
    logits = torch.tensor([[-float("inf"), 1.0, 0.0, 2.0, -1.0, -float("inf")]]).expand(n, 6)
    tokens = sample_next_tokens(logits, 0.7, 1.0, 0, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=6).double() / n
    expected = (logits[0].double() / 0.7).softmax(dim=-1)
    assert frequencies[0] == frequencies[5] == 0
    assert bool(((frequencies - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt()).all())
    with pytest.raises(ValueError, match="non-finite"):
        sample_next_tokens(torch.tensor([[0.0, float("nan")]]), 1.0, 1.0, 0)


def test_invalid_arguments(model, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"max_new_tokens.*\(--max_new_tokens, --batch_size, --num_samples\)"):
        generate_completions(model, tiny_tokenizer, PROMPTS, max_new_tokens=0)


def test_append_in_place_cache_equals_dynamic_cache(model):
    """Prefill, decode past the headroom, retire a row, splice in new rows, decode: the same logits and the same cache
    contents as transformers' DynamicCache; between surgeries a step writes into the buffer without reallocating."""
    input_ids, attention_mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_token_id=0)
    new_ids, new_mask = left_pad([[14, 15], [16, 17, 18, 19, 20]], pad_token_id=0)
    caches, masks, logits = {}, {}, {}
    with torch.no_grad():
        for kind in ("in_place", "dynamic"):
            if kind == "in_place":
                _, cache = prefill(model, input_ids, attention_mask)
                _, new_cache = prefill(model, new_ids, new_mask)
            else:
                cache, new_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
                model(input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                      **cache_kwargs(cache), use_cache=True)  # fmt: skip
                model(new_ids, attention_mask=new_mask, position_ids=position_ids_from_mask(new_mask),
                      **cache_kwargs(new_cache), use_cache=True)  # fmt: skip
            mask, steps = attention_mask, []
            for t in range(AppendInPlaceLayer.headroom + 12):  # the headroom runs out after the splice at t = 9
                if t == 5:
                    mask = keep_rows(mask, torch.tensor([0, 2]), cache)
                if t == 9:
                    mask = append_rows(cache, mask, new_cache, new_mask)
                tokens = torch.full((mask.size(0), 1), 20 + t)
                mask = torch.nn.functional.pad(mask, (0, 1), value=1)
                positions = mask.sum(1, keepdim=True) - 1
                layer = cache.layers[0]
                buffer = getattr(layer, "key_buffer", None)
                steps.append(forward_with_cache(model, cache, tokens, mask, positions).logits[:, -1])
                if kind == "in_place" and t in (2, 12):  # after a step with no surgery: same buffer, one more column
                    assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()
            caches[kind], masks[kind], logits[kind] = cache, mask, steps
    assert all(type(layer) is AppendInPlaceLayer for layer in caches["in_place"].layers)
    assert torch.equal(masks["in_place"], masks["dynamic"])
    for a, b in zip(logits["in_place"], logits["dynamic"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(caches["in_place"].layers, caches["dynamic"].layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=1e-6, rtol=0)
