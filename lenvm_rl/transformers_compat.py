"""The transformers releases lenvm-rl supports (5.19 to 5.39) differ in a few names; each difference is bridged here,
once, so the rest of the package uses one spelling.

vLLM's CPU build (0.32) pins `transformers < 5.20`, while the default install takes the newest release the range
allows, so both sides of the renames of 5.24 are in use:

| concept | 5.19 - 5.23 | 5.24 and later |
| --- | --- | --- |
| the key/value cache of a forward, argument and output | `past_key_values` | `cache` |
| activation checkpointing, model methods | `gradient_checkpointing_enable` / `_disable` / `is_gradient_checkpointing` | `activation_checkpointing_enable` / ... |
| `TrainingArguments` field | `gradient_checkpointing` | `activation_checkpointing` (the old name deprecated) |
"""

import transformers
from packaging.version import Version

__all__ = [
    "ACTIVATION_CHECKPOINTING_FIELD",
    "CACHE_RENAMED",
    "activation_checkpointing_disable",
    "activation_checkpointing_enable",
    "cache_kwargs",
    "is_activation_checkpointing",
    "output_cache",
]

CACHE_RENAMED = Version(transformers.__version__).release >= (5, 24)
ACTIVATION_CHECKPOINTING_FIELD = "activation_checkpointing" if CACHE_RENAMED else "gradient_checkpointing"


def cache_kwargs(cache) -> dict:
    """The keyword that hands `cache` to a model's forward, in this release's spelling."""
    return {"cache": cache} if CACHE_RENAMED else {"past_key_values": cache}


def output_cache(outputs):
    """The cache a forward with `use_cache=True` returned."""
    return outputs.cache if CACHE_RENAMED else outputs.past_key_values


def activation_checkpointing_enable(model, checkpointing_kwargs: dict | None = None, **options) -> None:
    """Enable activation (gradient) checkpointing on a transformers model; `options` such as `every_n_layers` and
    `offload` are passed on."""
    if CACHE_RENAMED:
        model.activation_checkpointing_enable(checkpointing_kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **options)


def activation_checkpointing_disable(model) -> None:
    if CACHE_RENAMED:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_activation_checkpointing(model) -> bool:
    return model.is_activation_checkpointing if CACHE_RENAMED else model.is_gradient_checkpointing
