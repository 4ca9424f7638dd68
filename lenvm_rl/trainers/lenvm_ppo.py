"""LenVMPPOConfig / LenVMPPOTrainer: PPO with a frozen Length Value Model as a length-specific critic.

Method doc section 6 (paper appendix C): the objective becomes ``J = J_task + s * J_len``, with the task critic
trained as usual and a pretrained LenVM as a frozen critic of the length term. The subclass overrides only the steps
the length term changes: the values (step 3, adds the LenVM's values), the rewards (step 4, shaping or a penalty),
the advantages (step 5, the additive length advantage) and the log (step 7, `length/` metrics).
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from ..compatibility import check_lenvm_reads_policy_ids
from ..core import length_advantages, length_shaping_rewards
from ..modeling import LengthValueModel
from ..rl_math import add_length_advantages, scheduled_length_coef
from .length_critic import (
    LENVM_DIR,
    LENVM_OPTIMIZER_NAME,
    LengthCriticConfigMixin,
    length_metrics,
    length_value_targets,
    lenvm_from_policy,
    lenvm_state_values,
    load_length_critic,
    make_lenvm_optimizer,
    update_lenvm_online,
)
from .ppo import PPOConfig, PPOTrainer, RewardFunc

logger = logging.getLogger(__name__)

__all__ = ["LenVMPPOConfig", "LenVMPPOTrainer"]

LENGTH_MODES = ("advantage", "shaping", "penalty", "none")


@dataclass
class LenVMPPOConfig(LengthCriticConfigMixin, PPOConfig):
    r"""
    Configuration of [`LenVMPPOTrainer`]: [`PPOConfig`] plus the length critic's knobs (the `lenvm_*` / `length_*`
    fields of [`~lenvm_rl.trainers.length_critic.LengthCriticConfigMixin`], shared with [`~lenvm_rl.LenVMGRPOConfig`])
    and `length_mode`. With `length_coef=0` (the default) or `length_mode="none"` training is exactly
    [`PPOTrainer`]'s (same losses and parameters, bit for bit) and the LenVM, if given, is never run.

    Parameters:
        > Parameters that control the length critic

        length_mode (`str`, *optional*, defaults to `"advantage"`):
            How the length term enters PPO. `"advantage"`: `A = A_task + s * A_len` with the LenVM's length
            advantage (changes the objective: trades quality for length). `"shaping"`: potential-based reward
            shaping `r_t + beta * (gamma * Phi(s_{t+1}) - Phi(s_t))` with `Phi` the LenVM (keeps the task optimum,
            densifies credit). `"penalty"`: sequence-level `score - alpha * tokens` (no LenVM needed; an ablation).
            `"none"`: plain PPO.
        length_penalty_correct_only (`bool`, *optional*, defaults to `False`):
            In `"penalty"` mode, only responses with a positive task score (correct, for a 0/1 accuracy reward) pay
            the penalty: length is traded only once the answer is right.
        length_coef (`float`, *optional*, defaults to `0.0`):
            The coefficient of the length term: `s` (advantage), `beta` (shaping) or `alpha` (penalty, per token).
            Positive values favour shorter responses. In `"advantage"` mode it is unitless: the scaled length
            advantage has unit root mean square, like the whitened task advantage (see
            [`~lenvm_rl.rl_math.add_length_advantages`]). Must be 0 with `length_mode="none"`.
        lenvm_model_name_or_path, lenvm_gamma, length_coef_schedule, length_coef_warmup_steps, length_gamma,
        length_lam, lenvm_update, lenvm_init, lenvm_learning_rate, lenvm_update_epochs:
            See [`~lenvm_rl.trainers.length_critic.LengthCriticConfigMixin`]; the schedule counts PPO updates.
    """

    length_mode: Literal["advantage", "shaping", "penalty", "none"] = field(
        default="advantage", metadata={"help": "How the length term enters PPO: advantage, shaping, penalty or none."}
    )
    length_penalty_correct_only: bool = field(
        default=False, metadata={"help": "penalty mode: only responses with a positive task score pay the penalty."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.length_mode not in LENGTH_MODES:
            raise ValueError(f"--length_mode must be one of {LENGTH_MODES}, got {self.length_mode!r}")
        if self.lenvm_update == "online" and self.length_mode not in ("advantage", "shaping"):
            raise ValueError(
                "--lenvm_update online refreshes the LenVM critic: use --length_mode advantage or shaping."
            )
        if self.length_mode == "none" and self.length_coef != 0.0:
            raise ValueError(
                f"--length_coef {self.length_coef} has no effect with --length_mode none: set --length_coef 0, or "
                "pick --length_mode advantage / shaping / penalty."
            )


class LenVMPPOTrainer(PPOTrainer):
    r"""
    PPO with a frozen Length Value Model as a length-specific critic (method doc section 6), on [`PPOTrainer`].

    The LenVM is loaded once, frozen with [`~lenvm_rl.freeze_model`] and placed like a reward model (a DeepSpeed
    inference engine, sharded under ZeRO-3). It never receives gradients, is not part of the trained module nor of
    its optimizer, and is never written into checkpoints (with the opt-in `lenvm_update="online"` it is refreshed by
    its own optimizer after each update and saved in `lenvm/`, see step 6). Steps it changes (the rest is
    [`PPOTrainer`]'s):

    3. [`~LenVMPPOTrainer.compute_values`] adds `length_values` `(B, T + 1)`, the LenVM on the same query + response
       tokens (column `t` = position `context_length - 1 + t`, the state in which response token `t` is chosen;
       column `T` = the state after the last padded position), and `length_coef`, this update's coefficient.
    4. [`~LenVMPPOTrainer.compute_rewards`] adds `length_rewards` to the task rewards, after the optional
       `whiten_rewards` scaling: `"shaping"`: `beta * (gamma * Phi(s_{t+1}) - Phi(s_t))` with `Phi` the LenVM values,
       `Phi` = 0 after a stop token and PPO's `gamma` (the discount of the objective, as potential-based shaping
       requires); `"penalty"`: `-alpha * L` on the last real token (`L` tokens, stop token included).
    5. [`~LenVMPPOTrainer.compute_advantages`] adds `length_advantages` (raw `A_len`, from
       [`~lenvm_rl.core.length_advantages`] with `length_gamma` and `length_lam`) and, in `"advantage"` mode,
       `A = A_task + s * A_len / rms(A_len)` ([`~lenvm_rl.rl_math.add_length_advantages`]). The task critic's `returns` are unchanged.
    6. [`~LenVMPPOTrainer.train_on_rollouts`] (`lenvm_update="online"` only) then regresses the LenVM on the
       realised returns of the same rollouts.
    7. [`~LenVMPPOTrainer.gather_metrics`] adds the `length/` metrics.

    Responses cut at `response_length` without a stop token bootstrap every length quantity from the LenVM's value
    of the state after the cut (`terminated=False` in [`~lenvm_rl.core`]); they are never treated as finished.

    Args:
        args ([`LenVMPPOConfig`]):
            Configuration.
        processing_class, model, ref_model, reward_model, train_dataset, value_model, data_collator, eval_dataset,
        optimizers, callbacks, peft_config, reward_funcs:
            As in [`PPOTrainer`].
        lenvm ([`~lenvm_rl.LengthValueModel`] or `str`, *optional*):
            The LenVM or its local directory; defaults to `args.lenvm_model_name_or_path`. It must read the policy's
            token ids: the tokenizer saved with it (or `lenvm_processing_class`) is checked against
            `processing_class` with [`~lenvm_rl.check_tokenizers_compatible`] at construction.
        lenvm_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The LenVM's tokenizer, to check a LenVM passed as a model (a directory's own tokenizer is found there).

    Metrics (gathered over all processes, every logging step):

    - `length/response_tokens_mean`, `length/response_tokens_max`: response length `L`, stop token included.
    - `length/truncated_frac`: fraction of responses cut at `response_length` without a stop token.
    - `length/coef`: the coefficient of this update (after the schedule; 0 in `"none"` mode).
    - `length/stop_token_advantage_mean`, `length/other_token_advantage_mean`: the final advantage of the stop-token
      action (finished rows) and of every other response token: how much the update favours stopping.
    - `length/lenvm_loss` (`lenvm_update="online"`): the online LenVM's regression loss.
    - `length/rewards_mean` (`"shaping"`, `"penalty"`): the per-response sum of the length rewards.
    - When the LenVM ran this update (advantage / shaping mode, coefficient != 0): `length/predicted_tokens_mean`, the mean of `values_to_lengths(v(s_0))` (the LenVM's predicted
      length at the prompt); `length/drift_ratio`, realised over predicted length, both averaged in value space
      (paper section 5), so a calibrated LenVM gives 1 even when lengths vary (rows cut at `response_length`
      count `-(1 - gamma^T) + gamma^T v(s_T)`); < 1 means the policy became shorter than the LenVM expects;
      `length/advantages_mean`, `length/advantages_std`: raw `A_len` over real tokens (mean > 0: shorter than
      predicted).
    """

    _tag_names = ["trl", "ppo", "lenvm-rl", "lenvm"]

    def __init__(
        self,
        args: LenVMPPOConfig,
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
        lenvm: LengthValueModel | str | None = None,
        lenvm_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        if not isinstance(args, LenVMPPOConfig):
            raise ValueError(f"LenVMPPOTrainer needs a LenVMPPOConfig, got {type(args).__name__}.")
        # Loaded before PPOTrainer seeds the run: the LenVM's construction must not shift the seeded RNG stream, so
        # that length_coef=0 reproduces PPOTrainer bit for bit.
        needs_lenvm = args.length_mode in ("advantage", "shaping")
        self.lenvm, lenvm_processing_class = load_length_critic(
            args,
            lenvm,
            lenvm_processing_class,
            missing_message=f"--length_mode {args.length_mode} needs a LenVM: set --lenvm_model_name_or_path (or pass "
            "`lenvm=`), or use --length_mode penalty / none."
            if needs_lenvm
            else None,
        )
        if self.lenvm is not None:
            check_lenvm_reads_policy_ids(self.lenvm, processing_class, lenvm_processing_class)
        self.lenvm_gamma = self.lenvm.gamma if self.lenvm is not None else None
        self.length_gamma = args.length_gamma if args.length_gamma is not None else self.lenvm_gamma
        super().__init__(
            args,
            processing_class,
            model,
            ref_model,
            reward_model,
            train_dataset,
            value_model,
            data_collator,
            eval_dataset,
            optimizers,
            callbacks,
            peft_config,
            reward_funcs,
        )
        if args.lenvm_init == "policy":  # the length critic without pretraining
            self.lenvm = lenvm_from_policy(self.accelerator.unwrap_model(self.model).policy, args.lenvm_gamma)
            self.lenvm_gamma = self.lenvm.gamma
            self.length_gamma = args.length_gamma if args.length_gamma is not None else self.lenvm_gamma
        self.lenvm_optimizer = None
        if args.lenvm_update == "online":
            if self.is_deepspeed_enabled:
                raise ValueError("--lenvm_update online is not supported with DeepSpeed: use DDP, or a frozen LenVM.")
            self.lenvm_optimizer = make_lenvm_optimizer(self.lenvm, args.lenvm_learning_rate)

    def _prepare_frozen_models(self):
        super()._prepare_frozen_models()
        if self.lenvm is not None:
            self.lenvm = self._place_frozen_model(self.lenvm)

    def current_length_coef(self) -> float:
        """The length coefficient of the update in progress (`state.global_step` is its 0-based index); 0 in
        `"none"` mode."""
        args = self.args
        if args.length_mode == "none":
            return 0.0
        return scheduled_length_coef(
            self.state.global_step,
            self.num_updates,
            args.length_coef,
            args.length_coef_schedule,
            args.length_coef_warmup_steps,
        )

    # ------------------------------------------------------------------ 3. values

    def compute_length_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen LenVM's values `(B, T + 1)` of the states `s_0 .. s_T` of each query + response.

        Column `t` reads position `context_length - 1 + t`, like the task critic's `values`; chunks of
        `local_rollout_forward_batch_size` rows, no gradients, float32 ([`~lenvm_rl.trainers.length_critic.lenvm_state_values`]).
        """
        # The engine's module keeps ZeRO-3's gathering hooks (they sit on its submodules); calling it directly skips
        # the engine's output post-processing, which an inference-only model does not need.
        lenvm = self.lenvm.module if self.is_deepspeed_enabled else self.lenvm
        length_values = lenvm_state_values(
            lenvm,
            batch["query_responses"],
            batch["attention_mask"],
            first_state=batch["context_length"] - 1,
            chunk_size=self.args.local_rollout_forward_batch_size,
            autocast=self.accelerator.autocast,
        )
        return self.check_finite(length_values, "LenVM values")

    def compute_values(self, batch: dict[str, Any]) -> dict[str, Any]:
        """[`PPOTrainer.compute_values`], plus `length_coef` and, when the LenVM is used this update, `length_values`
        `(B, T + 1)`. A coefficient of 0 (or `"penalty"` / `"none"` mode) never runs the LenVM."""
        out = super().compute_values(batch)
        out["length_coef"] = self.current_length_coef()
        if self.lenvm is not None and out["length_coef"] != 0.0 and self.args.length_mode in ("advantage", "shaping"):
            out["length_values"] = self.compute_length_values(batch)
        return out

    # ------------------------------------------------------------------ 4. rewards

    def compute_rewards(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """[`PPOTrainer.compute_rewards`] plus the length rewards of `"shaping"` and `"penalty"` modes.

            shaping:  r'_t = r_t + beta * (gamma * Phi(s_{t+1}) - Phi(s_t))      Phi = length_values, 0 after stop
            penalty:  r'_L = r_L - alpha * L                                      on the last real token
                      (with `length_penalty_correct_only`, only rows with a positive task score)

        Returns:
            `dict`: PPOTrainer's keys, `rewards` including the length term, and `length_rewards` `(B, T)` in those
            modes.
        """
        out = super().compute_rewards(batch)
        mode, mask = self.args.length_mode, batch["response_mask"]
        if batch["length_coef"] == 0.0:
            return out
        if mode == "shaping":
            shaping = length_shaping_rewards(batch["length_values"], mask, self.args.gamma, batch["terminated"])
            length_rewards = batch["length_coef"] * shaping.to(out["rewards"].dtype)
        elif mode == "penalty":
            rows = torch.arange(len(mask), device=mask.device)
            tokens = mask.sum(1).to(out["rewards"].dtype)  # (B,) L, stop token included
            if self.args.length_penalty_correct_only:
                tokens = tokens * (batch["scores"] > 0).to(tokens.dtype)
            length_rewards = torch.zeros_like(out["rewards"])
            length_rewards[rows, batch["sequence_lengths"]] = -batch["length_coef"] * tokens
        else:
            return out
        out["rewards"] = self.check_finite(out["rewards"] + length_rewards, "rewards with the length term")
        out["length_rewards"] = length_rewards
        return out

    # ------------------------------------------------------------------ 5. advantages

    def compute_advantages(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """[`PPOTrainer.compute_advantages`] (task GAE, whitened), plus the length advantage.

            delta_len_t = -(1 - gamma_len) + gamma_len * v(s_{t+1}) - v(s_t)       (v after a stop token = 0)
            A_len_t     = sum_i (gamma_len * lam_len)^i delta_len_{t+i}
            A_t         = A_task_t + s * A_len_t / rms(A_len)                       ("advantage" mode only)

        Returns:
            `dict`: `advantages`, `returns` (the task critic's, unchanged) and, with a LenVM, `length_advantages`
            (raw `A_len`, `(B, T)`, 0 on padding).
        """
        out = super().compute_advantages(batch)
        if "length_values" not in batch:
            return out
        mask = batch["response_mask"]
        out["length_advantages"] = self.check_finite(
            length_advantages(
                batch["length_values"], mask, self.length_gamma, self.args.length_lam, batch["terminated"]
            ),
            "length advantages",
        )
        if self.args.length_mode == "advantage":
            out["advantages"] = add_length_advantages(
                out["advantages"],
                out["length_advantages"],
                mask,
                batch["length_coef"],
                all_reduce=self._all_reduce_sum,
            )
            self.check_finite(out["advantages"], "advantages with the length term")
        return out

    # ------------------------------------------------------------------ 6. PPO epochs (+ the online LenVM update)

    def train_on_rollouts(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """[`PPOTrainer.train_on_rollouts`]; with `lenvm_update="online"`, then one refresh of the LenVM on the same
        rollouts (its values regress the realised returns, [`~lenvm_rl.trainers.length_critic.update_lenvm_online`]),
        after the length advantages of this update were computed with the LenVM as it was."""
        stats = super().train_on_rollouts(batch)
        if self.lenvm_optimizer is not None and "length_values" in batch:
            stats["lenvm_loss"] = torch.tensor(self.update_lenvm(batch))
        return stats

    def update_lenvm(self, batch: dict[str, Any]) -> float:
        """One online LenVM update on the rollout batch; returns its mean loss."""
        targets = length_value_targets(
            batch["length_values"], batch["response_mask"], self.lenvm_gamma, batch["terminated"]
        )
        average = (
            (lambda g: self.accelerator.reduce(g, reduction="mean")) if self.accelerator.num_processes > 1 else None
        )
        return update_lenvm_online(
            self.lenvm,
            self.lenvm_optimizer,
            batch["query_responses"],
            batch["attention_mask"],
            batch["context_length"] - 1,
            targets,
            batch["response_mask"],
            micro_batch_size=self.args.per_device_train_batch_size,
            epochs=self.args.lenvm_update_epochs,
            average_gradients=average,
        )

    # ------------------------------------------------------------------ checkpoints of an online LenVM

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """[`PPOTrainer._save`]; an online LenVM is saved too, in `lenvm/` (a frozen one never changes: not saved)."""
        super()._save(output_dir, state_dict)
        if self.lenvm_optimizer is not None and self.args.should_save:
            self.lenvm.save_pretrained(
                os.path.join(output_dir or self.args.output_dir, LENVM_DIR), self.processing_class
            )

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self.lenvm_optimizer is not None and self.args.should_save:
            torch.save(self.lenvm_optimizer.state_dict(), os.path.join(output_dir, LENVM_OPTIMIZER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.lenvm_optimizer is not None:
            saved = LengthValueModel.from_pretrained(os.path.join(resume_from_checkpoint, LENVM_DIR))
            self.lenvm.load_state_dict(saved.state_dict())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.lenvm_optimizer is not None and checkpoint is not None:
            state = torch.load(os.path.join(checkpoint, LENVM_OPTIMIZER_NAME), map_location=self.accelerator.device)
            self.lenvm_optimizer.load_state_dict(state)

    def model_card_facts(self) -> dict[str, object]:
        """[`PPOTrainer.model_card_facts`] plus the length critic: the LenVM used, its gamma, `length_mode` and
        `length_coef` (with its schedule)."""
        args = self.args
        facts = super().model_card_facts()
        if self.lenvm is not None:
            # A DeepSpeed engine once training placed it.
            lenvm = self.lenvm if isinstance(self.lenvm, LengthValueModel) else self.lenvm.module
            if args.lenvm_init == "policy":
                facts["LenVM"] = "the policy's backbone with a fresh head (`lenvm_init=policy`, no pretraining)"
            else:
                facts["LenVM"] = (
                    f"`{args.lenvm_model_name_or_path or lenvm.config._name_or_path or 'built in memory'}`"
                )
            facts["LenVM generator model"] = lenvm.generator_model or "not recorded"
            facts["LenVM gamma"] = self.lenvm_gamma
            facts["lenvm_update"] = args.lenvm_update
        facts["length_mode"] = args.length_mode
        facts["length_coef"] = (
            f"{args.length_coef} ({args.length_coef_schedule}, {args.length_coef_warmup_steps} warm-up updates)"
        )
        return facts

    # ------------------------------------------------------------------ 7. log

    def gather_metrics(self, batch: dict[str, Any], stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """[`PPOTrainer.gather_metrics`] plus the `length/` metrics (a collective: every process calls it)."""
        metrics = super().gather_metrics(batch, stats)
        mask = batch["response_mask"]
        metrics.update(
            length_metrics(
                mask.sum(1),
                batch["terminated"],
                self.accelerator.gather,
                length_values=batch.get("length_values"),
                raw_length_advantages=batch.get("length_advantages"),
                loss_mask=mask,
                gamma=self.lenvm_gamma,
            )
        )
        metrics["length/coef"] = float(batch["length_coef"])
        if "lenvm_loss" in stats:
            metrics["length/lenvm_loss"] = self.accelerator.gather(stats["lenvm_loss"][None]).mean().item()
        if "length_rewards" in batch:
            metrics["length/rewards_mean"] = self.accelerator.gather(batch["length_rewards"].sum(1)).mean().item()
        # The advantage of choosing the stop token (finished rows), against that of the other tokens: a length term
        # whose credit lands on the stop token's neighbours can make stopping look bad (README, the PPO penalty row).
        rows = torch.arange(len(mask), device=mask.device)
        advantages = batch["advantages"]
        stop = advantages[rows, batch["sequence_lengths"]][batch["terminated"]]
        others = advantages.masked_fill(~mask, 0.0)
        others[rows, batch["sequence_lengths"]] = 0.0
        sums = torch.stack(
            [stop.sum(), stop.new_tensor(stop.numel()), others.sum(), (mask.sum() - len(mask)).to(others)]
        )
        stop_sum, stop_count, other_sum, other_count = self.accelerator.gather(sums[None]).sum(0)
        metrics["length/stop_token_advantage_mean"] = (stop_sum / stop_count.clamp(min=1)).item()
        metrics["length/other_token_advantage_mean"] = (other_sum / other_count.clamp(min=1)).item()
        return metrics
