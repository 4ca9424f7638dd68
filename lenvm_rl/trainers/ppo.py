"""PPOConfig / PPOTrainer: PPO with a learned task critic for causal LMs, in TRL's PPO vocabulary.

TRL 1.13 removed its `PPOTrainer` (see ``shared/docs/trl_ppo_facts.md``). This trainer keeps the config fields,
defaults, metric keys and constructor of TRL 1.12's, so a TRL <= 1.12 PPO script ports by changing its import,
fixes that trainer's known defects, and splits one PPO update into overridable steps so that
`LenVMPPOTrainer` can change only the rewards or the advantages.
"""

import logging
import math
import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
)
from transformers.trainer_utils import set_seed
from trl.trainer.utils import (
    entropy_from_logits,
    selective_log_softmax,
)

from ..core import compute_gae
from ..modeling import FILL_TOKEN_ID, fill_padding
from ..rl_math import (
    check_finite,
    clipped_policy_loss,
    clipped_value_loss,
    kl_estimates,
    masked_mean,
    masked_whiten,
)
from .checkpointing import CompleteCheckpointsMixin
from .ppo_config import PPOConfig, resolve_stop_token_id
from .ppo_models import PolicyAndValueWrapper, PPOModelsMixin, prepare_ppo_models
from .ppo_rollouts import PPORolloutMixin, rollout_generation_config
from .reward_funcs import RewardFunc, call_reward_funcs, load_reward_funcs, reward_func_names, warn_constant_scores
from .trl_compat import TRLPPOCompatMixin
from .vllm_rollouts import make_ppo_vllm_generation, sampler_logprob_stats, vllm_metrics

logger = logging.getLogger(__name__)

__all__ = ["PPOConfig", "PPOTrainer", "PolicyAndValueWrapper"]  # PPOConfig lives in ppo_config.py


class PPOTrainer(PPORolloutMixin, PPOModelsMixin, TRLPPOCompatMixin, CompleteCheckpointsMixin, Trainer):
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

    Deliberate differences from TRL 1.12's trainer (defects fixed, rewards, data, truncated rows, the stop token,
    mini-batches, metrics, the critic, config defaults, the TRL surface) are listed in ``docs/trl_compatibility.md``
    (the documentation site's "TRL compatibility" page).
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
        self.generation_config = rollout_generation_config(
            max_new_tokens=args.response_length,
            temperature=args.temperature,
            do_sample=True,
            eos_token_id=self.stop_token_id,
            # `generate` writes this after a row's stop token and feeds it back to the policy, so it must be a valid
            # id (the tokenizer's may lie past the vocabulary); truncation then writes the pad id there.
            pad_token_id=FILL_TOKEN_ID,
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

    # ------------------------------------------------------------------ 1. rollout: PPORolloutMixin (ppo_rollouts.py)

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
            # Log-probabilities at padding are masked out below, but their ids must still index the vocabulary.
            responses = fill_padding(batch["responses"][i : i + chunk], mask[i : i + chunk])
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
        """[`~lenvm_rl.trainers.vllm_rollouts.sampler_logprob_stats`] of finite engine log-probabilities."""
        sampler_logprobs = self.check_finite(sampler_logprobs, "vLLM log-probabilities", mask)
        return sampler_logprob_stats(sampler_logprobs, logprobs, mask, self.args)

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
        logprobs = selective_log_softmax(logits, fill_padding(batch["responses"][indices], mask))
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
        metrics.update(vllm_metrics(batch, gather))
        rewards_per_func = gather(batch["rewards_per_func"])  # (B * processes, F)
        for i, name in enumerate(self.reward_func_names):
            column = rewards_per_func[:, i]
            column = column[~torch.isnan(column)]
            metrics[f"rewards/{name}/mean"] = column.mean().item() if column.numel() else math.nan
            metrics[f"rewards/{name}/std"] = column.std().item() if column.numel() > 1 else 0.0
        return metrics
