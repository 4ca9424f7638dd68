"""What every benchmark shares: the 135M model, the machine description, paired ratios and the results file.

Imports nothing from lenvm_rl at module level: `benchmarks/ppo_overhead.py` also runs in a virtualenv with TRL 1.12
and without lenvm_rl.

Machines here are shared and noisy, so a benchmark never reports an absolute time alone: it runs its two arms
alternately (A, B, A, B, ...), takes the ratio of each pair and reports the median ratio with its spread.
"""

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SMOLLM2_DIR = ROOT / "outputs" / "smollm2" / "model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct float32 checkpoint (`make smollm2`), built offline on first use."""
    from lenvm_rl.smollm2 import materialize_smollm2

    return materialize_smollm2(SMOLLM2_DIR)


def load_smollm2(dtype: str = "float32"):
    """The real SmolLM2-135M-Instruct policy, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=DTYPES[dtype]).eval()


def smollm2_config():
    """SmolLM2-135M's `LlamaConfig`, for benchmarks that need its shape but not its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(smollm2_dir())


def machine() -> dict:
    """CPU model, cores, threads, load and the torch build, so that a ratio can be traced to where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )  # fmt: skip
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    try:
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = git.stdout.strip() or None
    except OSError:
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "torch_build": {
            "cuda": torch.version.cuda,
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def spread(values: list[float]) -> dict:
    """Median, min, max and count of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratio(numerators: list[float], denominators: list[float]) -> dict:
    """Spread of the pairwise ratios `numerators[i] / denominators[i]` (each pair measured back to back)."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {**spread(ratios), "ratios": ratios}


def save(result: dict, output: str | os.PathLike) -> None:
    """Write `result` as JSON (atomic) and say where."""
    from lenvm_rl.io import write_json_atomic

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, result)
    print(f"Wrote {output}")
