"""The LenVM checkpoint format on disk: reading and validating its files, and publishing a saved directory safely.

A LenVM directory is the reference implementation's layout (a causal-LM backbone checkpoint plus
``value_head.safetensors`` with four keys) and, when lenvm-rl wrote it, ``lenvm_config.json`` (format version, gamma,
generator model, data description, and the list of files the save wrote). Every reader names the file and the
problem and says how to fix it; a value head holding NaN or inf is refused at load.
"""

import copy
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .io import write_json_atomic
from .model_cards import lenvm_model_card

logger = logging.getLogger(__name__)

__all__ = [
    "LENVM_CONFIG_NAME",
    "LENVM_FORMAT_VERSION",
    "VALUE_HEAD_NAME",
    "check_causal_lm_config",
    "check_gamma",
    "check_local_dir",
    "load_backbone",
    "merged_backbone_state_dict",
    "save_lenvm_directory",
    "write_lenvm_files",
    "read_lenvm_config",
    "read_value_head",
    "resolve_gamma",
]

VALUE_HEAD_NAME = "value_head.safetensors"
LENVM_CONFIG_NAME = "lenvm_config.json"
LENVM_FORMAT_VERSION = 1
SAVE_IN_PROGRESS_NAME = ".lenvm_save_in_progress"
# Where a user sets a LenVM's gamma: the error messages name the flag as well as the Python argument.
GAMMA_FLAGS = "--lenvm_gamma in the RL recipes (ppo_gsm8k.py, grpo_gsm8k.py), --gamma in the others"


def check_gamma(gamma: float) -> float:
    if not 0.0 < float(gamma) < 1.0:
        raise ValueError(
            f"gamma must be in (0, 1), got {gamma}. Pass the discount the LenVM was trained with ({GAMMA_FLAGS}; "
            "`gamma=` in Python; the paper's released LenVMs use 0.997)."
        )
    return float(gamma)


def resolve_gamma(passed: float | None, stored: float | None, path: Path) -> float:
    if passed is None and stored is None:
        raise ValueError(
            f"{path} does not store gamma (a reference-format LenVM has no {LENVM_CONFIG_NAME}): pass the gamma "
            f"it was trained with on the command line ({GAMMA_FLAGS}, e.g. --lenvm_gamma 0.997), or "
            "LengthValueModel.from_pretrained(path, gamma=0.997) in Python (the paper's released models use 0.997)."
        )
    if passed is not None and stored is not None and not math.isclose(passed, stored, rel_tol=0.0, abs_tol=1e-7):
        raise ValueError(
            f"gamma={passed} was passed but {path / LENVM_CONFIG_NAME} says the LenVM was trained with "
            f"gamma={stored}; a wrong gamma silently rescales every predicted length. Drop the flag ({GAMMA_FLAGS}) "
            "or the `gamma=` argument."
        )
    return check_gamma(stored if passed is None else passed)


def check_local_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a local directory. LengthValueModel loads local checkpoints only; download hub "
            "checkpoints first (e.g. `hf download <repo> --local-dir <dir>`)."
        )
    return path


def check_causal_lm_config(config, source: str) -> None:
    """Accept decoder-only causal LMs; reject encoders (BERT family) and encoder-decoders (T5 family).

    ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` also lists encoder families usable as decoders (``bert`` ->
    ``BertLMHeadModel``); in ``transformers`` 5 only those configs define ``is_decoder``, False by default.
    """
    is_causal = (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and not config.is_encoder_decoder
        and getattr(config, "is_decoder", True)
    )
    if not is_causal:
        raise ValueError(
            f"{source}: model_type {config.model_type!r} (architectures {config.architectures}) is not a "
            "decoder-only causal LM. A LenVM backbone must load with AutoModelForCausalLM (e.g. Qwen2, Llama); "
            "pick a causal-LM checkpoint."
        )


def read_lenvm_config(path: Path) -> dict:
    """``lenvm_config.json`` of a LenVM directory (``{}`` for the reference format), checked for an unfinished save,
    malformed content and files missing from its manifest."""
    if (path / SAVE_IN_PROGRESS_NAME).exists():
        raise ValueError(
            f"{path} holds an unfinished save ({SAVE_IN_PROGRESS_NAME} is present: the process was interrupted while "
            "writing it), so its files may mix two checkpoints. Save the LenVM again, or restore the directory."
        )
    file = path / LENVM_CONFIG_NAME
    if not file.is_file():
        return {}
    try:
        metadata = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{file} is not valid JSON ({error}): the file is truncated or was edited by hand. Restore it, or delete it "
            f"and pass gamma explicitly ({GAMMA_FLAGS}, `gamma=` in Python) to load the directory as a "
            "reference-format LenVM."
        ) from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("gamma", 0.5), int | float):
        raise ValueError(
            f"{file} must hold a JSON object with a numeric 'gamma' (got {str(metadata)[:80]}); restore the file."
        )
    if metadata.get("format_version", 0) > LENVM_FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {metadata['format_version']}, newer than this lenvm-rl understands "
            f"({LENVM_FORMAT_VERSION}); upgrade lenvm-rl."
        )
    missing = [name for name in metadata.get("files", []) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is incomplete: {missing[:5]} listed in {LENVM_CONFIG_NAME} are missing.")
    return metadata


def read_value_head(path: Path, hidden_size: int) -> dict[str, torch.Tensor]:
    """Read and validate ``value_head.safetensors``; every problem names the key and the expected shape."""
    file = path / VALUE_HEAD_NAME
    expected = {
        "v_head.fc.weight": [hidden_size, hidden_size],
        "v_head.fc.bias": [hidden_size],
        "v_head.summary.weight": [1, hidden_size],
        "v_head.summary.bias": [1],
    }
    layout = ", ".join(f"{key} {shape}" for key, shape in expected.items())
    if not file.is_file():
        raise ValueError(
            f"{path} has no {VALUE_HEAD_NAME}, so it is a plain language model, not a LenVM. To start a new "
            "LenVM from it, train one with `recipes/train_lenvm.py --model_name_or_path <it>` or use "
            f"LengthValueModel.from_backbone(path, gamma=...) in Python; a saved LenVM holds {layout}."
        )
    try:
        with safe_open(file, framework="pt") as handle:
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{file} is not a readable safetensors file ({error}): it is truncated or corrupt. Restore it from the "
            "original checkpoint or save the LenVM again."
        ) from None
    problems = [
        f"missing key {key!r} (expected shape {shape})" for key, shape in expected.items() if key not in shapes
    ]
    problems += [f"unexpected key {key!r}" for key in shapes if key not in expected]
    problems += [
        f"key {key!r} has shape {shapes[key]}, expected {shape}"
        for key, shape in expected.items()
        if key in shapes and shapes[key] != shape
    ]
    if problems:
        raise ValueError(
            f"{file}: {'; '.join(problems)}. A LenVM value head holds exactly {layout} "
            f"(H = hidden_size = {hidden_size} of the backbone); re-export the head with these keys and shapes."
        )
    head_state = load_file(file)
    broken = [key for key, tensor in head_state.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(
            f"{file}: {broken} hold NaN or inf values, so every predicted value would be NaN (a diverged training?). "
            "Use an earlier checkpoint of the LenVM."
        )
    return head_state


def load_backbone(path: Path, **kwargs) -> PreTrainedModel:
    """``AutoModel.from_pretrained`` plus the tied-embedding fix and a strict check for missing weights."""
    config = AutoConfig.from_pretrained(path)
    check_causal_lm_config(config, source=str(path))
    backbone, info = AutoModel.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = set(info["missing_keys"])
    embeddings = backbone.get_input_embeddings()
    embedding_key = next(name for name, param in backbone.named_parameters() if param is embeddings.weight)
    if embedding_key in missing and config.tie_word_embeddings:
        # Tied checkpoints may store the shared matrix only under the LM head's name.
        with torch.no_grad():
            embeddings.weight.copy_(read_checkpoint_tensor(path, "lm_head.weight"))
        missing.discard(embedding_key)
    if missing:
        raise ValueError(
            f"The backbone checkpoint in {path} lacks {len(missing)} weights, e.g. {sorted(missing)[:5]}; they "
            "would be randomly initialised. Re-save the checkpoint from the complete model."
        )
    return backbone


def read_checkpoint_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a (possibly sharded) safetensors checkpoint."""
    index = path / "model.safetensors.index.json"
    filename = json.loads(index.read_text())["weight_map"].get(key) if index.is_file() else "model.safetensors"
    if filename is not None and (path / filename).is_file():
        with safe_open(path / filename, framework="pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    raise ValueError(
        f"{path} ties its word embeddings but stores neither the input embeddings nor {key!r} in safetensors; "
        "re-save the checkpoint from the complete model."
    )


def save_lenvm_directory(target: str | os.PathLike, write) -> Path:
    """Write a LenVM checkpoint into `target` through `write(directory)`, so that a crash never leaves a directory
    that loads as a mixture, and nothing the save did not write is ever deleted.

    - `target` does not exist: `write` fills a temporary sibling directory, which one rename makes `target`.
    - `target` exists (a previous checkpoint, a trainer's output directory, a mount point): a save that would replace
      a model file (weights, `config.json`) that no earlier LenVM save listed is refused: it belongs to another model.
      Otherwise `write` fills a hidden
      temporary directory *inside* `target` (same file system, so renames work on a mount point too). A marker file
      `SAVE_IN_PROGRESS_NAME` is created, each written file is renamed over its old version, files that the previous
      lenvm-rl save listed in its manifest and this save no longer writes are removed, and the marker is removed last.
      A crash in between leaves the marker, and loading the directory then fails with an error saying so.

    `write` must write ``lenvm_config.json``; its ``files`` entry (the manifest) is filled in here.

    Returns:
        `Path`: the target directory.
    """
    from .io import default_dir_mode, write_json_atomic

    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = not target.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent if fresh else target))
    try:
        write(staging)
        files = sorted(str(f.relative_to(staging)) for f in staging.rglob("*") if f.is_file())
        metadata = json.loads((staging / LENVM_CONFIG_NAME).read_text())
        metadata["files"] = [name for name in files if name != LENVM_CONFIG_NAME]
        write_json_atomic(staging / LENVM_CONFIG_NAME, metadata)
        if fresh:
            os.chmod(staging, default_dir_mode())
            os.replace(staging, target)
            return target
        previous = _manifest(target)
        clobbered = [
            name
            for name in files
            if name not in previous and (_is_weight_file(name) or name == "config.json") and (target / name).is_file()
        ]
        if clobbered:
            raise ValueError(
                f"Refusing to save a LenVM into {target}: it holds {clobbered[:6]}, which no earlier LenVM save wrote "
                "there (another model's files, e.g. the policy the LenVM was initialised from), and the save would "
                "replace them. Save into another directory (--output_dir)."
            )
        marker = target / SAVE_IN_PROGRESS_NAME
        marker.write_text("A lenvm-rl save into this directory did not finish; save again.\n")
        for name in files:
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, destination)
        for name in sorted(set(previous) - set(files)):  # written by the previous save only
            (target / name).unlink(missing_ok=True)
        stale = [f.name for f in target.iterdir() if _is_weight_file(f.name) and f.name not in files + previous]
        if stale:
            logger.warning(
                "%s holds weight files that this save did not write and no earlier lenvm-rl save listed: %s. They were "
                "kept; delete them if they belong to an older checkpoint.",
                target,
                stale,
            )
        marker.unlink()
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manifest(directory: Path) -> list[str]:
    """The files the last lenvm-rl save into `directory` wrote (empty for reference-format or unreadable metadata)."""
    try:
        return list(json.loads((directory / LENVM_CONFIG_NAME).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):
        return []


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


# ---------------------------------------------------------------------- writing


def write_lenvm_files(model, directory: Path, tokenizer, metrics, name: str, repo_id=None, **kwargs) -> None:
    """Write a LenVM's files into `directory`: the backbone in the reference causal-LM layout,
    `value_head.safetensors` (float32), the tokenizer, `lenvm_config.json` and the model card. Called by
    [`~lenvm_rl.LengthValueModel.save_pretrained`] through [`save_lenvm_directory`]."""
    # A weightless causal-LM shell gives the reference layout through transformers' own writer: the
    # causal-LM class in config.json, its key names, tied-weight dedup, weight-conversion reversal, sharding.
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=_unwrap_peft(model.backbone).dtype)
    state_dict = {
        f"{shell.base_model_prefix}.{key}": value for key, value in merged_backbone_state_dict(model.backbone).items()
    }
    shell.save_pretrained(directory, state_dict=state_dict, **kwargs)
    head_state = {
        f"v_head.{name}": param.detach().float().cpu().contiguous() for name, param in model.v_head.named_parameters()
    }
    save_file(head_state, directory / VALUE_HEAD_NAME, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    metadata = {
        "format_version": LENVM_FORMAT_VERSION,
        "gamma": model.gamma,
        "generator_model": model.generator_model,
        "data_description": model.data_description,
    }
    if model.prompt_format is not None:
        metadata["prompt_format"] = model.prompt_format
    if metrics:
        metadata["metrics"] = metrics
    write_json_atomic(directory / LENVM_CONFIG_NAME, metadata)
    card = lenvm_model_card(
        name=name,
        backbone=model.config._name_or_path,
        model_type=model.config.model_type,
        generator_model=model.generator_model,
        gamma=model.gamma,
        data_description=model.data_description,
        metrics=metrics,
        repo_id=repo_id,
    )
    (directory / "README.md").write_text(card)


@torch.no_grad()
def merged_backbone_state_dict(backbone_or_peft) -> dict[str, torch.Tensor]:
    """A LenVM backbone's weights under plain key names, with LoRA deltas merged in (the live model is untouched)."""
    backbone = _unwrap_peft(backbone_or_peft)
    state_dict = backbone.state_dict()
    if backbone is backbone_or_peft:
        return state_dict
    merged = {
        key.replace(".base_layer.", "."): value
        for key, value in state_dict.items()
        if not any(part.startswith("lora_") for part in key.split("."))
    }
    for name, module in backbone.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            delta = sum(
                module.get_delta_weight(adapter).float()
                for adapter in module.active_adapters
                if adapter not in module.merged_adapters
            )
            merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def _unwrap_peft(backbone):
    """The ``transformers`` model under an optional peft wrapper (LoRA layers stay injected)."""
    return backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
