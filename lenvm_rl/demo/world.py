"""The demo world's build: the policy, its SFT run, and the cached, atomic [`build_demo_world`].

A world is a directory with `policy/` (a tiny Llama-style policy and its tokenizer), `data/train.jsonl`,
`data/test.jsonl` and `build_info.json`. This module owns [`DemoWorldConfig`], the policy's construction and
initialization, the SFT run with TRL's `SFTTrainer`, the fingerprint that decides whether a built world is
reused, and the choice between the two ways a world gets its policy: a checked copy of the policy shipped with
the package (the default, see `shipped.py`) or SFT from scratch (`rebuild=True`).
"""

import datetime
import hashlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from ..io import write_json_atomic, write_jsonl_atomic
from ..transformers_compat import ACTIVATION_CHECKPOINTING_FIELD
from .measure import reference_length_stats
from .problems import DEMO_INSTRUCTION, DEMO_SYSTEM_PROMPT, DemoProblem, demo_prompt, demo_rows, generate_demo_problems
from .shipped import copy_shipped_policy, file_sha256, load_shipped_manifest
from .tokenizer import DEMO_MAX_INTEGER, build_demo_tokenizer, demo_vocabulary_texts

logger = logging.getLogger(__name__)

__all__ = ["DEMO_WORLD_FORMAT", "DemoWorldConfig", "build_demo_world"]


@dataclass
class DemoWorldConfig:
    r"""
    Configuration of [`build_demo_world`]: data sizes, the policy's architecture and its SFT run.

    By default a world gets the policy shipped with the package, which was built once with seed 0 and these
    defaults, because a build depends on the machine's floating-point path (the same arguments gave 89.5% accuracy
    at temperature 1.0 on one machine and 73.3% on another). `rebuild=True` trains it from scratch instead: a
    0.62M-parameter policy in about 7 minutes on 2 CPU cores (one SFT thread: the model is too small for two to
    help); see the README for the measured figures. Many small steps beat fewer large ones here: batch 32 for 1500
    steps, or batch 8 for 3000, fitted the arithmetic far worse in the same time. Every field but `rebuild` enters
    the fingerprint that decides whether a built world is reused; which policy a world got enters it too.

    Parameters:
        num_train_problems (`int`, *optional*, defaults to `24000`):
            Problems in `data/train.jsonl`, each with one reference solution (SFT examples).
        num_test_problems (`int`, *optional*, defaults to `500`):
            Held-out problems in `data/test.jsonl`, disjoint from the training problems.
        hidden_size (`int`, *optional*, defaults to `96`):
            Width of the Llama-style policy.
        num_hidden_layers (`int`, *optional*, defaults to `4`):
            Decoder layers of the policy.
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Attention heads per layer.
        intermediate_size (`int`, *optional*, defaults to `384`):
            Width of the MLP of each layer.
        max_steps (`int`, *optional*, defaults to `6000`):
            SFT optimizer steps (a fixed number, so the build is deterministic).
        per_device_train_batch_size (`int`, *optional*, defaults to `4`):
            Sequences per SFT step.
        learning_rate (`float`, *optional*, defaults to `2e-3`):
            Peak AdamW learning rate (linear warm-up, cosine decay).
        warmup_steps (`int`, *optional*, defaults to `30`):
            Linear warm-up steps.
        number_embedding_frequencies (`int`, *optional*, defaults to `24`):
            At initialization, the first `2 * number_embedding_frequencies` dimensions of the embedding of each
            integer token n hold `cos` / `sin` of `2 pi f n / 200` for f = 1..F (see `_init_number_embeddings`);
            `0` keeps the plain random initialization.
        num_threads (`int`, *optional*, defaults to `1`):
            `torch.set_num_threads` during the build; results are reproducible for a given thread count.
        rebuild (`bool`, *optional*, defaults to `False`):
            Train the policy from scratch instead of copying the shipped one; required for any seed or config
            other than the shipped policy's (seed 0, the defaults).
    """

    num_train_problems: int = field(
        default=24000, metadata={"help": "Problems in data/train.jsonl, each with one reference solution."}
    )
    num_test_problems: int = field(
        default=500, metadata={"help": "Held-out problems in data/test.jsonl, disjoint from the training problems."}
    )
    hidden_size: int = field(default=96, metadata={"help": "Width of the Llama-style policy."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers of the policy."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per layer."})
    intermediate_size: int = field(default=384, metadata={"help": "Width of the MLP of each layer."})
    max_steps: int = field(
        default=6000, metadata={"help": "SFT optimizer steps (fixed, so builds are deterministic)."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per SFT step."})
    learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine decay)."}
    )
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    number_embedding_frequencies: int = field(
        default=24,
        metadata={"help": "Fourier features of n written into the embedding of integer n at init (0 disables)."},
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch.set_num_threads during the build; results are reproducible per count."}
    )
    rebuild: bool = field(
        default=False,
        metadata={
            "help": "Train the policy from scratch instead of copying the one shipped with the package (needed for "
            "any seed or config but seed 0 and the defaults)."
        },
    )

    def __post_init__(self):
        if self.num_train_problems < 1 or self.num_test_problems < 1:
            raise ValueError("--num_train_problems and --num_test_problems must be at least 1.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden_size ({self.hidden_size}) must be a multiple of --num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if 2 * self.number_embedding_frequencies > self.hidden_size:
            raise ValueError("--number_embedding_frequencies must be at most --hidden_size / 2.")
        if self.max_steps < 1:
            raise ValueError("--max_steps must be at least 1.")


def _make_policy(config: DemoWorldConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config)
    if config.number_embedding_frequencies:
        _init_number_embeddings(model, tokenizer, config.number_embedding_frequencies)
    return model


@torch.no_grad()
def _init_number_embeddings(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, num_frequencies: int) -> None:
    """
    Write Fourier features of n into the first `2 * num_frequencies` embedding dimensions of each integer token n:

        e_n[2j] = s cos(2 pi (j + 1) n / N),  e_n[2j + 1] = s sin(2 pi (j + 1) n / N),  N = DEMO_MAX_INTEGER + 1

    with `s = sqrt(2) * std(embeddings)` so the scale matches the random initialization. Adding b to n rotates each
    (cos, sin) pair by a fixed angle, the structure small transformers learn for modular addition (Nanda et al.,
    "Progress measures for grokking", 2023); starting from it, and from integers that are distinguishable and ordered
    from step 0 (the embeddings are tied), makes copying and arithmetic on numbers much faster to learn.
    """
    embeddings = model.get_input_embeddings().weight  # (V, H)
    numbers = torch.arange(DEMO_MAX_INTEGER + 1, dtype=torch.float32)[:, None]  # (N, 1)
    frequencies = torch.arange(1, num_frequencies + 1, dtype=torch.float32)[None, :]  # (1, F)
    angles = 2 * math.pi * frequencies * numbers / (DEMO_MAX_INTEGER + 1)  # (N, F)
    features = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)  # (N, 2F)
    token_ids = tokenizer.convert_tokens_to_ids([str(n) for n in range(DEMO_MAX_INTEGER + 1)])
    embeddings[token_ids, : 2 * num_frequencies] = features * math.sqrt(2) * embeddings.std()


def _train_policy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train_rows: list[dict],
    config: DemoWorldConfig,
    seed: int,
    work_dir: Path,
) -> dict:
    """SFT on the reference solutions, loss on completion tokens only; returns the trainer's final metrics."""
    dataset = Dataset.from_list(
        [
            {"prompt": demo_prompt(row["question"]), "completion": [{"role": "assistant", "content": row["answer"]}]}
            for row in train_rows
        ]
    )
    args = SFTConfig(
        output_dir=str(work_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        # Batches of similar lengths: with long-tailed completions, random batches are mostly padding.
        train_sampling_strategy="group_by_length",
        completion_only_loss=True,
        max_length=512,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        **{ACTIVATION_CHECKPOINTING_FIELD: False},
        dataloader_num_workers=0,
        logging_steps=max(1, config.max_steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    return dict(result.metrics)


DEMO_WORLD_FORMAT = 1  # bump when the generator or the build changes what a given seed and config produce


def _fingerprint(seed: int, config: DemoWorldConfig) -> str:
    """Fingerprint of the world SFT builds for `(seed, config)`; `config.rebuild` does not enter it."""
    # A sample of the data is hashed too, so a change to the problem or solution generator invalidates old worlds.
    sample = demo_rows(generate_demo_problems(16, seed=seed), seed)
    fields = {name: value for name, value in asdict(config).items() if name != "rebuild"}
    payload = {"format": DEMO_WORLD_FORMAT, "seed": seed, "config": fields, "sample": sample}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _shipped_fingerprint(seed: int, config: DemoWorldConfig, manifest: dict) -> str:
    """
    Fingerprint of the world made from the shipped policy; a `ValueError` naming `--rebuild` when the shipped
    policy was built for other arguments (or from other problems: the generator changed since it was shipped).
    """
    # The thread count changes how SFT runs, not which policy gets copied.
    trained_fingerprint = _fingerprint(seed, replace(config, num_threads=manifest["config"]["num_threads"]))
    if trained_fingerprint != manifest["fingerprint"]:
        fields = {name: value for name, value in asdict(config).items() if name not in ("rebuild", "num_threads")}
        differences = [f"{name}={value}" for name, value in fields.items() if manifest["config"].get(name) != value]
        differences += [f"seed={seed}"] if seed != manifest["seed"] else []
        reason = ", ".join(differences) or "problems the generator no longer writes the same way"
        raise ValueError(
            f"The demo policy shipped with lenvm-rl was built with seed {manifest['seed']} and the default config, "
            f"not for {reason}: pass --rebuild (rebuild=True) to train a policy for these arguments."
        )
    # A copied policy is not the one SFT would give on this machine: another world, which changes with the files.
    payload = {"trained": trained_fingerprint, "shipped_policy": manifest["files"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _reuse_world(output_dir: Path, fingerprint: str) -> Path:
    info_path = output_dir / "build_info.json"
    if not info_path.is_file():
        raise ValueError(f"{output_dir} exists and is not a demo world (no build_info.json): pass another output_dir.")
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        source = info.get("policy", {}).get("source", "trained")
        raise ValueError(
            f"{output_dir} holds a demo world built with other arguments (seed {info.get('seed')}, config "
            f"{info.get('config')}, {source} policy): pass another output_dir, or delete it to rebuild."
        )
    logger.info("Reusing the demo world in %s (fingerprint %s).", output_dir, fingerprint)
    return output_dir


def build_demo_world(output_dir: str | os.PathLike, seed: int = 0, config: DemoWorldConfig | None = None) -> Path:
    """
    Build the demo world into `output_dir`, or reuse it if it was already built with the same arguments.

    The directory holds `policy/` (the SFT policy and its tokenizer, loadable with `AutoModelForCausalLM` and
    `AutoTokenizer`), `data/train.jsonl` and `data/test.jsonl` (GSM8K columns `question`, `answer` plus `id`,
    `num_steps`, `style`, `theme`, `num_checks`, `start`, `operations`; test problems never occur in train) and
    `build_info.json` (arguments, fingerprint, sizes, data length statistics, training metrics, where the policy
    comes from, build time, versions).

    The policy: by default a copy of the one shipped with the package, after checking the sha256 of every file
    against its manifest (a mismatch raises a `ValueError` naming the file) and that the generated problem files
    are byte for byte those it was trained on; this needs seed 0 and the default config. With `config.rebuild`
    it is trained here instead, which takes minutes and depends on the machine's floating-point path.
    Caching: `build_info.json` stores a fingerprint of `(seed, config)` and, for a copied policy, of the shipped
    files; an existing world with the same fingerprint is returned as is, and one with another fingerprint (other
    arguments, or a policy made the other way) raises a `ValueError` (it is never overwritten).
    Atomicity: the world is built in a temporary directory next to `output_dir` and moved into place with one
    `os.replace`, so an interrupted build leaves no partial world. Determinism: a fixed number of SFT steps and
    seeded data, initialization and data order; bit-identical for the same seed, config, thread count and versions.

    Args:
        output_dir (`str` or `os.PathLike`):
            Where the world goes; it must not exist, be empty, or hold a world built with the same arguments.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the problems, solutions, initialization and SFT data order.
        config ([`DemoWorldConfig`], *optional*):
            Sizes and training settings; defaults to `DemoWorldConfig()`.

    Returns:
        `Path`: `output_dir`.
    """
    config = config or DemoWorldConfig()
    output_dir = Path(output_dir)
    if config.rebuild:
        fingerprint = _fingerprint(seed, config)
    else:
        fingerprint = _shipped_fingerprint(seed, config, load_shipped_manifest())
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        return _reuse_world(output_dir, fingerprint)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    work_dir.chmod(0o777 & ~umask)  # mkdtemp makes it private; the world is an ordinary directory
    try:
        _build_world_into(work_dir, seed, config, fingerprint)
        try:
            os.replace(work_dir, output_dir)
        except OSError:
            if not (output_dir / "build_info.json").is_file():
                raise
            # Another process built the same directory meanwhile: keep its world if it is ours.
            shutil.rmtree(work_dir)
            return _reuse_world(output_dir, fingerprint)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return output_dir


def _build_world_into(work_dir: Path, seed: int, config: DemoWorldConfig, fingerprint: str) -> None:
    start_time = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        # 1. The shipped policy, checked and copied first: a corrupted install fails before any other work.
        manifest = None if config.rebuild else copy_shipped_policy(work_dir)

        # 2. Problems: the first `num_test_problems` are held out; questions are distinct, so the splits are disjoint.
        problems = generate_demo_problems(config.num_test_problems + config.num_train_problems, seed=seed)
        test_problems, train_problems = problems[: config.num_test_problems], problems[config.num_test_problems :]
        train_rows, test_rows = demo_rows(train_problems, seed), demo_rows(test_problems, seed)
        (work_dir / "data").mkdir()
        write_jsonl_atomic(work_dir / "data" / "train.jsonl", train_rows)
        write_jsonl_atomic(work_dir / "data" / "test.jsonl", test_rows)

        # 3. Tokenizer and policy: trained here, or the shipped ones, which must have seen exactly these problems.
        if manifest is None:
            policy = _train_world_policy(work_dir, train_problems, train_rows, config, seed)
        else:
            policy = _shipped_world_policy(work_dir, seed, manifest)

        # 4. Build info, written last.
        info = {
            "format": DEMO_WORLD_FORMAT,
            "fingerprint": fingerprint,
            "seed": seed,
            "config": asdict(config),
            "num_train_problems": len(train_rows),
            "num_test_problems": len(test_rows),
            "prompt": {"system_prompt": DEMO_SYSTEM_PROMPT, "instruction": DEMO_INSTRUCTION},
            **policy,
            "build_seconds": round(time.perf_counter() - start_time, 1),
            "num_threads": config.num_threads,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }
        write_json_atomic(work_dir / "build_info.json", info)
    finally:
        torch.set_num_threads(previous_threads)


def _train_world_policy(
    work_dir: Path, train_problems: list[DemoProblem], train_rows: list[dict], config: DemoWorldConfig, seed: int
) -> dict:
    """Train the tokenizer and the policy into `work_dir/policy`; returns their entries of `build_info.json`."""
    # Tokenizer, trained on a fixed corpus that covers every word plus the training data.
    train_texts = (text for row in train_rows for text in (row["question"], row["answer"]))
    tokenizer = build_demo_tokenizer(itertools.chain(demo_vocabulary_texts(), train_texts))

    # Policy: SFT from a seeded random initialization.
    model = _make_policy(config, tokenizer, seed)
    metrics = _train_policy(model, tokenizer, train_rows, config, seed, work_dir / "sft")
    shutil.rmtree(work_dir / "sft", ignore_errors=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(work_dir / "policy")
    tokenizer.save_pretrained(work_dir / "policy")
    return {
        "vocab_size": len(tokenizer),
        "num_parameters": model.num_parameters(),
        "data_lengths": reference_length_stats(train_problems, tokenizer, seed),
        "train_metrics": metrics,
        "policy": {"source": "trained"},
    }


def _shipped_world_policy(work_dir: Path, seed: int, manifest: dict) -> dict:
    """Check the generated problem files against the shipped policy's; returns its entries of `build_info.json`."""
    for name, expected in manifest["data"].items():
        if file_sha256(work_dir / name) != expected:
            raise ValueError(
                f"{name} generated for seed {seed} differs from the problems the shipped demo policy was trained "
                "on (the generator changed since it was shipped): pass --rebuild, or re-ship the policy (see "
                "lenvm_rl/demo/shipped.py)."
            )
    build = manifest["build"]
    # Same problems, same tokenizer (both checked by hash): the build's statistics describe this world as they are.
    return {
        "vocab_size": build["vocab_size"],
        "num_parameters": build["num_parameters"],
        "data_lengths": build["data_lengths"],
        "train_metrics": build["train_metrics"],
        "policy": {
            "source": "shipped",
            "files": manifest["files"],
            **{name: build[name] for name in ("built_at", "build_seconds", "num_threads", "versions")},
        },
    }


def _versions() -> dict[str, str]:
    return {
        "lenvm_rl": importlib.metadata.version("lenvm-rl"),
        "python": platform.python_version(),
        **{name: importlib.metadata.version(name) for name in _VERSIONED_PACKAGES},
    }


_VERSIONED_PACKAGES = ("torch", "transformers", "trl", "tokenizers", "datasets", "accelerate")
