"""LenVM-guided decoding (`lenvm_rl.guidance`), length-control metrics and length tokens, on tiny real models."""

import math

import pytest
import torch
from conftest import (
    make_pad_past_vocabulary_tokenizer,
    make_tiny_causal_lm,
    make_tiny_tokenizer,
    write_guided_eval_world,
)
from transformers import DynamicCache

from lenvm_rl.candidates import candidate_set, select_candidates
from lenvm_rl.core import lengths_to_values
from lenvm_rl.generation import left_pad
from lenvm_rl.guidance import (
    LengthGuidanceConfig,
    generate_with_length_guidance,
    guided_generate_completions,
    score_candidates,
    score_candidates_by_reencoding,
)
from lenvm_rl.kv_cache import keep_chosen_candidates, prefill
from lenvm_rl.length_metrics import length_deviation, length_score, token_budget_curve
from lenvm_rl.length_tokens import (
    completion_td_residuals,
    count_length_tokens,
    default_length_token_threshold,
    length_tokens_html,
    top_length_tokens,
)
from lenvm_rl.modeling import LengthValueModel, position_ids_from_mask
from lenvm_rl.transformers_compat import cache_kwargs

# The decoding loops hand the KV cache over as `cache` (transformers >= 5.24): the deprecated keyword must not return.
pytestmark = pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")

EOS = 1
SMALL_VOCAB = 8  # every token is a candidate at top_k = 8, so the stop token always is one
PROMPTS = [[5, 6, 7, 3, 2], [4, 3], [6, 2, 5]]


def make_lenvm(arch="llama", seed=1, vocab_size=None, gamma=0.9, head_scale=1.0, constant=None):
    """A real LenVM on a tiny random backbone. `constant` fixes every value to -sigmoid(constant) (zero head)."""
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm(arch, vocab_size=vocab_size, seed=seed), gamma=gamma)
    with torch.no_grad():
        if constant is None:
            lenvm.v_head.summary.weight.normal_(std=head_scale, generator=torch.Generator().manual_seed(seed))
        else:
            lenvm.v_head.summary.weight.zero_()
            lenvm.v_head.summary.bias.fill_(constant)
    return lenvm.eval()


def padded(prompts=PROMPTS):
    return left_pad(prompts, pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# Candidate scoring


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_scoring_equals_reencoding(arch):
    lenvm = make_lenvm(arch)
    input_ids, attention_mask = padded()
    cache = DynamicCache(config=lenvm.config)
    positions = position_ids_from_mask(attention_mask)
    candidates = torch.randint(2, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    candidates[1, 2] = EOS
    with torch.no_grad():
        lenvm(input_ids, attention_mask=attention_mask, position_ids=positions, **cache_kwargs(cache), use_cache=True)
        cached = score_candidates(lenvm, candidates, cache, attention_mask, attention_mask.sum(1), torch.tensor([EOS]))
        naive = score_candidates_by_reencoding(lenvm, input_ids, attention_mask, candidates, torch.tensor([EOS]))
    assert cached.dtype == naive.dtype == torch.float32
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=0)
    assert cached[1, 2] == 0.0 and naive[1, 2] == 0.0  # the stop-token candidate is exactly 0
    assert bool((cached.flatten()[torch.arange(15) != 7] < 0).all())

    # Keeping the chosen column equals a plain cached forward of the chosen token: the next step scores the same.
    choices = torch.tensor([0, 4, 2])
    keep_chosen_candidates(cache, choices, num_candidates=5)
    chosen = candidates.gather(1, choices[:, None])  # (3, 1)
    extended_ids, extended_mask = (
        torch.cat([input_ids, chosen], 1),
        torch.nn.functional.pad(attention_mask, (0, 1), value=1),
    )
    more = torch.randint(2, 100, (3, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = score_candidates(lenvm, more, cache, extended_mask, extended_mask.sum(1))
        naive = score_candidates_by_reencoding(lenvm, extended_ids, extended_mask, more)
    torch.testing.assert_close(cached, naive, atol=1e-5, rtol=0)
    # The candidate forward broadcasts the grouped key/value heads in its own attention function, for that call only.
    assert lenvm.config.num_key_value_heads < lenvm.config.num_attention_heads
    assert lenvm.backbone.config._attn_implementation == "sdpa"


def test_candidate_scoring_keeps_the_chosen_column_in_place():
    """A guided step appends k candidate columns and keeps one, writing into the LenVM cache's buffer: no step copies
    the cached prefix."""
    lenvm = make_lenvm()
    input_ids, attention_mask = padded()
    with torch.no_grad():
        _, cache = prefill(lenvm, input_ids, attention_mask)
        layer = cache.layers[0]
        buffer, positions = layer.key_buffer, attention_mask.sum(1)
        for step in range(3):
            candidates = torch.randint(2, 100, (3, 5), generator=torch.Generator().manual_seed(step))
            score_candidates(lenvm, candidates, cache, attention_mask, positions)
            keep_chosen_candidates(cache, torch.tensor([0, 4, 2]), num_candidates=5)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=1)
            positions = positions + 1
            assert layer.keys.size(2) == attention_mask.size(1)
            assert layer.key_buffer is buffer and layer.keys.data_ptr() == buffer.data_ptr()


def test_stop_candidate_value_is_zero_during_generation():
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB, seed=0)
    lenvm = make_lenvm(vocab_size=SMALL_VOCAB, head_scale=3.0)
    input_ids, attention_mask = padded()
    config = LengthGuidanceConfig(mode="tilt", beta=-1.0, top_k=8, max_new_tokens=30, stop_token_ids=[EOS])
    out = generate_with_length_guidance(
        policy, input_ids, attention_mask, lenvm, config, generator=torch.Generator().manual_seed(0)
    )
    for ids, values, reason in zip(out.completion_ids, out.values, out.finish_reasons):
        assert len(values) == len(ids)
        assert all(v < 0 for v in values[:-1])
        assert (values[-1] == 0.0) == (reason == "stop")


# ---------------------------------------------------------------------------------------------------------------------
# Selection rules


def test_candidate_set_filters():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    ids, logprobs = candidate_set(logits, top_k=3)
    assert ids.tolist() == [[1, 2, 3]]
    torch.testing.assert_close(logprobs.exp(), torch.tensor([[0.5, 0.3, 0.15]]) / 0.95)
    _, logprobs = candidate_set(logits, top_k=4, top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3: two candidates
    assert logprobs.isfinite().tolist() == [[True, True, False, False]]
    _, logprobs = candidate_set(logits, top_k=4, min_p=0.35)  # keep p >= 0.35 * 0.5
    assert logprobs.isfinite().tolist() == [[True, True, False, False]]


def test_tilt_matches_formula():
    """p'(x) ∝ p(x) exp(beta * u(x)), u = -V: the empirical frequencies of 20k draws match it."""
    p = torch.tensor([0.5, 0.3, 0.2])
    values = torch.tensor([-0.8, -0.2, 0.0])
    beta = -3.0
    expected = p * torch.exp(beta * -values)
    expected = expected / expected.sum()
    n = 20000
    choices = select_candidates(
        p.log().expand(n, 3), values.expand(n, 3), "tilt", beta=beta, generator=torch.Generator().manual_seed(0)
    )
    frequencies = torch.bincount(choices, minlength=3) / n
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_equal_to_picks_candidate_nearest_target_value():
    gamma = 0.9
    values = lengths_to_values(torch.tensor([[10.0, 4.0, 7.0, 0.0]]), gamma).float()  # predicted tokens left
    logprobs = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    for generated, target, expected in [(0, 8, 2), (3, 8, 1), (7, 8, 3), (0, 30, 0), (20, 8, 3)]:
        # v* = -(1 - gamma^max(T - t, 0)) with t = generated + 1 (the candidate counts)
        choice = select_candidates(
            logprobs, values, "equal_to", gamma, steps=torch.tensor([generated]), target_lengths=torch.tensor([target])
        )
        target_value = -(1 - gamma ** max(target - (generated + 1), 0))
        nearest = int((values[0] - target_value).abs().argmin())
        assert int(choice) == nearest == expected


def test_at_most_and_at_least_rules():
    gamma = 0.9
    values = lengths_to_values(torch.tensor([[10.0, 4.0, 0.0]]), gamma).float()
    logprobs = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))

    def choose(mode, generated, target):
        return int(
            select_candidates(
                logprobs,
                values,
                mode,
                gamma,
                steps=torch.tensor([generated]),
                target_lengths=torch.tensor([target]),
                temperature=0.0,
            )
        )

    assert choose("at_most", 0, 20) == 0  # the policy's own choice still fits: 1 + 10 <= 20
    assert choose("at_most", 0, 8) == 1  # 1 + 10 > 8 >= 1 + 4: most likely feasible candidate
    assert choose("at_most", 5, 3) == 2  # nothing else fits: the shortest continuation (the stop token)
    assert choose("at_least", 0, 3) == 0
    assert choose("at_least", 0, 8) == 0  # 1 + 10 >= 8
    assert choose("at_least", 0, 30) == 0  # nothing reaches 30: the longest continuation
    assert choose("at_least", 5, 6) == 0  # the stop token (6 tokens) is feasible but least likely


def test_bounds_never_choose_a_candidate_below_the_probability_floor():
    """At Most forces a stop token, and At Least bans one, only when that leaves a candidate with p >= the floor."""
    gamma = 0.5
    values = lengths_to_values(torch.tensor([[10.0, 4.0, 0.0]]), gamma).float()  # candidate 2 is the stop token

    def choose(mode, probs, target, floor):
        logprobs = torch.log(torch.tensor([probs]))
        return int(
            select_candidates(
                logprobs, values, mode, gamma, steps=torch.tensor([0]), target_lengths=torch.tensor([target]),
                temperature=0.0, bound_min_prob=floor,
            )
        )  # fmt: skip

    # At Most 1: only the stop token fits. At p = 0.005 it is forced without a floor, never with one.
    assert choose("at_most", [0.6, 0.395, 0.005], 1, floor=0.0) == 2
    assert choose("at_most", [0.6, 0.395, 0.005], 1, floor=0.01) == 1  # the shortest eligible continuation
    assert choose("at_most", [0.6, 0.38, 0.02], 1, floor=0.01) == 2  # above the floor: forced as before
    # At Least 8: the stop token does not fit. At p = 0.995 it is banned without a floor, kept with one.
    assert choose("at_least", [0.004, 0.001, 0.995], 8, floor=0.0) == 0
    assert choose("at_least", [0.004, 0.001, 0.995], 8, floor=0.01) == 2  # nothing else is eligible: it stops
    assert choose("at_least", [0.02, 0.001, 0.979], 8, floor=0.01) == 0
    # The most likely candidate is always eligible, even under a floor above its probability.
    assert choose("at_most", [0.4, 0.35, 0.25], 1, floor=0.9) == 0

    # Sampled: 4000 draws of At Most 1 with the stop token at p = 0.005 never pick it (nothing fits -> shortest).
    logprobs = torch.log(torch.tensor([0.6, 0.3, 0.095, 0.005])).expand(4000, 4)
    wide = lengths_to_values(torch.tensor([[10.0, 4.0, 6.0, 0.0]]), gamma).expand(4000, 4)
    choices = select_candidates(
        logprobs, wide, "at_most", gamma, steps=torch.zeros(4000, dtype=torch.long),
        target_lengths=torch.full((4000,), 1), generator=torch.Generator().manual_seed(0), bound_min_prob=0.01,
    )  # fmt: skip
    assert set(choices.tolist()) == {1}
    # Equal To keeps the reference rule: the floor applies to the bounds only.
    assert choose("equal_to", [0.6, 0.395, 0.005], 1, floor=0.5) == 2


def chosen_token_probs(policy, prompt, completion):
    """The policy's probability (temperature 1, full vocabulary) of each token of `completion` after `prompt`, and
    whether it was the most likely token there."""
    with torch.no_grad():
        logits = policy(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]  # (L, V)
    probs = logits.float().softmax(-1)
    chosen = torch.tensor(completion)
    return probs[torch.arange(len(completion)), chosen], probs.argmax(-1) == chosen


def test_at_most_generation_never_forces_a_near_zero_probability_stop():
    """A LenVM that predicts ~47 tokens left after every non-stop token and At Most 3: only the stop token ever fits.
    Unfloored, every row stops at its first token whatever the stop token's probability; with the floor, every
    generated token (the stop token included) has probability >= the floor or is the policy's most likely token."""
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB, seed=0, tie=False)
    with torch.no_grad():
        policy.lm_head.weight.mul_(12.0)  # a peaked policy: some tokens, the stop token among them, are near 0
    lenvm = make_lenvm(vocab_size=SMALL_VOCAB, constant=5.0)  # v = -sigmoid(5): log(1 + v) / log(0.9) = 47 tokens
    prompts = [[p, q] for p in range(2, 8) for q in range(2, 8)]  # 36 prompts
    input_ids = torch.tensor(prompts)
    floor = 0.05
    runs = {}
    for bound_min_prob in (0.0, floor):
        config = LengthGuidanceConfig(
            mode="at_most", top_k=8, max_new_tokens=12, stop_token_ids=[EOS], bound_min_prob=bound_min_prob
        )
        runs[bound_min_prob] = generate_with_length_guidance(
            policy, input_ids, None, lenvm, config, target_lengths=3, generator=torch.Generator().manual_seed(0)
        ).completion_ids

    assert all(completion == [EOS] for completion in runs[0.0])  # the unfloored rule stops at once
    first_stop_probs = [float(chosen_token_probs(policy, p, [EOS])[0][0]) for p in prompts]
    assert sum(prob < floor for prob in first_stop_probs) >= 5  # ... often at a stop token the policy rules out

    for prompt, completion in zip(prompts, runs[floor]):
        probs, most_likely = chosen_token_probs(policy, prompt, completion)
        assert bool(((probs >= floor) | most_likely).all()), (prompt, completion, probs)
    assert all(c == [EOS] for p, c, q in zip(prompts, runs[floor], first_stop_probs) if q >= floor)
    assert all(len(c) > 1 for p, c, q in zip(prompts, runs[floor], first_stop_probs) if q < floor)


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def test_beta_zero_reproduces_base_sampling_bit_for_bit():
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB, seed=0)
    lenvm = make_lenvm(vocab_size=SMALL_VOCAB, head_scale=3.0)
    input_ids, attention_mask = padded()
    for top_k, top_p, min_p in [(8, 1.0, 0.0), (5, 0.9, 0.05)]:
        runs = {}
        for mode in ("none", "tilt"):
            config = LengthGuidanceConfig(
                mode=mode, beta=0.0, top_k=top_k, top_p=top_p, min_p=min_p, max_new_tokens=40, stop_token_ids=[EOS]
            )
            runs[mode] = generate_with_length_guidance(
                policy, input_ids, attention_mask, lenvm if mode == "tilt" else None, config,
                generator=torch.Generator().manual_seed(123),
            )  # fmt: skip
        assert runs["tilt"].completion_ids == runs["none"].completion_ids
        assert runs["tilt"].finish_reasons == runs["none"].finish_reasons
        assert len({len(c) for c in runs["none"].completion_ids}) > 1  # a real test: rows stop at different steps


def test_unguided_greedy_equals_transformers_generate():
    policy = make_tiny_causal_lm("qwen2", seed=3)
    prompt = torch.tensor([[5, 9, 14, 22]])
    config = LengthGuidanceConfig(mode="none", temperature=0.0, max_new_tokens=12, stop_token_ids=[EOS])
    ours = generate_with_length_guidance(policy, prompt, None, None, config).completion_ids[0]
    reference = policy.generate(prompt, do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0)
    assert ours == reference[0, 4:].tolist()[: len(ours)]


def test_negative_beta_shortens_expected_length():
    """Constant LenVM (every non-stop value -0.5): tilting only reweights the stop token by exp(-beta / 2)."""
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB, seed=0)
    lenvm = make_lenvm(vocab_size=SMALL_VOCAB, constant=0.0)
    input_ids = torch.tensor([[5, 6, 7]]).expand(48, 3)
    mean_lengths = {}
    for beta in (0.0, -4.0):
        config = LengthGuidanceConfig(mode="tilt", beta=beta, top_k=8, max_new_tokens=64, stop_token_ids=[EOS])
        out = generate_with_length_guidance(
            policy, input_ids, None, lenvm, config, generator=torch.Generator().manual_seed(0)
        )
        mean_lengths[beta] = sum(map(len, out.completion_ids)) / len(out.completion_ids)
    assert mean_lengths[-4.0] < 0.6 * mean_lengths[0.0]


def test_equal_to_hits_target_exactly_with_constant_lenvm():
    """Every non-stop value is -0.5 = value of 1 token left at gamma 0.5, so a row stops exactly at token T."""
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB, seed=0)
    lenvm = make_lenvm(vocab_size=SMALL_VOCAB, gamma=0.5, constant=0.0)
    input_ids, attention_mask = padded()
    config = LengthGuidanceConfig(mode="equal_to", top_k=8, max_new_tokens=40, stop_token_ids=[EOS])
    out = generate_with_length_guidance(policy, input_ids, attention_mask, lenvm, config, target_lengths=[3, 9, 17])
    assert [len(c) for c in out.completion_ids] == [3, 9, 17]
    assert out.finish_reasons == ["stop"] * 3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["none", "tilt", "equal_to", "at_most", "at_least"])
def test_batched_left_padded_equals_per_row(arch, mode):
    policy = make_tiny_causal_lm(arch, vocab_size=SMALL_VOCAB, seed=3)
    lenvm = make_lenvm(arch, vocab_size=SMALL_VOCAB, head_scale=3.0, gamma=0.8)
    config = LengthGuidanceConfig(
        mode=mode, beta=-2.0, temperature=0.0, top_k=6, max_new_tokens=24, stop_token_ids=[EOS]
    )
    targets = [4, 10, 7]
    input_ids, attention_mask = padded()
    batched = generate_with_length_guidance(policy, input_ids, attention_mask, lenvm, config, targets)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_with_length_guidance(policy, torch.tensor([prompt]), None, lenvm, config, targets[i])
        assert batched.completion_ids[i] == alone.completion_ids[0]
        if mode != "none":
            torch.testing.assert_close(
                torch.tensor(batched.values[i]), torch.tensor(alone.values[0]), atol=1e-5, rtol=0
            )
    if mode in ("equal_to", "at_most"):  # rows retire at different steps (greedy random models rarely stop)
        assert len({len(c) for c in batched.completion_ids}) > 1


def test_guided_generate_completions_keeps_prompt_order():
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm(seed=0)
    lenvm = make_lenvm()
    prompts = [[{"role": "user", "content": q}] for q in ("how many apples ?", "what is 3 + 4 ?", "he has 5 pens")]
    config = LengthGuidanceConfig(mode="equal_to", top_k=4, max_new_tokens=12, stop_token_ids=[EOS])
    out = guided_generate_completions(policy, tokenizer, prompts, lenvm, config, [5, 6, 7], batch_size=2)
    for prompt, target, completion in zip(prompts, [5, 6, 7], out.completion_ids):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        alone = generate_with_length_guidance(policy, torch.tensor([ids]), None, lenvm, config, target)
        assert completion == alone.completion_ids[0]


@pytest.mark.parametrize("mode", ["none", "tilt", "at_most"])
def test_pad_id_past_the_vocabulary(mode):
    """TRL's `[PAD]` recipe (a pad id equal to the embedding size): the policy's and the LenVM's prefills and the
    re-encoding reference embed padding as a valid id, so guided decoding gives what an in-vocabulary pad gives."""
    tokenizer = make_pad_past_vocabulary_tokenizer()
    policy, lenvm = make_tiny_causal_lm(seed=0), make_lenvm()
    assert tokenizer.pad_token_id == policy.get_input_embeddings().num_embeddings
    prompts = [[{"role": "user", "content": q}] for q in ("how many apples ?", "what is 3 + 4 ?", "he has 5 pens and")]
    config = LengthGuidanceConfig(mode=mode, beta=-2.0, top_k=4, max_new_tokens=8, stop_token_ids=[EOS])
    targets = [4, 6, 5] if mode == "at_most" else None

    def guided(tokenizer):
        return guided_generate_completions(
            policy, tokenizer, prompts, lenvm, config, targets, batch_size=3, lenvm_tokenizer=tokenizer
        )

    out, expected = guided(tokenizer), guided(make_tiny_tokenizer())
    assert out.completion_ids == expected.completion_ids and out.values == expected.values

    ids, mask = left_pad([[5, 6, 7], [4]], pad_token_id=tokenizer.pad_token_id)
    candidates = torch.tensor([[8, 9], [10, 11]])
    torch.testing.assert_close(
        score_candidates_by_reencoding(lenvm, ids, mask, candidates),
        score_candidates_by_reencoding(lenvm, ids.masked_fill(mask == 0, 3), mask, candidates),
        atol=0, rtol=0,
    )  # fmt: skip


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--top_k"):
        LengthGuidanceConfig(top_k=0)
    with pytest.raises(ValueError, match="--mode"):
        LengthGuidanceConfig(mode="shorter")
    with pytest.raises(ValueError, match="--bound_min_prob"):
        LengthGuidanceConfig(bound_min_prob=1.0)
    policy = make_tiny_causal_lm(vocab_size=SMALL_VOCAB)
    with pytest.raises(ValueError, match="target_lengths"):
        generate_with_length_guidance(
            policy, torch.tensor([[2, 3]]), None, make_lenvm(vocab_size=SMALL_VOCAB), LengthGuidanceConfig("equal_to")
        )
    with pytest.raises(ValueError, match="needs a LenVM"):
        generate_with_length_guidance(policy, torch.tensor([[2, 3]]), None, None, LengthGuidanceConfig("tilt"))


@pytest.mark.parametrize("beta", [math.nan, math.inf, -math.inf])
def test_non_finite_beta_is_refused(beta):
    """NaN or infinite tilts give every candidate the same weight: uniform sampling from the top-k, longer text."""
    with pytest.raises(ValueError, match="--beta must be a finite number"):
        LengthGuidanceConfig(mode="tilt", beta=beta)


def test_bad_temperature_and_stop_ids_are_refused():
    with pytest.raises(ValueError, match="--temperature must be a finite number >= 0, got nan"):
        LengthGuidanceConfig(temperature=math.nan)
    with pytest.raises(ValueError, match="--stop_token_ids must be token ids"):
        LengthGuidanceConfig(stop_token_ids=[-1])
    policy, lenvm = make_tiny_causal_lm(vocab_size=SMALL_VOCAB), make_lenvm(vocab_size=SMALL_VOCAB)
    ids, mask = padded()
    with pytest.raises(ValueError, match=r"stop_token_ids holds \[1, 99\], outside the policy's vocabulary \[0, 8\)"):
        generate_with_length_guidance(policy, ids, mask, lenvm, LengthGuidanceConfig(stop_token_ids=[EOS, 99]))
    policy.generation_config.eos_token_id = 50
    with pytest.raises(ValueError, match="generation_config.eos_token_id holds \\[50\\]"):
        generate_with_length_guidance(policy, ids, mask, lenvm, LengthGuidanceConfig())


@pytest.mark.parametrize(
    "target_lengths, message",
    [
        (0, r"whole numbers of tokens >= 1 .* got \[0.0, 0.0, 0.0\]"),
        ([4, -2, 4], r"got \[-2.0\]"),
        ([4, 2.5, 4], r"got \[2.5\]"),
        ([4, math.nan, 4], r"got \[nan\]"),
        ([4, 4], r"one per row, shape \(3,\); got shape \(2,\)"),
        ([[4], [4], [4]], r"shape \(3,\); got shape \(3, 1\)"),
    ],
)
def test_bad_target_lengths_are_refused(target_lengths, message):
    policy, lenvm = make_tiny_causal_lm(vocab_size=SMALL_VOCAB), make_lenvm(vocab_size=SMALL_VOCAB)
    policy.generation_config.eos_token_id = EOS
    ids, mask = padded()
    with pytest.raises(ValueError, match=message):
        generate_with_length_guidance(policy, ids, mask, lenvm, LengthGuidanceConfig("at_most"), target_lengths)
    out = generate_with_length_guidance(
        policy, ids, mask, lenvm, LengthGuidanceConfig("at_most", max_new_tokens=4), 3
    )  # one whole number for every row is fine
    assert len(out.completion_ids) == 3


# ---------------------------------------------------------------------------------------------------------------------
# Length-control metrics


def test_length_score_and_deviation_by_hand():
    outputs, target = torch.tensor([50, 100, 150]), 100
    torch.testing.assert_close(length_deviation(outputs, target), torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))
    too_short, too_long = 100 * math.exp(5 * -0.5), 100 * math.exp(-2 * 0.5)
    expected = {
        "equal_to": [too_short, 100.0, too_long],
        "at_most": [100.0, 100.0, too_long],
        "at_least": [too_short, 100.0, 100.0],
    }
    for constraint, scores in expected.items():
        torch.testing.assert_close(
            length_score(outputs, target, constraint), torch.tensor(scores, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="constraint"):
        length_score(outputs, target, "exactly")
    with pytest.raises(ValueError, match="> 0"):
        length_deviation([3], [0])


def test_token_budget_curve_by_hand():
    lengths, correct = [10, 20, 40, 80], [True, False, True, True]
    _, mean_tokens, accuracy = token_budget_curve(lengths, correct, budgets=[10, 40, 1000])
    torch.testing.assert_close(mean_tokens, torch.tensor([10.0, (10 + 20 + 40 + 40) / 4, 37.5], dtype=torch.float64))
    torch.testing.assert_close(accuracy, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Length tokens


def test_length_tokens_on_hand_built_values():
    gamma = 0.5
    # Remaining lengths 3, 2, 6 (token 1 lengthens by 5), 1 (token 2 shortens by 4), then the stop token.
    state_values = lengths_to_values(torch.tensor([3.0, 2.0, 6.0, 1.0, 0.0], dtype=torch.float64), gamma)
    residuals = completion_td_residuals(state_values, gamma)
    expected = torch.tensor(
        [
            -(1 - gamma) + gamma * -(1 - gamma**2) + (1 - gamma**3),  # exact prediction: 0
            -(1 - gamma) + gamma * -(1 - gamma**6) + (1 - gamma**2),
            -(1 - gamma) + gamma * -(1 - gamma**1) + (1 - gamma**6),
            -(1 - gamma) + 0.0 + (1 - gamma**1),  # the stop token closes the episode: 0
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(residuals, expected)
    assert residuals[1] < -0.1 and residuals[2] > 0.1
    stats = count_length_tokens([[11, 12, 13, 1]], [residuals], threshold=0.1)
    assert stats[12]["lengthen"] == 1 and stats[13]["shorten"] == 1
    assert stats[11]["lengthen"] == stats[11]["shorten"] == 0
    assert [t for t, _ in top_length_tokens(stats, "lengthen")] == [12]
    assert [t for t, _ in top_length_tokens(stats, "shorten")] == [13]
    # Not terminated: the last state's value is kept, not forced to 0.
    assert completion_td_residuals(state_values[:4], gamma, terminated=False)[-1] == residuals[2]
    assert default_length_token_threshold(0.997) == pytest.approx(0.01)


def test_length_tokens_html_escapes_text():
    gamma = 0.9
    pieces = ["<script>alert(1)</script>", ' & "quoted"', "\n'ok'"]
    state_values = lengths_to_values(torch.tensor([3.0, 2.0, 9.0, 0.0]), gamma)
    page = length_tokens_html(pieces, state_values, gamma, threshold=0.01, title="<b>t</b>", prompt="a < b")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&amp; &quot;quoted&quot;" in page and "&lt;b&gt;t&lt;/b&gt;" in page and "a &lt; b" in page
    assert page.count('class="tok"') == 3
    assert "remaining after it ≈ 9.0 tokens" in page  # the hover text of the second token
    with pytest.raises(ValueError, match="state values"):
        length_tokens_html(pieces, state_values[:3], gamma, threshold=0.01)


# ---------------------------------------------------------------------------------------------------------------------
# Recipes end to end on tiny saved models


def test_recipes_end_to_end(tmp_path):  # about 6 s on 2 cores
    import importlib
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
    common = write_guided_eval_world(tmp_path, make_lenvm(gamma=0.9))
    g = torch.Generator().manual_seed(0)
    records = [
        {
            "prompt_id": f"p{i // 3}", "prompt_ids": torch.randint(7, 100, (5,), generator=g).tolist(),
            "completion_ids": torch.randint(7, 100, (4 + i,), generator=g).tolist() + [EOS], "finish_reason": "stop",
        }
        for i in range(9)
    ]  # fmt: skip
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    control = importlib.import_module("eval_length_control")
    out = control.main(
        control.EvalLengthControlArguments(output_dir=str(tmp_path / "lc"), target_lengths=[4, 8], **common)
    )
    assert set(out["constraints"]) == {"equal_to", "at_most", "at_least"}
    assert (tmp_path / "lc" / "length_control.png").is_file()
    run = out["constraints"]["at_most"]["per_target"]["8"]["guided"]
    assert len(run["lengths"]) == 6 and len(run["examples"]) == 2
    assert run["fraction_satisfied"] == sum(n <= 8 for n in run["lengths"]) / 6

    tradeoff = importlib.import_module("eval_tradeoff")
    out = tradeoff.main(tradeoff.EvalTradeoffArguments(output_dir=str(tmp_path / "to"), betas=[0.0, -5.0], **common))
    assert len(out["tilt"]) == 2 and (tmp_path / "to" / "tradeoff.png").is_file()
    base = next(run for run in out["runs"] if run["beta"] == 0.0)
    assert len(base["lengths"]) == len(base["correct"]) == 6 and len(base["examples"]) == 2
    assert base["matched_budget"] >= max(base["lengths"])  # the untilted run matches the budget that cuts nothing

    predict = importlib.import_module("predict_length")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"question": "how many apples ?"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "he"}]})
        + "\n"
    )
    out = predict.main(
        predict.PredictLengthArguments(lenvm_path=str(tmp_path / "lenvm"), input_file=str(tmp_path / "prompts.jsonl"))
    )
    assert len(out) == 2 and all(o["predicted_length"] > 0 for o in out)
    out = predict.main(
        predict.PredictLengthArguments(
            lenvm_path=str(tmp_path / "lenvm"), eval_rollouts=str(tmp_path / "rollouts.jsonl")
        )
    )
    assert out["num_prompts"] == 3

    tokens = importlib.import_module("length_tokens")
    out = tokens.main(tokens.LengthTokensArguments(lenvm_path=str(tmp_path / "lenvm"), rollouts=str(tmp_path / "rollouts.jsonl"),
                                                   output_dir=str(tmp_path / "lt"), min_count=1))  # fmt: skip
    assert out["num_tokens"] == sum(len(r["completion_ids"]) for r in records)
    assert (tmp_path / "lt" / "completion.html").read_text().count('class="tok"') == len(records[0]["completion_ids"])


def test_load_guided_eval_dtype_and_prompt_format(tmp_path, caplog):
    """`--dtype bfloat16` loads the policy and the LenVM backbone in bfloat16 (head float32), and prompts built
    unlike the LenVM's training prompts are named in a warning (a real LenVM records its `prompt_format`)."""
    import json
    import logging

    from lenvm_rl.configs import GuidedEvalArguments
    from lenvm_rl.evaluation import load_guided_eval

    tokenizer = make_tiny_tokenizer()
    make_tiny_causal_lm(seed=0).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    lenvm = make_lenvm()
    lenvm.prompt_format = {"system_prompt": None, "instruction": "End with #### N."}
    lenvm.save_pretrained(tmp_path / "lenvm", tokenizer=tokenizer)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text(json.dumps({"question": "he has 2 pens", "answer": "#### 2"}) + "\n")
    common = dict(policy_path=str(tmp_path / "policy"), lenvm_path=str(tmp_path / "lenvm"), output_dir=str(tmp_path),
                  dataset_name=str(tmp_path / "data"), num_problems=1)  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="lenvm_rl.data"):
        policy, _, lenvm, _ = load_guided_eval(GuidedEvalArguments(instruction="End with #### N.", **common))
        assert not caplog.text
        assert policy.dtype == lenvm.backbone.dtype == torch.float32
        policy, _, lenvm, _ = load_guided_eval(GuidedEvalArguments(dtype="bfloat16", **common))
    assert policy.dtype == lenvm.backbone.dtype == torch.bfloat16
    assert lenvm.v_head.summary.weight.dtype == torch.float32
    assert (
        "evaluation prompts" in caplog.text and "--instruction (LenVM: 'End with #### N.', here: None)" in caplog.text
    )
    with pytest.raises(ValueError, match="--dtype"):
        GuidedEvalArguments(dtype="bf16", **common)


def test_a_lenvm_with_a_smaller_vocabulary_is_refused():
    policy = make_tiny_causal_lm("llama", vocab_size=64)
    lenvm = make_lenvm(vocab_size=16)  # reading the policy's ids 16..63 would be an IndexError mid-decoding
    ids, mask = padded()
    with pytest.raises(ValueError, match="The LenVM embeds 16 token ids but the policy can emit 64"):
        generate_with_length_guidance(policy, ids, mask, lenvm, LengthGuidanceConfig(mode="tilt", beta=-1.0))


def test_mismatched_lenvm_tokenizer_is_refused():
    tokenizer = make_tiny_tokenizer()
    other = make_tiny_tokenizer(extra_words=["zebra"])
    other.add_special_tokens({"pad_token": "zebra"})
    policy = make_tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="tokenizers are incompatible"):
        guided_generate_completions(
            policy,
            tokenizer,
            ["what is 1 + 1 ?"],
            make_lenvm(),
            LengthGuidanceConfig(mode="tilt", beta=-1.0),
            lenvm_tokenizer=other,
        )
