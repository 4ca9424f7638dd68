"""From sampled completions to LenVM training batches: tokenised examples, targets, padded or packed batches.

Data flows rollouts -> [`tokenize_rollouts`] -> [`LenVMDataCollator`] -> [`LenVMTrainer`]. Targets are the
dense returns of [`core.length_returns`] (paper section 3), computed per batch in float64.

Two facts the reference implementation gets wrong are handled here:

- a completion cut at the sampling cap (``finish_reason == "length"``) has an unknown true length: it is
  dropped by default (and counted), or kept with bootstrapped targets on request;
- a prompt longer than ``max_prompt_length`` is truncated **from the left**, which keeps the chat template's
  assistant header next to the completion. Targets are defined relative to the completion start, so they never
  shift. A completion longer than the remaining window keeps its first tokens with their exact targets (its
  true length is known).
"""

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from .core import length_returns

logger = logging.getLogger(__name__)

__all__ = ["LenVMDataCollator", "tokenize_rollouts"]


def tokenize_rollouts(
    dataset,
    tokenizer=None,
    max_prompt_length: int | None = None,
    max_length: int | None = None,
    include_truncated: bool = False,
    reuse_token_ids: bool = True,
    num_proc: int | None = None,
):
    """Turn rollout records into LenVM training examples.

    Each record needs ``completion_ids`` (or ``completion`` text), ``finish_reason`` (``"stop"`` or ``"length"``)
    and ``prompt_ids`` (or ``prompt``: chat messages or text). With ``reuse_token_ids`` (the default) the sampled
    token ids are used as they are, which is exact when the LenVM shares the policy's tokenizer (check it with
    [`check_tokenizers_compatible`]); otherwise prompt and completion are re-tokenised with ``tokenizer`` (the
    LenVM's), appending its EOS token to finished completions.

    Args:
        dataset (`datasets.Dataset`):
            Rollout records as written by ``recipes/sample_rollouts.py``.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The LenVM's tokenizer; required when ``reuse_token_ids`` is False.
        max_prompt_length (`int`, *optional*):
            Prompts longer than this are truncated from the left (the assistant header stays).
        max_length (`int`, *optional*):
            Window of prompt + completion; the completion's tail beyond it is dropped, its targets stay exact.
        include_truncated (`bool`, *optional*, defaults to `False`):
            Keep completions cut at the sampling cap; they then get bootstrapped targets.
        reuse_token_ids (`bool`, *optional*, defaults to `True`):
            Use the sampled ``prompt_ids`` / ``completion_ids`` instead of re-tokenising text.
        num_proc (`int`, *optional*):
            Processes for `datasets.Dataset.map`.

    Returns:
        `datasets.Dataset` with columns ``input_ids``, ``completion_start``, ``completion_length`` (true length,
        stop token included) and ``terminated``. Dropped records are logged with their counts.
    """
    if not reuse_token_ids and tokenizer is None:
        raise ValueError("tokenize_rollouts needs the LenVM's `tokenizer` when `reuse_token_ids=False`.")
    if max_prompt_length is not None and max_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}, --max_prompt_length) must be smaller than max_length "
            f"({max_length}, --max_length) to leave room for at least one completion token."
        )

    vocab_size = len(tokenizer) if tokenizer is not None else None
    eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None

    def encode(record, index):
        where = f"rollout record {index} (prompt_id {record.get('prompt_id')!r})"
        finish_reason = record.get("finish_reason")
        if finish_reason not in ("stop", "length"):
            raise ValueError(
                f"{where}: finish_reason must be 'stop' (ended with its stop token) or 'length' (cut at the sampling "
                f"cap), got {finish_reason!r}. Fix the record, or re-sample it with recipes/sample_rollouts.py."
            )
        terminated = finish_reason == "stop"
        if reuse_token_ids:
            prompt_ids = _check_token_ids(record.get("prompt_ids"), "prompt_ids", where, vocab_size)
            completion_ids = _check_token_ids(record.get("completion_ids"), "completion_ids", where, vocab_size)
        else:
            prompt = record["prompt"]
            if isinstance(prompt, list):
                prompt_ids = list(
                    tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
                )
            else:
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            if terminated:
                completion_ids = completion_ids + [tokenizer.eos_token_id]
        completion_length = len(completion_ids)
        stop_without_eos = terminated and eos_token_id is not None and completion_ids[-1:] != [eos_token_id]
        prompt_budget = max_prompt_length if max_prompt_length is not None else None
        if max_length is not None:  # leave room for at least one completion token in the window
            prompt_budget = min(prompt_budget or max_length - 1, max_length - 1)
        if prompt_budget is not None and len(prompt_ids) > prompt_budget:
            prompt_ids = prompt_ids[-prompt_budget:]
        if max_length is not None:
            completion_ids = completion_ids[: max(max_length - len(prompt_ids), 0)]
        return {
            "input_ids": prompt_ids + completion_ids,
            "completion_start": len(prompt_ids),
            "completion_length": completion_length,
            "terminated": terminated,
            # The first target is V(s_0), the value at the prompt's last token: a record without one is dropped.
            "_keep": completion_length > 0 and len(prompt_ids) > 0 and (terminated or include_truncated),
            "_empty_prompt": len(prompt_ids) == 0,
            "_stop_without_eos": stop_without_eos,
        }

    examples = dataset.map(
        encode, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing rollouts"
    )
    num_empty = sum(1 for n in examples["completion_length"] if n == 0)
    num_empty_prompts = sum(examples["_empty_prompt"])
    num_truncated = sum(1 for t in examples["terminated"] if not t)
    num_stop_without_eos = sum(examples["_stop_without_eos"])
    kept = examples.filter(lambda keep: keep, input_columns="_keep", num_proc=num_proc)
    kept = kept.remove_columns(["_keep", "_empty_prompt", "_stop_without_eos"])
    summary = (
        f"LenVM examples: {len(kept)} kept of {len(examples)}; {num_truncated} "
        f"({num_truncated / max(len(examples), 1):.0%}) cut at the sampling cap ("
        + ("kept with bootstrapped targets" if include_truncated else "dropped: their true length is unknown")
        + f"), {num_empty} empty completions and {num_empty_prompts} records with an empty prompt dropped."
    )
    dropped = num_empty + num_empty_prompts + (0 if include_truncated else num_truncated)
    (logger.warning if dropped else logger.info)(summary)
    if num_stop_without_eos:
        logger.warning(
            "%d of %d records are marked finish_reason='stop' but their completion_ids do not end with EOS (%d): they "
            "are trained as finished. Check that the sampler recorded the stop token.",
            num_stop_without_eos,
            len(examples),
            eos_token_id,
        )
    if len(kept) == 0:
        raise ValueError(
            f"No LenVM training examples left out of {len(examples)} records: {num_truncated} were cut at the sampling "
            f"cap, {num_empty} had an empty completion and {num_empty_prompts} an empty prompt. Sample with a larger "
            "max_new_tokens or pass include_truncated=True."
        )
    return kept


def _check_token_ids(ids, field: str, where: str, vocab_size: int | None) -> list[int]:
    """A record's token ids as a list of ints, or a `ValueError` naming the record, the field and the fix."""
    if ids is None or isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise ValueError(
            f"{where}: {field} is missing or not a list of token ids (got {type(ids).__name__}); re-sample the record "
            "or pass reuse_token_ids=False to re-tokenise its text."
        )
    ids = list(ids)
    for position, token_id in enumerate(ids):
        bad = (
            isinstance(token_id, bool)
            or not isinstance(token_id, numbers.Integral)
            and not (isinstance(token_id, float) and math.isfinite(token_id) and token_id.is_integer())
        )
        if bad or token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
            limit = f" in [0, {vocab_size})" if vocab_size is not None else " >= 0"
            raise ValueError(
                f"{where}: {field}[{position}] is {token_id!r}, not a token id{limit}. The record is corrupt or was "
                "sampled with another tokenizer; re-sample it."
            )
    return [int(token_id) for token_id in ids]


@dataclass
class LenVMDataCollator:
    """Pads (or packs) LenVM examples and attaches their dense targets.

    Padded batches (``padding_free=False``) are right-padded ``(B, T)`` with an attention mask. Packed batches
    (``padding_free=True``) place the sequences end to end into ``R`` rows of the longest sequence's length
    (first-fit decreasing), with ``position_ids`` restarting at 0 for every sequence and no attention mask:
    transformers then restricts attention to each sequence (``find_packed_sequence_indices``), so a packed batch
    gives the same values, loss and gradients as the padded one. Rows as long as the longest sequence, rather than
    one row of all ``N`` tokens, keep the attention cost at ``R * T^2`` instead of ``N^2``; the rows' leftover
    slots hold padding that forms its own sequence and carries no target.

    Output keys: ``input_ids``, ``attention_mask`` or ``position_ids``, ``length_targets`` (float64 ``G``),
    ``target_mask`` (bool), and for censored rows with bootstrapped targets ``bootstrap_discounts``
    (``gamma^(L - t)``, 0 elsewhere) and ``bootstrap_index`` (the flat index, into ``values.view(-1)``, of the
    state after the row's last token).

    Args:
        gamma (`float`): The LenVM's discount.
        pad_token_id (`int`): Padding id for padded batches.
        padding_free (`bool`, *optional*, defaults to `False`): Pack sequences instead of padding them.
    """

    gamma: float
    pad_token_id: int
    padding_free: bool = False

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        B = len(examples)
        T = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.bool)
        completion_mask = torch.zeros(B, T, dtype=torch.bool)
        for i, ex in enumerate(examples):
            n, start = len(ex["input_ids"]), ex["completion_start"]
            input_ids[i, :n] = torch.tensor(ex["input_ids"])
            attention_mask[i, :n] = True
            completion_mask[i, start:n] = True
        terminated = torch.tensor([bool(ex["terminated"]) for ex in examples])
        lengths = torch.tensor([ex["completion_length"] for ex in examples])
        visible = completion_mask.sum(-1)

        # Censored rows: G_t = -(1 - g^(L-t)) + g^(L-t) V(s_L), with V(s_L) read from the model in the loss.
        # Evaluating the targets at V(s_L) = 0 and 1 gives the constant part and the discount g^(L-t). Only a
        # censored row whose last token is inside the window has its state s_L to bootstrap from.
        zero, one = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
        targets = length_returns(completion_mask, terminated, self.gamma, bootstrap_values=zero, lengths=lengths)
        with_tail = length_returns(completion_mask, terminated, self.gamma, bootstrap_values=one, lengths=lengths)
        bootstrappable = ~terminated & (visible == lengths) & (visible > 0)
        target_mask = targets.mask & (terminated | bootstrappable)[:, None]
        returns = targets.returns.masked_fill(~target_mask, 0.0)
        discounts = (with_tail.returns - targets.returns).masked_fill(~target_mask, 0.0)  # (B, T)
        row_lengths = attention_mask.sum(-1)  # (B,)
        last_index = torch.arange(B) * T + row_lengths - 1  # flat index of each row's last token

        batch = {"input_ids": input_ids, "length_targets": returns, "target_mask": target_mask}
        if bool(bootstrappable.any()):
            batch.update(bootstrap_discounts=discounts, bootstrap_index=last_index[:, None].expand(B, T))
        batch["position_ids"] = torch.arange(T)[None, :].expand(B, T)
        if not self.padding_free:
            batch["attention_mask"] = attention_mask.long()
            del batch["position_ids"]  # the model derives padding-aware positions from the mask
            return batch
        return _pack(batch, row_lengths, T, self.pad_token_id)


def _pack(batch: dict[str, torch.Tensor], row_lengths: torch.Tensor, capacity: int, pad_token_id: int) -> dict:
    """Move the rows of a right-padded batch into rows of ``capacity`` slots, first-fit decreasing."""
    bins: list[list[int]] = []  # example indices per packed row
    free: list[int] = []
    for i in sorted(range(len(row_lengths)), key=lambda i: -int(row_lengths[i])):
        n = int(row_lengths[i])
        slot = next((b for b, room in enumerate(free) if room >= n), None)
        if slot is None:
            bins.append([])
            free.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(i)
        free[slot] -= n

    R, B = len(bins), len(row_lengths)
    # Source (flat padded index) of every packed slot; leftover slots read column 0 of row 0 and are masked.
    source = torch.zeros(R, capacity, dtype=torch.long)
    is_real = torch.zeros(R, capacity, dtype=torch.bool)
    position_ids = torch.zeros(R, capacity, dtype=torch.long)
    new_flat_index = torch.zeros(B * capacity, dtype=torch.long)  # padded flat index -> packed flat index
    for r, members in enumerate(bins):
        offset = 0
        for i in members:
            n = int(row_lengths[i])
            source[r, offset : offset + n] = i * capacity + torch.arange(n)
            new_flat_index[i * capacity : i * capacity + n] = r * capacity + offset + torch.arange(n)
            is_real[r, offset : offset + n] = True
            position_ids[r, offset : offset + n] = torch.arange(n)
            offset += n
        position_ids[r, offset:] = torch.arange(capacity - offset)  # the padding tail is a sequence of its own

    packed = {}
    for key, value in batch.items():
        gathered = value.reshape(-1)[source]
        packed[key] = gathered.masked_fill(~is_real, 0) if gathered.dtype != torch.bool else gathered & is_real
    packed["input_ids"] = packed["input_ids"].masked_fill(~is_real, pad_token_id)
    packed["position_ids"] = position_ids
    if "bootstrap_index" in packed:
        packed["bootstrap_index"] = new_flat_index[packed["bootstrap_index"]]
    return packed
