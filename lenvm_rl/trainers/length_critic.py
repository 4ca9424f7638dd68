"""The frozen LenVM length critic as both RL trainers use it: its config fields, loading, forward and metrics.

[`~lenvm_rl.LenVMPPOTrainer`] and [`~lenvm_rl.LenVMGRPOTrainer`] share everything about the length critic except
where it enters their update (PPO: the per-token GAE advantage or the rewards; GRPO: the sequence advantage), so
this module holds it once:

- [`LengthCriticConfigMixin`]: the `lenvm_*` / `length_*` config fields and their checks;
- [`load_length_critic`]: the LenVM from `lenvm=` or `--lenvm_model_name_or_path`, frozen (its tokenizer is checked
  against the policy's afterwards with [`~lenvm_rl.modeling.check_lenvm_reads_policy_ids`]);
- [`lenvm_state_values`]: the chunked, gradient-free forward that gives `v(s_0) .. v(s_T)` of prompt + response;
- [`length_metrics`]: the `length/` metrics (response tokens, truncation, predicted length, drift, advantage
  statistics), gathered over processes;
- the opt-in online refresh (`lenvm_update="online"`): [`lenvm_from_policy`] (a critic without pretraining),
  [`make_lenvm_optimizer`], [`length_value_targets`], [`update_lenvm_online`].

The math (length advantages, normalisation, schedule) lives in ``lenvm_rl.core`` and ``lenvm_rl.rl_math``.
"""

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core import compute_gae, lengths_to_values, values_to_lengths
from ..modeling import LengthValueModel, freeze_model, position_ids_from_mask, resolve_lenvm
from ..rl_math import LENGTH_COEF_SCHEDULES

logger = logging.getLogger(__name__)

LENVM_DIR = "lenvm"  # checkpoint sub-folder of an online LenVM (a frozen one never changes and is not saved)
LENVM_OPTIMIZER_NAME = "lenvm_optimizer.pt"

__all__ = [
    "LENVM_DIR",
    "LENVM_OPTIMIZER_NAME",
    "LengthCriticConfigMixin",
    "length_metrics",
    "length_value_targets",
    "lenvm_from_policy",
    "lenvm_state_values",
    "load_length_critic",
    "make_lenvm_optimizer",
    "update_lenvm_online",
]


@dataclass
class LengthCriticConfigMixin:
    r"""
    The length critic's config fields, shared by [`~lenvm_rl.LenVMPPOConfig`] and [`~lenvm_rl.LenVMGRPOConfig`]. Put it
    first among the bases (`class C(LengthCriticConfigMixin, PPOConfig)`) so that its checks run after the trainer
    config's own `__post_init__`.

    Parameters:
        lenvm_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Local directory of a LenVM ([`~lenvm_rl.LengthValueModel`] format or the reference format).
        lenvm_gamma (`float` or `None`, *optional*, defaults to `None`):
            Discount the LenVM was trained with; needed for reference-format checkpoints (they do not store it, the
            paper's released LenVMs use 0.997), checked against the stored value otherwise.
        length_coef (`float`, *optional*, defaults to `0.0`):
            Coefficient of the length term; positive values favour shorter responses, 0 is plain RL exactly (the
            LenVM is then never run). Its meaning per trainer is in the trainer config's docstring.
        length_coef_schedule (`str`, *optional*, defaults to `"constant"`):
            `"constant"` or `"linear"` (decays to 0 at the last update), after `length_coef_warmup_steps`.
        length_coef_warmup_steps (`int`, *optional*, defaults to `0`):
            Updates (PPO) or optimizer steps (GRPO) over which the coefficient rises linearly from 0.
        length_gamma (`float` or `None`, *optional*, defaults to `None`):
            Discount of the length advantage; `None` uses the LenVM's gamma (anything else mismatches its values).
        length_lam (`float`, *optional*, defaults to `1.0`):
            GAE lambda of the length advantage; 1 gives `A_len_t = G_t - v(s_t)` (realised minus predicted remaining
            length, in value units), smaller values lean on the LenVM's own bootstrap.

        > Refreshing the length critic during RL (opt-in; the method's default is a frozen, pretrained LenVM)

        lenvm_update (`str`, *optional*, defaults to `"frozen"`):
            `"frozen"`: the LenVM never changes (byte-identical after training). `"online"`: after each update the
            LenVM regresses the realised returns `G_t` of the current policy's rollouts (squared error averaged over
            tokens, cut responses bootstrapped from its own detached value) with its own AdamW optimizer, so its
            predictions follow the policy as it gets shorter (`length/drift_ratio` shows how far they had drifted).
            Not supported under DeepSpeed (the LenVM is an inference engine there).
        lenvm_init (`str`, *optional*, defaults to `"pretrained"`):
            `"pretrained"`: the LenVM of `lenvm_model_name_or_path` / `lenvm=`. `"policy"`: a length critic *without
            pretraining*, the policy's backbone with a fresh value head (needs `lenvm_gamma` and
            `lenvm_update="online"`): the ablation that isolates what LenVM pretraining buys.
        lenvm_learning_rate (`float`, *optional*, defaults to `1e-5`):
            Learning rate of the online LenVM updates.
        lenvm_update_epochs (`int`, *optional*, defaults to `1`):
            Passes over each batch of rollouts per online LenVM update.
    """

    lenvm_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local directory of a LenVM (lenvm-rl or reference format)."}
    )
    lenvm_gamma: float | None = field(
        default=None, metadata={"help": "Discount the LenVM was trained with (needed for reference checkpoints)."}
    )
    length_coef: float = field(
        default=0.0,
        metadata={"help": "Coefficient of the length term; > 0 favours shorter responses, 0 is plain RL exactly."},
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
    lenvm_update: Literal["frozen", "online"] = field(
        default="frozen",
        metadata={"help": "frozen (the method) or online: refit the LenVM on each update's rollouts."},
    )
    lenvm_init: Literal["pretrained", "policy"] = field(
        default="pretrained",
        metadata={"help": "pretrained LenVM, or policy: the policy's backbone with a fresh head (no pretraining)."},
    )
    lenvm_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of online LenVM updates."})
    lenvm_update_epochs: int = field(default=1, metadata={"help": "Passes over each rollout batch per LenVM update."})

    def __post_init__(self):
        super().__post_init__()
        # A flag cannot pass None: `--lenvm_model_name_or_path none` (or null, or "") unsets a YAML config's LenVM,
        # e.g. for `--lenvm_init policy`.
        path = self.lenvm_model_name_or_path
        if isinstance(path, str) and path.strip().lower() in ("", "none", "null"):
            self.lenvm_model_name_or_path = None
        if not math.isfinite(self.length_coef):
            raise ValueError(f"--length_coef must be a finite number, got {self.length_coef}")
        if self.length_coef_schedule not in LENGTH_COEF_SCHEDULES:
            raise ValueError(
                f"--length_coef_schedule must be one of {LENGTH_COEF_SCHEDULES}, got {self.length_coef_schedule!r}"
            )
        if self.length_coef_warmup_steps < 0:
            raise ValueError(f"--length_coef_warmup_steps must be >= 0, got {self.length_coef_warmup_steps}")
        if not 0.0 <= self.length_lam <= 1.0:  # also rejects NaN
            raise ValueError(f"--length_lam must be in [0, 1], got {self.length_lam}")
        for name in ("lenvm_gamma", "length_gamma"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"--{name} must be in (0, 1), got {value}")
        if self.lenvm_update not in ("frozen", "online"):
            raise ValueError(f"--lenvm_update must be 'frozen' or 'online', got {self.lenvm_update!r}")
        if self.lenvm_init not in ("pretrained", "policy"):
            raise ValueError(f"--lenvm_init must be 'pretrained' or 'policy', got {self.lenvm_init!r}")
        if not (math.isfinite(self.lenvm_learning_rate) and self.lenvm_learning_rate > 0):
            raise ValueError(f"--lenvm_learning_rate must be a finite number > 0, got {self.lenvm_learning_rate}")
        if self.lenvm_update_epochs < 1:
            raise ValueError(f"--lenvm_update_epochs must be >= 1, got {self.lenvm_update_epochs}")
        if self.lenvm_init == "policy":
            if self.lenvm_update != "online" or self.lenvm_gamma is None or self.lenvm_model_name_or_path is not None:
                raise ValueError(
                    "--lenvm_init policy (a length critic without pretraining) starts from a fresh value head: it needs "
                    "--lenvm_update online, a --lenvm_gamma, and no --lenvm_model_name_or_path."
                )


def load_length_critic(
    args: LengthCriticConfigMixin,
    lenvm: LengthValueModel | str | None,
    lenvm_processing_class: PreTrainedTokenizerBase | None,
    missing_message: str | None,
) -> tuple[LengthValueModel | None, PreTrainedTokenizerBase | None]:
    """The frozen LenVM of a trainer (from `lenvm=` or `--lenvm_model_name_or_path`) and its tokenizer if known.

    Args:
        args: the trainer config.
        lenvm: the `lenvm=` argument of the trainer (a model or a local directory), or `None`.
        lenvm_processing_class: the LenVM's tokenizer, when `lenvm` is a model.
        missing_message: the error when no LenVM is given; `None` when the trainer can run without one.

    Returns:
        `(lenvm, tokenizer)`: the LenVM frozen with [`~lenvm_rl.freeze_model`] (or `None`), and its tokenizer (or
        `None` when neither a saved one nor `lenvm_processing_class` is known).
    """
    if lenvm is not None and args.lenvm_model_name_or_path is not None:
        raise ValueError("Pass the LenVM either as `lenvm=` or as --lenvm_model_name_or_path, not both.")
    if args.lenvm_init == "policy":  # built from the policy by the trainer, once the policy is loaded
        if lenvm is not None:
            raise ValueError("--lenvm_init policy builds the length critic from the policy: do not pass `lenvm=`.")
        return None, None
    lenvm = lenvm if lenvm is not None else args.lenvm_model_name_or_path
    if lenvm is None:
        if missing_message is not None:
            raise ValueError(missing_message)
        return None, None
    lenvm, lenvm_processing_class = resolve_lenvm(lenvm, args.lenvm_gamma, lenvm_processing_class)
    length_gamma = args.length_gamma if args.length_gamma is not None else lenvm.gamma
    if not math.isclose(length_gamma, lenvm.gamma, abs_tol=1e-9):
        logger.warning(
            "--length_gamma %s differs from the LenVM's gamma %s: the length advantage then mixes two horizons.",
            length_gamma,
            lenvm.gamma,
        )
    return freeze_model(lenvm), lenvm_processing_class


@torch.no_grad()
def lenvm_state_values(
    lenvm: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    first_state: int,
    chunk_size: int,
    autocast: Callable | None = None,
) -> torch.Tensor:
    """The frozen LenVM's values `(B, T + 1)` of the states `s_0 .. s_T` of left-padded prompts + responses.

    Column `t` reads position `first_state + t` (`first_state` = index of the last prompt token, the same for every
    row because prompts are left-padded); positions count real tokens only ([`~lenvm_rl.position_ids_from_mask`]).
    Rows go through the LenVM in chunks of `chunk_size`, without gradients, and come out in float32. Every process
    of a run holds the same number of rows, so under ZeRO-3 all make the same number of (collective) forward calls.

    Args:
        lenvm (`torch.nn.Module`): the LenVM (or the module of its DeepSpeed engine).
        input_ids (`torch.Tensor`): `(B, P + T)` prompt + response ids.
        attention_mask (`torch.Tensor`): `(B, P + T)`, 1 on real tokens.
        first_state (`int`): `P - 1`.
        chunk_size (`int`): rows per forward call.
        autocast (`Callable`, *optional*): a context-manager factory for mixed precision (`accelerator.autocast`).

    Returns:
        `torch.Tensor`: `(B, T + 1)` values in `(-1, 0)`, float32.
    """
    length_values = []
    for i in range(0, input_ids.size(0), chunk_size):
        ids, mask = input_ids[i : i + chunk_size], attention_mask[i : i + chunk_size]
        with autocast() if autocast is not None else nullcontext():
            values = lenvm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).values
        length_values.append(values[:, first_state:].float())  # (b, T + 1)
    return torch.cat(length_values)


def length_metrics(
    lengths: torch.Tensor,
    terminated: torch.Tensor,
    gather: Callable[[torch.Tensor], torch.Tensor],
    length_values: torch.Tensor | None = None,
    raw_length_advantages: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    gamma: float | None = None,
) -> dict[str, float]:
    """The `length/` metrics of one batch of rollouts, gathered over processes (a collective: every process calls it).

    - `length/response_tokens_mean`, `length/response_tokens_max`: response length `L`, stop token included;
    - `length/truncated_frac`: fraction cut at the maximum length without a stop token;
    - with LenVM values: `length/predicted_tokens_mean`, the mean of `values_to_lengths(v(s_0))`;
      `length/drift_ratio`, realised over predicted length, both averaged in value space (paper section 5), so a
      calibrated LenVM gives 1 even when lengths vary (a cut row counts `-(1 - gamma^L) + gamma^L v(s_L)`); below 1
      the policy has become shorter than the LenVM expects;
    - with length advantages: `length/advantages_mean`, `length/advantages_std`, the raw `A_len` over the tokens of
      `loss_mask` (mean > 0: shorter than predicted).

    Args:
        lengths (`torch.Tensor`): `(B,)` response lengths `L`.
        terminated (`torch.Tensor`): `(B,)` bool, True when the response ended with its stop token.
        gather (`Callable`): concatenates a tensor over processes along dim 0 (`accelerator.gather`).
        length_values (`torch.Tensor`, *optional*): `(B, T + 1)` LenVM values.
        raw_length_advantages (`torch.Tensor`, *optional*): `(B, T)` raw `A_len`.
        loss_mask (`torch.Tensor`, *optional*): `(B, T)` bool, the tokens whose `A_len` enter the statistics.
        gamma (`float`, *optional*): the LenVM's discount (needed with `length_values`).

    Returns:
        `dict[str, float]`: the metrics.
    """
    all_lengths = gather(lengths).double()
    metrics = {
        "length/response_tokens_mean": all_lengths.mean().item(),
        "length/response_tokens_max": all_lengths.max().item(),
        "length/truncated_frac": gather((~terminated).double()).mean().item(),
    }
    if length_values is not None:
        length_values = length_values.double()
        rows = torch.arange(len(lengths), device=lengths.device)
        predicted = length_values[:, 0]  # (B,) v(s_0)
        # Realised return from s_0; a cut row keeps the LenVM's value after the cut.
        tail = torch.where(terminated, torch.zeros_like(predicted), length_values[rows, lengths])
        realised = lengths_to_values(lengths.double(), gamma) + torch.pow(gamma, lengths.double()) * tail  # (B,)
        predicted, realised = gather(predicted), gather(realised)
        metrics["length/predicted_tokens_mean"] = values_to_lengths(predicted, gamma).mean().item()
        predicted_length = values_to_lengths(predicted.mean(), gamma).clamp(min=1e-6)
        metrics["length/drift_ratio"] = (values_to_lengths(realised.mean(), gamma) / predicted_length).item()
    if raw_length_advantages is not None:
        advantages = raw_length_advantages.double().masked_fill(~loss_mask, 0.0)
        sums = torch.stack([advantages.sum(), (advantages**2).sum(), loss_mask.sum().double()])  # (3,)
        total, squares, count = gather(sums[None]).sum(0)
        mean = total / count.clamp(min=1)
        var = (squares - count * mean**2) / (count - 1).clamp(min=1)
        metrics["length/advantages_mean"] = mean.item()
        metrics["length/advantages_std"] = var.clamp(min=0).sqrt().item()
    return metrics


# ---------------------------------------------------------------------- online refresh (opt-in, lenvm_update="online")


def lenvm_from_policy(policy: nn.Module, gamma: float) -> LengthValueModel:
    """A length critic without pretraining: the policy's backbone (deep-copied) with a fresh value head."""
    if hasattr(policy, "get_base_model"):  # a PEFT policy: start from its base weights
        policy = policy.get_base_model()
    return LengthValueModel.from_backbone(
        policy, gamma=gamma, data_description="online length critic initialised from the policy (no pretraining)"
    )


def make_lenvm_optimizer(lenvm: LengthValueModel, learning_rate: float) -> torch.optim.Optimizer:
    """Unfreeze every LenVM parameter (it stays in eval mode: no dropout) and give it its own AdamW optimizer."""
    lenvm.requires_grad_(True)
    return torch.optim.AdamW([p for p in lenvm.parameters() if p.requires_grad], lr=learning_rate)


def length_value_targets(
    length_values: torch.Tensor, response_mask: torch.Tensor, gamma: float, terminated: torch.Tensor
) -> torch.Tensor:
    """Regression targets of an online LenVM update: the realised returns `G_t = -(1 - gamma^(L - t))`, bootstrapped
    from the detached `v(s_L)` for rows cut at the maximum length (`lenvm_rl.core.compute_gae` with `lam = 1`).

    Returns:
        `torch.Tensor`: `(B, T)` targets, 0 outside `response_mask`.
    """
    rewards = torch.full(response_mask.shape, -(1.0 - gamma), dtype=length_values.dtype, device=length_values.device)
    _, returns = compute_gae(rewards, length_values.detach(), response_mask, gamma, 1.0, terminated)
    return returns


def update_lenvm_online(
    lenvm: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    first_state: int,
    targets: torch.Tensor,
    response_mask: torch.Tensor,
    micro_batch_size: int,
    epochs: int = 1,
    average_gradients: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Regress the LenVM's values of `s_0 .. s_{T-1}` onto `targets` (token-averaged squared error per micro-batch,
    one optimizer step each), `epochs` passes in row order. `average_gradients` averages a gradient over processes
    (DDP); every process must hold the same number of rows.

    Returns:
        `float`: the mean loss over the steps (before each step).
    """
    T = targets.shape[1]
    losses = []
    for _ in range(epochs):
        for i in range(0, input_ids.size(0), micro_batch_size):
            rows = slice(i, i + micro_batch_size)
            mask = attention_mask[rows]
            values = lenvm(input_ids=input_ids[rows], attention_mask=mask, position_ids=position_ids_from_mask(mask))
            values = values.values[:, first_state : first_state + T]  # (b, T)
            token_mask = response_mask[rows].bool()
            errors = (values - targets[rows].to(values.dtype)) ** 2
            loss = errors.masked_fill(~token_mask, 0.0).sum() / token_mask.sum().clamp(min=1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"online LenVM loss is {loss.item()}: the LenVM update would carry NaN/inf.")
            optimizer.zero_grad()
            loss.backward()
            if average_gradients is not None:
                for parameter in lenvm.parameters():
                    if parameter.grad is not None:
                        parameter.grad = average_gradients(parameter.grad)
            optimizer.step()
            losses.append(loss.detach())
    optimizer.zero_grad()
    return torch.stack(losses).mean().item()
