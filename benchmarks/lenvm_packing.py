"""Packed (padding-free) versus padded LenVM training: tokens/s and peak memory, side by side in one run.

    python benchmarks/lenvm_packing.py --model tiny --steps 12 --batch_size 16
    python benchmarks/lenvm_packing.py --model smollm2 --steps 4 --batch_size 8

Completion lengths are log-normal (median ~60 tokens, long tail capped at 512), the distribution LenVM
training data has. Both modes train the same randomly initialised LenVM on the same batches: `tiny`, a CPU-sized
Llama (vocab 2048, hidden 256, 4 layers, 3.2M parameters); `smollm2`, SmolLM2-135M's config
(`outputs/smollm2/model/config.json`) with random weights (throughput does not depend on them). Speed steps are
interleaved (padded, packed, packed, padded, ...) after one warm-up step each, so that machine noise hits both
alike; the headline is the median over steps of the paired ratio of step times (both modes see the same tokens),
and tokens/s counts real (non-padding) tokens. Peak memory is the maximum resident set size of one child process
per mode running the same steps (CPU torch has no allocator statistics). Prints and saves the ratios.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from bench_utils import RESULTS, machine, paired_ratio, save, smollm2_config
from transformers import LlamaConfig, LlamaForCausalLM

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.targets import LenVMDataCollator


def make_model(name, seed=0):
    torch.manual_seed(seed)
    if name == "smollm2":
        config = smollm2_config()
    else:
        config = LlamaConfig(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            pad_token_id=0,
            eos_token_id=1,
        )
    return LengthValueModel.from_backbone(LlamaForCausalLM(config), gamma=0.99)


def make_batches(num_batches, batch_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        examples = []
        for _ in range(batch_size):
            prompt_len = int(torch.randint(20, 60, (1,), generator=g))
            length = int(torch.exp(torch.randn(1, generator=g) * 0.8 + 4.1).clamp(2, 512))  # median ~60
            ids = torch.randint(3, 2048, (prompt_len + length,), generator=g)
            ids[-1] = 1
            examples.append(
                {
                    "input_ids": ids.tolist(),
                    "completion_start": prompt_len,
                    "completion_length": length,
                    "terminated": True,
                }
            )
        batches.append(examples)
    return batches


def train_step(model, optimizer, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    values = model(**inputs).values.double()
    mask = batch["target_mask"]
    loss = (((values - batch["length_targets"]) ** 2) * mask).sum() / mask.sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_mode(name, padding_free, steps, batch_size):
    """Train `steps` steps in one mode; used by the child processes that measure peak memory."""
    model = make_model(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collator = LenVMDataCollator(gamma=0.99, pad_token_id=0, padding_free=padding_free)
    for examples in make_batches(steps, batch_size):
        train_step(model, optimizer, collator(examples))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="default: benchmarks/results/lenvm_packing_<model>.json")
    parser.add_argument("--child", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    if args.child:
        peak = run_mode(args.model, args.child == "packed", args.steps, args.batch_size)
        print(json.dumps({"peak_rss_mib": peak}))
        return

    # Memory first: a child process inherits its parent's peak RSS as its starting maximum, so the children
    # must start while this process is still small.
    memory = {}
    for mode in ("padded", "packed"):
        child = [sys.executable, __file__, "--child", mode, "--model", args.model, "--steps", str(args.steps),
                 "--batch_size", str(args.batch_size), "--num_threads", str(args.num_threads)]  # fmt: skip
        out = subprocess.run(
            child, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
        )
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]

    batches = make_batches(args.steps + 1, args.batch_size)
    collators = {
        "padded": LenVMDataCollator(gamma=0.99, pad_token_id=0),
        "packed": LenVMDataCollator(gamma=0.99, pad_token_id=0, padding_free=True),
    }
    models = {mode: make_model(args.model) for mode in collators}
    optimizers = {mode: torch.optim.AdamW(models[mode].parameters(), lr=1e-5) for mode in collators}
    seconds = {mode: [] for mode in collators}
    real_tokens = padded_tokens = 0
    for step, examples in enumerate(batches):
        for mode in list(collators) if step % 2 == 0 else list(collators)[::-1]:
            batch = collators[mode](examples)
            start = time.perf_counter()
            train_step(models[mode], optimizers[mode], batch)
            if step > 0:  # the first step warms up both modes
                seconds[mode].append(time.perf_counter() - start)
        if step > 0:
            real_tokens += sum(len(e["input_ids"]) for e in examples)
            padded_tokens += len(examples) * max(len(e["input_ids"]) for e in examples)
        print(f"  step {step}: " + ", ".join(f"{m} {v[-1]:.2f} s" for m, v in seconds.items() if v), flush=True)

    result = {
        "benchmark": "lenvm_packing",
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "model": args.model,
        "parameters": sum(p.numel() for p in models["padded"].parameters()),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "real_tokens": real_tokens,
        "padding_fraction": 1 - real_tokens / padded_tokens,
        "tokens_per_second": {mode: real_tokens / sum(seconds[mode]) for mode in collators},
        "step_seconds": seconds,
        "peak_rss_mib": memory,
        "speedup_packed_over_padded": paired_ratio(seconds["padded"], seconds["packed"]),
        "speedup_packed_over_padded_total": sum(seconds["padded"]) / sum(seconds["packed"]),
        "peak_memory_ratio_packed_over_padded": memory["packed"] / memory["padded"],
    }
    speedup = result["speedup_packed_over_padded"]
    print(f"{'mode':<8}{'tokens/s':>12}{'peak RSS (MiB)':>16}")
    for mode in collators:
        print(f"{mode:<8}{result['tokens_per_second'][mode]:>12.0f}{memory[mode]:>16.0f}")
    print(f"padding fraction of the padded batches: {result['padding_fraction']:.1%}")
    print(
        f"packed / padded tokens/s: {speedup['median']:.2f}x (min {speedup['min']:.2f}, max {speedup['max']:.2f}; "
        "target >= 1.5x)"
    )
    print(f"packed / padded peak memory: {result['peak_memory_ratio_packed_over_padded']:.2f}")
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(result, args.output or RESULTS / f"lenvm_packing_{args.model}.json")


if __name__ == "__main__":
    main()
