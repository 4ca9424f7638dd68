"""Two-process LenVM-PPO runs on CPU through `accelerate launch` (gloo): DDP, DDP + LoRA, DeepSpeed ZeRO-3.

Each test launches tests/scripts/lenvm_ppo_distributed.py with a config from accelerate_configs/ and reads the facts it
prints. Multi-process runs fail silently in known ways on CPU (shared/docs/distributed_on_cpu.md), so every test checks
that the processes really worked together rather than trusting the exit code: equal parameter checksums on both ranks
after updates on different per-rank prompts, and under ZeRO-3 a LenVM that holds half its weights per rank and gives
the values of an unsharded single-process forward.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer

from lenvm_rl.modeling import LengthValueModel

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lenvm_ppo_distributed.py"
CONFIGS = ROOT / "accelerate_configs"


@pytest.fixture(scope="module")
def lenvm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "lenvm"
    torch.manual_seed(7)
    LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=7), gamma=0.9).save_pretrained(
        path, tokenizer=make_tiny_tokenizer()
    )
    return path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config, scenario, lenvm_dir, output_dir, use_cpu):
    """Run the script on 2 processes; returns its stdout lines. Success = both ranks printed their final "done" line
    (a gloo thread can abort at interpreter exit after a correct run: the script exits with `os._exit(0)`, and a
    non-zero code after both "done" lines would still be such an exit race)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--scenario",
        scenario,
        "--lenvm",
        str(lenvm_dir),
        "--output_dir",
        str(output_dir),
    ]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    done = {line for line in lines if line.startswith("done rank=")}
    assert done == {"done rank=0", "done rank=1"}, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return lines


def facts(lines, key):
    """`{(tag, rank): value}` of the lines `KEY tag rank=R value` (or `{rank: value}` for `KEY rank=R value`)."""
    out = {}
    for line in lines:
        match = re.search(rf"\b{key} (?:(\S+) )?rank=(\d) (.*)$", line)  # search: another rank's log may precede
        if match:
            tag, rank, value = match.groups()
            out[(tag, int(rank)) if tag else int(rank)] = value
    return out


def test_ddp_synchronises_saves_and_resumes_full_and_lora(lenvm_dir, tmp_path):
    lines = launch("cpu_ddp.yaml", "ddp", lenvm_dir, tmp_path, use_cpu=True)
    assert set(facts(lines, "WORLD").values()) == {"2 DistributedType.MULTI_CPU"}
    prompts, checksums = facts(lines, "PROMPTS"), facts(lines, "CHECKSUM")
    for name in ("full", "lora"):
        assert prompts[(name, 0)] != prompts[(name, 1)]  # each rank trained on its own prompts ...
        assert (
            checksums[(name, 0)] == checksums[(name, 1)]
        )  # ... and the parameters still agree: gradients were synced
        for rank in (0, 1):
            assert facts(lines, "RESUME_MATCH")[(name, rank)] == "True"
            assert facts(lines, "LENVM_UNCHANGED")[(name, rank)] == "True"
        checkpoint = tmp_path / name / "a" / "checkpoint-1"
        assert (checkpoint / "value_model" / "model.safetensors").is_file()
        assert not list(checkpoint.rglob("value_head.safetensors"))  # the LenVM is never saved
    assert checksums[("full", 0)] != checksums[("lora", 0)]
    assert (tmp_path / "lora" / "a" / "checkpoint-1" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_without_the_cpu_flag_is_caught(lenvm_dir, tmp_path):
    """The silent failure: without ACCELERATE_USE_CPU each process believes it is alone (exit code 0). Both then take
    process 0's prompts and end with equal checksums, so equal checksums prove synchronisation only together with
    different per-rank prompts and a world of 2, which the test above checks and this run fails."""
    lines = launch("cpu_ddp.yaml", "ddp", lenvm_dir, tmp_path, use_cpu=False)
    assert set(facts(lines, "WORLD").values()) == {"1 DistributedType.NO"}
    prompts = facts(lines, "PROMPTS")
    assert prompts[("full", 0)] == prompts[("full", 1)]


def test_zero3_shards_the_lenvm_and_matches_the_unsharded_values(lenvm_dir, tmp_path):
    pytest.importorskip("deepspeed")  # in the `dev` extra
    lines = launch("cpu_zero3.yaml", "zero3", lenvm_dir, tmp_path, use_cpu=False)
    assert set(facts(lines, "WORLD").values()) == {"2 DistributedType.DEEPSPEED"}
    checksums = facts(lines, "CHECKSUM")
    assert checksums[("zero3", 0)] == checksums[("zero3", 1)]
    engines = facts(lines, "LENVM_ENGINE")
    assert set(engines) == {0, 1}
    for engine in engines.values():
        kind, local, full = re.match(r"(\S+) local=(\d+) full=(\d+)", engine).groups()
        assert kind == "DeepSpeedEngine" and int(local) < 0.6 * int(full), engine  # about half of it per rank

    lenvm = LengthValueModel.from_pretrained(lenvm_dir)
    gathered = torch.load(tmp_path / "lenvm_gathered.pt")
    assert gathered.keys() == lenvm.state_dict().keys()
    assert all(torch.equal(gathered[k], v) for k, v in lenvm.state_dict().items())  # frozen: the weights on disk

    prompts = []
    for rank in (0, 1):
        records = torch.load(tmp_path / f"records_rank{rank}.pt")
        assert len(records) == 2  # two updates
        prompts.append(records[0]["prompts"])
        for record in records:
            mask, C = record["attention_mask"], record["context_length"]
            with torch.no_grad():
                values = lenvm(record["query_responses"], attention_mask=mask).values[:, C - 1 :]
            torch.testing.assert_close(record["length_values"], values, atol=1e-5, rtol=1e-5)
    assert prompts[0] != prompts[1]


def test_lenvm_trainer_ddp_step_equals_one_process_on_the_union(tmp_path):
    """LenVMTrainer under DDP: the loss is normalised by the target count of both ranks, so one step on 2 x 2
    sequences gives the parameters of a single-process step on the same 4 sequences."""
    from test_lenvm_trainer import make_records, tiny_args

    from lenvm_rl.trainers.lenvm import LenVMTrainer

    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    script = ROOT / "tests" / "scripts" / "lenvm_trainer_distributed.py"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_ddp.yaml")]
    command += ["--main_process_port", str(free_port()), str(script), "--output_dir", str(tmp_path / "ddp")]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "done rank=0" in proc.stdout and "done rank=1" in proc.stdout, proc.stderr[-4000:]
    facts = [json.loads((tmp_path / "ddp" / f"facts-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [f["world"] for f in facts] == [2, 2]
    assert facts[0]["checksum"] == facts[1]["checksum"]  # the ranks really synchronised
    checksums = {"rank=0": facts[0]["checksum"]}

    model = LengthValueModel.from_backbone(make_tiny_causal_lm("qwen2", seed=3), gamma=0.9)
    args = tiny_args(tmp_path / "single", per_device_train_batch_size=4, max_steps=1)
    LenVMTrainer(model, args=args, train_dataset=make_records(num=8)).train()
    single = sum(p.detach().double().sum().item() for p in model.parameters())
    assert abs(single - checksums["rank=0"]) < 1e-6 * max(1.0, abs(single))
