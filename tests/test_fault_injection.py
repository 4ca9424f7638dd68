"""Fault injection: sampling, LenVM training and PPO are killed (SIGKILL) at random times and in the middle of writing
a checkpoint, restarted, and must end with exactly the outputs of an uninterrupted run, nothing lost or duplicated.
A second run started into a running one's directory is refused, a killed run restarted with another config is refused,
and a disk that fills while a checkpoint is written names it and leaves the previous one to resume from.

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


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    return path


def start(job: str, config: dict, path: Path, *flags: str) -> subprocess.Popen:
    """Start one job with its config written to `path`, its output to `path` with the suffix `.log`."""
    command = [sys.executable, str(JOB), job, "--config", str(write_yaml(path, config)), *flags]
    log = path.with_suffix(".log").open("a")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV)


def run(job: str, config: dict, path: Path, kill_in_checkpoint=None, kill_after=None) -> bool:
    """Run one job; True if it finished, False if it was killed (by injection or after `kill_after` seconds)."""
    flags = [] if kill_in_checkpoint is None else ["--kill_in_checkpoint", str(kill_in_checkpoint)]
    process = start(job, config, path, *flags)
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


def test_a_second_run_into_a_running_ones_directory_is_refused(world, references, tmp_path):
    reference, _ = references
    output_dir = tmp_path / "run"
    config = configs(world, output_dir)["ppo"]
    first = start("ppo", config, tmp_path / "first.yaml")
    while not (output_dir / "run_manifest.json").is_file():  # the first run holds the directory from here on
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, the lock still held
    try:
        second = start("ppo", config, tmp_path / "second.yaml")
        assert second.wait(timeout=600) == 1
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"being written by another process (PID {first.pid} on host" in (tmp_path / "second.log").read_text()
    assert first.wait(timeout=600) == 0
    assert same(outputs("ppo", output_dir), reference["ppo"])  # the second run changed nothing
    assert run("ppo", config, tmp_path / "again.yaml")  # once it ended, a start finds the finished run: a no-op
    assert "nothing to do" in (tmp_path / "again.log").read_text()


def test_a_killed_run_restarted_with_another_config_is_refused(world, references, tmp_path):
    reference, _ = references
    output_dir = tmp_path / "run"
    config = configs(world, output_dir)["train_lenvm"]
    assert not run("train_lenvm", config, tmp_path / "killed.yaml", kill_in_checkpoint=2)
    assert start("train_lenvm", {**config, "learning_rate": 2.0e-3}, tmp_path / "changed.yaml").wait() == 1
    log = (tmp_path / "changed.log").read_text()
    assert "training_args.learning_rate: 0.001 -> 0.002" in log and "--overwrite_output_dir" in log
    assert run("train_lenvm", config, tmp_path / "final.yaml")  # the original config resumes it
    assert same(outputs("train_lenvm", output_dir), reference["train_lenvm"])


def can_mount_a_tmpfs(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    command = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"]
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_a_full_disk_names_the_checkpoint_and_the_run_resumes_once_space_is_freed(world, references, tmp_path):
    """On a real, small file system (a tmpfs in a user namespace) that fills up after the first checkpoint."""
    if not can_mount_a_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    reference, _ = references
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    output_dir = disk / "run"
    config = write_yaml(tmp_path / "lenvm.yaml", configs(world, output_dir)["train_lenvm"])
    job = f"{sys.executable} {JOB} train_lenvm --config {config}"
    script = f"""
        mount -t tmpfs -o size=32m tmpfs {disk} || exit 90
        {job} --fill_disk_after_checkpoint 1 > {tmp_path / "full.log"} 2>&1 && exit 91
        rm {disk / "filler"}
        {job} > {tmp_path / "resumed.log"} 2>&1 || exit 92
        cp -r {output_dir} {kept}
    """
    finished = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, (finished.returncode, (tmp_path / "full.log").read_text()[-3000:])
    full = (tmp_path / "full.log").read_text()
    assert (  # checkpoints every 2 steps and at the last, the 3rd
        f"no space left on device while writing {output_dir / 'checkpoint-3'}; the previous checkpoint "
        f"{output_dir / 'checkpoint-2'} is intact"
    ) in full
    assert same(outputs("train_lenvm", kept), reference["train_lenvm"])
