"""PPOConfig / PPOTrainer: PPO with a learned task critic for causal LMs, in TRL's PPO vocabulary.

TRL 1.13 removed its `PPOTrainer` (see ``shared/docs/trl_ppo_facts.md``). This trainer keeps the config fields,
defaults, metric keys and constructor of TRL 1.12's, so a TRL <= 1.12 PPO script ports by changing its import,
fixes that trainer's known defects, and splits one PPO update into overridable steps so that
`LenVMPPOTrainer` can change only the rewards or the advantages.
"""

import logging
import math
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    Trainer,
)
from transformers.trainer_utils import set_seed
from trl.models.utils import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import (
    entropy_from_logits,
    pad,
    selective_log_softmax,
)

from ..core import compute_gae
from ..modeling import position_ids_from_mask
from ..rl_math import (
    check_finite,
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimates,
    masked_mean,
    masked_whiten,
    truncate_after_stop_token,
    truncated_importance_weights,
)
from .checkpointing import CompleteCheckpointsMixin
from .ppo_config import PPOConfig, resolve_stop_token_id
from .ppo_models import (
    VALUE_MODEL_DIR,
    PolicyAndValueWrapper,
    prepare_ppo_models,
    save_policy_and_critic,
    tied_parameter_names,
)
from .ppo_rollouts import decode_completions, epoch_permutation_rows, tokenize_prompt_rows
from .reward_funcs import RewardFunc, call_reward_funcs, load_reward_funcs, reward_func_names, warn_constant_scores
from .trl_compat import TRLPPOCompatMixin
from .vllm_rollouts import make_ppo_vllm_generation, pad_vllm_completions

logger = logging.getLogger(__name__)

__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValueWrapper"]  # PPOConfig lives in ppo_config.py


class PPOTrainer(TRLPPOCompatMixin, CompleteCheckpointsMixin, Trainer):
    r"""
    PPO with a learned task critic for causal LMs (Schulman et al. 2017; Ziegler et al. 2019), built on
    `transformers.Trainer` (checkpointing, `report_to`, callbacks, mixed precision, DeepSpeed) and TRL's utilities.

    One update (`train` runs `ceil(total_episodes / batch_size)` of them) is a numbered list of overridable steps that
    pass one plain dict, the *rollout batch*, from step to step (each step returns the keys it adds):

    1. [`~PPOTrainer.generate_rollouts`]`(inputs)` -> `prompts`, `columns`, `queries`, `context_length`,
       `responses`, `query_responses`, `attention_mask`, `response_mask`, `sequence_lengths`, `terminated`,
       `completions`, `completion_ids`.
    2. [`~PPOTrainer.score_rollouts`]`(batch)` -> `rewards_per_func` `(B, F)`, `scores` `(B,)`.
    3. [`~PPOTrainer.compute_values`]`(batch)` -> `logprobs`, `ref_logprobs` `(B, T)`, `values` `(B, T + 1)`.
    4. [`~PPOTrainer.compute_rewards`]`(batch)` -> `kl`, `non_score_rewards`, `rewards` `(B, T)`.
    5. [`~PPOTrainer.compute_advantages`]`(batch)` -> `advantages` (whitened), `returns` `(B, T)`.
    6. [`~PPOTrainer.train_on_rollouts`]`(batch)` -> per-micro-batch statistics (calls
       [`~PPOTrainer.compute_ppo_loss`] on each micro-batch).
    7. [`~PPOTrainer.gather_metrics`]`(batch, stats)` -> TRL's metric dict, logged with `Trainer.log`.

    Shapes: `B` rollouts of this process, `T = response_length`, `C = context_length` (left-padded prompts).
    `response_mask` is True on real response tokens including the stop token; `sequence_lengths` is the index of each
    row's last real token (TRL's meaning); `values[:, t]` is `V(s_t)`, the critic at the position before token `t`, and
    `values[:, T]` the state after the last column (the bootstrap of rows cut at `response_length`).

    Args:
        args ([`PPOConfig`]):
            Configuration.
        processing_class ([`~transformers.PreTrainedTokenizerBase`]):
            The policy's tokenizer, with a chat template for conversational prompts and a pad token.
        model ([`~transformers.PreTrainedModel`] or `str`):
            The policy, a causal LM (or its path).
        ref_model ([`~transformers.PreTrainedModel`], *optional*):
            Frozen reference for the KL penalty. `None`: a frozen copy of the policy, or, with `peft_config` or a PEFT
            policy, the policy with its adapter disabled (or `ref_adapter_name` active).
        reward_model ([`~transformers.PreTrainedModel`], *optional*):
            A sequence classifier (`AutoModelForSequenceClassification`, `num_labels=1`) sharing the policy's
            tokenizer; its score is read at each response's last real token. Needs `reward_funcs` when `None`.
        train_dataset ([`~datasets.Dataset`]):
            A `prompt` column (conversational messages or text) and any extra columns, which reach the reward
            functions; or TRL 1.12's pre-tokenised `input_ids` column.
        value_model ([`~transformers.PreTrainedModel`], *optional*):
            The critic, a sequence or token classifier with one label whose `score` head is read at every position.
            `None` builds one from the policy's backbone with a zero-initialised head.
        data_collator (*optional*):
            Accepted for TRL 1.12 signatures and ignored: the trainer tokenises and pads prompts itself.
        eval_dataset (*optional*):
            Prompts (same columns as `train_dataset`) of the sample tables of [`~PPOTrainer.generate_completions`].
        optimizers (`tuple`, *optional*, defaults to `(None, None)`):
            Optimizer over the wrapper's parameters and scheduler; created from `args` by default.
        callbacks (`list[TrainerCallback]`, *optional*):
            Extra callbacks.
        peft_config ([`~peft.PeftConfig`], *optional*):
            LoRA (or another adapter) on the policy; the critic trains in full.
        reward_funcs (`list`, *optional*):
            Reward functions with TRL's GRPO signature, `func(prompts=..., completions=..., completion_ids=...,
            trainer_state=..., **dataset_columns) -> list[float | None]` (`None` skips the function for a row), or
            sequence classifiers / their paths. Logged as `rewards/<name>/mean` and `/std`.

    Differences from TRL 1.12:

    - **Defects fixed.** The score lands on the last real token (the stop token), not the slot after it.
      `missing_eos_penalty` and `val/num_eos_tokens` use the configured stop token; masks come from the stop token's
      position, so `pad_token_id == eos_token_id` works. `bf16`/`fp16` and `gradient_checkpointing` from the config
      apply (the Trainer's accelerator). Advantage (and reward) whitening uses statistics all-reduced over processes
      and is safe on masks of 0 or 1 tokens. Checkpoints hold the policy, the critic (`value_model/`), optimizer,
      scheduler and RNG states, and `train(resume_from_checkpoint=...)` continues the run exactly. Reference
      log-probabilities of a LoRA policy and saving go through `accelerator.unwrap_model` (DDP-safe).
    - **Rewards.** Reward functions with GRPO's signature and any dataset column, several rewards combined with
      `reward_weights` (a reward model is the first entry), per-reward metrics `rewards/<name>/mean|std`.
    - **Data.** Prompts are rendered with the chat template and tokenised per batch; extra columns are allowed. Each
      update takes the next `batch_size` prompts of a seeded per-epoch permutation (no rows dropped at epoch ends).
    - **Truncated rows.** A response cut at `response_length` without a stop token is not treated as finished: its
      score (minus `missing_eos_penalty`) still lands on its last token, and GAE bootstraps from the critic's value of
      the state after the cut (`terminated=False` in [`~lenvm_rl.core.compute_gae`]).
    - **Stop token.** With neither `stop_token` nor `stop_token_id`, EOS is the stop token (TRL 1.12 stopped
      generation at EOS but then did not truncate nor check it). Generation stops at the stop token.
    - **Mini-batches.** Each mini-batch is `gradient_accumulation_steps / num_mini_batches` micro-batches and ends
      with one optimizer step (TRL 1.12 stepped every `gradient_accumulation_steps` micro-batches whatever the
      mini-batch boundaries); `max_grad_norm` clips the gradients (TRL 1.12 ignored it).
    - **Metrics.** Token-level statistics (`policy/*`, `val/ratio`) are masked means over real tokens; `logging_steps`
      (default 1) selects the updates that log.
    - **Critic.** `value_model` may be omitted (built from the policy). Checkpoints save it under `value_model/`.
    - **Config defaults.** `bf16` defaults to `False` and `activation_checkpointing` (`gradient_checkpointing`) to
      off, `logging_steps` to 1 (TRL 1.12: `bf16=True` unless `fp16`, checkpointing on, 10, all ignored by its
      trainer, which logged every update): here they take effect, so they are opt-in. The batch sizes set on `args`
      (`batch_size`, `local_batch_size`, ...) are not settable fields.
    - **TRL surface** ([`~lenvm_rl.trainers.trl_compat.TRLPPOCompatMixin`]). `generate_completions` decodes greedily
      (TRL 1.12 sampled at temperature 0.01) and scores like training (all rewards, `missing_eos_penalty`);
      `save_model` also writes the model card `README.md`; `eval_strategy` runs no evaluation (nor did TRL 1.12);
      `state.episode` is not stored in `trainer_state.json` (it is `global_step * batch_size`).
    """

    _tag_names = ["trl", "ppo", "lenvm-rl"]

    def __init__(
        self,
        args: PPOConfig,
        processing_class: PreTrainedTokenizerBase,
        model: nn.Module | str,
        ref_model: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        train_dataset=None,
        value_model: nn.Module | None = None,
        data_collator=None,
        eval_dataset=None,
        optimizers: tuple = (None, None),
        callbacks: list | None = None,
        peft_config=None,
        reward_funcs: list[RewardFunc] | None = None,
    ):
        if train_dataset is None or not hasattr(train_dataset, "__len__"):
            raise ValueError("PPOTrainer needs a map-style `train_dataset` (with a length) of prompts.")
        if processing_class is None or processing_class.pad_token_id is None:
            raise ValueError("PPOTrainer needs a tokenizer with a pad token: set `tokenizer.pad_token`.")
        if data_collator is not None:
            logger.warning("`data_collator` is ignored: PPOTrainer tokenises and left-pads the prompts itself.")
        if args.max_steps > 0:
            logger.warning("`max_steps` is ignored by PPOTrainer: the number of updates follows `total_episodes`.")
        set_seed(args.seed)  # the critic built from the policy is part of the seeded run

        policy, ref_model, value_model, is_peft_policy = prepare_ppo_models(
            model, ref_model, value_model, peft_config, args
        )
        self.ref_model = ref_model

        self.reward_funcs = load_reward_funcs(reward_model, reward_funcs)
        self.reward_func_names = reward_func_names(self.reward_funcs)
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"--reward_weights has {len(weights)} entries but there are {len(self.reward_funcs)} rewards "
                f"({self.reward_func_names}, the reward model first)."
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)

        super().__init__(
            model=PolicyAndValueWrapper(policy, value_model),
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.is_peft_model = is_peft_policy
        if self.is_deepspeed_enabled and args.num_mini_batches > 1:
            raise ValueError(
                "--num_mini_batches > 1 is not supported with DeepSpeed yet: its gradient accumulation spans "
                "gradient_accumulation_steps micro-batches, one mini-batch here has fewer."
            )

        self.stop_token_id = resolve_stop_token_id(args, processing_class, policy)
        self.pad_token_id = processing_class.pad_token_id
        self.generation_config = GenerationConfig(
            max_new_tokens=args.response_length,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            do_sample=True,
            eos_token_id=self.stop_token_id,
            pad_token_id=self.pad_token_id,
        )

        # Batch sizes (TRL's names), also set on `args` as TRL 1.12 did: its scripts and callbacks read them there.
        world = self.accelerator.num_processes
        args.local_batch_size = self.local_batch_size = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps
        )
        args.batch_size = self.batch_size = self.local_batch_size * world
        args.local_mini_batch_size = self.local_mini_batch_size = self.local_batch_size // args.num_mini_batches
        args.mini_batch_size = self.batch_size // args.num_mini_batches
        args.micro_batch_size = args.per_device_train_batch_size * world
        args.total_episodes = args.total_episodes or int(args.num_train_epochs * len(train_dataset))
        args.num_total_batches = self.num_updates = math.ceil(args.total_episodes / self.batch_size)
        self.sample_generations_freq = (
            max(1, self.num_updates // args.num_sample_generations) if args.num_sample_generations > 0 else 0
        )
        self.state.episode = 0

        # vLLM rollouts: an engine loaded from the policy's checkpoint, given the policy's weights before each
        # update's rollout (the step it last received is tracked so a resumed run syncs before sampling).
        self.vllm_generation = make_ppo_vllm_generation(self, policy) if args.use_vllm else None
        self._vllm_synced_step = -1

    # ------------------------------------------------------------------ the update loop

    def _inner_training_loop(
        self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None
    ):
        args = self.args
        self.accelerator.free_memory()
        updates_per_epoch = max(1, len(self.train_dataset) // self.batch_size)
        num_epochs = math.ceil(self.num_updates / updates_per_epoch)
        self._init_training_state(self.num_updates, updates_per_epoch, num_epochs, resume_from_checkpoint, trial)
        self.state.episode = self.state.global_step * self.batch_size
        model, _ = self._prepare_for_training(self.num_updates, None, resume_from_checkpoint)
        self._prepare_frozen_models()
        self._load_rng_state(resume_from_checkpoint)  # after all set-up, so the run continues bit for bit

        logger.info(
            "***** Running PPO *****  updates = %d, rollouts per update = %d, PPO epochs = %d, mini-batches = %d",
            self.num_updates,
            self.batch_size,
            args.num_ppo_epochs,
            args.num_mini_batches,
        )
        start_time = time.time()
        self._initial_num_input_tokens_seen = self.state.num_input_tokens_seen
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.tensor(0.0, device=args.device)
        self._total_loss_scalar = 0.0
        self._globalstep_last_logged = self.state.global_step
        self._start_time = start_time
        model.zero_grad()
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)

        for update in range(self.state.global_step, self.num_updates):
            self.state.episode += self.batch_size  # TRL counts the rollouts of the update in progress
            self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
            inputs = self.get_rollout_inputs(update)
            with torch.no_grad():
                # 1. rollout
                batch = self.generate_rollouts(inputs)
                # 2. score
                batch.update(self.score_rollouts(batch))
                # 3. values
                batch.update(self.compute_values(batch))
                # 4. rewards
                batch.update(self.compute_rewards(batch))
                # 5. advantages
                batch.update(self.compute_advantages(batch))
            # 6. PPO epochs (one scheduler step per update)
            stats = self.train_on_rollouts(batch)
            self.lr_scheduler.step()
            self._tr_loss += stats["loss"].mean()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step * self.batch_size / len(self.train_dataset)
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            # 7. log
            if self.control.should_log:
                self.log(self.gather_metrics(batch, stats))
            if self.control.should_save:
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.sample_generations_freq and update % self.sample_generations_freq == 0:
                self.generate_completions(sampling=True)
            if self.control.should_training_stop:
                break

        self.control = self.callback_handler.on_epoch_end(args, self.state, self.control)
        return self._finalize_training(trial, self.state.global_step * self.batch_size, start_time)

    def _prepare_frozen_models(self):
        """Place the reference and reward models (subclasses add theirs, e.g. the LenVM)."""
        if self.ref_model is not None:
            self.ref_model = self._place_frozen_model(self.ref_model)
        self.reward_funcs = [
            self._place_frozen_model(func) if isinstance(func, nn.Module) else func for func in self.reward_funcs
        ]

    def _place_frozen_model(self, model: nn.Module) -> nn.Module:
        """A frozen model on this process's device; under DeepSpeed, an inference engine (sharded with ZeRO-3).

        Called after the policy's `accelerator.prepare`, which fills the DeepSpeed config's "auto" values.
        """
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        return model.to(self.accelerator.device)

    def get_rollout_inputs(self, update: int) -> list[dict[str, Any]]:
        """This process's dataset rows for `update`: a slice of a seeded per-epoch permutation of the dataset.

        A pure function of `update` (and the seed), so resuming needs no data-loader state and uses no global RNG.
        """
        start = update * self.batch_size + self.accelerator.process_index * self.local_batch_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return epoch_permutation_rows(self.train_dataset, start, self.local_batch_size, seed)

    # ------------------------------------------------------------------ 1. rollout

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
                    input_ids=queries[i : i + chunk],
                    attention_mask=query_mask[i : i + chunk],
                    generation_config=generation_config or self.generation_config,
                )
                generated = output[:, context_length:]
                responses.append(nn.functional.pad(generated, (0, T - generated.shape[1]), value=self.pad_token_id))
        return torch.cat(responses)

    # ------------------------------------------------------------------ 2. score

    def score_rollouts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Task scores: the weighted sum of every reward (NaN entries skipped), minus `missing_eos_penalty` for rows
        without a stop token.

        Returns:
            `dict`: `rewards_per_func` `(B, F)` (NaN where a function returned `None`) and `scores` `(B,)`.
        """
        where = f"update {self.state.global_step}"
        rewards_per_func = call_reward_funcs(
            self.reward_funcs,
            self.reward_func_names,
            batch,
            where,
            trainer_state=self.state,
            chunk_size=self.args.local_rollout_forward_batch_size,
            autocast=self.accelerator.autocast,
        ).to(self.accelerator.device)  # (B, F)
        scores = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~batch["terminated"]).float()
        all_scores = self.accelerator.gather(scores)
        if all_scores.numel() > 1 and bool((all_scores == all_scores[0]).all()):
            self._constant_score_updates = getattr(self, "_constant_score_updates", 0) + 1
            warn_constant_scores(self._constant_score_updates, len(all_scores), where, float(all_scores[0]))
        return {"rewards_per_func": rewards_per_func, "scores": scores}

    # ------------------------------------------------------------------ 3. values

    def _forward(self, model: nn.Module, query_responses, attention_mask, context_length: int):
        """Tempered policy logits of the response tokens `(B, T, V)` and critic values `(B, T + 1)`."""
        T = query_responses.shape[1] - context_length
        logits, values = model(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=T + 1,
        )
        # Position C - 1 + t predicts response token t and holds V(s_t); the last position is the state after T.
        return logits[:, :-1].float() / self.args.temperature, values[:, context_length - 1 :].float()

    def _ref_logits(self, query_responses, attention_mask, context_length: int) -> torch.Tensor:
        T = query_responses.shape[1] - context_length
        kwargs = dict(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=T + 1,
            use_cache=False,
        )
        with self.accelerator.autocast():
            if self.ref_model is not None:
                logits = self.ref_model(**kwargs).logits
            else:
                with self.null_ref_context():
                    logits = self.policy_model(**kwargs).logits
        return logits[:, :-1].float() / self.args.temperature

    def compute_values(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Log-probabilities of the sampled tokens under the policy and the reference, and the critic's values.

        Returns:
            `dict`: `logprobs` and `ref_logprobs` `(B, T)` (0 on padding), `values` `(B, T + 1)`.
        """
        C = batch["context_length"]
        mask = batch["response_mask"]
        logprobs, ref_logprobs, values = [], [], []
        self.model_wrapped.eval()
        chunk = self.args.local_rollout_forward_batch_size
        for i in range(0, len(mask), chunk):
            query_responses = batch["query_responses"][i : i + chunk]
            attention_mask = batch["attention_mask"][i : i + chunk]
            responses = batch["responses"][i : i + chunk]
            logits, chunk_values = self._forward(self.model_wrapped, query_responses, attention_mask, C)
            logprobs.append(selective_log_softmax(logits, responses))
            ref_logprobs.append(selective_log_softmax(self._ref_logits(query_responses, attention_mask, C), responses))
            values.append(chunk_values)
        result = {
            "logprobs": self.check_finite(torch.cat(logprobs).masked_fill(~mask, 0.0), "policy log-probabilities"),
            "ref_logprobs": self.check_finite(
                torch.cat(ref_logprobs).masked_fill(~mask, 0.0), "reference log-probabilities"
            ),
            "values": self.check_finite(torch.cat(values), "critic values"),
        }
        if "sampler_logprobs" in batch:
            result.update(self.compare_sampler_logprobs(batch["sampler_logprobs"], result["logprobs"], mask))
        return result

    def compare_sampler_logprobs(self, sampler_logprobs, logprobs, mask) -> dict[str, torch.Tensor]:
        """The engine/trainer gap on the sampled tokens, `|log pi_old - log pi_vllm|` `(B, T)` (0 on padding), and,
        with `vllm_importance_sampling_correction`, the tokens' truncated importance weights `(B, T)`."""
        sampler_logprobs = self.check_finite(sampler_logprobs, "vLLM log-probabilities", mask)
        result = {"sampler_logprob_diff": (logprobs - sampler_logprobs).abs().masked_fill(~mask, 0.0)}
        if self.args.vllm_importance_sampling_correction:
            result["importance_weights"] = truncated_importance_weights(
                logprobs,
                sampler_logprobs,
                mask,
                self.args.vllm_importance_sampling_clip_max,
                self.args.vllm_importance_sampling_mode,
            )
        return result

    # ------------------------------------------------------------------ 4. rewards

    def compute_rewards(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-token rewards: `-kl_coef * KL_t` on every real token, plus the score on the last real token.

            r_t = -kl_coef * KL_t + 1[t = sequence_length] * score

        Returns:
            `dict`: `kl`, `non_score_rewards` and `rewards`, all `(B, T)` and 0 on padding.
        """
        mask = batch["response_mask"]
        kl = kl_estimates(batch["logprobs"], batch["ref_logprobs"], self.args.kl_estimator).masked_fill(~mask, 0.0)
        non_score_rewards = -self.args.kl_coef * kl
        rows = torch.arange(len(mask), device=mask.device)
        rewards = non_score_rewards.clone()
        rewards[rows, batch["sequence_lengths"]] += batch["scores"]
        if self.args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=self._all_reduce_sum)
        return {"kl": kl, "non_score_rewards": non_score_rewards, "rewards": self.check_finite(rewards, "rewards")}

    # ------------------------------------------------------------------ 5. advantages

    def compute_advantages(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """GAE of the task critic ([`~lenvm_rl.core.compute_gae`]); rows cut without a stop token bootstrap from
        `values[:, T]`. Returns are computed before the advantages are whitened over all processes' real tokens.

        Returns:
            `dict`: `advantages` (whitened) and `returns`, `(B, T)`, 0 on padding.
        """
        mask = batch["response_mask"]
        advantages, returns = compute_gae(
            batch["rewards"], batch["values"], mask, self.args.gamma, self.args.lam, batch["terminated"]
        )
        advantages = masked_whiten(advantages, mask, all_reduce=self._all_reduce_sum)
        return {
            "advantages": self.check_finite(advantages, "advantages"),
            "returns": self.check_finite(returns, "returns"),
        }

    def check_finite(self, tensor: torch.Tensor, what: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[`~lenvm_rl.rl_math.check_finite`] with the update in the message: a NaN / inf stops the run before any
        optimizer step or checkpoint can carry it."""
        return check_finite(tensor, f"{what} at update {self.state.global_step}", mask)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    # ------------------------------------------------------------------ 6. PPO epochs

    def compute_ppo_loss(
        self, model: nn.Module, batch: dict[str, Any], indices: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`pg_loss + vf_coef * vf_loss` on the rows `indices` of the batch, and detached statistics."""
        mask = batch["response_mask"][indices]
        logits, values = self._forward(
            model, batch["query_responses"][indices], batch["attention_mask"][indices], batch["context_length"]
        )
        logprobs = selective_log_softmax(logits, batch["responses"][indices])
        token_weights = batch["importance_weights"][indices] if "importance_weights" in batch else None
        pg_loss, pg_stats = clipped_policy_loss(
            logprobs,
            batch["logprobs"][indices],
            batch["advantages"][indices],
            mask,
            self.args.cliprange,
            token_weights,
        )
        vf_loss, vf_clipfrac = clipped_value_loss(
            values[:, :-1], batch["values"][indices, :-1], batch["returns"][indices], mask, self.args.cliprange_value
        )
        loss = pg_loss + self.args.vf_coef * vf_loss
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(logits), mask)
        stats = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "vf_loss": vf_loss.detach(),
            "vf_clipfrac": vf_clipfrac,
            "pg_clipfrac": pg_stats["clipfrac"],
            "approxkl": pg_stats["approxkl"],
            "ratio": pg_stats["ratio"],
            "entropy": entropy,
        }
        return loss, stats

    def train_on_rollouts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` passes over shuffled mini-batches; one optimizer step per mini-batch, its micro-batches
        (`per_device_train_batch_size` rows) accumulated without gradient synchronisation until the last.

        Returns:
            `dict[str, torch.Tensor]`: each statistic of [`~PPOTrainer.compute_ppo_loss`], one entry per micro-batch.
        """
        model = self.model_wrapped
        model.train()
        micro_batch_size = self.args.per_device_train_batch_size
        stats = defaultdict(list)
        for _ in range(self.args.num_ppo_epochs):
            order = torch.randperm(self.local_batch_size, device=self.accelerator.device)
            for mini_batch in order.split(self.local_mini_batch_size):
                micro_batches = mini_batch.split(micro_batch_size)
                # DeepSpeed divides by its gradient_accumulation_steps itself (the micro-batch count, see __init__).
                loss_scale = 1 if self.is_deepspeed_enabled else len(micro_batches)
                for k, indices in enumerate(micro_batches):
                    is_last = k == len(micro_batches) - 1
                    with nullcontext() if is_last else self.accelerator.no_sync(model):
                        loss, micro_stats = self.compute_ppo_loss(model, batch, indices)
                        self.check_finite(loss.detach(), "PPO loss")
                        self.accelerator.backward(loss / loss_scale)
                    for key, value in micro_stats.items():
                        stats[key].append(value)
                if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
                    grad_norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
                    self.check_finite(torch.as_tensor(grad_norm), "gradient norm")
                self.optimizer.step()
                self.optimizer.zero_grad()
        stats = {key: torch.stack(values) for key, values in stats.items()}
        stats["lr"] = torch.tensor(self._get_learning_rate())  # the rate these steps used, before the scheduler steps
        return stats

    # ------------------------------------------------------------------ 7. log

    def gather_metrics(self, batch: dict[str, Any], stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """TRL's metrics over all processes, plus `rewards/<name>/mean|std` (a collective: every process calls it)."""
        gather = self.accelerator.gather
        mask = batch["response_mask"]
        non_score_reward = batch["non_score_rewards"].sum(1)  # (B,)
        episode = self.state.episode
        ratio = gather(stats["ratio"])
        metrics = {
            "eps": int(episode / max(time.time() - self._start_time, 1e-9)),
            "objective/kl": gather(batch["kl"].sum(1)).mean().item(),
            "objective/entropy": gather((-batch["logprobs"]).masked_fill(~mask, 0.0).sum(1)).mean().item(),
            "objective/non_score_reward": gather(non_score_reward).mean().item(),
            "objective/rlhf_reward": gather(non_score_reward + batch["scores"]).mean().item(),
            "objective/scores": gather(batch["scores"]).mean().item(),
            "policy/approxkl_avg": gather(stats["approxkl"]).mean().item(),
            "policy/clipfrac_avg": gather(stats["pg_clipfrac"]).mean().item(),
            "loss/policy_avg": gather(stats["pg_loss"]).mean().item(),
            "loss/value_avg": gather(stats["vf_loss"]).mean().item(),
            "val/clipfrac_avg": gather(stats["vf_clipfrac"]).mean().item(),
            "policy/entropy_avg": gather(stats["entropy"]).mean().item(),
            "val/ratio": ratio.mean().item(),
            "val/ratio_var": ratio.var().item() if ratio.numel() > 1 else 0.0,
            "val/num_eos_tokens": gather(batch["terminated"].sum()).sum().item(),
            "lr": stats["lr"].item(),
            "episode": episode,
        }
        if "sampler_logprob_diff" in batch:
            diff = gather(batch["sampler_logprob_diff"])  # (B * processes, T), 0 on padding
            real = gather(mask)
            metrics["vllm/logprob_diff_mean"] = diff[real].mean().item() if real.any() else 0.0
            metrics["vllm/logprob_diff_max"] = diff.max().item()
            if "importance_weights" in batch:
                metrics["vllm/importance_weight_mean"] = gather(batch["importance_weights"])[real].mean().item()
        rewards_per_func = gather(batch["rewards_per_func"])  # (B * processes, F)
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            column = column[~torch.isnan(column)]
            metrics[f"rewards/{name}/mean"] = column.mean().item() if column.numel() else math.nan
            metrics[f"rewards/{name}/std"] = column.std().item() if column.numel() > 1 else 0.0
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy at the top of `output_dir` (a loadable model or adapter), the critic in `value_model/`, staged
        and renamed into place ([`~lenvm_rl.trainers.ppo_models.save_policy_and_critic`])."""
        if self.args.should_save:
            wrapper = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_policy_and_critic(wrapper, state_dict, output_dir, self.processing_class, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=wrapper.policy)
        super()._load_from_checkpoint(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR), model=wrapper.value_model)

    def _issue_warnings_after_load(self, load_result) -> None:
        # Tied weights (an LM head sharing the embedding matrix) are saved once: their absence is expected.
        wrapper = self.accelerator.unwrap_model(self.model)
        missing = sorted(set(load_result.missing_keys) - tied_parameter_names(wrapper.policy, wrapper.value_model))
        if missing:
            logger.warning("There were missing keys in the checkpoint model loaded: %s.", missing)
        if load_result.unexpected_keys:
            logger.warning(
                "There were unexpected keys in the checkpoint model loaded: %s.", load_result.unexpected_keys
            )
