"""LenVMPPOConfig / LenVMPPOTrainer: PPO with a frozen Length Value Model as a length-specific critic.

Method doc section 6 (paper appendix C): the objective becomes ``J = J_task + s * J_len``, with the task critic
trained as usual and a pretrained LenVM as a frozen critic of the length term. The subclass overrides only the steps
the length term changes: the values (step 3, adds the LenVM's values), the rewards (step 4, shaping or a penalty),
the advantages (step 5, the additive length advantage) and the log (step 7, `length/` metrics).
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from transformers import PreTrainedTokenizerBase

from ..core import length_advantages, length_shaping_rewards, lengths_to_values, values_to_lengths
from ..modeling import LengthValueModel, load_frozen_lenvm
from .ppo import PPOConfig, PPOTrainer, RewardFunc, _position_ids

logger = logging.getLogger(__name__)

__all__ = ["LenVMPPOConfig", "LenVMPPOTrainer", "add_length_advantages", "scheduled_length_coef"]

LENGTH_MODES = ("advantage", "shaping", "penalty", "none")
LENGTH_COEF_SCHEDULES = ("constant", "linear")


@dataclass
class LenVMPPOConfig(PPOConfig):
    r"""
    Configuration of [`LenVMPPOTrainer`]: [`PPOConfig`] plus the length critic's knobs. With `length_coef=0` (the
    default) or `length_mode="none"` training is exactly [`PPOTrainer`]'s (same losses and parameters, bit for bit);
    the LenVM, if given, then only feeds the `length/` metrics.

    Parameters:
        > Parameters that control the length critic

        lenvm_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Local directory of a LenVM ([`~lenvm_rl.LengthValueModel`] format or the reference format). Required by
            the `"advantage"` and `"shaping"` modes unless a model is passed to the trainer as `lenvm`.
        lenvm_gamma (`float` or `None`, *optional*, defaults to `None`):
            Discount the LenVM was trained with; needed for reference-format checkpoints (they do not store it, the
            paper's released LenVMs use 0.997), checked against the stored value otherwise.
        length_mode (`str`, *optional*, defaults to `"advantage"`):
            How the length term enters PPO. `"advantage"`: `A = A_task + s * A_len` with the LenVM's length
            advantage (changes the objective: trades quality for length). `"shaping"`: potential-based reward
            shaping `r_t + beta * (gamma * Phi(s_{t+1}) - Phi(s_t))` with `Phi` the LenVM (keeps the task optimum,
            densifies credit). `"penalty"`: sequence-level `score - alpha * tokens` (no LenVM needed; an ablation).
            `"none"`: plain PPO.
        length_coef (`float`, *optional*, defaults to `0.0`):
            The coefficient of the length term: `s` (advantage), `beta` (shaping) or `alpha` (penalty, per token).
            Positive values favour shorter responses. In `"advantage"` mode it is unitless: the scaled length
            advantage has unit root mean square, like the whitened task advantage (see [`add_length_advantages`]).
        length_coef_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` or `"linear"` (decays to 0 at the last update), after `length_coef_warmup_steps`.
        length_coef_warmup_steps (`int`, *optional*, defaults to `0`):
            Updates over which the coefficient rises linearly from 0 (a function of the update index, resume-safe).
        length_gamma (`float` or `None`, *optional*, defaults to `None`):
            Discount of the length advantage; `None` uses the LenVM's gamma (anything else mismatches its values).
        length_lam (`float`, *optional*, defaults to `1.0`):
            GAE lambda of the length advantage; 1 gives `A_len_t = G_t - v(s_t)` (the paper's choice for LenVM
            regression), smaller values lean on the LenVM's own bootstrap.
    """

    lenvm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory of a LenVM (lenvm-rl or reference format)."}
    )
    lenvm_gamma: float | None = field(
        default=None, metadata={"help": "Discount the LenVM was trained with (needed for reference checkpoints)."}
    )
    length_mode: Literal["advantage", "shaping", "penalty", "none"] = field(
        default="advantage", metadata={"help": "How the length term enters PPO: advantage, shaping, penalty or none."}
    )
    length_coef: float = field(
        default=0.0,
        metadata={"help": "Coefficient of the length term (s, beta or alpha); > 0 favours shorter responses."},
    )
    length_coef_schedule: Literal["constant", "linear"] = field(
        default="constant", metadata={"help": "Schedule of length_coef after warm-up: constant or linear decay."}
    )
    length_coef_warmup_steps: int = field(
        default=0, metadata={"help": "Updates over which length_coef rises linearly from 0."}
    )
    length_gamma: float | None = field(
        default=None, metadata={"help": "Discount of the length advantage (None: the LenVM's gamma)."}
    )
    length_lam: float = field(default=1.0, metadata={"help": "GAE lambda of the length advantage."})

    def __post_init__(self):
        super().__post_init__()
        if self.length_mode not in LENGTH_MODES:
            raise ValueError(f"--length_mode must be one of {LENGTH_MODES}, got {self.length_mode!r}")
        if self.length_coef_schedule not in LENGTH_COEF_SCHEDULES:
            raise ValueError(
                f"--length_coef_schedule must be one of {LENGTH_COEF_SCHEDULES}, got {self.length_coef_schedule!r}"
            )
        if self.length_coef_warmup_steps < 0:
            raise ValueError(f"--length_coef_warmup_steps must be >= 0, got {self.length_coef_warmup_steps}")
        if not 0.0 <= self.length_lam <= 1.0:
            raise ValueError(f"--length_lam must be in [0, 1], got {self.length_lam}")
        for name in ("lenvm_gamma", "length_gamma"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"--{name} must be in (0, 1), got {value}")


def scheduled_length_coef(
    update: int, num_updates: int, coef: float, schedule: str = "constant", warmup_steps: int = 0
) -> float:
    """The length coefficient of update `update` (0-based): a linear warm-up, then constant or a linear decay.

        c(u) = coef * u / W                                    u < W  (warm-up)
        c(u) = coef                                            "constant"
        c(u) = coef * max(0, (N - u) / max(1, N - W))          "linear"

    The same shapes as `transformers`' `constant_with_warmup` and `linear` learning-rate schedules. A pure function of
    the update index, so a resumed run uses the coefficients of an uninterrupted one.

    Example:
        >>> [scheduled_length_coef(u, 4, 1.0, "linear", warmup_steps=2) for u in range(4)]
        [0.0, 0.5, 1.0, 0.5]
    """
    if update < warmup_steps:
        return coef * update / warmup_steps
    if schedule == "constant":
        return coef
    if schedule == "linear":
        return coef * max(0.0, (num_updates - update) / max(1, num_updates - warmup_steps))
    raise ValueError(f"schedule must be one of {LENGTH_COEF_SCHEDULES}, got {schedule!r}")


def add_length_advantages(
    advantages: torch.Tensor,
    length_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    coef: float,
    eps: float = 1e-12,
    all_reduce=None,
) -> torch.Tensor:
    """Add the LenVM's length advantage to the whitened task advantage (method doc section 6).

        A_t = A_task_t + s * A_len_t / sqrt(mean_all(A_len^2) + eps)

    ``A_task`` arrives whitened as in PPO (zero mean, unit variance over all processes' real tokens). ``A_len`` is
    divided by its root mean square over all processes' real tokens, with *no* mean subtracted, and the sum is not
    re-whitened. Why:

    - Scaling both terms to unit size makes ``s`` the size of the length term relative to the task term, whatever
      the reward scale, gamma, response length or LenVM calibration of the run; raw ``A_len`` lives in value units
      (order ``1 - gamma`` per token), raw ``A_task`` in reward units.
    - Not centring keeps the reference of the length credit the LenVM's prediction: a token whose remainder was
      shorter than predicted always gets positive credit, even when the whole batch is shorter (centring would
      credit only "shorter than this batch's average drift"). The mean of ``A_len`` is the LenVM's drift; it is
      logged (`length/advantages_mean`), not removed.
    - The root mean square ``sqrt(mean^2 + var)`` rather than the standard deviation: it equals the standard
      deviation for a calibrated LenVM (``E[A_len] = 0`` at ``lam = 1``), and when the policy drifts away from the
      LenVM's predictions it keeps the length term's size at ``s`` instead of letting the drift offset grow to
      ``s * mean / std`` and swamp the task term.
    - No re-whitening: it would subtract the drift that was deliberately kept and rescale ``A_task``, so ``s``
      would stop meaning a fixed ratio.

    Args:
        advantages (`torch.Tensor`): ``(B, T)`` whitened task advantages, 0 on padding.
        length_advantages (`torch.Tensor`): ``(B, T)`` raw length advantages ([`~lenvm_rl.core.length_advantages`]).
        response_mask (`torch.Tensor`): ``(B, T)`` bool, True on real response tokens.
        coef (`float`): ``s``; > 0 favours shorter continuations.
        eps (`float`, *optional*, defaults to `1e-12`): added to the mean square (raw `A_len` is small: order
            `1 - gamma` per token, so the usual 1e-8 would not be negligible).
        all_reduce (`Callable`, *optional*): sums a tensor over processes; the identity by default.

    Returns:
        `torch.Tensor`: ``(B, T)`` combined advantages, 0 on padding.

    Example:
        >>> add_length_advantages(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.3, 0.4]]),
        ...                       torch.tensor([[True, True]]), coef=0.5, eps=0.0)
        tensor([[ 1.4243, -0.4343]])
    """
    mask = response_mask.bool()
    zeros = torch.zeros_like(length_advantages)
    sums = torch.stack([torch.where(mask, length_advantages**2, zeros).sum(), mask.sum().to(zeros.dtype)])
    if all_reduce is not None:
        sums = all_reduce(sums)
    mean_square = sums[0] / sums[1].clamp(min=1)
    scaled = length_advantages * torch.rsqrt(mean_square + eps)
    return torch.where(mask, advantages + coef * scaled.to(advantages.dtype), torch.zeros_like(advantages))


class LenVMPPOTrainer(PPOTrainer):
    r"""
    PPO with a frozen Length Value Model as a length-specific critic (method doc section 6), on [`PPOTrainer`].

    The LenVM is loaded once, frozen with [`~lenvm_rl.freeze_model`] and placed like a reward model (a DeepSpeed
    inference engine, sharded under ZeRO-3). It never receives gradients, is not part of the trained module nor of
    its optimizer, and is never written into checkpoints. Steps it changes (the rest is [`PPOTrainer`]'s):

    3. [`~LenVMPPOTrainer.compute_values`] adds `length_values` `(B, T + 1)`, the LenVM on the same query + response
       tokens (column `t` = position `context_length - 1 + t`, the state in which response token `t` is chosen;
       column `T` = the state after the last padded position), and `length_coef`, this update's coefficient.
    4. [`~LenVMPPOTrainer.compute_rewards`] adds `length_rewards` to the task rewards, after the optional
       `whiten_rewards` scaling: `"shaping"`: `beta * (gamma * Phi(s_{t+1}) - Phi(s_t))` with `Phi` the LenVM values,
       `Phi` = 0 after a stop token and PPO's `gamma` (the discount of the objective, as potential-based shaping
       requires); `"penalty"`: `-alpha * L` on the last real token (`L` tokens, stop token included).
    5. [`~LenVMPPOTrainer.compute_advantages`] adds `length_advantages` (raw `A_len`, from
       [`~lenvm_rl.core.length_advantages`] with `length_gamma` and `length_lam`) and, in `"advantage"` mode,
       `A = A_task + s * A_len / rms(A_len)` ([`add_length_advantages`]). The task critic's `returns` are unchanged.
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
    - `length/rewards_mean` (`"shaping"`, `"penalty"`): the per-response sum of the length rewards.
    - With a LenVM: `length/predicted_tokens_mean`, the mean of `values_to_lengths(v(s_0))` (the LenVM's predicted
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
        self.lenvm = self._load_lenvm(args, processing_class, lenvm, lenvm_processing_class)
        self.lenvm_gamma = self.lenvm.gamma if self.lenvm is not None else None
        self.length_gamma = args.length_gamma if args.length_gamma is not None else self.lenvm_gamma
        if self.lenvm is not None and not math.isclose(self.length_gamma, self.lenvm_gamma, abs_tol=1e-9):
            logger.warning(
                "--length_gamma %s differs from the LenVM's gamma %s: the length advantage then mixes two horizons.",
                self.length_gamma,
                self.lenvm_gamma,
            )
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

    @staticmethod
    def _load_lenvm(args, processing_class, lenvm, lenvm_processing_class) -> LengthValueModel | None:
        if lenvm is not None and args.lenvm_model_name_or_path is not None:
            raise ValueError("Pass the LenVM either as `lenvm=` or as --lenvm_model_name_or_path, not both.")
        lenvm = lenvm if lenvm is not None else args.lenvm_model_name_or_path
        if lenvm is None:
            if args.length_mode in ("advantage", "shaping"):
                raise ValueError(
                    f"--length_mode {args.length_mode} needs a LenVM: set --lenvm_model_name_or_path (or pass "
                    "`lenvm=`), or use --length_mode penalty / none."
                )
            return None
        return load_frozen_lenvm(lenvm, processing_class, args.lenvm_gamma, lenvm_processing_class)

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

    @torch.no_grad()
    def compute_length_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen LenVM's values `(B, T + 1)` of the states `s_0 .. s_T` of each query + response.

        Column `t` reads position `context_length - 1 + t`, like the task critic's `values`; chunks of
        `local_rollout_forward_batch_size` rows, no gradients, float32.
        """
        C = batch["context_length"]
        chunk = self.args.local_rollout_forward_batch_size
        # The engine's module keeps ZeRO-3's gathering hooks (they sit on its submodules); calling it directly skips
        # the engine's output post-processing, which an inference-only model does not need.
        lenvm = self.lenvm.module if self.is_deepspeed_enabled else self.lenvm
        length_values = []
        for i in range(0, len(batch["query_responses"]), chunk):
            input_ids = batch["query_responses"][i : i + chunk]
            attention_mask = batch["attention_mask"][i : i + chunk]
            with self.accelerator.autocast():
                values = lenvm(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask)
                ).values  # (b, C + T)
            length_values.append(values[:, C - 1 :].float())  # (b, T + 1)
        return torch.cat(length_values)

    def compute_values(self, batch: dict[str, Any]) -> dict[str, Any]:
        """[`PPOTrainer.compute_values`], plus `length_values` `(B, T + 1)` (with a LenVM) and `length_coef`."""
        out = super().compute_values(batch)
        out["length_coef"] = self.current_length_coef()
        if self.lenvm is not None:
            out["length_values"] = self.compute_length_values(batch)
        return out

    # ------------------------------------------------------------------ 4. rewards

    def compute_rewards(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """[`PPOTrainer.compute_rewards`] plus the length rewards of `"shaping"` and `"penalty"` modes.

            shaping:  r'_t = r_t + beta * (gamma * Phi(s_{t+1}) - Phi(s_t))      Phi = length_values, 0 after stop
            penalty:  r'_L = r_L - alpha * L                                      on the last real token

        Returns:
            `dict`: PPOTrainer's keys, `rewards` including the length term, and `length_rewards` `(B, T)` in those
            modes.
        """
        out = super().compute_rewards(batch)
        mode, mask = self.args.length_mode, batch["response_mask"]
        if mode == "shaping":
            shaping = length_shaping_rewards(batch["length_values"], mask, self.args.gamma, batch["terminated"])
            length_rewards = batch["length_coef"] * shaping.to(out["rewards"].dtype)
        elif mode == "penalty":
            rows = torch.arange(len(mask), device=mask.device)
            tokens = mask.sum(1).to(out["rewards"].dtype)  # (B,) L, stop token included
            length_rewards = torch.zeros_like(out["rewards"])
            length_rewards[rows, batch["sequence_lengths"]] = -batch["length_coef"] * tokens
        else:
            return out
        out["rewards"] = out["rewards"] + length_rewards
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
        out["length_advantages"] = length_advantages(
            batch["length_values"], mask, self.length_gamma, self.args.length_lam, batch["terminated"]
        )
        if self.args.length_mode == "advantage":
            out["advantages"] = add_length_advantages(
                out["advantages"],
                out["length_advantages"],
                mask,
                batch["length_coef"],
                all_reduce=self._all_reduce_sum,
            )
        return out

    # ------------------------------------------------------------------ 7. log

    def gather_metrics(self, batch: dict[str, Any], stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """[`PPOTrainer.gather_metrics`] plus the `length/` metrics (a collective: every process calls it)."""
        metrics = super().gather_metrics(batch, stats)
        gather = self.accelerator.gather
        mask, terminated = batch["response_mask"], batch["terminated"]
        tokens = mask.sum(1)  # (B,) L
        all_tokens = gather(tokens).float()
        metrics["length/response_tokens_mean"] = all_tokens.mean().item()
        metrics["length/response_tokens_max"] = all_tokens.max().item()
        metrics["length/truncated_frac"] = gather((~terminated).float()).mean().item()
        metrics["length/coef"] = float(batch["length_coef"])
        if "length_rewards" in batch:
            metrics["length/rewards_mean"] = gather(batch["length_rewards"].sum(1)).mean().item()
        if "length_values" not in batch:
            return metrics

        gamma, length_values = self.lenvm_gamma, batch["length_values"].double()
        rows = torch.arange(len(tokens), device=tokens.device)
        predicted = length_values[:, 0]  # (B,) v(s_0)
        # Realised return from s_0; a row cut without a stop token keeps the LenVM's value after the cut.
        tail = torch.where(terminated, torch.zeros_like(predicted), length_values[rows, tokens])
        realised = lengths_to_values(tokens.double(), gamma) + torch.pow(gamma, tokens.double()) * tail  # (B,)
        predicted, realised = gather(predicted), gather(realised)
        metrics["length/predicted_tokens_mean"] = values_to_lengths(predicted, gamma).mean().item()
        predicted_length = values_to_lengths(predicted.mean(), gamma).clamp(min=1e-6)
        metrics["length/drift_ratio"] = (values_to_lengths(realised.mean(), gamma) / predicted_length).item()

        length_advantages = batch["length_advantages"].double().masked_fill(~mask, 0.0)
        sums = gather(torch.stack([length_advantages.sum(), (length_advantages**2).sum(), mask.sum().double()])[None])
        total, squares, count = sums.sum(0)
        mean = total / count.clamp(min=1)
        var = (squares - count * mean**2) / (count - 1).clamp(min=1)
        metrics["length/advantages_mean"] = mean.item()
        metrics["length/advantages_std"] = var.clamp(min=0).sqrt().item()
        return metrics
