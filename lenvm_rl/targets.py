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
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length}) "
            "to leave room for at least one completion token."
        )

    def encode(record):
        terminated = record["finish_reason"] == "stop"
        if reuse_token_ids:
            prompt_ids = list(record["prompt_ids"])
            completion_ids = list(record["completion_ids"])
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
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
        if max_length is not None:
            completion_ids = completion_ids[: max(max_length - len(prompt_ids), 0)]
        return {
            "input_ids": prompt_ids + completion_ids,
            "completion_start": len(prompt_ids),
            "completion_length": completion_length,
            "terminated": terminated,
            "_keep": completion_length > 0 and len(prompt_ids) > 0 and (terminated or include_truncated),
        }

    examples = dataset.map(encode, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing rollouts")
    num_empty = sum(1 for n in examples["completion_length"] if n == 0)
    num_truncated = sum(1 for t in examples["terminated"] if not t)
    kept = examples.filter(lambda keep: keep, input_columns="_keep", num_proc=num_proc).remove_columns("_keep")
    logger.info(
        "LenVM examples: %d kept of %d; %d cut at the sampling cap (%s), %d empty completions dropped.",
        len(kept),
        len(examples),
        num_truncated,
        "kept with bootstrapped targets" if include_truncated else "dropped: their true length is unknown",
        num_empty,
    )
    if len(kept) == 0:
        raise ValueError(
            f"No LenVM training examples left out of {len(examples)} records: {num_truncated} were cut at the sampling "
            f"cap and {num_empty} were empty. Sample with a larger max_new_tokens or pass include_truncated=True."
        )
    return kept


@dataclass
class LenVMDataCollator:
    """Pads (or packs) LenVM examples and attaches their dense targets.

    Padded batches (``padding_free=False``) are right-padded ``(B, T)`` with an attention mask. Packed batches
    (``padding_free=True``) concatenate the sequences into one row ``(1, N)`` with ``position_ids`` restarting at
    0 for every sequence and no attention mask: transformers then restricts attention to each sequence
    (``find_packed_sequence_indices``), so a packed batch gives the same values, loss and gradients as the padded
    one without computing on padding.

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
        if self.padding_free:
            row_starts = torch.cumsum(row_lengths, 0) - row_lengths  # where each row starts in the packed row
        else:
            row_starts = torch.arange(B) * T
        bootstrap_index = (row_starts + row_lengths - 1)[:, None].expand(B, T)  # state after the row's last token

        batch = {"input_ids": input_ids, "length_targets": returns, "target_mask": target_mask}
        if bool(bootstrappable.any()):
            batch.update(bootstrap_discounts=discounts, bootstrap_index=bootstrap_index)
        if not self.padding_free:
            batch["attention_mask"] = attention_mask.long()
            return batch
        batch["position_ids"] = torch.arange(T)[None, :].expand(B, T)
        keep = attention_mask.reshape(-1)
        return {key: value.reshape(-1)[keep][None, :] for key, value in batch.items()}  # each (1, N)
