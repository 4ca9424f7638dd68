"""PPO's rollout step (step 1 of an update): which dataset rows an update takes, sampling one response per prompt
(the training policy's `generate`, or a vLLM engine), cutting it after its stop token, and turning completions back
into reward-function inputs."""

from typing import Any

import torch
import torch.nn as nn
from transformers import GenerationConfig
from trl.data_utils import is_conversational, maybe_apply_chat_template
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from ..modeling import fill_padding
from ..rl_math import truncate_after_stop_token
from .vllm_rollouts import pad_vllm_completions

__all__ = [
    "NEUTRAL_SAMPLING",
    "PPORolloutMixin",
    "decode_completions",
    "epoch_permutation_rows",
    "rollout_generation_config",
    "tokenize_prompt_rows",
]


# Every logits processor `generate` would otherwise take from the policy's own generation config (an instruct model's
# `repetition_penalty=1.05`, a `top_k=20`, ...): `generate` fills the settings a passed config leaves unset from the
# model's, and the rollout's log-probabilities (softmax of logits / temperature) would then not be those of the
# distribution that sampled the tokens. The vLLM path sets the same neutral values.
NEUTRAL_SAMPLING = dict(
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    min_new_tokens=0,
)


def rollout_generation_config(**kwargs) -> GenerationConfig:
    """A `GenerationConfig` with `kwargs` and every other sampling setting neutral (see `NEUTRAL_SAMPLING`)."""
    return GenerationConfig(**{**NEUTRAL_SAMPLING, **kwargs})


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


class PPORolloutMixin:
    """Step 1 of [`~lenvm_rl.PPOTrainer`]'s update: the rollout. Uses the trainer's `accelerator`, `args`,
    `processing_class`, `stop_token_id`, `pad_token_id`, `generation_config` and `vllm_generation`."""

    def get_rollout_inputs(self, update: int) -> list[dict[str, Any]]:
        """This process's dataset rows for `update`: a slice of a seeded per-epoch permutation of the dataset.

        A pure function of `update` (and the seed), so resuming needs no data-loader state and uses no global RNG.
        """
        start = update * self.batch_size + self.accelerator.process_index * self.local_batch_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return epoch_permutation_rows(self.train_dataset, start, self.local_batch_size, seed)

    def generate_rollouts(
        self, inputs: list[dict[str, Any]], generation_config: GenerationConfig | None = None
    ) -> dict[str, Any]:
        """Sample one response per prompt and cut it after its first stop token.

        Args:
            inputs (`list[dict]`): this process's dataset rows.
            generation_config ([`~transformers.GenerationConfig`], *optional*): replaces the sampling configuration
                (the greedy one of [`~PPOTrainer.generate_completions`]).

        Returns:
            `dict`: the rollout batch: `prompts` (raw), `columns` (every dataset column but `prompt`, as lists),
            `queries` `(B, C)` left-padded, `context_length` (`C`), `responses` `(B, T)`, `query_responses`
            `(B, C + T)`, `attention_mask` `(B, C + T)`, `response_mask` `(B, T)`, `sequence_lengths` `(B,)`,
            `terminated` `(B,)`, `completions` (text, or assistant messages for conversational prompts) and
            `completion_ids` (lists of ids, stop token included), the last two in reward-function format; with vLLM,
            `sampler_logprobs` `(B, T)`, the engine's log-probabilities of the sampled tokens.
        """
        device = self.accelerator.device
        prompts, prompt_ids = tokenize_prompt_rows(inputs, self.processing_class)
        queries = pad([torch.tensor(ids) for ids in prompt_ids], self.pad_token_id, "left").to(device)  # (B, C)
        query_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], 0, "left").to(device)
        context_length = queries.shape[1]

        if self.vllm_generation is not None and generation_config is None:
            responses, sampler_logprobs = self.sample_with_vllm(prompt_ids)  # (B, T), (B, T)
        else:
            responses, sampler_logprobs = self._generate_with_policy(queries, query_mask, generation_config), None
        responses, response_mask, sequence_lengths, terminated = truncate_after_stop_token(
            responses.to(device), self.stop_token_id, self.pad_token_id
        )

        completion_ids = [row[mask].tolist() for row, mask in zip(responses, response_mask)]
        completions = decode_completions(completion_ids, prompts, self.processing_class)
        columns = {key: [row[key] for row in inputs] for key in inputs[0] if key != "prompt"}
        extra = {} if sampler_logprobs is None else {"sampler_logprobs": sampler_logprobs.to(device)}
        return {
            "prompts": prompts,
            "columns": columns,
            "queries": queries,
            "context_length": context_length,
            "responses": responses,
            "query_responses": torch.cat([queries, responses], dim=1),
            "attention_mask": torch.cat([query_mask, response_mask.long()], dim=1),
            "response_mask": response_mask,
            "sequence_lengths": sequence_lengths,
            "terminated": terminated,
            "completions": completions,
            "completion_ids": completion_ids,
            **extra,
        }

    def sample_with_vllm(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample one response per prompt on the vLLM engine, after giving it the policy's current weights if an
        optimizer step happened since the last sync: `responses` and the engine's `sampler_logprobs`, `(B, T)`."""
        if self._vllm_synced_step != self.state.global_step:
            self.vllm_generation.sync_weights()
            self._vllm_synced_step = self.state.global_step
        _, completion_ids, logprobs, _ = self.vllm_generation.generate(
            prompts=prompt_ids, images=None, num_generations=1
        )
        return pad_vllm_completions(completion_ids, logprobs, self.args.response_length, self.pad_token_id)

    def _generate_with_policy(self, queries, query_mask, generation_config: GenerationConfig | None) -> torch.Tensor:
        """`model.generate` on the training policy, in chunks: responses `(B, T)`, padded after their end."""
        context_length, T = queries.shape[1], self.args.response_length
        chunk = self.args.local_rollout_forward_batch_size
        responses = []
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
            ) as unwrapped,
            self.accelerator.autocast(),
        ):
            unwrapped.eval()
            for i in range(0, len(queries), chunk):
                output = unwrapped.policy.generate(
                    input_ids=fill_padding(queries[i : i + chunk], query_mask[i : i + chunk]),
                    attention_mask=query_mask[i : i + chunk],
                    generation_config=generation_config or self.generation_config,
                )
                generated = output[:, context_length:]
                responses.append(nn.functional.pad(generated, (0, T - generated.shape[1]), value=self.pad_token_id))
        return torch.cat(responses)
