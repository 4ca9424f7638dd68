"""Sampling the completions a LenVM is pretrained on: resumable, sharded per process, atomic.

Layout of a rollout directory::

    rollouts/
      rollouts_config.json               sampling parameters, generator model, seed (a resume must match them)
      rollouts_layout.json               what decides which records exist: prompt set, chunk size, processes, model
      shard-00000-of-00002/chunk-000000.jsonl   process 0's records, one chunk of prompts per file
      shard-00001-of-00002/chunk-000000.jsonl   process 1's records

A chunk file holds every completion of its prompts and appears in one ``os.replace``: a crash loses at most
the chunk in flight and never leaves a partial file, and a re-run skips the chunks already on disk, so
interrupting and re-running gives exactly the records of an uninterrupted run (same seeds per chunk). A resume
that would change which prompt lands in which chunk file (another prompt set, chunk size or number of processes) or
which policy samples is refused with an error naming the field: it would lose or duplicate records silently.
``load_rollouts(dir)`` reads everything back as one `datasets.Dataset`.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .generation import generate_completions
from .io import read_json, write_json_atomic, write_jsonl_atomic
from .vllm_engine import generate_completions_vllm

logger = logging.getLogger(__name__)

__all__ = ["ROLLOUTS_CONFIG_NAME", "ROLLOUTS_LAYOUT_NAME", "SamplingConfig", "load_rollouts", "sample_rollouts"]

ROLLOUTS_CONFIG_NAME = "rollouts_config.json"
ROLLOUTS_LAYOUT_NAME = "rollouts_layout.json"


@dataclass
class SamplingConfig:
    """What a set of rollouts was sampled with; stored next to them and checked on resume.

    Parameters:
        num_samples (`int`): Completions per prompt (paper: up to 16).
        temperature (`float`): Sampling temperature (paper: 1.0).
        top_p (`float`): Nucleus threshold (paper: 1.0).
        top_k (`int`): Top-k filter, 0 disables it.
        max_new_tokens (`int`): Length cap; completions cut there are recorded with ``finish_reason="length"``.
        seed (`int`): Base seed; chunk ``k`` of shard ``r`` samples with a seed derived from it.
        generator_model (`str`): Name or path of the policy that produced the completions.
        engine (`str`): What sampled them: `"transformers"` (the built-in continuous-batching sampler) or `"vllm"`.
            Both sample the same distribution; a directory is resumed only with the engine that started it.
    """

    num_samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 0
    generator_model: str = field(default="")
    engine: str = "transformers"


def sample_rollouts(
    model,
    tokenizer,
    prompts: Dataset,
    output_dir: str | os.PathLike,
    sampling: SamplingConfig,
    batch_size: int = 32,
    chunk_size: int = 32,
    process_index: int = 0,
    num_processes: int = 1,
) -> Path:
    """Sample ``sampling.num_samples`` completions for every prompt this process owns and write them as records.

    Process ``r`` of ``n`` owns the prompts at positions ``r, r + n, r + 2n, ...`` and writes only its own shard
    directory, so several processes (``accelerate launch``) never touch the same file.

    Args:
        model (`PreTrainedModel` or `vllm.LLM`): The policy, in eval mode on its device, or a vLLM engine loaded
            from its checkpoint (see `lenvm_rl.vllm_engine.make_vllm_engine`; `sampling.engine` must be `"vllm"`,
            and one process drives it).
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer (chat template, EOS and pad tokens).
        prompts (`datasets.Dataset`): A ``prompt`` column (chat messages or text) and a ``prompt_id`` column; every
            other column (such as ``answer``) is copied into each record.
        output_dir (`str` or `os.PathLike`): The rollout directory (created or resumed).
        sampling ([`SamplingConfig`]): Sampling parameters; must equal those stored when resuming.
        batch_size (`int`, *optional*, defaults to `32`): Rows decoded together.
        chunk_size (`int`, *optional*, defaults to `32`): Prompts per atomically written file.
        process_index (`int`, *optional*, defaults to `0`): This process's rank.
        num_processes (`int`, *optional*, defaults to `1`): Number of sampling processes.

    Returns:
        `Path`: this process's shard directory.
    """
    for column in ("prompt", "prompt_id"):
        if column not in prompts.column_names:
            raise ValueError(f"sample_rollouts needs a {column!r} column; the dataset has {prompts.column_names}.")
    use_vllm = not isinstance(model, torch.nn.Module)
    if sampling.engine != ("vllm" if use_vllm else "transformers"):
        raise ValueError(
            f"sampling.engine is {sampling.engine!r} but the model is a {type(model).__name__}: pass a vllm.LLM with "
            "engine='vllm', a transformers model with engine='transformers'."
        )
    if use_vllm and num_processes > 1:
        raise ValueError(
            "Sampling with vLLM runs in one process (the engine batches every request itself); launch it with python, "
            "not accelerate launch --num_processes > 1, and spread a large model with --vllm_tensor_parallel_size."
        )
    output_dir = Path(output_dir)
    _write_or_check_config(output_dir, sampling, process_index)
    layout = {
        "num_prompts": len(prompts),
        "prompts_sha256": _prompts_fingerprint(prompts),
        "chunk_size": chunk_size,
        "num_processes": num_processes,
        "model_sha256": _checkpoint_fingerprint(_vllm_model_path(model)) if use_vllm else _model_fingerprint(model),
    }
    _write_or_check_layout(output_dir, layout, process_index)
    shard_dir = output_dir / f"shard-{process_index:05d}-of-{num_processes:05d}"
    shard_dir.mkdir(parents=True, exist_ok=True)

    mine = prompts.select(range(process_index, len(prompts), num_processes))
    chunks = [(k, range(s, min(s + chunk_size, len(mine)))) for k, s in enumerate(range(0, len(mine), chunk_size))]
    todo = [(k, rows) for k, rows in chunks if not (shard_dir / f"chunk-{k:06d}.jsonl").exists()]
    if len(todo) < len(chunks):
        logger.warning(
            "Resuming %s: %d of %d chunks already written.", shard_dir, len(chunks) - len(todo), len(chunks)
        )

    extra_columns = [c for c in mine.column_names if c not in ("prompt", "prompt_id")]
    total = sum(len(rows) for _, rows in todo) * sampling.num_samples
    progress = tqdm(total=total, desc=f"Sampling (process {process_index})", unit="completion")
    tokens, start = 0, time.perf_counter()
    for k, rows in todo:
        batch = mine.select(rows)
        seed = sampling.seed * 1_000_003 + process_index * 10_007 + k  # fixed per chunk: resumes reproduce it
        common = dict(
            num_samples=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=seed,
        )
        if use_vllm:
            completions = generate_completions_vllm(model, tokenizer, list(batch["prompt"]), **common)
        else:
            completions = generate_completions(
                model, tokenizer, list(batch["prompt"]), batch_size=batch_size, **common
            )
        records = []
        for completion in completions:
            row = batch[completion.prompt_index]
            records.append(
                {
                    "prompt_id": row["prompt_id"],
                    "prompt": row["prompt"],
                    "prompt_ids": completion.prompt_ids,
                    "completion": completion.text,
                    "completion_ids": completion.completion_ids,
                    "length": len(completion.completion_ids),
                    "finish_reason": completion.finish_reason,
                    "sample_index": completion.sample_index,
                    **{key: value for key, value in asdict(sampling).items() if key != "num_samples"},
                    "seed": seed,
                    **{column: row[column] for column in extra_columns},
                }
            )
            tokens += len(completion.completion_ids)
        write_jsonl_atomic(shard_dir / f"chunk-{k:06d}.jsonl", records)
        progress.update(len(records))
        progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    progress.close()
    return shard_dir


def load_rollouts(path: str | os.PathLike) -> Dataset:
    """Load every record of a rollout directory (all shards and chunks), or one jsonl file, as one `datasets.Dataset`.

    Every line must be a JSON object: an empty chunk file, a truncated line or a record that appears twice (the same
    `prompt_id` and `sample_index`, e.g. shards of two different process counts) is an error naming the file, the line
    and the fix.
    """
    path = Path(path)
    files = sorted(path.glob("shard-*/chunk-*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"No rollout files under {path} (expected shard-*/chunk-*.jsonl).")
    records, seen = [], {}
    for file in files:
        lines = file.read_text().splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(
                f"{file} is empty: a rollout chunk always holds records. Delete it and resume the sampling."
            )
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(
                    f"{file}, line {number}: not a JSON record ({error}); the file is truncated or corrupt. Delete the "
                    "file and resume the sampling (chunks are rewritten whole)."
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{file}, line {number}: a record must be a JSON object, got {type(record).__name__}."
                )
            key = (record.get("prompt_id"), record.get("sample_index"))
            if key != (None, None) and key in seen:
                raise ValueError(
                    f"{file}, line {number}: record {key} (prompt_id, sample_index) also appears in {seen[key]}: "
                    "shards of different runs are mixed in this directory. Keep one run's shards."
                )
            seen[key] = f"{file}, line {number}"
            records.append(record)
    return Dataset.from_list(records)


def _write_or_check_config(output_dir: Path, sampling: SamplingConfig, process_index: int) -> None:
    config_path = output_dir / ROLLOUTS_CONFIG_NAME
    if config_path.exists():
        stored = read_json(config_path, fix="restore it, or sample into a new output_dir")
        stored.setdefault("engine", "transformers")  # directories written before the engine was recorded
        if stored != asdict(sampling):
            changed = {k: (stored.get(k), v) for k, v in asdict(sampling).items() if stored.get(k) != v}
            raise ValueError(
                f"{output_dir} holds rollouts sampled with other parameters {changed} (stored, requested): mixing "
                "them would give the LenVM two policies' lengths. Use a new output_dir or the stored parameters."
            )
        return
    if process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config_path, asdict(sampling))


_LAYOUT_FIXES = {
    "num_prompts": "sample the same prompts (e.g. the same --num_prompts / split)",
    "prompts_sha256": "sample the same prompts in the same order (the same dataset, split and selection)",
    "chunk_size": "pass the stored --chunk_size",
    "num_processes": "launch the stored number of processes",
    "model_sha256": "sample with the same policy weights",
}


def _write_or_check_layout(output_dir: Path, layout: dict, process_index: int) -> None:
    """Refuse a resume that would change which records exist (chunk k of shard r holds fixed prompts)."""
    path = output_dir / ROLLOUTS_LAYOUT_NAME
    if path.exists():
        stored = read_json(path, fix="restore it, or sample into a new output_dir")
        changed = {key: (stored.get(key), value) for key, value in layout.items() if stored.get(key) != value}
        if changed:
            fixes = "; ".join(_LAYOUT_FIXES[key] for key in changed)
            raise ValueError(
                f"{output_dir} was sampled with a different {', '.join(changed)} {changed} (stored, requested): "
                f"resuming would lose or duplicate records. {fixes}, or use a new output directory."
            )
        return
    if any(output_dir.glob("shard-*/chunk-*.jsonl")):
        logger.warning(
            "%s has rollouts but no %s (written by an older lenvm-rl): the prompt set, chunk size, process count "
            "and model of this resume cannot be checked against them.",
            output_dir,
            ROLLOUTS_LAYOUT_NAME,
        )
    if process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, layout)


def _prompts_fingerprint(prompts: Dataset) -> str:
    """sha256 of the prompt ids and prompts, in order."""
    digest = hashlib.sha256()
    for prompt_id, prompt in zip(prompts["prompt_id"], prompts["prompt"]):
        digest.update(json.dumps([prompt_id, prompt], sort_keys=True).encode())
    return digest.hexdigest()


def _model_fingerprint(model) -> str:
    """sha256 of the policy's parameters (names, shapes, values): another checkpoint at the same path is detected."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _vllm_model_path(llm) -> str:
    return llm.llm_engine.model_config.model


def _checkpoint_fingerprint(model_name_or_path: str) -> str:
    """sha256 of a checkpoint's weight files (names and bytes), what a vLLM engine loaded; a hub id by its name."""
    digest = hashlib.sha256()
    path = Path(model_name_or_path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    if not files:
        logger.warning(
            "%s has no local weight files: the rollouts' model fingerprint is its name.", model_name_or_path
        )
        digest.update(str(model_name_or_path).encode())
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
