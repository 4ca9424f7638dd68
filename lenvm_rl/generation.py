"""Sampling many completions from a small causal LM on a CPU, without waiting on the longest one.

Completion lengths are long-tailed, so a static batch spends most of its steps decoding padding behind its
longest row. [`generate_completions`] keeps a fixed number of rows in flight instead (continuous batching): a row
that emits EOS or reaches `max_new_tokens` leaves the batch, and new prompts are prefilled and spliced into the
key/value cache as soon as a quarter of the rows are free. Prompts are taken in order of length so prefills pad
little.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .kv_cache import append_rows, forward_with_cache, keep_rows, prefill

__all__ = ["GeneratedCompletion", "generate_completions", "left_pad", "sample_next_tokens", "tokenize_prompts"]


@dataclass
class GeneratedCompletion:
    """
    One sampled completion.

    Parameters:
        prompt_index (`int`):
            Index of its prompt in the `prompts_messages` passed to [`generate_completions`].
        sample_index (`int`):
            Index of the sample among the `num_samples` of its prompt.
        prompt_ids (`list[int]`):
            The tokenized prompt (chat template applied).
        completion_ids (`list[int]`):
            Generated token ids, including the EOS token when one was produced.
        text (`str`):
            The completion decoded without special tokens.
        finish_reason (`str`):
            `"stop"` if the completion ended with EOS, `"length"` if it was cut at `max_new_tokens`.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """
    Sample one token per row from next-token logits (inverse-CDF sampling from the filtered softmax).

    Args:
        logits (`torch.Tensor`):
            Logits of shape `(B, V)`.
        temperature (`float`):
            Softmax temperature; `0` means greedy (argmax).
        top_p (`float`):
            Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`; `1.0` keeps all.
        top_k (`int`):
            Keep the `top_k` most likely tokens; `0` keeps all.
        generator (`torch.Generator`, *optional*):
            Source of randomness.

    Returns:
        `torch.Tensor`: token ids of shape `(B,)`.

    Example:
        >>> import torch
        >>> from lenvm_rl.generation import sample_next_tokens
        >>> sample_next_tokens(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0.0, top_p=1.0, top_k=0).tolist()
        [1]
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if 0 < top_k < logits.size(-1):
        kth_largest = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely token always stays.
        sorted_drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(sorted_drop.scatter(-1, sorted_indices, sorted_drop), float("-inf"))
    # Inverse-CDF sampling: one uniform per row against the cumulative distribution, accumulated in float64 and
    # normalised so that its last entry is exactly 1 (a token of probability 0 is never drawn). torch.multinomial
    # draws one exponential per vocabulary entry instead: ~15% of a bfloat16 decoding step at 32 rows of a 49K-token
    # vocabulary on a CPU (benchmarks/rollout_throughput.py).
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()  # (B, V) probabilities up to normalisation
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # (B, V)
    cdf = cdf / cdf[:, -1:]
    if not bool(cdf[:, -1].isfinite().all()):
        raise ValueError("Cannot sample: the model produced non-finite logits (NaN or +inf).")
    uniforms = torch.rand(len(cdf), 1, dtype=torch.float64, device=cdf.device, generator=generator)  # (B, 1) in [0, 1)
    return torch.searchsorted(cdf, uniforms, right=True).squeeze(-1)


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Stack token-id rows into a left-padded batch, the layout of every decoding loop here.

    Args:
        rows (`list[list[int]]`): Token ids, at least one row, each non-empty.
        pad_token_id (`int`): Id written on padding (masked; the decoding loops embed it as a valid id).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `input_ids` and `attention_mask`, both `(B, T)` long.

    Example:
        >>> input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
        >>> input_ids.tolist(), attention_mask.tolist()
        ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts_messages: list[list[dict[str, str]]] | list[str]
) -> list[list[int]]:
    """Token ids of each prompt: conversational prompts through the chat template with a generation prompt, prompt
    strings as they are (no special tokens added)."""
    return [
        tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if isinstance(prompt, str)
        else tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        for prompt in prompts_messages
    ]


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts_messages: list[list[dict[str, str]]] | list[str],
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> list[GeneratedCompletion]:
    """
    Sample `num_samples` completions for each prompt with continuous batching and a key/value cache.

    Up to `batch_size` rows decode together. A row leaves the batch when it samples the tokenizer's EOS token or
    reaches `max_new_tokens`; whenever at least a quarter of the rows are free (or the batch is empty) the next
    prompts, taken in order of token length, are prefilled together and their caches spliced into the batch. Rows
    are left-aligned by padding masked positions in front, and positions no row attends to any more are dropped,
    so the cache never grows past the longest row in flight.

    The result is a pure function of the inputs and `seed` for a given `batch_size` and number of CPU threads: one
    generator draws every sample, so the batch composition (which depends on `batch_size`) changes the draws.

    Args:
        model ([`~transformers.PreTrainedModel`]):
            A causal LM whose cache is a plain [`~transformers.DynamicCache`] (Llama, Qwen2, ... without sliding
            window).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer, with `eos_token_id` and `pad_token_id` set.
        prompts_messages (`list[list[dict[str, str]]]` or `list[str]`):
            Conversational prompts (rendered with the chat template and a generation prompt) or already rendered
            prompt strings (tokenized without adding special tokens).
        num_samples (`int`, *optional*, defaults to `1`):
            Completions per prompt.
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Length cap; a completion cut there has `finish_reason="length"`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature; `0` is greedy decoding.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold; `1.0` disables it.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filtering; `0` disables it.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows decoded together.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sampling generator.
        progress (`bool`, *optional*, defaults to `False`):
            Show a progress bar over completions.

    Returns:
        `list[GeneratedCompletion]`: `len(prompts_messages) * num_samples` completions ordered by prompt, then
        sample (index `prompt_index * num_samples + sample_index`).
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("generate_completions needs a tokenizer with `eos_token_id` and `pad_token_id` set.")
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(
            f"max_new_tokens, batch_size and num_samples (--max_new_tokens, --batch_size, --num_samples) must be at "
            f"least 1, got {max_new_tokens}, {batch_size} and {num_samples}."
        )
    eos_token_id, pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()

    prompt_ids = tokenize_prompts(tokenizer, prompts_messages)
    # Work items (prompt_index, sample_index), shortest prompts first so each prefill group pads little.
    queue = sorted(
        ((i, j) for i in range(len(prompt_ids)) for j in range(num_samples)), key=lambda item: len(prompt_ids[item[0]])
    )
    queue.reverse()  # pop() from the end takes the shortest
    results: dict[tuple[int, int], GeneratedCompletion] = {}

    cache = None
    rows: list[tuple[int, int]] = []  # work item of each row in flight
    generated: list[list[int]] = []  # tokens generated so far by each row
    attention_mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # (B, T) over cache positions
    positions = torch.zeros(0, dtype=torch.long, device=device)  # (B,) position id of each row's next token
    progress_bar = tqdm(total=len(queue), desc="Generating", disable=not progress)

    while queue or rows:
        # 1. Refill: prefill the next prompts and splice their caches into the batch.
        free = batch_size - len(rows)
        if queue and (free >= max(1, batch_size // 4) or not rows):
            new_items = [queue.pop() for _ in range(min(free, len(queue)))]
            new_ids, new_mask = left_pad([prompt_ids[i] for i, _ in new_items], pad_token_id)
            new_ids, new_mask = new_ids.to(device), new_mask.to(device)
            outputs, new_cache = prefill(model, new_ids, new_mask, logits_to_keep=1)
            first_tokens = sample_next_tokens(outputs.logits[:, -1], temperature, top_p, top_k, generator)  # (n,)
            if cache is None or not rows:
                cache, attention_mask = new_cache, new_mask
                positions = new_mask.sum(dim=1)
                rows, generated = [], []
            else:
                attention_mask = append_rows(cache, attention_mask, new_cache, new_mask)
                positions = torch.cat([positions, new_mask.sum(dim=1)])
            rows += new_items
            generated += [[token] for token in first_tokens.tolist()]
        else:
            # 2. Decode one token for every row in flight.
            last_tokens = torch.tensor([tokens[-1] for tokens in generated], device=device)[:, None]  # (B, 1)
            attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=1)  # (B, T + 1)
            outputs = forward_with_cache(model, cache, last_tokens, attention_mask, positions[:, None])
            positions = positions + 1
            next_tokens = sample_next_tokens(outputs.logits[:, -1], temperature, top_p, top_k, generator)  # (B,)
            for tokens, token in zip(generated, next_tokens.tolist()):
                tokens.append(token)

        # 3. Retire finished rows and drop cache positions that no remaining row attends to.
        finished = [
            k for k, tokens in enumerate(generated) if tokens[-1] == eos_token_id or len(tokens) >= max_new_tokens
        ]
        if finished:
            for k in finished:
                prompt_index, sample_index = rows[k]
                tokens = generated[k]
                results[rows[k]] = GeneratedCompletion(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    prompt_ids=prompt_ids[prompt_index],
                    completion_ids=tokens,
                    text=tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason="stop" if tokens[-1] == eos_token_id else "length",
                )
            progress_bar.update(len(finished))
            finished_rows = set(finished)
            keep = [k for k in range(len(rows)) if k not in finished_rows]
            rows, generated = [rows[k] for k in keep], [generated[k] for k in keep]
            keep_index = torch.tensor(keep, dtype=torch.long, device=device)
            attention_mask, positions = keep_rows(attention_mask, keep_index, cache), positions[keep_index]
    progress_bar.close()
    return [results[(i, j)] for i in range(len(prompt_ids)) for j in range(num_samples)]
