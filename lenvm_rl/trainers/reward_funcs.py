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

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import get_callable_name

from ..modeling import freeze_model

logger = logging.getLogger(__name__)

__all__ = ["RewardFunc", "load_reward_funcs", "reward_func_names", "rewards_to_tensor"]

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
