"""The models of a PPO run: the policy + critic wrapper that one optimizer trains, the critic built from the policy,
and the per-position scalar head read of critics and reward models (TRL's sequence-classifier layout)."""

import copy
from contextlib import nullcontext

import torch
import torch.nn as nn
from transformers import AutoModelForSequenceClassification
from transformers.integrations import is_deepspeed_zero3_enabled

__all__ = [
    "VALUE_MODEL_DIR",
    "PolicyAndValueWrapper",
    "refuse_to_copy_sharded",
    "score_per_token",
    "value_model_from_policy",
]

VALUE_MODEL_DIR = "value_model"  # checkpoint sub-folder of the critic; the policy sits at the top (TRL's layout)


def score_per_token(model: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Scalar head on every position of a sequence classifier (TRL's critic and reward-model layout).

    Reads the backbone (`base_model_prefix`) and the `score` head directly, so the caller picks the position; a
    classifier's own pooling finds the last token through `input_ids != pad_token_id`, which fails when pad == EOS.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden_states = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return model.score(hidden_states).squeeze(-1).float()  # (B, L)


def refuse_to_copy_sharded(policy: nn.Module, argument: str) -> None:
    """Raise a clear error instead of copying a policy that ZeRO-3 sharded as it loaded (its copies would hold the
    empty local shards)."""
    if any(hasattr(parameter, "ds_id") for parameter in policy.parameters()):
        raise ValueError(
            f"The policy was sharded by DeepSpeed ZeRO-3 when it was loaded, so it cannot be copied into the default "
            f"`{argument}`: load `{argument}` with `from_pretrained` too and pass it (recipes/ppo_gsm8k.py does)."
        )


class PolicyAndValueWrapper(nn.Module):
    """The policy and the critic as one module, so one optimizer, DDP and DeepSpeed see a single model.

    `forward` runs both, which is what DDP needs to synchronise the gradients of both. Checkpoints store the policy
    at the top of the folder (a loadable causal LM or PEFT adapter) and the critic in `value_model/`.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        logits = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        ).logits
        values = score_per_token(self.value_model, input_ids, attention_mask, position_ids)
        return logits, values  # (B, logits_to_keep or L, V), (B, L)

    # Activation checkpointing: `Trainer.train` enables it through the first method; TRL's generation context
    # disables it around `generate` and re-enables it without arguments, so the settings are remembered.
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        self._checkpointing_kwargs = {"activation_checkpointing_kwargs": activation_checkpointing_kwargs, **kwargs}
        for model in (self.policy, self.value_model):
            model.activation_checkpointing_enable(**self._checkpointing_kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        if gradient_checkpointing_kwargs is None:
            self.activation_checkpointing_enable(**getattr(self, "_checkpointing_kwargs", {}))
        else:
            self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for model in (self.policy, self.value_model):
            model.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.policy.is_activation_checkpointing


def value_model_from_policy(policy: nn.Module) -> nn.Module:
    """A critic with the policy's backbone and a zero scalar head (every value starts at 0)."""
    refuse_to_copy_sharded(policy, "value_model")
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    value_model = AutoModelForSequenceClassification.from_config(config)
    gathered = nullcontext()
    if is_deepspeed_zero3_enabled():  # from_config built it sharded (zero.Init): gather its weights to write them
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(value_model.parameters()), modifier_rank=0)
    with gathered:
        backbone = getattr(value_model, value_model.base_model_prefix)
        backbone.load_state_dict(getattr(policy, policy.base_model_prefix).state_dict())
        nn.init.zeros_(value_model.score.weight)
    return value_model.to(device=policy.device, dtype=policy.dtype)
