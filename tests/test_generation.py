"""Continuous-batching sampler: agrees with `model.generate`, does not depend on batching when greedy, stops on EOS."""

import pytest
import torch
from conftest import make_tiny_causal_lm

from lenvm_rl.generation import generate_completions, sample_next_tokens

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


def test_invalid_arguments(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(model, tiny_tokenizer, PROMPTS, max_new_tokens=0)
