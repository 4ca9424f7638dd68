"""Building a [`~lenvm_rl.LengthValueModel`] and moving it to and from files: a fresh value head on a causal LM
([`~LenVMFilesMixin.from_backbone`]), loading either checkpoint format ([`~LenVMFilesMixin.from_pretrained`]),
saving the reference layout plus ``lenvm_config.json`` ([`~LenVMFilesMixin.save_pretrained`]) and uploading it
([`~LenVMFilesMixin.push_to_hub`]). What ``transformers``' ``PreTrainedModel`` gives a model, for a module that
wraps any causal-LM backbone; the format itself (reading, validating, the crash-safe save) is
[`lenvm_rl.lenvm_checkpoint`]."""

import copy
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, PreTrainedModel

from .lenvm_checkpoint import (
    check_causal_lm_config,
    check_gamma,
    check_local_dir,
    load_backbone,
    read_lenvm_config,
    read_value_head,
    resolve_gamma,
    save_lenvm_directory,
    write_lenvm_files,
)

if TYPE_CHECKING:
    from .modeling import LengthValueModel

__all__ = ["LenVMFilesMixin"]


class LenVMFilesMixin:
    """The construction, loading, saving and upload methods of [`~lenvm_rl.LengthValueModel`]."""

    @classmethod
    def from_backbone(
        cls,
        model_or_path: PreTrainedModel | str | os.PathLike,
        gamma: float,
        generator_model: str | None = None,
        data_description: str | None = None,
        **kwargs,
    ) -> "LengthValueModel":
        """Initialise a LenVM from a causal LM with a fresh value head (initial values near -0.5).

        Args:
            model_or_path (`transformers.PreTrainedModel`, `str` or `os.PathLike`):
                A causal LM instance (for example the policy; its decoder is deep-copied, so training the LenVM
                never touches it) or a local directory holding one.
            gamma (`float`):
                Discount in ``(0, 1)``; see [`~lenvm_rl.core.gamma_for_length`].
            generator_model (`str`, *optional*):
                Name of the policy that will generate the training completions.
            data_description (`str`, *optional*):
                Free text describing the training prompts.
            **kwargs:
                Passed to ``AutoModel.from_pretrained`` when ``model_or_path`` is a path (``dtype``,
                ``attn_implementation``, ...).

        Returns:
            [`LengthValueModel`]: in training mode, all parameters trainable.
        """
        check_gamma(gamma)
        if isinstance(model_or_path, PreTrainedModel):
            check_causal_lm_config(model_or_path.config, source=type(model_or_path).__name__)
            backbone = copy.deepcopy(model_or_path.base_model)
        else:
            backbone = load_backbone(check_local_dir(model_or_path), **kwargs)
        return cls(backbone, gamma, generator_model, data_description).train()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, gamma: float | None = None, **kwargs
    ) -> "LengthValueModel":
        """Load a LenVM saved by [`~LengthValueModel.save_pretrained`] or by the reference implementation.

        The directory is a causal-LM checkpoint plus ``value_head.safetensors``; ``lenvm_config.json`` is
        optional (the reference format has none). Tied-embedding checkpoints saved with only
        ``lm_head.weight`` get their input embeddings filled from it.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                Local checkpoint directory.
            gamma (`float`, *optional*):
                Discount the LenVM was trained with. Required for reference checkpoints, which do not store it
                (the paper's released LenVMs use 0.997). If the checkpoint stores gamma, passing a different
                value is an error: a wrong gamma silently rescales every predicted length.
            **kwargs:
                Passed to ``AutoModel.from_pretrained`` for the backbone (``dtype``, ``attn_implementation``,
                ``device_map``, ...). The value head is always float32.

        Returns:
            [`LengthValueModel`]: in eval mode (like ``transformers``' ``from_pretrained``).
        """
        path = check_local_dir(pretrained_model_name_or_path)
        config = AutoConfig.from_pretrained(path)
        check_causal_lm_config(config, source=str(path))
        head_state = read_value_head(path, config.hidden_size)
        metadata = read_lenvm_config(path)
        gamma = resolve_gamma(gamma, metadata.get("gamma"), path)
        model = cls(
            load_backbone(path, **kwargs),
            gamma,
            generator_model=metadata.get("generator_model"),
            data_description=metadata.get("data_description"),
            prompt_format=metadata.get("prompt_format"),
        )
        with torch.no_grad():
            for name, param in model.v_head.named_parameters():
                param.copy_(head_state[f"v_head.{name}"])
        return model.eval()

    def save_pretrained(
        self, save_directory: str | os.PathLike, tokenizer=None, metrics: dict[str, float] | None = None, **kwargs
    ) -> None:
        """Save in the reference layout plus ``lenvm_config.json`` and a model card, atomically.

        Written files: the backbone as a causal-LM checkpoint (``config.json`` naming the causal-LM class,
        weights under the causal-LM key names, sharded as ``transformers`` does; no ``lm_head.weight`` for
        untied models, since a LenVM never uses it and the reference loaders only warn about it),
        ``value_head.safetensors`` with the four reference keys in float32, ``lenvm_config.json``, ``README.md``
        (backbone, generator model, gamma, data description, metrics; [`~lenvm_rl.model_cards.lenvm_model_card`])
        and, if given, the tokenizer. With LoRA applied ([`~LengthValueModel.apply_lora`]) the adapters are merged
        into the saved weights (the live model keeps its adapters), so the result is a plain checkpoint
        every loader reads.

        Crash-safe and non-destructive ([`~lenvm_rl.lenvm_checkpoint.save_lenvm_directory`]): a new directory
        appears whole with one rename; into an existing directory (a trainer's output directory, a mount point)
        files are renamed in one by one under an in-progress marker that loading refuses, and only files listed
        by the previous lenvm-rl save are ever removed (trainer logs, ``checkpoint-*`` folders and any other file
        stay). ``lenvm_config.json`` lists the files of the save, so a missing one is detected at load.

        Args:
            save_directory (`str` or `os.PathLike`):
                Target directory, created if needed.
            tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*):
                Saved alongside, as hub checkpoints ship it.
            metrics (`dict[str, float]`, *optional*):
                Figures of this checkpoint (e.g. `{"eval_loss": ..., "prompt_boundary_mre": ...}`), recorded under
                ``"metrics"`` in ``lenvm_config.json`` and in the card. They describe these weights only, so they are
                not carried over when the loaded model is saved again.
            **kwargs:
                Passed to the backbone's ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        metrics = _check_metrics(metrics)
        name = Path(save_directory).absolute().name
        save_lenvm_directory(
            save_directory, lambda directory: write_lenvm_files(self, directory, tokenizer, metrics, name, **kwargs)
        )

    def push_to_hub(
        self,
        repo_id: str,
        tokenizer=None,
        metrics: dict[str, float] | None = None,
        commit_message: str = "Upload Length Value Model",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        """Upload the LenVM to the Hub: the files of [`~LengthValueModel.save_pretrained`] (its card's quick start
        downloads from `repo_id`), written to a temporary folder and uploaded with `huggingface_hub`'s `upload_folder`.

        Args:
            repo_id (`str`): the model repository (`"user/name"`), created if needed.
            tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*): as in
                [`~LengthValueModel.save_pretrained`].
            metrics (`dict[str, float]`, *optional*): as in [`~LengthValueModel.save_pretrained`].
            commit_message (`str`, *optional*, defaults to `"Upload Length Value Model"`): the commit message.
            private (`bool`, *optional*): visibility of a repository this call creates.
            token (`str`, *optional*): a Hub token with write access (default: the logged-in one).
            revision (`str`, *optional*): the branch to push to.
            **kwargs: as in [`~LengthValueModel.save_pretrained`].

        Returns:
            `huggingface_hub.CommitInfo`: the upload's commit.
        """
        from huggingface_hub import HfApi

        metrics = _check_metrics(metrics)
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            name = repo_id.split("/")[-1]
            save_lenvm_directory(
                Path(folder) / name,
                lambda directory: write_lenvm_files(self, directory, tokenizer, metrics, name, repo_id, **kwargs),
            )
            return api.upload_folder(
                repo_id=repo_id, folder_path=Path(folder) / name, commit_message=commit_message, revision=revision
            )


def _check_metrics(metrics: dict | None) -> dict[str, float] | None:
    """`metrics` as JSON-ready `{name: float}` (tensors and numpy scalars included), checked before anything is written."""
    if metrics is None:
        return None
    try:
        return {str(name): float(value) for name, value in metrics.items()}
    except (TypeError, ValueError) as error:
        raise ValueError(f"`metrics` must map names to numbers, got {metrics!r} ({error}).") from None
