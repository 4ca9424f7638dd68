"""Fault injection: sampling, LenVM training and PPO are killed (SIGKILL) at random times and in the middle of writing
a checkpoint, restarted, and must end with exactly the outputs of an uninterrupted run, nothing lost or duplicated.

Each job runs `tests/scripts/fault_injection_job.py` in a subprocess on tiny offline models (one CPU thread, so runs
are bit-for-bit reproducible). About 3 minutes on 2 cores: marked `slow` (`make test-slow`).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from safetensors.torch import load_file

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import load_rollouts

pytestmark = pytest.mark.slow

JOB = Path(__file__).parent / "scripts" / "fault_injection_job.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_world")
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm("llama")
    policy.generation_config.eos_token_id = 1
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=7), gamma=0.9).save_pretrained(
        root / "lenvm", tokenizer=tokenizer
    )
    (root / "data").mkdir()
    for split, numbers in (("train", range(1, 13)), ("test", range(20, 24))):
        rows = [{"question": f"what is {i} + {i} ?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in numbers]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def configs(world, output_dir: Path) -> dict[str, dict]:
    common = {"report_to": "none", "use_cpu": True, "bf16": False, "disable_tqdm": True, "seed": 0}
    return {
        "sample": {
            "model_name_or_path": str(world / "policy"),
            "output_dir": str(output_dir),
            "dataset_name": str(world / "data"),
            "instruction": None,
            "num_samples": 3,
            "max_new_tokens": 8,
            "batch_size": 6,
            "chunk_size": 2,
            "seed": 0,
        },
        "train_lenvm": {
            "model_name_or_path": str(world / "policy"),
            "train_rollouts": str(world / "rollouts"),
            "output_dir": str(output_dir),
            "gamma": 0.9,
            "per_device_train_batch_size": 4,
            "num_train_epochs": 3,
            "learning_rate": 1.0e-3,
            "lr_scheduler_type": "constant",
            "save_strategy": "steps",
            "save_steps": 2,
            **common,
        },
        "ppo": {
            "model_name_or_path": str(world / "policy"),
            "dataset_name": str(world / "data"),
            "instruction": None,
            "num_eval_problems": 4,
            "eval_batch_size": 4,
            "output_dir": str(output_dir),
            "per_device_train_batch_size": 4,
            "total_episodes": 16,
            "response_length": 6,
            "num_ppo_epochs": 1,
            "learning_rate": 1.0e-2,
            "local_rollout_forward_batch_size": 4,
            "save_strategy": "steps",
            "save_steps": 1,
            "lenvm_model_name_or_path": str(world / "lenvm"),
            "length_mode": "advantage",
            "length_coef": 0.5,
            **common,
        },
    }


def run(job: str, config: dict, path: Path, kill_in_checkpoint=None, kill_after=None) -> bool:
    """Run one job; True if it finished, False if it was killed (by injection or after `kill_after` seconds)."""
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    command = [sys.executable, str(JOB), job, "--config", str(path)]
    if kill_in_checkpoint is not None:
        command += ["--kill_in_checkpoint", str(kill_in_checkpoint)]
    log = path.with_suffix(".log").open("a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return False
    if process.returncode == -signal.SIGKILL:
        return False
    assert process.returncode == 0, path.with_suffix(".log").read_text()[-3000:]
    return True


def outputs(job: str, output_dir: Path):
    """What must equal an uninterrupted run's: every record, or the final weights."""
    if job == "sample":
        records = load_rollouts(output_dir)  # refuses duplicated records
        return sorted(json.dumps(record, sort_keys=True) for record in records)
    if job == "train_lenvm":
        return load_file(output_dir / "value_head.safetensors") | load_file(output_dir / "model.safetensors")
    return load_file(output_dir / "model.safetensors")


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(scope="module")
def references(world, tmp_path_factory):
    """Uninterrupted runs of each job (the sampling output also feeds LenVM training)."""
    root = tmp_path_factory.mktemp("reference")
    result, durations = {}, {}
    for job in ("sample", "train_lenvm", "ppo"):
        output_dir = world / "rollouts" if job == "sample" else root / job
        start = time.perf_counter()
        assert run(job, configs(world, output_dir)[job], root / f"{job}.yaml")
        durations[job] = time.perf_counter() - start
        result[job] = outputs(job, output_dir)
    return result, durations


@pytest.mark.parametrize("job", ["sample", "train_lenvm", "ppo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_and_restarted_runs_equal_an_uninterrupted_one(world, references, tmp_path, job, seed):
    reference, durations = references
    rng = random.Random(f"{job}-{seed}")
    output_dir = tmp_path / "run"
    config = configs(world, output_dir)[job]
    # Seed 0: killed while writing its 2nd checkpoint (chunk); others: killed at a random time, then again.
    kills = [dict(kill_in_checkpoint=2)] if seed == 0 else []
    kills += [dict(kill_after=rng.uniform(0.3, 0.9) * durations[job]) for _ in range(2)]
    killed = 0
    for attempt, kill in enumerate(kills):
        killed += not run(job, config, tmp_path / f"attempt{attempt}.yaml", **kill)
    assert run(job, config, tmp_path / "final.yaml")  # the restart that finishes
    if seed == 0:
        assert killed >= 1  # the injected kill always fires
    assert same(outputs(job, output_dir), reference[job])
