"""The Length Value Model: a causal-LM backbone with a scalar value head, loaded and saved in both formats.

A LenVM reads the final (post-norm) hidden state ``h_t`` of a decoder-only language model at every position
and maps it to the value of the prefix ending there (paper section 2):

    z_t = W2 SiLU(W1 h_t + b1) + b2          W1: (H, H), W2: (1, H), both with bias
    V(s_t) = -sigmoid(z_t)                   in (-1, 0)

``V(s_t) = -(1 - gamma^l)`` for ``l`` remaining tokens (EOS included), so a value converts to a length with
[`~lenvm_rl.core.values_to_lengths`].

Checkpoint layout. The reference implementation stores a LenVM as a plain Hugging Face causal-LM directory
(``config.json`` unchanged, backbone ``*.safetensors``, tokenizer files) plus ``value_head.safetensors`` with
exactly the keys ``v_head.fc.weight`` ``[H, H]``, ``v_head.fc.bias`` ``[H]``, ``v_head.summary.weight``
``[1, H]`` and ``v_head.summary.bias`` ``[1]``; it does not store gamma. [`LengthValueModel.save_pretrained`]
writes exactly that layout, so the reference loaders read our checkpoints, and adds ``lenvm_config.json``
(format version, gamma, generator model, data description, optional metrics), which is what makes gamma travel
with the weights, and a model card ``README.md``.

Why an ``nn.Module`` and not a ``PreTrainedModel`` subclass: ``PreTrainedModel`` ties a model class to one
config class and one weight file layout, while a LenVM wraps *any* causal-LM backbone (its ``config`` is the
backbone's, e.g. a ``Qwen2Config``) and splits its weights across the backbone files and
``value_head.safetensors``. Subclassing would mean a synthetic config class and overriding loading and saving
anyway, so the model is a plain module that exposes what trainers use: ``.config`` (the backbone config, with
``hidden_size``), ``from_pretrained`` / ``save_pretrained`` and activation (gradient) checkpointing.
"""

import copy
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from .compatibility import check_lenvm_reads_policy_ids, check_tokenizers_compatible  # noqa: F401 (re-exported)
from .core import values_to_lengths
from .lenvm_checkpoint import (
    LENVM_CONFIG_NAME,
    LENVM_FORMAT_VERSION,
    VALUE_HEAD_NAME,
    check_causal_lm_config,
    check_gamma,
)
from .lenvm_files import LenVMFilesMixin
from .transformers_compat import activation_checkpointing_disable, activation_checkpointing_enable, output_cache

logger = logging.getLogger(__name__)

__all__ = [
    "FILL_TOKEN_ID",
    "LENVM_CONFIG_NAME",
    "LENVM_FORMAT_VERSION",
    "VALUE_HEAD_NAME",
    "LengthValueModel",
    "LengthValueModelOutput",
    "check_lenvm_reads_policy_ids",
    "check_tokenizers_compatible",
    "fill_padding",
    "freeze_model",
    "load_frozen_lenvm",
    "position_ids_from_mask",
    "resolve_lenvm",
]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Padding-aware position ids: ``max(cumsum(mask) - 1, 0)``, so real tokens count 0, 1, 2, ... in every row.

    Llama/Qwen2-style backbones do not derive positions from the attention mask, so a left-padded row would start
    at the padding width; these positions make a row's outputs independent of its padding side and batch.

    Args:
        attention_mask (`torch.Tensor`): `(B, T)`, 1 (or True) on real tokens.

    Returns:
        `torch.LongTensor`: `(B, T)` positions (0 on leading padding).

    Example:
        >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]))
        tensor([[0, 0, 0, 1, 2],
                [0, 1, 2, 3, 3]])
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


FILL_TOKEN_ID = 0  # the id models see on padding (TRL's choice): every vocabulary has an id 0


def fill_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.LongTensor:
    """``input_ids`` with every padding position set to [`FILL_TOKEN_ID`] (0), a valid id for any model.

    A tokenizer's pad id may lie outside the model's embedding: TRL's PPO recipe adds a `[PAD]` token without
    resizing, which gives it the id one past the vocabulary (GPT-2: 50257, Llama-3: 128256). Padding is never
    attended to, so any valid id gives the same outputs on real tokens; an invalid one fails in the embedding lookup.
    lenvm-rl's model forwards and `generate` calls on padded ids go through this; the ids kept for decoding stay as
    they are.

    Args:
        input_ids (`torch.Tensor`): `(B, T)` token ids.
        attention_mask (`torch.Tensor`): `(B, T)`, 1 (or True) on real tokens.

    Returns:
        `torch.LongTensor`: `(B, T)` ids, 0 on padding.

    Example:
        >>> fill_padding(torch.tensor([[50257, 7, 8], [9, 10, 50257]]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
        tensor([[ 0,  7,  8],
                [ 9, 10,  0]])
    """
    return input_ids.masked_fill(attention_mask == 0, FILL_TOKEN_ID)


@dataclass
class LengthValueModelOutput:
    """Output of [`LengthValueModel.forward`].

    A plain dataclass, not a `transformers.utils.ModelOutput`: a ModelOutput is a dict, and a field named
    ``values`` would hide ``dict.values()``, which DDP (``find_unused_parameters``) and DeepSpeed call on dict
    outputs. Dataclass outputs are traversed field by field instead.

    Args:
        values (`torch.FloatTensor` of shape `(batch_size, sequence_length)`):
            ``V(s_t) = -sigmoid(z_t)`` in ``(-1, 0)``, float32 whatever the backbone dtype. Entries at padding
            positions are meaningless and must be masked by the caller.
        value_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length)`):
            The head output ``z_t`` before the sigmoid, float32.
        cache (`transformers.Cache`, *optional*):
            The backbone's key/value cache, returned when the forward is called with ``use_cache=True``
            (transformers' name since 5.24; ``past_key_values`` is deprecated there).
    """

    values: torch.FloatTensor | None = None
    value_logits: torch.FloatTensor | None = None
    cache: object | None = None


class ValueHead(nn.Module):
    """Two-layer SiLU MLP ``z = summary(SiLU(fc(h)))``, always evaluated in float32.

    The attribute names give the state-dict keys of the reference format (``v_head.fc.weight``, ...). The
    weights are cast to float32 inside the forward and autocast is disabled, so the head stays float32 even
    when a wrapper (DeepSpeed bf16, ``model.to(torch.bfloat16)``, ``torch.autocast``) lowers its parameters.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.fc = nn.Linear(hidden_size, hidden_size, dtype=torch.float32)
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            hidden_states = hidden_states.to(device=self.fc.weight.device, dtype=torch.float32)
            hidden_states = F.silu(F.linear(hidden_states, self.fc.weight.float(), self.fc.bias.float()))
            return F.linear(hidden_states, self.summary.weight.float(), self.summary.bias.float()).squeeze(-1)


class LengthValueModel(LenVMFilesMixin, nn.Module):
    """A Length Value Model: causal-LM backbone (without its LM head) plus a float32 value head.

    Build one with [`~LengthValueModel.from_pretrained`] (a saved LenVM, ours or the reference format) or
    [`~LengthValueModel.from_backbone`] (a fresh head on a causal LM, e.g. the policy); save it with
    [`~LengthValueModel.save_pretrained`] or [`~LengthValueModel.push_to_hub`] (those four come from
    [`~lenvm_rl.lenvm_files.LenVMFilesMixin`]).

    Args:
        backbone (`transformers.PreTrainedModel`):
            A decoder without LM head, as returned by ``AutoModel`` for a causal-LM config (e.g. ``Qwen2Model``).
        gamma (`float`):
            Discount the LenVM is (or will be) trained with, in ``(0, 1)``; needed to turn values into lengths.
        generator_model (`str`, *optional*):
            Name of the policy whose completions the LenVM learns to predict (values are policy-dependent).
        data_description (`str`, *optional*):
            Free text describing the prompts the LenVM was trained on.
        prompt_format (`dict`, *optional*):
            How its training prompts were built (`{"system_prompt": ..., "instruction": ...}`, see
            [`~lenvm_rl.data.prompt_format_of`]); the RL recipes warn when theirs differ.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        gamma: float,
        generator_model: str | None = None,
        data_description: str | None = None,
        prompt_format: dict | None = None,
    ):
        super().__init__()
        check_causal_lm_config(backbone.config, source=type(backbone).__name__)
        self.backbone = backbone
        self.config = backbone.config
        self.gamma = check_gamma(gamma)
        self.generator_model = generator_model
        self.data_description = data_description
        self.prompt_format = prompt_format
        self.v_head = ValueHead(self.config.hidden_size).to(backbone.device)
        # A near-zero summary layer starts every value at -sigmoid(0) = -0.5 (about log(2)/(1-gamma) tokens)
        # instead of a random per-token guess; fc keeps PyTorch's default init so gradients still reach it.
        nn.init.normal_(self.v_head.summary.weight, std=0.1 / math.sqrt(self.config.hidden_size))
        nn.init.zeros_(self.v_head.summary.bias)

    # ------------------------------------------------------------------ forward and predictions
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> LengthValueModelOutput:
        """Values of every prefix of ``input_ids``.

        When ``position_ids`` is None and an ``attention_mask`` is given, positions count real tokens only,
        ``position_ids = max(cumsum(attention_mask) - 1, 0)``, so a sequence gets the same values whether it is
        left- or right-padded or batched with others (Llama/Qwen2 backbones do not derive positions from the
        mask themselves). With a key/value cache the mask covers past and new tokens, as in ``transformers``.
        Padding positions are embedded as id 0 ([`fill_padding`]), so any pad id works, even one past the vocabulary.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, past_length + sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Explicit positions; override the padding-aware default.
            **kwargs:
                Passed to the backbone (``cache``, ``use_cache`` (default False), ...).

        Returns:
            [`LengthValueModelOutput`]: ``values`` and ``value_logits`` of shape `(batch_size, sequence_length)`,
            float32.
        """
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1] :]  # (B, T)
        if attention_mask is not None and attention_mask.dim() == 2:
            # Every caller's padding, whatever its id (possibly one past the vocabulary), is embedded as a valid id.
            # A 4D mask (candidate scoring) comes with real tokens only.
            input_ids = fill_padding(input_ids, attention_mask[:, -input_ids.shape[1] :])
        kwargs.setdefault("use_cache", False)
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        value_logits = self.v_head(outputs.last_hidden_state)  # (B, T) float32
        return LengthValueModelOutput(
            values=-torch.sigmoid(value_logits),  # (B, T)
            value_logits=value_logits,
            cache=output_cache(outputs) if kwargs["use_cache"] else None,
        )

    @torch.no_grad()
    def predict_remaining_lengths(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted remaining tokens (EOS included) after every prefix: ``l_t = log(1 + V_t) / log(gamma)``.

        A length from a predicted mean value underestimates the mean remaining length (Jensen; paper
        section 1). Runs without gradients.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (either side).

        Returns:
            `torch.FloatTensor` of shape `(batch_size, sequence_length)`: lengths in tokens, float32; entries at
            padding positions are meaningless.
        """
        values = self(input_ids, attention_mask=attention_mask).values  # (B, T)
        return values_to_lengths(values, self.gamma)

    @torch.no_grad()
    def predict_prompt_lengths(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predicted completion length of each prompt, read at its last token ``s_0`` (paper section 5).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt token ids, left- or right-padded.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`):
                1 for real tokens, 0 for padding.

        Returns:
            `torch.FloatTensor` of shape `(batch_size,)`: predicted number of completion tokens, EOS included.
        """
        lengths = self.predict_remaining_lengths(input_ids, attention_mask)  # (B, T)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        last = (attention_mask.long() * positions).argmax(dim=-1, keepdim=True)  # (B, 1) last real token
        return lengths.gather(1, last).squeeze(1)  # (B,)

    # ------------------------------------------------------------------ training helpers
    def apply_lora(self, peft_config: LoraConfig) -> "LengthValueModel":
        """Wrap the backbone with LoRA adapters; the value head stays fully trainable.

        Only the adapters and the head train; base weights are frozen. [`~LengthValueModel.save_pretrained`]
        saves merged weights, so a LoRA-trained LenVM reloads as a plain one in either format.

        Args:
            peft_config (`peft.LoraConfig`):
                LoRA settings. ``task_type`` is ignored (the backbone has no LM head); DoRA and
                ``modules_to_save`` are not supported because the save path merges plain LoRA deltas.

        Returns:
            [`LengthValueModel`]: ``self``, for chaining.
        """
        if not isinstance(peft_config, LoraConfig) or peft_config.use_dora or peft_config.modules_to_save:
            raise ValueError(
                "apply_lora supports a plain peft.LoraConfig (no use_dora, no modules_to_save: the value head is "
                f"already trainable); got {peft_config!r}."
            )
        peft_config = copy.copy(peft_config)
        peft_config.task_type = None
        self.backbone = get_peft_model(self.backbone, peft_config)
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Enable activation (gradient) checkpointing in the backbone; arguments as in ``transformers``.

        ``transformers`` defaults to ``use_reentrant=False``, which also works with frozen embeddings (LoRA).
        """
        activation_checkpointing_enable(_unwrap_peft(self.backbone), activation_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Disable activation (gradient) checkpointing in the backbone."""
        activation_checkpointing_disable(_unwrap_peft(self.backbone))


def freeze_model(model: nn.Module) -> nn.Module:
    """Freeze a model for use as a fixed critic: no parameter takes gradients, dropout is off and it is in eval mode.

    This is the single freezing path of the package (the frozen LenVM of the RL trainers, reference and reward
    models). Dropout probabilities are set to 0 as well, so a later ``.train()`` call (which undoes the eval mode)
    still leaves the model's outputs deterministic.

    Args:
        model (`torch.nn.Module`):
            Model to freeze, in place.

    Returns:
        `torch.nn.Module`: the same ``model``.
    """
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.eval()


def load_frozen_lenvm(
    lenvm: "LengthValueModel | str | os.PathLike",
    policy_tokenizer,
    gamma: float | None = None,
    lenvm_tokenizer=None,
    **kwargs,
) -> "LengthValueModel":
    """
    A frozen LenVM checked to read a policy's token ids: what the LenVM trainers do with `lenvm=` or
    `--lenvm_model_name_or_path`.

    A directory is loaded with [`LengthValueModel.from_pretrained`] (lenvm-rl or reference format; `gamma` is
    required for the latter) together with its tokenizer when it has one; a given model's gamma is checked against
    `gamma`. The LenVM must embed at least the policy's vocabulary, and when its tokenizer is known it must pass
    [`check_tokenizers_compatible`] (without one, only the embedding size is checked and a warning says so).

    Args:
        lenvm ([`LengthValueModel`], `str` or `os.PathLike`):
            The LenVM or its local directory.
        policy_tokenizer (`transformers.PreTrainedTokenizerBase`):
            Tokenizer of the policy whose ids the LenVM will read.
        gamma (`float`, *optional*):
            The LenVM's discount: required for a reference-format directory, checked otherwise.
        lenvm_tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*):
            The LenVM's tokenizer, if not saved in its directory.
        **kwargs:
            Passed to [`LengthValueModel.from_pretrained`] when `lenvm` is a directory (e.g. `dtype`).

    Returns:
        [`LengthValueModel`]: the LenVM, frozen with [`freeze_model`].
    """
    lenvm, lenvm_tokenizer = resolve_lenvm(lenvm, gamma, lenvm_tokenizer, **kwargs)
    check_lenvm_reads_policy_ids(lenvm, policy_tokenizer, lenvm_tokenizer)
    return freeze_model(lenvm)


# ---------------------------------------------------------------------- loading helpers
def resolve_lenvm(lenvm, gamma: float | None, lenvm_tokenizer, **kwargs):
    """The LenVM (loaded if a directory, with `kwargs` for `from_pretrained`; its gamma checked if a model) and its
    tokenizer if one is known."""
    if isinstance(lenvm, str | os.PathLike):
        path = lenvm
        lenvm = LengthValueModel.from_pretrained(path, gamma=gamma, **kwargs)
        if lenvm_tokenizer is None and any(
            os.path.isfile(os.path.join(path, name)) for name in ("tokenizer_config.json", "tokenizer.json")
        ):
            from transformers import AutoTokenizer

            lenvm_tokenizer = AutoTokenizer.from_pretrained(path)
    elif not isinstance(lenvm, LengthValueModel):
        raise ValueError(f"`lenvm` must be a LengthValueModel or a local directory, got {type(lenvm).__name__}.")
    elif gamma is not None and not math.isclose(gamma, lenvm.gamma, abs_tol=1e-7):
        raise ValueError(
            f"gamma {gamma} (--lenvm_gamma / `lenvm_gamma=` of the RL configs, `gamma=` of load_frozen_lenvm) "
            f"differs from the given LenVM's gamma {lenvm.gamma}: drop it or pass the LenVM's."
        )
    return lenvm, lenvm_tokenizer


def _unwrap_peft(backbone: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model under an optional peft wrapper (LoRA layers stay injected)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
