"""The models of a PPO run: setting them up from `PPOTrainer`'s arguments (policy, frozen reference, critic, PEFT),
the policy + critic wrapper that one optimizer trains, the per-position scalar head read of critics and reward models
(TRL's sequence-classifier layout), the trainer's forwards through them, placing the frozen ones, and saving and
loading them in TRL's layout (policy at the top, critic in `value_model/`)."""

import copy
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from contextlib import nullcontext

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.models.utils import prepare_deepspeed

from ..io import move_files_into
from ..modeling import fill_padding, freeze_model, position_ids_from_mask
from ..transformers_compat import (
    activation_checkpointing_disable,
    activation_checkpointing_enable,
    is_activation_checkpointing,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PPOModelsMixin",
    "prepare_ppo_models",
    "save_policy_and_critic",
    "tied_parameter_names",
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
    Padding is embedded as a valid id ([`~lenvm_rl.modeling.fill_padding`]): the pad id may lie past the vocabulary.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden_states = backbone(
        input_ids=fill_padding(input_ids, attention_mask),
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
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
        input_ids = fill_padding(input_ids, attention_mask)  # padding may hold a pad id past the vocabulary
        logits = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        ).logits
        values = score_per_token(self.value_model, input_ids, attention_mask, position_ids)
        return logits, values  # (B, logits_to_keep or L, V), (B, L)

    # Activation checkpointing under transformers' names (lenvm_rl.transformers_compat bridges the 5.24 rename).
    # `Trainer.train` enables it through the first method (5.24 and later) or the pre-5.24 name; TRL 1.16's generation
    # context (`unwrap_model_for_generation`) calls the pre-5.24 names too, and re-enables without arguments, so the
    # settings are remembered.
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        self._checkpointing_kwargs = {"checkpointing_kwargs": activation_checkpointing_kwargs, **kwargs}
        for model in (self.policy, self.value_model):
            activation_checkpointing_enable(model, **self._checkpointing_kwargs)

    def activation_checkpointing_disable(self):
        for model in (self.policy, self.value_model):
            activation_checkpointing_disable(model)

    @property
    def is_activation_checkpointing(self) -> bool:
        return is_activation_checkpointing(self.policy)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **options):
        # transformers < 5.24's Trainer enables through this name (with its options); TRL's generation context
        # re-enables without arguments, which reuses the last settings.
        if gradient_checkpointing_kwargs is None and not options:
            previous = dict(getattr(self, "_checkpointing_kwargs", {}))
            self.activation_checkpointing_enable(previous.pop("checkpointing_kwargs", None), **previous)
        else:
            self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing


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


def prepare_ppo_models(model, ref_model, value_model, peft_config, args):
    """The policy, frozen reference, critic and whether the policy is a PEFT model, from `PPOTrainer`'s arguments.

    - `model`: a causal LM or its path; with `peft_config` it gets the adapter (the critic is built before, from the
      base model).
    - `ref_model`: `None` gives a frozen copy of the policy, or, for a PEFT policy, `None` (the policy with its
      adapter disabled serves as the reference).
    - `value_model`: `None` builds one from the policy ([`value_model_from_policy`]).

    Dropout is disabled in the policy and the critic (PPO's ratios must be deterministic), and the reference is frozen.

    Returns:
        `tuple`: `(policy, ref_model or None, value_model, is_peft_policy)`.
    """
    policy = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, str) else model
    if ref_model is not None and ref_model is policy:
        raise ValueError("`model` and `ref_model` are the same object; pass `ref_model=None` for a frozen copy.")
    is_peft_policy = hasattr(policy, "peft_config")
    if value_model is None:
        if is_peft_policy:
            raise ValueError(
                "A PEFT policy needs an explicit `value_model`; or pass the base model with `peft_config` and the "
                "critic is built from its backbone."
            )
        value_model = value_model_from_policy(policy)
    if peft_config is not None:
        if ref_model is not None:
            raise ValueError(
                "With `peft_config` the reference is the policy with its adapter disabled: pass `ref_model=None`."
            )
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config)
        is_peft_policy = True
    if is_peft_policy:
        if ref_model is not None:
            raise ValueError("A PEFT policy is its own reference (adapter disabled): pass `ref_model=None`.")
        if args.model_adapter_name is not None:
            policy.set_adapter(args.model_adapter_name)
    elif ref_model is None:
        refuse_to_copy_sharded(policy, "ref_model")
        ref_model = copy.deepcopy(policy)
    ref_model = freeze_model(ref_model) if ref_model is not None else None
    for module in (policy, value_model):
        for submodule in module.modules():
            if isinstance(submodule, nn.Dropout):
                submodule.p = 0.0
    return policy, ref_model, value_model, is_peft_policy


def save_policy_and_critic(
    wrapper: PolicyAndValueWrapper, state_dict, output_dir: str, processing_class, args
) -> None:
    """Write a PPO run's models: the policy at the top of `output_dir` (a loadable causal LM or PEFT adapter, TRL's
    layout), the critic in `value_model/`, the tokenizer and `training_args.bin`.

    Everything goes to a hidden staging folder inside `output_dir` first and is then renamed into place file by file
    ([`~lenvm_rl.io.move_files_into`]), so a process killed while saving never leaves a truncated weight file.
    """
    state_dict = wrapper.state_dict() if state_dict is None else state_dict
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir)
    try:
        for name, module, folder in (
            ("policy", wrapper.policy, staging),
            ("value_model", wrapper.value_model, os.path.join(staging, VALUE_MODEL_DIR)),
        ):
            prefix = f"{name}."
            module_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            module.save_pretrained(folder, state_dict=module_state)
        processing_class.save_pretrained(staging)
        torch.save(args, os.path.join(staging, "training_args.bin"))
        move_files_into(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tied_parameter_names(*modules: nn.Module) -> set[str]:
    """Names of parameters that share storage with another one (tied embeddings are saved once)."""
    tied = set()
    for module in modules:
        names_by_storage = defaultdict(list)
        for name, tensor in module.state_dict().items():
            names_by_storage[tensor.data_ptr()].append(name)
        tied.update(name for names in names_by_storage.values() if len(names) > 1 for name in names)
    return tied


class PPOModelsMixin:
    """[`~lenvm_rl.PPOTrainer`]'s use of its models: placing the frozen ones, the policy / critic / reference forwards
    of steps 3 and 6, and saving and loading a checkpoint (the policy at the top, the critic in `value_model/`)."""

    def _prepare_frozen_models(self):
        """Place the reference and reward models (subclasses add theirs, e.g. the LenVM)."""
        if self.ref_model is not None:
            self.ref_model = self._place_frozen_model(self.ref_model)
        self.reward_funcs = [
            self._place_frozen_model(func) if isinstance(func, nn.Module) else func for func in self.reward_funcs
        ]

    def _place_frozen_model(self, model: nn.Module) -> nn.Module:
        """A frozen model on this process's device; under DeepSpeed, an inference engine (sharded with ZeRO-3).

        Called after the policy's `accelerator.prepare`, which fills the DeepSpeed config's "auto" values.
        """
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        return model.to(self.accelerator.device)

    def _forward(self, model: nn.Module, query_responses, attention_mask, context_length: int):
        """Tempered policy logits of the response tokens `(B, T, V)` and critic values `(B, T + 1)`."""
        T = query_responses.shape[1] - context_length
        logits, values = model(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=T + 1,
        )
        # Position C - 1 + t predicts response token t and holds V(s_t); the last position is the state after T.
        return logits[:, :-1].float() / self.args.temperature, values[:, context_length - 1 :].float()

    def _ref_logits(self, query_responses, attention_mask, context_length: int) -> torch.Tensor:
        T = query_responses.shape[1] - context_length
        kwargs = dict(
            input_ids=fill_padding(query_responses, attention_mask),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=T + 1,
            use_cache=False,
        )
        with self.accelerator.autocast():
            if self.ref_model is not None:
                logits = self.ref_model(**kwargs).logits
            else:
                with self.null_ref_context():
                    logits = self.policy_model(**kwargs).logits
        return logits[:, :-1].float() / self.args.temperature

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy at the top of `output_dir` (a loadable model or adapter), the critic in `value_model/`, staged
        and renamed into place ([`~lenvm_rl.trainers.ppo_models.save_policy_and_critic`])."""
        if self.args.should_save:
            wrapper = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_policy_and_critic(wrapper, state_dict, output_dir, self.processing_class, self.args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        super()._load_from_checkpoint(resume_from_checkpoint, model=wrapper.policy)
        super()._load_from_checkpoint(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR), model=wrapper.value_model)

    def _issue_warnings_after_load(self, load_result) -> None:
        # Tied weights (an LM head sharing the embedding matrix) are saved once: their absence is expected.
        wrapper = self.accelerator.unwrap_model(self.model)
        missing = sorted(set(load_result.missing_keys) - tied_parameter_names(wrapper.policy, wrapper.value_model))
        if missing:
            logger.warning("There were missing keys in the checkpoint model loaded: %s.", missing)
        if load_result.unexpected_keys:
            logger.warning(
                "There were unexpected keys in the checkpoint model loaded: %s.", load_result.unexpected_keys
            )
