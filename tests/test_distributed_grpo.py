"""Two-process LenVM-GRPO runs on CPU through `accelerate launch` (gloo): DDP with KL, and DeepSpeed ZeRO-3.

Each test launches tests/scripts/lenvm_grpo_distributed.py with a config from accelerate_configs/ and reads the facts
it prints. Multi-process runs fail silently in known ways on CPU (shared/docs/distributed_on_cpu.md), so every test
checks that the processes really worked together rather than trusting the exit code: a world of 2, different prompts
per rank yet equal parameter checksums after the updates, length advantages normalised over *both* ranks' tokens,
and under ZeRO-3 a LenVM that holds half its weights per rank and gives the values of an unsharded forward.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from safetensors import safe_open

from lenvm_rl.modeling import LengthValueModel

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "lenvm_grpo_distributed.py"
CONFIGS = ROOT / "accelerate_configs"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A saved policy (GRPO rebuilds the KL reference from its path) and a saved LenVM, both with the tokenizer."""
    root = tmp_path_factory.mktemp("dist_grpo")
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm("llama")
    policy.generation_config.eos_token_id = [1, *range(10, 50)]  # completions of mixed lengths, some cut
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(7)
    LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=7), gamma=0.9).save_pretrained(
        root / "lenvm", tokenizer=tokenizer
    )
    return root / "policy", root / "lenvm"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config, scenario, model_dirs, output_dir, use_cpu):
    """Run the script on 2 processes; returns the fact lines both ranks wrote. Success = both ranks printed their
    final "done" line (the script leaves with `os._exit(0)` after a clean `end_training`; a non-zero code after both
    "done" lines could only be the gloo exit race of shared/docs/distributed_on_cpu.md)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    policy, lenvm = model_dirs
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
        "--policy",
        str(policy),
        "--lenvm",
        str(lenvm),
        "--output_dir",
        str(output_dir),
    ]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Searched, not matched per line: the ranks share stdout, so another process's output may share the line.
    assert "done rank=0" in proc.stdout and "done rank=1" in proc.stdout, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return [line for rank in (0, 1) for line in (output_dir / f"facts_rank{rank}.txt").read_text().splitlines()]


def facts(lines, key):
    """`{(tag, rank): value}` of the lines `KEY tag rank=R value` (or `{rank: value}` for `KEY rank=R value`)."""
    out = {}
    for line in lines:
        match = re.match(rf"{key} (?:(\S+) )?rank=(\d) (.*)$", line)
        if match:
            tag, rank, value = match.groups()
            out[(tag, int(rank)) if tag else int(rank)] = value
    return out


def check_ranks_trained_together(lines, name):
    prompts, checksums = facts(lines, "PROMPTS"), facts(lines, "CHECKSUM")
    assert prompts[(name, 0)] != prompts[(name, 1)]  # each rank generated for its own prompts ...
    assert checksums[(name, 0)] == checksums[(name, 1)]  # ... and the parameters still agree: gradients were synced
    logged = facts(lines, "LOGGED_LENGTHS")
    assert logged[(name, 0)] == logged[(name, 1)]  # length/ metrics are gathered, not per rank
    # A_len / rms(A_len) has unit mean square over the loss tokens of both ranks together (2 generation batches).
    squares = facts(lines, "LENGTH_SQUARES")
    for step in (0, 1):
        shares = [squares[(f"{name}{step}", rank)].split() for rank in (0, 1)]
        total, count = sum(float(s) for s, _ in shares), sum(int(n) for _, n in shares)
        assert count > 0 and total == pytest.approx(count, rel=1e-5)


def test_ddp_synchronises_and_keeps_the_lenvm_out(model_dirs, tmp_path):
    lines = launch("cpu_ddp.yaml", "ddp", model_dirs, tmp_path, use_cpu=True)
    assert set(facts(lines, "WORLD").values()) == {"2 DistributedType.MULTI_CPU"}
    check_ranks_trained_together(lines, "ddp")
    assert set(facts(lines, "LENVM_UNCHANGED").values()) == {"True"}
    checkpoint = tmp_path / "checkpoint-1"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        assert not [key for key in handle.keys() if "v_head" in key or key.startswith("lenvm")]
    assert not list(checkpoint.rglob("value_head.safetensors")) and not list(checkpoint.rglob("lenvm_config.json"))


def test_zero3_shards_the_lenvm_and_matches_the_unsharded_values(model_dirs, tmp_path):
    lines = launch("cpu_zero3.yaml", "zero3", model_dirs, tmp_path, use_cpu=False)
    assert set(facts(lines, "WORLD").values()) == {"2 DistributedType.DEEPSPEED"}
    check_ranks_trained_together(lines, "zero3")
    engines = facts(lines, "LENVM_ENGINE")
    assert set(engines) == {0, 1}
    for engine in engines.values():
        kind, local, full = re.match(r"(\S+) local=(\d+) full=(\d+)", engine).groups()
        assert kind == "DeepSpeedEngine" and int(local) < 0.6 * int(full), engine  # about half of it per rank

    lenvm = LengthValueModel.from_pretrained(model_dirs[1])
    gathered = torch.load(tmp_path / "lenvm_gathered.pt")
    assert gathered.keys() == lenvm.state_dict().keys()
    assert all(torch.equal(gathered[k], v) for k, v in lenvm.state_dict().items())  # frozen: the weights on disk

    for rank in (0, 1):
        records = torch.load(tmp_path / f"records_rank{rank}.pt")
        assert len(records) == 2  # two generation batches
        for record in records:
            P = record["prompt_ids"].shape[1]
            input_ids = torch.cat([record["prompt_ids"], record["completion_ids"]], dim=1)
            mask = torch.cat([record["prompt_mask"], record["response_mask"].long()], dim=1)
            with torch.no_grad():
                values = lenvm(input_ids, attention_mask=mask).values[:, P - 1 :]
            columns = torch.arange(values.shape[1])
            real = columns[None, :] <= record["response_mask"].sum(1, keepdim=True)  # s_0 .. s_L of each row
            torch.testing.assert_close(record["length_values"][real], values[real], atol=1e-5, rtol=1e-5)
