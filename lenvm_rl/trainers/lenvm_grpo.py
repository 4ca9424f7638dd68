"""LenVMGRPOConfig / LenVMGRPOTrainer: GRPO with a frozen Length Value Model as a per-token length critic.

Method doc section 6 (paper appendix C): the objective becomes ``J = J_task + s * J_len``. GRPO has no task critic,
so its sequence advantage ``A_seq`` (the group-normalised reward, one number per completion) stays as it is and the
frozen LenVM adds a per-token length advantage:

    delta_len_t = -(1 - gamma) + gamma * v(s_{t+1}) - v(s_t)            (v after EOS = 0)
    A_len_t     = sum_i (gamma * lam)^i delta_len_{t+i}                  (lenvm_rl.core.length_advantages)
    A_t         = A_seq + s * A_len_t / rms(A_len)                       (s = length_coef after its schedule)

The subclass overrides three seams of TRL's GRPOTrainer and nothing else, so generation (every rollout path), the
vLLM importance-sampling correction, KL, entropy masking and ``num_iterations`` stay TRL's:

1. ``_generate``: records each completion's true length and whether it was cut at ``max_completion_length``.
2. ``_generate_and_score_completions``: runs the LenVM on prompt + completion and adds ``length_advantages``, a
   separate ``(B, T)`` key that travels with the batch through TRL's buffering, shuffling and slicing.
3. ``compute_loss``: combines ``A_seq[:, None] + s * length_advantages`` on a shallow copy of the inputs.

Why no potential-based shaping mode (the PPO trainer's `"shaping"`): GRPO's advantage is an undiscounted Monte-Carlo
return with no critic, so the reward-to-go of the shaping terms ``Phi(s_{t+1}) - Phi(s_t)`` (discount 1, the
objective's, as shaping requires) from token ``t`` of a finished completion telescopes to ``-Phi(s_t)``: a
state-dependent baseline, whose expected policy gradient is zero. It would add variance, not credit; the additive
advantage above is the length term that changes the objective.

Checked against trl 1.16.0 (``pyproject.toml`` pins ``trl>=1.16,<1.17``): ``_generate(self, prompts)`` returns the
8-tuple ``(prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images)`` with
``completion_ids`` a list of token-id lists (EOS included when generated, no padding) on every rollout path;
``_generate_and_score_completions(self, inputs)`` returns a dict with left-padded ``prompt_ids``/``prompt_mask``,
right-padded ``completion_ids``/``completion_mask``, ``(B,)`` ``advantages``; ``_compute_loss`` accepts ``(B, T)``
advantages. Re-check these three when moving the pin.
"""

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import prepare_deepspeed
from trl.trainer import grpo_trainer as grpo_trainer_module
from trl.trainer.utils import get_config_model_id

from ..compatibility import check_lenvm_reads_policy_ids
from ..core import length_advantages
from ..modeling import LengthValueModel
from ..rl_math import check_finite, combine_advantages, rms_normalize_length_advantages, scheduled_length_coef
from ..vllm_engine import vllm_generation_class_of
from .checkpointing import CompleteCheckpointsMixin
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
from .trl_compat import lenvm_config_from

logger = logging.getLogger(__name__)

__all__ = ["LenVMGRPOConfig", "LenVMGRPOTrainer"]


@dataclass
class LenVMGRPOConfig(LengthCriticConfigMixin, GRPOConfig):
    r"""
    Configuration of [`LenVMGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus the length critic's knobs. With
    `length_coef=0` (the default) training is exactly [`~trl.GRPOTrainer`]'s (same losses and parameters, bit for
    bit) and the LenVM is never run (only the length statistics that need no LenVM are logged).

    Loss types. Every loss type works with the per-token advantage except two options whose definition is
    sequence-level and keyed on the *sign* of the advantage; with a per-token advantage that sign differs from token to
    token, so they are refused when `length_coef != 0`:

    - `loss_type="vespo"`: its Gamma weights are a per-sequence function of the sequence importance ratio, with
      `k`/`lambda` picked by the advantage's sign; they would become per-token weights of a different objective.
    - `off_policy_mask_threshold`: the off-policy *sequence* mask (DeepSeek-V3.2) drops whole negative-advantage
      sequences; it would drop individual tokens instead.

    `loss_type="sapo"` is allowed: its soft gate is already per token, and with a per-token advantage its temperature
    (`sapo_temperature_pos` / `_neg`) follows each token's combined advantage. The `clip_ratio/*` metrics likewise
    count tokens by the sign of their own advantage.

    Parameters:
        > Parameters that control the length critic

        length_coef (`float`, *optional*, defaults to `0.0`):
            `s` in `A = A_seq + s * A_len / rms(A_len)`. Positive values favour shorter completions, negative values
            longer ones. Unitless: the scaled length advantage has unit root mean square over the generation batch's
            real tokens, the scale of GRPO's group-normalised `A_seq` (with `scale_rewards="none"`, `A_seq` is in
            reward units instead). 0 is plain GRPO and never runs the LenVM.
        lenvm_model_name_or_path, lenvm_gamma, length_coef_schedule, length_coef_warmup_steps, length_gamma,
        length_lam:
            See [`~lenvm_rl.trainers.length_critic.LengthCriticConfigMixin`]; the schedule counts optimizer steps.

        > Parameters that control generation with vLLM (with TRL's `use_vllm`, `vllm_mode`, ...)

        vllm_dtype (`str` or `None`, *optional*, defaults to `None`):
            The colocated engine's dtype (`"float32"`, `"bfloat16"`, `"float16"`); `None` takes the policy's weight
            dtype. (TRL leaves it to vLLM's `"auto"`, which runs a float32 checkpoint in bfloat16.)
    """

    vllm_dtype: str | None = field(
        default=None,
        metadata={"help": "Colocated vLLM engine dtype (float32, bfloat16, float16); default: the policy's."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.vllm_dtype is not None and self.vllm_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--vllm_dtype must be float32, bfloat16, float16 or unset, got {self.vllm_dtype!r}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.length_coef != 0.0:
            if self.loss_type == "vespo":
                raise ValueError(
                    "--loss_type vespo weights whole sequences by the sign of their advantage, which a per-token "
                    "length advantage does not have: use another --loss_type (e.g. dapo) or --length_coef 0."
                )
            if self.off_policy_mask_threshold is not None:
                raise ValueError(
                    "--off_policy_mask_threshold masks whole sequences by the sign of their advantage, which a "
                    "per-token length advantage does not have: unset it or use --length_coef 0."
                )


class LenVMGRPOTrainer(CompleteCheckpointsMixin, GRPOTrainer):
    r"""
    GRPO with a frozen Length Value Model as a per-token length critic (method doc section 6), on TRL's
    [`~trl.GRPOTrainer`]; a drop-in replacement that takes the same arguments plus `lenvm`.

    The LenVM is loaded once, frozen with [`~lenvm_rl.freeze_model`] and placed like GRPO's reward models (a DeepSpeed
    inference engine under DeepSpeed, sharded with ZeRO-3; `accelerator.prepare_model(..., evaluation_mode=True)`
    otherwise). It never receives gradients, is not part of `self.model` nor of the optimizer, and is never written
    into checkpoints. With the opt-in `lenvm_update="online"` it is refreshed after each generation batch by its own
    optimizer and saved in the checkpoints' `lenvm/`.

    Length advantage. For each completion of `L` tokens (EOS included) the LenVM reads prompt + completion with
    padding-aware positions (`cumsum(mask) - 1`, so the left padding of prompts changes nothing); column `t` of the
    `(B, T + 1)` values is the state `s_t` in which completion token `t` is chosen (position `prompt_end - 1 + t`),
    column `L` the state after the last token. A completion that ended with EOS has `v = 0` after it; one cut at
    `max_completion_length` bootstraps from the LenVM's value after the cut (it is never treated as finished).
    The raw `A_len` ([`~lenvm_rl.core.length_advantages`], with `length_gamma` and `length_lam`) is divided by its
    root mean square over the real tokens of the generation batch of *all* processes, without removing its mean
    (the same normalisation as [`~lenvm_rl.LenVMPPOTrainer`], see [`~lenvm_rl.rl_math.rms_normalize_length_advantages`]):
    `s` is then the size of the length term relative to the unit-scale `A_seq`, and a token whose remainder was
    shorter than the LenVM predicted always gets positive length credit. The scale is fixed per generation batch, so
    every micro-batch and every one of the `num_iterations` passes uses the same advantages. With
    `mask_truncated_completions=True` the cut completions leave both the loss and the scale.

    Supported: every rollout path of `_generate` (transformers `generate`, continuous batching, vLLM colocate/server,
    `rollout_func`), all loss types but those refused by [`LenVMGRPOConfig`], `num_iterations > 1`,
    `mask_truncated_completions`, KL (`beta > 0`), PEFT, DDP and DeepSpeed (DDP and ZeRO-3 tested with 2 processes on
    CPU; vLLM needs CUDA, its `_generate` output is tested through the same seam). Not supported (`ValueError`):
    `tools` / `environment_factory` (tool responses are inserted into the completion, so its token count is no longer
    the policy's episode length) and vision-language processors (the LenVM reads text token ids only). FSDP follows
    the reward-model placement but is untested (no CPU backend).

    Args:
        model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes,
        callbacks, optimizers, quantization_config, peft_config, rollout_func:
            As in [`~trl.GRPOTrainer`]. `args` is a [`LenVMGRPOConfig`]; a plain [`~trl.GRPOConfig`] is converted
            (its length fields at their defaults, with a warning) and `None` gives `LenVMGRPOConfig("<model>-GRPO")`.
        tools, environment_factory:
            Must be `None` (see above).
        lenvm ([`~lenvm_rl.LengthValueModel`] or `str`, *optional*):
            The LenVM or its local directory; defaults to `args.lenvm_model_name_or_path`. It reads the policy's
            token ids, so its tokenizer (saved with it, or `lenvm_processing_class`) is checked against the policy's
            with [`~lenvm_rl.check_tokenizers_compatible`].
        lenvm_processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The LenVM's tokenizer, to check a LenVM passed as a model (a directory's own tokenizer is found there).

    Attributes:
        lenvm (`torch.nn.Module`): the placed, frozen [`~lenvm_rl.LengthValueModel`] (a DeepSpeed engine under
            DeepSpeed). `lenvm_gamma`, `length_gamma`: the LenVM's and the advantage's discount.

    Metrics (gathered over all processes, logged under `length/`):

    - `length/response_tokens_mean`, `length/response_tokens_max`: completion length `L`, EOS included.
    - `length/truncated_frac`: fraction of completions cut at `max_completion_length` without EOS.
    - `length/predicted_tokens_mean`: mean of `values_to_lengths(v(s_0))`, the LenVM's predicted length at the prompt.
    - `length/drift_ratio`: realised over predicted length, both averaged in value space (paper section 5), so a
      calibrated LenVM gives 1; cut completions count `-(1 - gamma^L) + gamma^L v(s_L)`. Below 1: the policy has
      become shorter than the LenVM expects.
    - `length/advantages_mean`, `length/advantages_std`: raw `A_len` over the tokens that enter the loss (mean > 0:
      shorter than predicted).
    - `length/coef`: the coefficient `s` of the current optimizer step.
    """

    _tag_names = ["trl", "grpo", "lenvm-rl", "lenvm"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: LenVMGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
        lenvm: LengthValueModel | str | None = None,
        lenvm_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        # Half-swapped scripts: TRL's default config when none is given, and a plain GRPOConfig converted (with a
        # warning that the length fields take their defaults) rather than refused.
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = LenVMGRPOConfig(f"{model_name.split('/')[-1]}-GRPO")
        elif not isinstance(args, LenVMGRPOConfig):
            args = lenvm_config_from(args, LenVMGRPOConfig)
        if tools or environment_factory is not None:
            raise ValueError(
                "LenVMGRPOTrainer does not support `tools` or `environment_factory`: tool responses are inserted into "
                "the completion, so its token count is no longer the policy's episode length that the LenVM predicts."
            )
        # Loaded before GRPOTrainer seeds the run; GRPOTrainer calls set_seed first, so the LenVM's construction cannot
        # shift the seeded RNG stream either way (length_coef=0 reproduces GRPOTrainer bit for bit).
        lenvm, lenvm_processing_class = load_length_critic(
            args,
            lenvm,
            lenvm_processing_class,
            missing_message="LenVMGRPOTrainer needs a LenVM: set --lenvm_model_name_or_path or pass `lenvm=` (use "
            "trl.GRPOTrainer for plain GRPO).",
        )
        # With use_vllm, TRL's backend is built as LenVMVLLMGeneration: the engine in the dtype asked for, and a weight
        # sync that also works on a CPU (lenvm_rl.vllm_engine).
        engine = vllm_generation_class_of(grpo_trainer_module, args.vllm_dtype) if args.use_vllm else nullcontext()
        with engine:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                rollout_func=rollout_func,
            )
        if self._is_vlm:
            raise ValueError("LenVMGRPOTrainer supports text-only policies: the LenVM reads text token ids only.")
        if args.lenvm_init == "policy":  # the length critic without pretraining
            lenvm = lenvm_from_policy(self.accelerator.unwrap_model(self.model), args.lenvm_gamma)
        else:
            check_lenvm_reads_policy_ids(lenvm, self._tokenizer, lenvm_processing_class)

        self.lenvm_gamma = lenvm.gamma
        self.length_gamma = args.length_gamma if args.length_gamma is not None else self.lenvm_gamma
        # Placed like GRPOTrainer's reward models. Under ZeRO-3 its forward is a collective: every process must call
        # it the same number of times (see `compute_length_values`).
        if self.is_deepspeed_enabled:
            self.lenvm = prepare_deepspeed(lenvm, self.accelerator)
        else:
            self.lenvm = self.accelerator.prepare_model(lenvm, evaluation_mode=True, device_placement=True)
        self.lenvm_optimizer = None
        if args.lenvm_update == "online":
            if self.is_deepspeed_enabled:
                raise ValueError("--lenvm_update online is not supported with DeepSpeed: use DDP, or a frozen LenVM.")
            self.lenvm_optimizer = make_lenvm_optimizer(self.lenvm, args.lenvm_learning_rate)
        self._rollout_lengths = None  # (lengths, terminated) of the last `_generate` call

    def current_length_coef(self) -> float:
        """The length coefficient `s` of the optimizer step in progress (`state.global_step` is its 0-based index)."""
        args = self.args
        return scheduled_length_coef(
            self.state.global_step,
            self.state.max_steps,
            args.length_coef,
            args.length_coef_schedule,
            args.length_coef_warmup_steps,
        )

    # ------------------------------------------------------------------ 1. rollout

    def _generate(self, prompts: list):
        """[`~trl.GRPOTrainer._generate`], recording each completion's true length and whether it terminated.

        This is the last place where both are known on every rollout path: `_generate_and_score_completions` pads
        the completions (and with `pad_token == eos_token` a padded row looks finished) and may zero the mask of cut
        completions (`mask_truncated_completions`). A completion is *cut* when it reached `max_completion_length`
        without ending in an EOS (or padding) token, TRL's own truncation test; everything else terminated.
        """
        outputs = super()._generate(prompts)
        completion_ids = outputs[1]
        device = self.accelerator.device
        stop_ids = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.long, device=device)  # (B,)
        cut = [len(ids) >= self.max_completion_length and ids[-1] not in stop_ids for ids in completion_ids]
        self._rollout_lengths = (lengths, ~torch.tensor(cut, dtype=torch.bool, device=device))
        return outputs

    # ------------------------------------------------------------------ 2. score: LenVM values and length advantages

    def compute_length_values(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, response_mask
    ) -> torch.Tensor:
        """The frozen LenVM's values `(B, T + 1)` of the states `s_0 .. s_T` of each prompt + completion.

        Prompts are left-padded to width `P`, so column `t` reads position `P - 1 + t` for every row. Rows go
        through the LenVM in fixed chunks of the per-device batch size
        ([`~lenvm_rl.trainers.length_critic.lenvm_state_values`]).
        """
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + T)
        attention_mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)  # (B, P + T)
        mode = "train" if self.model.training else "eval"
        chunk = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        return lenvm_state_values(
            self.lenvm, input_ids, attention_mask, prompt_ids.size(1) - 1, chunk, autocast=self.accelerator.autocast
        )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """[`~trl.GRPOTrainer._generate_and_score_completions`] plus `length_advantages` `(B, T)`.

        `length_advantages` is `A_len / rms(A_len)` (0 outside the loss mask); the sequence `advantages` are left
        untouched, so both can be logged and ablated. The coefficient is applied in [`compute_loss`].
        """
        output = super()._generate_and_score_completions(inputs)
        where = f"optimizer step {self.state.global_step}"
        # TRL turns an infinite reward into NaN advantages without a word; stop before they reach the loss.
        check_finite(output["advantages"], f"GRPO advantages (group-normalised rewards) at {where}")
        if self.args.length_coef != 0.0 and self.model.training:
            self._warn_if_no_task_signal(output["advantages"], where)
        lengths, terminated = self._rollout_lengths
        self._rollout_lengths = None
        if self.args.length_coef == 0.0:  # plain GRPO: the LenVM is never run
            self._log_length_metrics(lengths, terminated)
            return output
        completion_ids = output["completion_ids"]
        columns = torch.arange(completion_ids.size(1), device=completion_ids.device)
        # The true completion tokens: `completion_mask` may have been zeroed for cut rows, whose values still count.
        response_mask = columns[None, :] < lengths[:, None]  # (B, T)
        length_values = self.compute_length_values(
            output["prompt_ids"], output["prompt_mask"], completion_ids, response_mask
        )  # (B, T + 1)
        check_finite(length_values, f"LenVM values at {where}")
        raw_length_advantages = length_advantages(
            length_values, response_mask, self.length_gamma, self.args.length_lam, terminated
        )  # (B, T)
        loss_mask = output["completion_mask"].bool()  # (B, T), without the cut rows under mask_truncated_completions
        # The normalisation of the PPO trainer, with the statistics reduced over all processes.
        output["length_advantages"] = rms_normalize_length_advantages(
            raw_length_advantages,
            loss_mask,
            all_reduce=lambda tensor: self.accelerator.reduce(tensor, reduction="sum"),
        )
        self._log_length_metrics(lengths, terminated, length_values, raw_length_advantages, loss_mask)
        if self.lenvm_optimizer is not None and self.model.training:
            self.update_lenvm(output, length_values, response_mask, terminated)
        return output

    def _warn_if_no_task_signal(self, advantages: torch.Tensor, where: str) -> None:
        """Every group's rewards were equal (all sequence advantages 0 on every process): only the length term trains.
        Warned the first time and then every 20 such generation batches."""
        if bool(self.accelerator.reduce(advantages.abs().sum(), reduction="sum") == 0):
            self._no_signal_batches = getattr(self, "_no_signal_batches", 0) + 1
            if self._no_signal_batches % 20 == 1:
                logger.warning(
                    "Every group's task rewards are equal at %s (%d such batches so far): the sequence advantage is 0, "
                    "so only the length term trains the policy (it will just get shorter). Check the reward functions, "
                    "or pick a task the policy solves sometimes.",
                    where,
                    self._no_signal_batches,
                )

    def update_lenvm(self, output: dict[str, Any], length_values, response_mask, terminated) -> None:
        """With `lenvm_update="online"`: one refresh of the LenVM on this generation batch, after its length
        advantages were computed with the LenVM as it was ([`~lenvm_rl.trainers.length_critic.update_lenvm_online`])."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)  # (B, P + T)
        attention_mask = torch.cat([output["prompt_mask"], response_mask.to(output["prompt_mask"].dtype)], dim=1)
        targets = length_value_targets(length_values, response_mask, self.lenvm_gamma, terminated)
        average = (
            (lambda g: self.accelerator.reduce(g, reduction="mean")) if self.accelerator.num_processes > 1 else None
        )
        loss = update_lenvm_online(
            self.lenvm,
            self.lenvm_optimizer,
            input_ids,
            attention_mask,
            output["prompt_ids"].size(1) - 1,
            targets,
            response_mask,
            micro_batch_size=self.args.per_device_train_batch_size,
            epochs=self.args.lenvm_update_epochs,
            average_gradients=average,
        )
        self._metrics["train"]["length/lenvm_loss"].append(loss)

    # ------------------------------------------------------------------ checkpoints of an online LenVM

    def _save_checkpoint(self, model, trial):
        """An online LenVM and its optimizer go into the checkpoint folder before it is marked complete."""
        if self.lenvm_optimizer is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            self.lenvm.save_pretrained(os.path.join(folder, LENVM_DIR), self.processing_class)
            torch.save(self.lenvm_optimizer.state_dict(), os.path.join(folder, LENVM_OPTIMIZER_NAME))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.lenvm_optimizer is not None:
            saved = LengthValueModel.from_pretrained(os.path.join(resume_from_checkpoint, LENVM_DIR))
            self.lenvm.load_state_dict(saved.state_dict())
            state = torch.load(os.path.join(resume_from_checkpoint, LENVM_OPTIMIZER_NAME), map_location="cpu")
            self.lenvm_optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ 3. loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPO's loss with the per-token advantage `A_seq[:, None] + s * length_advantages`.

        The combination is made on a shallow copy of `inputs`, so the buffered batch that `num_iterations > 1`
        re-serves keeps the separate terms. With `s = 0` the inputs are passed through unchanged (plain GRPO).
        """
        coef = self.current_length_coef()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["length/coef"].append(coef)
        if coef != 0.0:
            advantages = combine_advantages(inputs["advantages"], inputs["length_advantages"], coef)  # (B, T)
            inputs = {**inputs, "advantages": advantages}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # ------------------------------------------------------------------ 4. log

    def _log_length_metrics(
        self, lengths, terminated, length_values=None, raw_length_advantages=None, loss_mask=None
    ) -> None:
        """Append the `length/` metrics of one generation batch (a collective: every process calls it)."""
        mode = "train" if self.model.training else "eval"
        metrics = length_metrics(
            lengths,
            terminated,
            self.accelerator.gather,
            length_values=length_values,
            raw_length_advantages=raw_length_advantages,
            loss_mask=loss_mask,
            gamma=self.lenvm_gamma,
        )
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
