"""What TRL scripts and callbacks expect of a trainer beyond training: the TRL-compatible surface of our trainers.

A TRL script ported by changing its import still calls the members TRL's own trainers had; this module holds them so
that the trainers' modules keep only their algorithm:

- [`lenvm_config_from`]: a plain TRL config (`trl.GRPOConfig`) turned into its LenVM subclass, for half-swapped scripts.
"""

import logging
from dataclasses import fields

from transformers import TrainingArguments

from .length_critic import LengthCriticConfigMixin

logger = logging.getLogger(__name__)

__all__ = ["lenvm_config_from"]


def lenvm_config_from(args: TrainingArguments, config_class: type) -> TrainingArguments:
    """`args`, a TRL config, as an instance of its LenVM subclass `config_class` with the length fields at their defaults.

    Every value of `args` is kept as it is after its `__post_init__`; re-running that on the filled-in values would be
    wrong (TRL's `GRPOConfig` derives `generation_batch_size` from `steps_per_generation` and then refuses both set).
    The defaults make the length term off (`length_coef=0`), so a warning names how to set it.

    Args:
        args ([`~transformers.TrainingArguments`]): the config the script built, e.g. a `trl.GRPOConfig`.
        config_class (`type`): the LenVM config, a subclass of `type(args)` and of
            [`~lenvm_rl.trainers.length_critic.LengthCriticConfigMixin`], e.g. [`~lenvm_rl.LenVMGRPOConfig`].
    """
    trl_config_class = next(base for base in config_class.__bases__ if base is not LengthCriticConfigMixin)
    if not isinstance(args, trl_config_class):
        raise ValueError(
            f"Expected a {config_class.__name__} (or a {trl_config_class.__name__}) as `args`, got "
            f"{type(args).__name__}."
        )
    converted = object.__new__(config_class)
    converted.__dict__.update(vars(args))
    for length_field in fields(LengthCriticConfigMixin):
        setattr(converted, length_field.name, length_field.default)
    logger.warning(
        "Got a %s as `args`: converted to %s with the length fields at their defaults (length_coef=0, no LenVM "
        "path), i.e. plain RL unless a LenVM is passed and length_coef is set. To set them, build a %s (in TRL's "
        "scripts: import it as the config class in make_parser(); see docs/trl_compatibility.md).",
        type(args).__name__,
        config_class.__name__,
        config_class.__name__,
    )
    return converted
