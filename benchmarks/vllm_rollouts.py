"""Rollouts on vLLM against the built-in sampler, and how the cost of an RL update grows with the answer's length,
at SmolLM2-135M's shape. Runs in `.venv-vllm` (`make install-vllm`), which has both engines.

    # 1. PPO update time and rollout tokens/s: the built-in sampler vs vLLM colocate, child processes alternating
    .venv-vllm/bin/python benchmarks/vllm_rollouts.py engines --pairs 2 --updates 3 --response_length 256
    # 2. time and peak memory per LenVM-PPO update and per LenVM-GRPO step, and the LenVM's share, per response length
    .venv-vllm/bin/python benchmarks/vllm_rollouts.py lengths --lengths 128 512 2048 4096

Every measurement runs in a child process (one `train()`), so peak memory (`VmHWM`) belongs to one configuration and
each vLLM engine starts fresh. An update is timed from its `on_step_begin` to its `on_step_end` callback; the first
`--skip_updates` updates (warm-up, and the engine's first weight sync) are not counted (`lengths --skip_updates 0`
times every update, for lengths where one update takes minutes).

Models: random weights in SmolLM2-135M-Instruct's shape (`outputs/smollm2/model/config.json`: vocab 49,152, hidden
576, 30 layers), saved once to `.cache/bench-smollm2-random` (vLLM loads weights from disk). A random model of this
vocabulary almost never samples its stop token, so responses are `response_length` tokens long in every arm and the
comparisons are per token; cost does not depend on what the weights are. The LenVM is a LengthValueModel on a
second backbone of the same shape (gamma 0.999). float32 everywhere (vLLM's CPU build is only usable in float32 on
CPUs without bf16 matrix units), one PPO epoch, no evaluation, no saving.

1. `engines`: `LenVMPPOTrainer` (`length_coef` 1) with `use_vllm` false / true, `--pairs` children of each,
   alternating. Reported: median PPO update time, rollout tokens per second (tokens sampled / time in
   `generate_rollouts`), and the paired ratios built-in / vLLM.
2. `lengths`: for each response length, one LenVM-PPO child (4 rollouts per update: 2 per micro-batch x 2) and one
   LenVM-GRPO child (4 completions of one prompt), built-in sampler. Reported: median update time, peak memory, the
   time in generation, and the LenVM's share (its forward over prompt + response / the update), with a fit of
   `log(time)` on `log(length)` (the growth exponent) over the measured lengths.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import RESULTS, ROOT, machine, paired_ratio, save, smollm2_config, spread

RANDOM_DIR = ROOT / ".cache" / "bench-smollm2-random"


def random_smollm2_dir() -> Path:
    """SmolLM2-135M's shape with random weights, saved with SmolLM2's tokenizer (once)."""
    if (RANDOM_DIR / "model.safetensors").exists():
        return RANDOM_DIR
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lenvm_rl.io import move_files_into

    torch.manual_seed(0)
    config = smollm2_config()
    model = AutoModelForCausalLM.from_config(config)
    staging = Path(tempfile.mkdtemp(dir=RANDOM_DIR.parent if RANDOM_DIR.parent.exists() else None))
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(ROOT / "outputs" / "smollm2" / "model").save_pretrained(staging)
    RANDOM_DIR.mkdir(parents=True, exist_ok=True)
    move_files_into(staging, RANDOM_DIR)
    return RANDOM_DIR


def prompts(num: int):
    from datasets import Dataset

    questions = [
        f"Tom has {i + 3} apples and buys {2 * i + 1} more. How many apples does he have now?" for i in range(num)
    ]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions])


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def child(args) -> dict:
    """One training run of one configuration; returns its per-update timings and peak memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from lenvm_rl import LengthValueModel
    from lenvm_rl.trainers import lenvm_ppo

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    model_dir = str(random_smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(1)
    lenvm = LengthValueModel.from_backbone(AutoModelForCausalLM.from_pretrained(model_dir), gamma=0.999)
    marks, starts, spent = [], [], {"generate": 0.0, "lenvm": 0.0, "tokens": 0}

    class Marks(TrainerCallback):
        def on_step_begin(self, *a, **k):
            starts.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    def timed(owner, name, key, count_tokens=False):
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            start = time.perf_counter()
            out = inner(*a, **k)
            if len(marks) >= args.skip_updates:  # the first updates are warm-up
                spent[key] += time.perf_counter() - start
                if count_tokens:
                    spent["tokens"] += int(out["response_mask"].sum())
            return out

        setattr(owner, name, wrapper)

    out_dir = tempfile.mkdtemp()
    common = dict(output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, bf16=False)
    if args.trainer == "ppo":
        from lenvm_rl import LenVMPPOConfig, LenVMPPOTrainer

        config = LenVMPPOConfig(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            total_episodes=4 * args.updates,
            response_length=args.response_length,
            num_ppo_epochs=1,
            temperature=1.0,
            learning_rate=1e-6,
            length_mode="advantage",
            length_coef=1.0,
            use_vllm=args.arm == "vllm",
            vllm_max_model_length=args.response_length + 64,
            local_rollout_forward_batch_size=2,
            **common,
        )
        trainer = LenVMPPOTrainer(
            config,
            tokenizer,
            AutoModelForCausalLM.from_pretrained(model_dir),
            reward_funcs=[word_count_reward],
            train_dataset=prompts(64),
            lenvm=lenvm,
            lenvm_processing_class=tokenizer,
            callbacks=[Marks()],
        )
        timed(trainer, "generate_rollouts", "generate", count_tokens=True)
        inner_values = lenvm_ppo.lenvm_state_values

        def lenvm_values(*a, **k):
            start = time.perf_counter()
            out = inner_values(*a, **k)
            if len(marks) >= args.skip_updates:
                spent["lenvm"] += time.perf_counter() - start
            return out

        lenvm_ppo.lenvm_state_values = lenvm_values
    else:
        from lenvm_rl import LenVMGRPOConfig, LenVMGRPOTrainer

        config = LenVMGRPOConfig(
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=args.response_length,
            max_steps=args.updates,
            learning_rate=1e-6,
            temperature=1.0,
            length_coef=1.0,
            use_cpu=True,
            gradient_checkpointing=False,
            use_vllm=args.arm == "vllm",
            vllm_max_model_length=args.response_length + 64,
            **common,
        )
        trainer = LenVMGRPOTrainer(
            model=model_dir,
            reward_funcs=[word_count_reward],
            args=config,
            train_dataset=prompts(64),
            processing_class=tokenizer,
            lenvm=lenvm,
            lenvm_processing_class=tokenizer,
            callbacks=[Marks()],
        )
        timed(trainer, "_generate", "generate")
        timed(trainer, "compute_length_values", "lenvm")
    trainer.train()
    updates = [end - begin for begin, end in zip(starts, marks)][args.skip_updates :]
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    timed_updates = len(updates)
    return {
        "update_seconds": updates,
        "generate_seconds_per_update": spent["generate"] / max(timed_updates, 1),
        "lenvm_seconds_per_update": spent["lenvm"] / max(timed_updates, 1),
        "rollout_tokens_per_second": spent["tokens"] / spent["generate"] if spent["tokens"] else None,
        "peak_memory_gb": peak_kb / 2**20,
    }


def run_child(trainer: str, arm: str, response_length: int, updates: int, skip_updates: int = 1) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    command = [sys.executable, __file__, "_child", "--trainer", trainer, "--arm", arm,
               "--response_length", str(response_length), "--updates", str(updates),
               "--skip_updates", str(skip_updates), "--out", out]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"  {trainer} {arm} L={response_length} ...", flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    print(f"    update {spread(result['update_seconds'])['median']:.1f} s, peak {result['peak_memory_gb']:.2f} GB")
    return result


def engines(args) -> dict:
    runs = {"builtin": [], "vllm": []}
    for pair in range(args.pairs):
        order = ("builtin", "vllm") if pair % 2 == 0 else ("vllm", "builtin")
        for arm in order:
            runs[arm].append(run_child("ppo", arm, args.response_length, args.updates))
    median = {arm: [spread(r["update_seconds"])["median"] for r in rs] for arm, rs in runs.items()}
    tokens = {arm: [r["rollout_tokens_per_second"] for r in rs] for arm, rs in runs.items()}
    return {
        "runs": runs,
        "update_seconds": {arm: spread(v) for arm, v in median.items()},
        "rollout_tokens_per_second": {arm: spread(v) for arm, v in tokens.items()},
        "update_time_ratio_builtin_over_vllm": paired_ratio(median["builtin"], median["vllm"]),
        "rollout_speedup_vllm_over_builtin": paired_ratio(tokens["vllm"], tokens["builtin"]),
    }


def growth_exponent(lengths: list[int], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) on log(length): 1 is linear growth, 2 quadratic."""
    if len(lengths) < 2:
        return None
    x, y = [math.log(v) for v in lengths], [math.log(v) for v in seconds]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def lengths(args) -> dict:
    table = {}
    for trainer in ("ppo", "grpo"):
        rows = []
        for length in args.lengths:
            result = run_child(trainer, "builtin", length, args.updates, args.skip_updates)
            update = spread(result["update_seconds"])["median"]
            rows.append({
                "response_length": length,
                "update_seconds": update,
                "generate_share": result["generate_seconds_per_update"] / update,
                "lenvm_share": result["lenvm_seconds_per_update"] / update,
                "peak_memory_gb": result["peak_memory_gb"],
                "raw": result,
            })  # fmt: skip
        table[trainer] = {
            "rows": rows,
            "time_growth_exponent": growth_exponent(args.lengths, [r["update_seconds"] for r in rows]),
        }
    return table


def print_lengths(table: dict) -> None:
    print("| trainer | response tokens | s / update | generation share | LenVM share | peak memory GB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for trainer, block in table.items():
        for r in block["rows"]:
            print(f"| {trainer} | {r['response_length']} | {r['update_seconds']:.1f} | {r['generate_share']:.0%} | "
                  f"{r['lenvm_share']:.1%} | {r['peak_memory_gb']:.2f} |")  # fmt: skip
        print(f"| {trainer} | growth exponent of time | {block['time_growth_exponent']:.2f} | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("engines")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--updates", type=int, default=3)
    p.add_argument("--response_length", type=int, default=256)
    p.add_argument("--output", default=str(RESULTS / "vllm_engines_smollm2.json"))
    p = sub.add_parser("lengths")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096])
    p.add_argument("--updates", type=int, default=2)
    p.add_argument("--skip_updates", type=int, default=1, help="First updates not timed (warm-up).")
    p.add_argument("--output", default=str(RESULTS / "response_length_cost_smollm2.json"))
    p = sub.add_parser("_child")
    p.add_argument("--trainer", choices=["ppo", "grpo"])
    p.add_argument("--arm", choices=["builtin", "vllm"])
    p.add_argument("--response_length", type=int)
    p.add_argument("--updates", type=int)
    p.add_argument("--skip_updates", type=int, default=1)
    p.add_argument("--out")
    args = parser.parse_args()
    if args.command == "_child":
        Path(args.out).write_text(json.dumps(child(args)))
        os._exit(0)  # vLLM's engine threads can hold up interpreter exit
    random_smollm2_dir()
    started = time.time()
    if args.command == "engines":
        result = engines(args)
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    else:
        result = lengths(args)
        print_lengths(result)
    command = " ".join([".venv-vllm/bin/python", "benchmarks/vllm_rollouts.py", *sys.argv[1:]])
    options = {key: value for key, value in vars(args).items() if key not in ("command", "output")}
    save({"command": command, "machine": machine(), "wall_seconds": time.time() - started, **options,
          "result": result}, args.output)  # fmt: skip


if __name__ == "__main__":
    main()
