"""LenVM-guided decoding: steer a causal LM's output length with a Length Value Model (paper section 5).

At every step the policy's next-token distribution is cut to a candidate set, the LenVM scores every candidate
``x`` with the value of the state after it, ``v(x) = V(s_t + x)`` (a stop-token candidate gets exactly 0: the
episode ends there), and one candidate is chosen by tilting (``p'(x) ∝ p(x) exp(beta * (1 - gamma^l(x)))``) or by a
hard length constraint (Equal To / At Most / At Least a target ``T``). The candidate set and the selection rules are
pure functions of [`lenvm_rl.candidates`], where their equations are written out; this module owns the decoding
loop around them ([`generate_with_length_guidance`], [`guided_generate_completions`]), its configuration
([`LengthGuidanceConfig`]) and the LenVM's candidate scoring ([`score_candidates`]).

Cost and cache strategy. The LenVM keeps a key/value cache of the prefix, in lockstep with the policy's. Each
step scores all ``k`` candidates of all rows in ONE forward of shape ``(B, k)`` against that cache: the ``k``
candidates sit at the same position and a 4D attention mask lets each attend to the prefix and to itself only
(the tree mask of the reference SGLang fork). A candidate's keys/values are then exactly those a plain forward
of that token would have produced, so the cache is extended by *keeping the chosen candidate's column* and
dropping the others ([`~lenvm_rl.kv_cache.keep_chosen_candidates`]): no second LenVM forward per step, and no copy
of the prefix cache per candidate (the alternative, repeating the cache ``k`` times, is measured in
``benchmarks/guided_decoding.py``).

Rows are left-padded and position ids count real tokens only (for the policy and the LenVM), so a row gets the
same tokens alone or in a batch (deterministic modes; sampled modes share one generator across rows). A row
that emits a stop token or reaches ``max_new_tokens`` leaves the batch.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .candidates import BOUND_MIN_PROB, CONSTRAINT_MODES, GuidanceMode, candidate_set, select_candidates
from .generation import left_pad, tokenize_prompts
from .kv_cache import forward_with_cache, keep_chosen_candidates, keep_rows, prefill
from .modeling import LengthValueModel, check_tokenizers_compatible

__all__ = [
    "CandidateSamplingConfig",
    "GuidedGeneration",
    "LengthGuidanceConfig",
    "generate_with_length_guidance",
    "guided_generate_completions",
    "score_candidates",
    "score_candidates_by_reencoding",
]


@dataclass(kw_only=True)
class CandidateSamplingConfig:
    r"""
    The candidate set of each decoding step and how a candidate is drawn: the knobs [`LengthGuidanceConfig`] shares
    with the guided-decoding recipes' arguments ([`~lenvm_rl.configs.GuidedEvalArguments`]). Keyword-only.

    Parameters:
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Length cap; a row cut there has `finish_reason="length"`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of the policy's logits; `0` chooses greedily (argmax of the, possibly tilted,
            candidate distribution). The `"equal_to"` rule is deterministic at any temperature.
        top_k (`int`, *optional*, defaults to `8`):
            Candidates per step (the LenVM scores every one): the `top_k` most likely tokens.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus filter inside the top-k set (on the temperature-scaled distribution); `1.0` keeps all.
        min_p (`float`, *optional*, defaults to `0.0`):
            Drops candidates with probability below `min_p` times the top probability; `0.0` keeps all.
        bound_min_prob (`float`, *optional*, defaults to `0.01`):
            At Most / At Least choose only candidates with at least this probability (the most likely one always
            qualifies), so a bound never forces a near-zero-probability token, a stop token included; the bound gives
            way instead. `0` is the unfloored rule. See [`~lenvm_rl.candidates.select_candidates`].
    """

    max_new_tokens: int = field(default=256, metadata={"help": "Length cap (finish_reason='length')."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature; 0 chooses greedily."})
    top_k: int = field(default=8, metadata={"help": "Candidates per step, all scored by the LenVM."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus filter inside the top-k set; 1.0 keeps all."})
    min_p: float = field(default=0.0, metadata={"help": "Drop candidates below min_p * top probability."})
    bound_min_prob: float = field(
        default=BOUND_MIN_PROB,
        metadata={"help": "At Most / At Least never choose a candidate below this probability; 0: no floor."},
    )

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"--top_k must be at least 1 (the LenVM scores a finite candidate set), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN would sample uniformly
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"--min_p must be in [0, 1), got {self.min_p}")
        if not 0.0 <= self.bound_min_prob < 1.0:
            raise ValueError(f"--bound_min_prob must be in [0, 1), got {self.bound_min_prob}")


@dataclass
class LengthGuidanceConfig(CandidateSamplingConfig):
    r"""
    Configuration of [`generate_with_length_guidance`].

    Parameters:
        mode (`str`, *optional*, defaults to `"tilt"`):
            `"none"` (the base model's sampling from the candidate set, no LenVM), `"tilt"` (exponential tilting
            with `beta`), or a hard length constraint `"equal_to"`, `"at_most"`, `"at_least"` (needs target
            lengths). The rules: [`~lenvm_rl.candidates.select_candidates`].
        beta (`float`, *optional*, defaults to `0.0`):
            Tilt strength: `p'(x) ∝ p(x) exp(beta * (1 - gamma^l(x)))`; negative shortens, `0` is the base model.
        stop_token_ids (`list[int]` or `None`, *optional*, defaults to `None`):
            Tokens that end a row (their candidate value is 0); `None` takes the policy's
            `generation_config.eos_token_id`.

        > Candidate set and sampling, keyword-only ([`CandidateSamplingConfig`]): `max_new_tokens` (256),
        > `temperature` (1.0), `top_k` (8), `top_p` (1.0), `min_p` (0.0), `bound_min_prob` (0.01).
    """

    mode: GuidanceMode = field(
        default="tilt",
        metadata={"help": "none | tilt | equal_to | at_most | at_least.", "choices": list(GuidanceMode.__args__)},
    )
    beta: float = field(
        default=0.0, metadata={"help": "Tilt strength; negative shortens, 0 is the base model's sampling."}
    )
    stop_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Stop tokens (value 0); default: the policy's generation_config.eos_token_id."}
    )

    def __post_init__(self):
        if self.mode not in GuidanceMode.__args__:
            raise ValueError(f"--mode must be one of {GuidanceMode.__args__}, got {self.mode!r}")
        if not math.isfinite(self.beta):  # NaN or inf tilts every candidate alike: uniform sampling from the top-k
            raise ValueError(
                f"--beta must be a finite number (negative shortens, 0 is the base model), got {self.beta}"
            )
        if self.stop_token_ids is not None and any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_token_ids
        ):
            raise ValueError(f"--stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids}")
        super().__post_init__()


@dataclass
class GuidedGeneration:
    """
    Output of [`generate_with_length_guidance`], one entry per input row.

    Parameters:
        completion_ids (`list[list[int]]`):
            Generated token ids, the stop token included when one was produced.
        finish_reasons (`list[str]`):
            `"stop"` or `"length"`.
        prompt_values (`torch.Tensor` or `None`):
            `(B,)` LenVM value `V(s_0)` at the last prompt token; `None` without a LenVM.
        values (`list[list[float]]` or `None`):
            LenVM value of the state after each generated token (0 after a stop token); `None` without a LenVM.
    """

    completion_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_values: torch.Tensor | None = None
    values: list[list[float]] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Candidate scoring against the LenVM cache

TREE_ATTENTION = "lenvm_rl_tree_sdpa"


def _tree_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """
    transformers' sdpa attention for the candidate forward's 4D mask, with the key/value heads of a grouped-query
    model broadcast inside the kernel (`enable_gqa`). transformers' own sdpa copies them `num_key_value_groups`
    times whenever a mask is given: the whole LenVM cache, in every layer, at every step (SmolLM2: 3x).
    """
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.size(1) != key.size(1),
    )  # fmt: skip
    return output.transpose(1, 2).contiguous(), None  # (B, k, heads, head_dim), as transformers returns it


AttentionInterface.register(TREE_ATTENTION, _tree_attention)


def score_candidates(
    lenvm: LengthValueModel,
    candidate_ids: torch.Tensor,
    cache: DynamicCache,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    stop_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    LenVM values of every candidate, in one forward of `(B, k)` tokens against the cached prefix.

    All `k` candidates of a row sit at the row's next position; a 4D mask lets each attend to the prefix (its
    real tokens) and to itself, never to the other candidates. The forward appends the `k` candidate columns to
    `cache`; call [`~lenvm_rl.kv_cache.keep_chosen_candidates`] next to keep only the chosen one.

    Args:
        lenvm ([`LengthValueModel`]):
            The LenVM.
        candidate_ids (`torch.Tensor`):
            `(B, k)` candidate token ids.
        cache (`transformers.DynamicCache`):
            The LenVM's cache of the `(B, P)` prefix.
        attention_mask (`torch.Tensor`):
            `(B, P)` 1 on real prefix columns, 0 on padding.
        position_ids (`torch.Tensor`):
            `(B,)` position id of the next token of each row (its count of real prefix tokens).
        stop_token_ids (`torch.Tensor`, *optional*):
            Ids whose candidates get value exactly 0 (the state after a stop token is terminal).

    Returns:
        `torch.Tensor`: `(B, k)` float32 values.
    """
    B, k = candidate_ids.shape
    dtype = next(lenvm.backbone.parameters()).dtype
    prefix = attention_mask.bool()[:, None, None, :].expand(B, 1, k, attention_mask.size(1))  # (B, 1, k, P)
    own = torch.eye(k, dtype=torch.bool, device=candidate_ids.device).expand(B, 1, k, k)  # (B, 1, k, k)
    allowed = torch.cat([prefix, own], dim=-1)  # (B, 1, k, P + k)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=candidate_ids.device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)  # additive: works for eager and sdpa
    positions = position_ids[:, None].expand(B, k)  # (B, k) all candidates at the row's next position
    config = lenvm.backbone.config
    implementation = config._attn_implementation
    if implementation == "sdpa":  # read by every attention layer at every call, so this forward alone uses it
        config._attn_implementation = TREE_ATTENTION
    try:
        values = forward_with_cache(lenvm, cache, candidate_ids, mask, positions).values  # (B, k)
    finally:
        config._attn_implementation = implementation
    return _force_stop_values(values, candidate_ids, stop_token_ids)


@torch.no_grad()
def score_candidates_by_reencoding(
    lenvm: LengthValueModel,
    prefix_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    candidate_ids: torch.Tensor,
    stop_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    The naive reference of [`score_candidates`]: re-encode the whole prefix once per candidate, no cache.

    Args:
        lenvm ([`LengthValueModel`]):
            The LenVM.
        prefix_ids (`torch.Tensor`):
            `(B, P)` left-padded prefixes (prompt and generated tokens).
        attention_mask (`torch.Tensor`):
            `(B, P)` 1 on real tokens.
        candidate_ids (`torch.Tensor`):
            `(B, k)` candidate ids.
        stop_token_ids (`torch.Tensor`, *optional*):
            Ids whose candidates get value 0.

    Returns:
        `torch.Tensor`: `(B, k)` float32 values.
    """
    B, k = candidate_ids.shape
    input_ids = torch.cat([prefix_ids.repeat_interleave(k, dim=0), candidate_ids.reshape(B * k, 1)], dim=1)
    mask = torch.nn.functional.pad(attention_mask.repeat_interleave(k, dim=0), (0, 1), value=1)  # (B * k, P + 1)
    values = lenvm(input_ids, attention_mask=mask).values[:, -1].reshape(B, k)
    return _force_stop_values(values, candidate_ids, stop_token_ids)


def _force_stop_values(values: torch.Tensor, candidate_ids: torch.Tensor, stop_token_ids: torch.Tensor | None):
    if stop_token_ids is None:
        return values
    return values.masked_fill(torch.isin(candidate_ids, stop_token_ids.to(candidate_ids.device)), 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate_with_length_guidance(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    lenvm: LengthValueModel | None = None,
    guidance_config: LengthGuidanceConfig | None = None,
    target_lengths: int | list[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> GuidedGeneration:
    """
    Generate completions of a left-padded batch, steering their lengths with a LenVM.

    Each step: 1. candidate set from the policy's logits ([`~lenvm_rl.candidates.candidate_set`]); 2. LenVM values
    of all candidates in one cached forward ([`score_candidates`], stop tokens forced to 0); 3. choose
    ([`~lenvm_rl.candidates.select_candidates`]); 4. extend the LenVM cache with the chosen column
    ([`~lenvm_rl.kv_cache.keep_chosen_candidates`]) and run the policy on the chosen token; 5. retire finished rows
    from both caches ([`~lenvm_rl.kv_cache.keep_rows`]).

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The policy: a causal LM with a plain [`~transformers.DynamicCache`] (Llama, Qwen2, ...).
        input_ids (`torch.Tensor`):
            `(B, P)` prompt ids, left-padded.
        attention_mask (`torch.Tensor`, *optional*):
            `(B, P)` 1 on real tokens; defaults to all ones.
        lenvm ([`LengthValueModel`], *optional*):
            The LenVM, trained on this policy's completions with the same tokenizer; required unless
            `mode="none"`.
        guidance_config ([`LengthGuidanceConfig`], *optional*):
            Mode and sampling settings; defaults to `LengthGuidanceConfig()`.
        target_lengths (`int`, `list[int]` or `torch.Tensor`, *optional*):
            Target length `T` (tokens, stop token included) of every row or of each row; required by the
            constraint modes.
        generator (`torch.Generator`, *optional*):
            Source of randomness of the sampled modes.

    Returns:
        [`GuidedGeneration`]: completions, finish reasons and the LenVM values along them.
    """
    config = guidance_config or LengthGuidanceConfig()
    device = input_ids.device
    B = input_ids.size(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.long()
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate_with_length_guidance needs left-padded prompts (the last column must be real).")
    guided = config.mode != "none"
    if guided and lenvm is None:
        raise ValueError(f"mode={config.mode!r} needs a LenVM; pass `lenvm` or use mode='none'.")
    if guided:
        policy_vocab = model.get_output_embeddings().weight.shape[0]
        lenvm_vocab = lenvm.backbone.get_input_embeddings().num_embeddings
        if lenvm_vocab < policy_vocab:
            raise ValueError(
                f"The LenVM embeds {lenvm_vocab} token ids but the policy can emit {policy_vocab}: it must read the "
                "policy's token ids. Use a LenVM trained with the policy's tokenizer (check it with "
                "lenvm_rl.check_tokenizers_compatible, or pass `lenvm_tokenizer` to guided_generate_completions)."
            )
    if config.mode in CONSTRAINT_MODES:
        if target_lengths is None:
            raise ValueError(f"mode={config.mode!r} needs `target_lengths` (tokens, stop token included).")
        target_lengths = _target_lengths_tensor(target_lengths, B).to(device)  # (B,)
    stop_ids = config.stop_token_ids if config.stop_token_ids is not None else model.generation_config.eos_token_id
    if stop_ids is None:
        raise ValueError("No stop token: set `stop_token_ids` or the policy's generation_config.eos_token_id.")
    stop_ids = torch.as_tensor(stop_ids, device=device).long().reshape(-1)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if bool(((stop_ids < 0) | (stop_ids >= vocab_size)).any()):  # a stop token the policy can never emit
        source = (
            "stop_token_ids" if config.stop_token_ids is not None else "the policy's generation_config.eos_token_id"
        )
        raise ValueError(
            f"{source} holds {stop_ids.tolist()}, outside the policy's vocabulary [0, {vocab_size}): no row would ever "
            "stop. Pass the policy's stop token ids (--stop_token_ids)."
        )
    model.eval()

    # 1. Prefill the policy and the LenVM on the prompts (padding-aware positions).
    outputs, policy_cache = prefill(model, input_ids, attention_mask, logits_to_keep=1)
    logits = outputs.logits[:, -1]  # (B, V)
    caches, prompt_values = [policy_cache], None
    if guided:
        lenvm.eval()
        outputs, lenvm_cache = prefill(lenvm, input_ids, attention_mask)
        prompt_values = outputs.values[:, -1]  # (B,)
        caches.append(lenvm_cache)

    rows = list(range(B))  # original index of each row in flight
    next_positions = attention_mask.sum(dim=1)  # (B,)
    completions: list[list[int]] = [[] for _ in range(B)]
    values_out: list[list[float]] = [[] for _ in range(B)]
    finish_reasons = [""] * B
    stop_set = set(stop_ids.tolist())
    while rows:
        # 2. Candidates and their values.
        candidate_ids, candidate_logprobs = candidate_set(
            logits, config.top_k, config.top_p, config.min_p, config.temperature
        )  # (b, k)
        candidate_values = None
        if guided:
            candidate_values = score_candidates(
                lenvm, candidate_ids, lenvm_cache, attention_mask, next_positions, stop_ids
            )  # (b, k)
        # 3. Choose one candidate per row.
        steps = torch.tensor([len(completions[i]) for i in rows], device=device)  # (b,)
        choices = select_candidates(
            candidate_logprobs,
            candidate_values,
            config.mode,
            gamma=lenvm.gamma if guided else None,
            beta=config.beta,
            steps=steps,
            target_lengths=target_lengths[rows] if config.mode in CONSTRAINT_MODES else None,
            temperature=config.temperature,
            generator=generator,
            bound_min_prob=config.bound_min_prob,
        )  # (b,)
        next_tokens = candidate_ids.gather(1, choices[:, None])  # (b, 1)
        # 4. Extend both caches with the chosen tokens.
        attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=1)  # (b, P + 1)
        if guided:
            keep_chosen_candidates(lenvm_cache, choices, candidate_ids.size(1))
            chosen_values = candidate_values.gather(1, choices[:, None]).squeeze(1).tolist()
        for j, (i, token) in enumerate(zip(rows, next_tokens.squeeze(1).tolist())):
            completions[i].append(token)
            if guided:
                values_out[i].append(chosen_values[j])
        # 5. Retire finished rows; the others run the policy on their new token.
        done = [
            j
            for j, i in enumerate(rows)
            if completions[i][-1] in stop_set or len(completions[i]) >= config.max_new_tokens
        ]
        for j in done:
            finish_reasons[rows[j]] = "stop" if completions[rows[j]][-1] in stop_set else "length"
        if done:
            keep = torch.tensor([j for j in range(len(rows)) if j not in set(done)], dtype=torch.long, device=device)
            rows = [rows[j] for j in keep.tolist()]
            if not rows:
                break
            attention_mask = keep_rows(attention_mask, keep, *caches)
            next_tokens, next_positions = next_tokens[keep], next_positions[keep]
        outputs = forward_with_cache(model, policy_cache, next_tokens, attention_mask, next_positions[:, None])
        logits = outputs.logits[:, -1]  # (b, V)
        next_positions = next_positions + 1
    return GuidedGeneration(
        completion_ids=completions,
        finish_reasons=finish_reasons,
        prompt_values=prompt_values,
        values=values_out if guided else None,
    )


def _target_lengths_tensor(target_lengths, batch_size: int) -> torch.Tensor:
    """`(B,)` target lengths from one number for every row or one per row; each a whole number of tokens >= 1."""
    values = torch.as_tensor(target_lengths, dtype=torch.float64)
    if values.dim() == 0:
        values = values.expand(batch_size)
    if values.shape != (batch_size,):
        raise ValueError(
            f"target_lengths must be one number or one per row, shape ({batch_size},); got shape {tuple(values.shape)}."
        )
    bad = ~torch.isfinite(values) | (values < 1) | (values != values.round())
    if bool(bad.any()):
        raise ValueError(
            f"target_lengths must be whole numbers of tokens >= 1 (the stop token included); got "
            f"{values[bad].tolist()[:5]} (--target_lengths)."
        )
    return values.long()


def guided_generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts_messages: list[list[dict[str, str]]] | list[str],
    lenvm: LengthValueModel | None = None,
    guidance_config: LengthGuidanceConfig | None = None,
    target_lengths: list[int] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    lenvm_tokenizer: PreTrainedTokenizerBase | None = None,
) -> GuidedGeneration:
    """
    [`generate_with_length_guidance`] over a list of prompts: chat template, batches of similar length, one seed.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            The policy.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer (with a pad token); stop tokens default to its `eos_token_id` when the policy's
            generation config has none.
        prompts_messages (`list[list[dict[str, str]]]` or `list[str]`):
            Conversational prompts (chat template with a generation prompt) or rendered strings.
        lenvm ([`LengthValueModel`], *optional*):
            The LenVM (required unless `mode="none"`).
        guidance_config ([`LengthGuidanceConfig`], *optional*):
            Mode and sampling settings.
        target_lengths (`list[int]`, *optional*):
            One target per prompt (constraint modes).
        batch_size (`int`, *optional*, defaults to `32`):
            Prompts per batch.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator shared by all batches.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar over batches.
        lenvm_tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The LenVM's tokenizer: checked against `tokenizer` with [`~lenvm_rl.check_tokenizers_compatible`] (the
            LenVM reads the policy's token ids). Without it only the embedding sizes are compared.

    Returns:
        [`GuidedGeneration`]: in the order of `prompts_messages`.
    """
    config = guidance_config or LengthGuidanceConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (--batch_size), got {batch_size}")
    if target_lengths is not None and len(target_lengths) != len(prompts_messages):
        raise ValueError(
            f"target_lengths has {len(target_lengths)} entries for {len(prompts_messages)} prompts: give one per prompt."
        )
    if lenvm is not None and lenvm_tokenizer is not None:
        check_tokenizers_compatible(tokenizer, lenvm_tokenizer)
    if config.stop_token_ids is None and model.generation_config.eos_token_id is None:
        config = dataclasses.replace(config, stop_token_ids=[tokenizer.eos_token_id])
    device = model.device
    prompt_ids = tokenize_prompts(tokenizer, prompts_messages)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    generator = torch.Generator(device=device).manual_seed(seed)
    N = len(prompt_ids)
    completion_ids, finish_reasons, values = [None] * N, [None] * N, [None] * N
    prompt_values = torch.zeros(N)
    for start in tqdm(range(0, N, batch_size), desc="Guided generation", disable=not progress):
        index = order[start : start + batch_size]
        batch_ids, batch_mask = left_pad([prompt_ids[i] for i in index], tokenizer.pad_token_id)
        targets = None if target_lengths is None else [target_lengths[i] for i in index]
        out = generate_with_length_guidance(
            model, batch_ids.to(device), batch_mask.to(device), lenvm, config, targets, generator
        )
        for j, i in enumerate(index):
            completion_ids[i], finish_reasons[i] = out.completion_ids[j], out.finish_reasons[j]
            if out.values is not None:
                values[i] = out.values[j]
                prompt_values[i] = out.prompt_values[j]
    guided = config.mode != "none"
    return GuidedGeneration(
        completion_ids=completion_ids,
        finish_reasons=finish_reasons,
        prompt_values=prompt_values if guided else None,
        values=values if guided else None,
    )
