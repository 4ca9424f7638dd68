"""Task rewards of the PPO trainer: TRL's GRPO reward-function convention, loaded once and called with checks.

A reward is a callable with TRL's signature, ``func(prompts=..., completions=..., completion_ids=..., **columns) ->
list[float | None]``, or a sequence classifier (or its path) read at each response's last token. Outputs are
checked where they are produced, so a bad reward stops the run with an error that names the function, the row and
the update, before anything is trained on it:

- a list (or tuple / 1-D array / tensor) with one entry per completion;
- each entry a real number or ``None`` (that function then skips the row, as in GRPO; ``float("nan")`` means the
  same); a string, a list, a complex number or ``inf`` is an error;
- a row that every function skips scores 0, with a warning (GRPO's behaviour).
"""

import logging
import math
import numbers
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import get_callable_name

from ..modeling import freeze_model, position_ids_from_mask
from ..rl_math import check_finite
from .ppo_models import score_per_token

logger = logging.getLogger(__name__)

__all__ = [
    "RewardFunc",
    "call_reward_funcs",
    "load_reward_funcs",
    "reward_func_names",
    "rewards_to_tensor",
    "warn_constant_scores",
]

RewardFunc = Callable[..., list[float | None]] | nn.Module | str


def load_reward_funcs(reward_model: nn.Module | None, reward_funcs: list[RewardFunc] | None) -> list:
    """The rewards in order `[reward_model, *reward_funcs]`: paths become frozen sequence classifiers, models are
    frozen ([`~lenvm_rl.freeze_model`]), callables stay as they are."""
    funcs = ([reward_model] if reward_model is not None else []) + list(reward_funcs or [])
    if not funcs:
        raise ValueError("PPOTrainer needs a `reward_model` and/or `reward_funcs`.")
    loaded = []
    for func in funcs:
        if isinstance(func, str):
            func = freeze_model(AutoModelForSequenceClassification.from_pretrained(func, num_labels=1))
        elif isinstance(func, nn.Module):
            func = freeze_model(func)
        elif not callable(func):
            raise ValueError(
                f"A reward must be a callable, a sequence classifier or its path; got {type(func).__name__}."
            )
        loaded.append(func)
    return loaded


def reward_func_names(funcs: list) -> list[str]:
    """Metric names (`rewards/<name>/mean`): a model's checkpoint name, a function's name."""
    return [
        (func.config._name_or_path.split("/")[-1] or type(func).__name__)
        if isinstance(func, nn.Module)
        else get_callable_name(func)
        for func in funcs
    ]


def rewards_to_tensor(output, num_rows: int, name: str, where: str) -> torch.Tensor:
    """Check one reward function's output and turn it into a `(num_rows,)` float tensor, NaN where it skipped a row.

    Args:
        output: what the function returned.
        num_rows (`int`): the number of completions it was given.
        name (`str`): the function's name, for errors.
        where (`str`): the update, for errors (e.g. `"update 12"`).

    Returns:
        `torch.Tensor`: `(num_rows,)` float32 rewards, NaN for `None`.

    Example:
        >>> rewards_to_tensor([1, None, 0.5], 3, "f", "update 0")
        tensor([1.0000,    nan, 0.5000])
    """
    if isinstance(output, str | bytes | numbers.Number | dict) or output is None or getattr(output, "ndim", 1) != 1:
        raise ValueError(
            f"Reward function {name!r} returned {type(output).__name__} {output!r} at {where}; it must return a list "
            f"with one reward (a number or None) per completion ({num_rows} here)."
        )
    values = output.tolist() if hasattr(output, "tolist") else list(output)
    if len(values) != num_rows:
        raise ValueError(
            f"Reward function {name!r} returned {len(values)} rewards for {num_rows} completions at {where}; it must "
            "return one per completion (None to skip one)."
        )
    rewards = []
    for row, value in enumerate(values):
        if value is None:
            rewards.append(math.nan)
            continue
        if not isinstance(value, numbers.Real):
            raise ValueError(
                f"Reward function {name!r} returned {value!r} ({type(value).__name__}) for completion {row} at {where}; "
                "each reward must be a real number, or None to skip the completion."
            )
        if math.isinf(value):
            raise ValueError(
                f"Reward function {name!r} returned {value} for completion {row} at {where}: an infinite reward would "
                "make the policy NaN. Return a finite number (or None to skip the completion)."
            )
        rewards.append(float(value))
    return torch.tensor(rewards, dtype=torch.float32)


def call_reward_funcs(funcs, names, batch, where: str, trainer_state=None, chunk_size: int = 64, autocast=None):
    """Every reward of a rollout batch: `(B, F)` float32, NaN where a function skipped a row (`None`).

    Reward models are read at each response's last real token; functions get TRL's keyword arguments and every
    dataset column, and their output is checked ([`rewards_to_tensor`]). A row that every function skipped scores 0
    and is reported in a warning.
    """
    num_rows = len(batch["prompts"])
    columns = []
    for func, name in zip(funcs, names):
        if isinstance(func, nn.Module):
            rewards = reward_model_scores(func, batch, chunk_size, autocast)
            check_finite(rewards, f"scores of reward model {name!r} at {where}")
        else:
            output = func(
                prompts=batch["prompts"],
                completions=batch["completions"],
                completion_ids=batch["completion_ids"],
                trainer_state=trainer_state,
                **batch["columns"],
            )
            rewards = rewards_to_tensor(output, num_rows, name, where)
        columns.append(rewards.float().cpu())
    rewards_per_func = torch.stack(columns, dim=1)  # (B, F)
    skipped = torch.isnan(rewards_per_func).all(dim=1)  # (B,)
    if skipped.any():
        logger.warning(
            "Every reward function returned None for %d of %d completions at %s (rows %s): they score 0.",
            int(skipped.sum()),
            num_rows,
            where,
            skipped.nonzero().flatten().tolist()[:10],
        )
    return rewards_per_func


@torch.no_grad()
def reward_model_scores(reward_model: nn.Module, batch, chunk_size: int, autocast=None) -> torch.Tensor:
    """A sequence classifier's score at each response's last real token, on the policy's token ids."""
    last = batch["context_length"] + batch["sequence_lengths"]  # (B,) position of the last real token
    scores = []
    for i in range(0, len(last), chunk_size):
        input_ids = batch["query_responses"][i : i + chunk_size]
        attention_mask = batch["attention_mask"][i : i + chunk_size]
        with autocast() if autocast is not None else nullcontext():
            per_token = score_per_token(
                reward_model, input_ids, attention_mask, position_ids_from_mask(attention_mask)
            )
        scores.append(per_token[torch.arange(len(input_ids), device=per_token.device), last[i : i + chunk_size]])
    return torch.cat(scores)


def warn_constant_scores(count: int, num_rows: int, where: str, score: float) -> None:
    """Every rollout of an update got the same task score (the `count`-th such update): the task gives no signal,
    only the KL and any length term train. Warned the first time and then every 20 such updates."""
    if count % 20 == 1:
        logger.warning(
            "All %d task scores of %s equal %g (%d such updates so far): the task reward has no variance, so only the "
            "KL penalty and any length term move the policy. Check the reward functions, or pick a task the policy "
            "solves sometimes.",
            num_rows,
            where,
            score,
            count,
        )
