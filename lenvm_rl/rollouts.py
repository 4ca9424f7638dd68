"""Sampling the completions a LenVM is pretrained on: resumable, sharded per process, atomic.

Layout of a rollout directory::

    rollouts/
      rollouts_config.json               sampling parameters, generator model, seed (a resume must match them)
      shard-00000-of-00002/chunk-000000.jsonl   process 0's records, one chunk of prompts per file
      shard-00001-of-00002/chunk-000000.jsonl   process 1's records

A chunk file holds every completion of its prompts and appears in one ``os.replace``: a crash loses at most
the chunk in flight and never leaves a partial file, and a re-run skips the chunks already on disk, so
interrupting and re-running gives exactly the records of an uninterrupted run (same seeds per chunk).
``load_rollouts(dir)`` reads everything back as one `datasets.Dataset`.
"""

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset
from tqdm.auto import tqdm

from .generation import generate_completions

logger = logging.getLogger(__name__)

__all__ = ["ROLLOUTS_CONFIG_NAME", "SamplingConfig", "load_rollouts", "sample_rollouts"]

ROLLOUTS_CONFIG_NAME = "rollouts_config.json"


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
    """

    num_samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    seed: int = 0
    generator_model: str = field(default="")


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
        model (`PreTrainedModel`): The policy, in eval mode on its device.
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
    output_dir = Path(output_dir)
    _write_or_check_config(output_dir, sampling, process_index)
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
        completions = generate_completions(
            model,
            tokenizer,
            list(batch["prompt"]),
            num_samples=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            batch_size=batch_size,
            seed=seed,
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
        _write_jsonl_atomic(shard_dir / f"chunk-{k:06d}.jsonl", records)
        progress.update(len(records))
        progress.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    progress.close()
    return shard_dir


def load_rollouts(path: str | os.PathLike) -> Dataset:
    """Load every record of a rollout directory (all shards and chunks) as one `datasets.Dataset`."""
    path = Path(path)
    files = sorted(str(f) for f in path.glob("shard-*/chunk-*.jsonl")) if path.is_dir() else [str(path)]
    if not files:
        raise FileNotFoundError(f"No rollout files under {path} (expected shard-*/chunk-*.jsonl).")
    return load_dataset("json", data_files=files, split="train")


def _write_or_check_config(output_dir: Path, sampling: SamplingConfig, process_index: int) -> None:
    config_path = output_dir / ROLLOUTS_CONFIG_NAME
    if config_path.exists():
        stored = json.loads(config_path.read_text())
        if stored != asdict(sampling):
            changed = {k: (stored.get(k), v) for k, v in asdict(sampling).items() if stored.get(k) != v}
            raise ValueError(
                f"{output_dir} holds rollouts sampled with other parameters {changed} (stored, requested): mixing "
                "them would give the LenVM two policies' lengths. Use a new output_dir or the stored parameters."
            )
        return
    if process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(config_path, json.dumps(asdict(sampling), indent=2) + "\n")


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    _write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
