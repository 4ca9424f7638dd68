"""Dataset rows to prompts and completions back to reward-function inputs: the plumbing around PPO's rollout step."""

from typing import Any

import torch
from trl.data_utils import is_conversational, maybe_apply_chat_template

__all__ = ["decode_completions", "epoch_permutation_rows", "tokenize_prompt_rows"]


class _Permutations:
    """The seeded permutation of one epoch, cached per dataset (one epoch at a time)."""

    def __init__(self):
        self.key, self.order = None, None

    def get(self, dataset, epoch: int, seed: int) -> list[int]:
        key = (id(dataset), epoch, seed)
        if key != self.key:
            generator = torch.Generator().manual_seed(seed + epoch)
            self.key, self.order = key, torch.randperm(len(dataset), generator=generator).tolist()
        return self.order


_PERMUTATIONS = _Permutations()


def epoch_permutation_rows(dataset, start: int, count: int, seed: int) -> list[dict[str, Any]]:
    """Rows `start .. start + count` of the endless stream "epoch 0's permutation, then epoch 1's, ...", epoch `e`
    permuted with seed `seed + e`. A pure function of its arguments, so a resumed run needs no data-loader state and
    uses no global RNG, and no row is dropped at an epoch's end."""
    n, rows = len(dataset), []
    for position in range(start, start + count):
        epoch, index = divmod(position, n)
        rows.append(dataset[_PERMUTATIONS.get(dataset, epoch, seed)[index]])
    return rows


def tokenize_prompt_rows(rows: list[dict[str, Any]], tokenizer) -> tuple[list, list[list[int]]]:
    """`(prompts, prompt_ids)` of dataset rows: a `prompt` column (chat messages, rendered with the chat template, or
    text) or TRL 1.12's pre-tokenised `input_ids` column."""
    if "input_ids" in rows[0]:  # TRL 1.12 scripts pre-tokenise
        prompt_ids = [list(row["input_ids"]) for row in rows]
        prompts = [row.get("prompt", tokenizer.decode(ids)) for row, ids in zip(rows, prompt_ids)]
        return prompts, prompt_ids
    if "prompt" not in rows[0]:
        raise ValueError(f"The dataset needs a 'prompt' (or 'input_ids') column; found {list(rows[0])}.")
    prompts = [row["prompt"] for row in rows]
    texts = [maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"] for prompt in prompts]
    return prompts, tokenizer(text=texts, add_special_tokens=False)["input_ids"]


def decode_completions(completion_ids: list[list[int]], prompts: list, tokenizer) -> list:
    """Completions in reward-function format: text, or one assistant message for conversational prompts."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    if is_conversational({"prompt": prompts[0]}):
        return [[{"role": "assistant", "content": text}] for text in texts]
    return texts
