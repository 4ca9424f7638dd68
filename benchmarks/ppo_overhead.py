"""Wall time per PPO update and peak memory: with the frozen LenVM critic versus without, and our PPOTrainer versus
TRL 1.12's, each pair of child processes run alternately in one call.

    python benchmarks/ppo_overhead.py --model tiny --updates 16 --pairs 3 --trl112
    python benchmarks/ppo_overhead.py --model smollm2 --updates 3 --pairs 3 --trl112

Every arm runs in its own child process (one `train()` of `--updates` updates), and the arms alternate (A B, B A,
A B, ...; `--pairs` of each). A child reports the wall time of each update, taken between consecutive `on_step_end`
callbacks (so the first update, which warms up, is never counted), and its peak resident memory (`VmHWM`). The
headline of a comparison is the median over pairs of the ratio of the two children's median update times.

1. LenVM overhead (target <= 1.10x time, peak memory + 1 model). `LenVMPPOTrainer` (`length_mode="advantage"`,
   `length_coef=0.1`, a LenVM as large as the policy: `from_backbone` of a policy-shaped model) against `PPOTrainer`,
   both with a reward function (`word_count_reward`) and the critic built from the policy.
2. `--trl112` (target <= 1.0x): the same TRL 1.12-style script (policy, reference, reward and value models as
   positional arguments, a pre-tokenised `input_ids` dataset) with `from lenvm_rl import PPOTrainer` and, in a clean
   virtualenv (`.cache/bench-venv-trl112`, created on first use: torch 2.13.0, trl 1.12.0, transformers 5.23.0,
   accelerate 1.15.0), with `from trl.experimental.ppo import PPOTrainer`.

Equal settings in every comparison: models (random init, same seeds), prompts, `per_device_train_batch_size`,
`gradient_accumulation_steps`, `response_length`, `num_ppo_epochs` 4, `num_mini_batches` 1, float32 (`bf16=False`:
TRL 1.12's default is bf16), sampling at temperature 1 with top-k/top-p off, no evaluation, no saving, one thread.
Stop tokens are never sampled by these random models, so every response is `response_length` tokens long in both.
What differs is the implementations' own work: TRL 1.12 keeps the logits of generation as the policy's
log-probabilities (one policy forward fewer than ours, which re-scores the responses with the policy and the critic in
one forward) and calls `gc.collect()` and `empty_cache()` several times per update; ours checks every loss, value and
reward for non-finite entries and logs more metrics (`PPOTrainer` docstring: the deliberate differences).

Sizes (`--model`): `tiny` (the test suite's scale, 37K parameters), `cpu` (3.7M) and `smollm2` (SmolLM2-135M's
shape, `outputs/smollm2/model/config.json`: vocab 49152, hidden 576, 30 layers, 9 heads / 3 key-value heads; random
weights, because update time does not depend on what the weights are).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_utils import RESULTS, ROOT, machine, paired_ratio, save, spread
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

TRL112_VENV = ROOT / ".cache" / "bench-venv-trl112"
TRL112_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0"]

CONFIGS = {
    # name: model shape, rollouts per update (per_device x accumulation), response and prompt lengths
    "tiny": dict(
        vocab=256, hidden=32, layers=2, intermediate=64, heads=4, kv_heads=4, per_device=4, accumulation=2,
        response=16, prompt=8,
    ),
    "cpu": dict(
        vocab=2048, hidden=256, layers=4, intermediate=512, heads=4, kv_heads=4, per_device=4, accumulation=2,
        response=64, prompt=32,
    ),
    "smollm2": dict(
        vocab=49152, hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, per_device=4, accumulation=1,
        response=48, prompt=32,
    ),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the children


def make_tokenizer(vocab):
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def llama_config(config, **kwargs):
    return LlamaConfig(
        vocab_size=config["vocab"],
        hidden_size=config["hidden"],
        intermediate_size=config["intermediate"],
        num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"],
        num_key_value_heads=config["kv_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **kwargs,
    )


def make_policy(config, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(config)).eval()


def make_classifier(config, seed):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(config, num_labels=1)).eval()


def make_prompts(config, num, tokenized=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        ids = torch.randint(3, config["vocab"], (config["prompt"],), generator=g).tolist()
        rows.append({"input_ids": ids} if tokenized else {"prompt": " ".join(f"w{i - 3}" for i in ids)})
    return Dataset.from_list(rows)


def word_count_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def ppo_kwargs(config, updates, output_dir):
    batch = config["per_device"] * config["accumulation"]
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=config["per_device"],
        gradient_accumulation_steps=config["accumulation"],
        local_rollout_forward_batch_size=batch,
        total_episodes=updates * batch,
        response_length=config["response"],
        num_ppo_epochs=4,
        num_mini_batches=1,
        learning_rate=1e-5,
        stop_token="eos",
        num_sample_generations=0,
        bf16=False,  # TRL 1.12's PPOConfig defaults to bf16; both run float32
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )


class StepTimes(TrainerCallback):
    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def peak_rss_mib() -> float:
    """This process's peak resident set size (`VmHWM`: reset by exec, unlike `ru_maxrss`)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def child(arm, config_name, updates):
    """One `train()`; prints per-update seconds, peak memory and parameter counts as JSON."""
    config = CONFIGS[config_name]
    tokenizer = make_tokenizer(config["vocab"])
    timer = StepTimes()
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        if arm in ("trl112", "ours_trl_script"):
            if arm == "trl112":
                from trl.experimental.ppo import PPOConfig, PPOTrainer
            else:
                from lenvm_rl import PPOConfig, PPOTrainer
            dataset = make_prompts(config, 64, tokenized=True)
            policy = make_policy(config, seed=0)
            trainer = PPOTrainer(
                PPOConfig(**ppo_kwargs(config, updates, tmp)),
                tokenizer,
                policy,
                make_policy(config, seed=0),
                make_classifier(config, seed=1),
                dataset,
                make_classifier(config, seed=2),
                eval_dataset=dataset,
                callbacks=[timer],
            )
        else:
            from lenvm_rl.modeling import LengthValueModel
            from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer
            from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer

            dataset = make_prompts(config, 64)
            policy = make_policy(config, seed=0)
            if arm == "ppo":
                trainer = PPOTrainer(
                    PPOConfig(**ppo_kwargs(config, updates, tmp)), tokenizer, policy,
                    reward_funcs=[word_count_reward], train_dataset=dataset, callbacks=[timer],
                )  # fmt: skip
            else:
                lenvm = LengthValueModel.from_backbone(make_policy(config, seed=1), gamma=0.99)
                extra["lenvm_parameters"] = sum(p.numel() for p in lenvm.parameters())
                trainer = LenVMPPOTrainer(
                    LenVMPPOConfig(**ppo_kwargs(config, updates, tmp), length_mode="advantage", length_coef=0.1),
                    tokenizer, policy, reward_funcs=[word_count_reward], train_dataset=dataset,
                    callbacks=[timer], lenvm=lenvm, lenvm_processing_class=tokenizer,
                )  # fmt: skip
                seconds = []
                compute = trainer.compute_length_values

                def timed(batch):
                    start = time.perf_counter()
                    out = compute(batch)
                    seconds.append(time.perf_counter() - start)
                    return out

                trainer.compute_length_values = timed
                extra["lenvm_forward_s"] = seconds
        trainer.train()
    times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    print(
        json.dumps(
            {
                "per_update_s": times,
                "peak_rss_mib": peak_rss_mib(),
                "policy_parameters": sum(p.numel() for p in policy.parameters()),
                **extra,
            }
        )
    )


# ---------------------------------------------------------------------------------------------- the parent


def ensure_trl112_venv():
    python = TRL112_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL112_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL112_PACKAGES], check=True)
    return python


def compare(arms, config_name, updates, pairs, threads):
    """Alternate the two arms' child processes; returns their per-process summaries and the paired ratios."""
    import lenvm_rl

    ours_path = str(Path(lenvm_rl.__file__).resolve().parents[1])  # the lenvm_rl this process imports
    runs = {arm: [] for arm in arms}
    for pair in range(pairs):
        for arm in arms if pair % 2 == 0 else arms[::-1]:
            python = str(ensure_trl112_venv()) if arm == "trl112" else sys.executable
            command = [python, __file__, "--child", arm, "--model", config_name, "--updates", str(updates)]
            env = {
                **os.environ,
                "PYTHONPATH": "" if arm == "trl112" else ours_path,
                "OMP_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false",
                "TQDM_DISABLE": "1",
            }
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{arm} run failed:\n{out.stderr[-4000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            runs[arm].append(run)
            print(
                f"  {config_name} pair {pair} {arm:<16} median {statistics.median(run['per_update_s']):8.3f} s/update "
                f"over {len(run['per_update_s'])}, peak RSS {run['peak_rss_mib']:8.0f} MiB",
                flush=True,
            )
    a, b = arms
    medians = {arm: [statistics.median(run["per_update_s"]) for run in runs[arm]] for arm in arms}
    peaks = {arm: [run["peak_rss_mib"] for run in runs[arm]] for arm in arms}
    return {
        "config": CONFIGS[config_name],
        "updates_per_process": updates,
        "per_update_s": {arm: spread([t for run in runs[arm] for t in run["per_update_s"]]) for arm in arms},
        "process_median_s": medians,
        "peak_rss_mib": {arm: spread(values) for arm, values in peaks.items()},
        f"time_{a}_over_{b}": paired_ratio(medians[a], medians[b]),
        f"peak_rss_{a}_minus_{b}_mib": spread([x - y for x, y in zip(peaks[a], peaks[b])]),
        "runs": runs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(CONFIGS), default="tiny")
    parser.add_argument("--updates", type=int, default=16, help="PPO updates per process (the first is not timed)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating child processes per arm")
    parser.add_argument("--trl112", action="store_true", help="also compare with TRL 1.12's PPOTrainer")
    parser.add_argument("--no_lenvm", action="store_true", help="skip the LenVM-overhead comparison")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="default: benchmarks/results/ppo_overhead_<model>.json")
    parser.add_argument("--child", choices=["ppo", "lenvm_ppo", "ours_trl_script", "trl112"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.model, args.updates)
        return

    result = {"benchmark": "ppo_overhead", "command": "python " + " ".join(sys.argv), "machine": machine()}
    if not args.no_lenvm:
        out = compare(["lenvm_ppo", "ppo"], args.model, args.updates, args.pairs, args.threads)
        model_mib = out["runs"]["lenvm_ppo"][0]["lenvm_parameters"] * 4 / 2**20  # float32
        out["lenvm_model_mib"] = model_mib
        lenvm_seconds = [t for run in out["runs"]["lenvm_ppo"] for t in run["lenvm_forward_s"][1:]]
        out["lenvm_forward_s"] = spread(lenvm_seconds)
        result["lenvm_overhead"] = out
        ratio, extra = out["time_lenvm_ppo_over_ppo"], out["peak_rss_lenvm_ppo_minus_ppo_mib"]
        print(
            f"{args.model}: LenVM-PPO / PPO time per update {ratio['median']:.3f}x (min {ratio['min']:.3f}, max "
            f"{ratio['max']:.3f}; target <= 1.10x); peak RSS +{extra['median']:.0f} MiB (one LenVM: {model_mib:.0f} MiB)",
            flush=True,
        )
    if args.trl112:
        out = compare(["ours_trl_script", "trl112"], args.model, args.updates, args.pairs, args.threads)
        out["packages"] = TRL112_PACKAGES
        result["vs_trl112"] = out
        ratio = out["time_ours_trl_script_over_trl112"]
        print(
            f"{args.model}: ours / TRL 1.12 time per update {ratio['median']:.3f}x (min {ratio['min']:.3f}, max "
            f"{ratio['max']:.3f}; target <= 1.0x)"
        )
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(result, args.output or RESULTS / f"ppo_overhead_{args.model}.json")


if __name__ == "__main__":
    main()
