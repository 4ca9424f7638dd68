"""Wall time per PPO update: with the frozen LenVM critic versus without, and our PPOTrainer versus TRL 1.12's.

    python benchmarks/ppo_overhead.py [--updates 8] [--configs tiny cpu] [--trl112] \
        [--output benchmarks/results/ppo_overhead.json]

1. LenVM overhead (target <= 1.15x). `LenVMPPOTrainer` (`length_mode="advantage"`, `length_coef=0.1`, a LenVM as large
   as the policy) and `PPOTrainer` train the same policy on the same prompts in one process. Their `train()` loops run
   in two threads that pass a baton after every update (PPO, LenVM-PPO, PPO, ...), so exactly one update runs at a
   time and machine noise hits both alike. An update is timed from `on_step_begin` to its `on_log` (rollout, score,
   values, rewards, advantages, PPO epochs, scheduler, metrics); the first (warm-up) and last (overlaps the other
   thread's clean-up) updates of each are dropped; the headline ratio is the median over updates of LenVM-PPO's time
   over the PPO update that ran just before it (robust to load drifting over the run). Configs: `tiny` (the test suite's scale) and `cpu` (a 3M-parameter
   Llama, 64-token responses, the largest that runs in minutes on 2 CPU cores).
2. `--trl112` (target <= 1.0x): the same TRL 1.12-style script (policy, reference, reward and value models as
   positional arguments, a pre-tokenised `input_ids` dataset) runs with `from lenvm_rl import PPOTrainer` and, in a
   clean virtualenv (`.cache/bench-venv-trl112`, created on first use: torch 2.13.0, trl 1.12.0, transformers 5.23.0,
   accelerate 1.15.0), with `from trl.experimental.ppo import PPOTrainer`, on the tiny config. Child processes
   alternate (ours, TRL, ours, TRL); an update is the interval between consecutive `on_step_end` calls, the first
   dropped.

Prints a table and saves JSON. Every run uses `torch.set_num_threads(--threads)` (default 1: on 2 shared cores a
second thread makes tiny matmuls slower and noisier).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)

ROOT = Path(__file__).resolve().parents[1]
TRL112_VENV = ROOT / ".cache" / "bench-venv-trl112"
TRL112_PACKAGES = ["torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0"]

CONFIGS = {
    # name: model shape, rollouts per update (per_device x accumulation), response and prompt lengths
    "tiny": dict(vocab=256, hidden=32, layers=2, intermediate=64, per_device=4, accumulation=2, response=16, prompt=8),
    "cpu": dict(
        vocab=2048, hidden=256, layers=4, intermediate=512, per_device=4, accumulation=2, response=64, prompt=32
    ),
}


# ---------------------------------------------------------------------------------------------- shared set-up


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
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
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


def summary(times):
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times), "n": len(times)}


# ---------------------------------------------------------------------------------------------- 1. LenVM overhead


class Baton(TrainerCallback):
    """Two trainers in two threads take turns, one update each; records the wall time of every update."""

    def __init__(self, name, other, turns, barrier):
        self.name, self.other, self.turns, self.barrier = name, other, turns, barrier
        self.times = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.barrier.wait(timeout=1800)  # both set-ups done before the first timed update

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.turns[self.name].wait(timeout=1800):
            raise TimeoutError(f"{self.name} never got its turn")
        self.turns[self.name].clear()
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss/policy_avg" in logs:
            self.times.append(time.perf_counter() - self.start)
            self.turns[self.other].set()


def lenvm_overhead(name, config, updates):
    from lenvm_rl.modeling import LengthValueModel
    from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer
    from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer

    class TimedLenVMPPOTrainer(LenVMPPOTrainer):
        lenvm_seconds = []

        def compute_length_values(self, batch):
            start = time.perf_counter()
            out = super().compute_length_values(batch)
            self.lenvm_seconds.append(time.perf_counter() - start)
            return out

    tokenizer = make_tokenizer(config["vocab"])
    dataset = make_prompts(config, 64)
    lenvm = LengthValueModel.from_backbone(make_policy(config, seed=1), gamma=0.99)
    turns = {"ppo": threading.Event(), "lenvm_ppo": threading.Event()}
    barrier = threading.Barrier(2)
    batons = {"ppo": Baton("ppo", "lenvm_ppo", turns, barrier), "lenvm_ppo": Baton("lenvm_ppo", "ppo", turns, barrier)}
    with tempfile.TemporaryDirectory() as tmp:
        ppo = PPOTrainer(
            PPOConfig(**ppo_kwargs(config, updates, tmp)),
            tokenizer,
            make_policy(config, seed=0),
            reward_funcs=[word_count_reward],
            train_dataset=dataset,
            callbacks=[batons["ppo"]],
        )
        lenvm_ppo = TimedLenVMPPOTrainer(
            LenVMPPOConfig(**ppo_kwargs(config, updates, tmp), length_mode="advantage", length_coef=0.1),
            tokenizer,
            make_policy(config, seed=0),
            reward_funcs=[word_count_reward],
            train_dataset=dataset,
            callbacks=[batons["lenvm_ppo"]],
            lenvm=lenvm,
            lenvm_processing_class=tokenizer,
        )
        errors = []

        def train(trainer, key):
            try:
                trainer.train()
            except BaseException as error:  # noqa: BLE001 (re-raised in the main thread)
                errors.append(error)
                barrier.abort()
                turns[batons[key].other].set()

        turns["ppo"].set()
        threads = [
            threading.Thread(target=train, args=(ppo, "ppo")),
            threading.Thread(target=train, args=(lenvm_ppo, "lenvm_ppo")),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    times = {key: baton.times[1:-1] for key, baton in batons.items()}
    params = {key: sum(p.numel() for p in model.parameters()) for key, model in (("policy", ppo.model.policy),)}
    params["lenvm"] = sum(p.numel() for p in lenvm.parameters())
    result = {
        "config": config,
        "parameters": params,
        "ppo": summary(times["ppo"]),
        "lenvm_ppo": summary(times["lenvm_ppo"]),
        "lenvm_forward": summary(TimedLenVMPPOTrainer.lenvm_seconds[1:-1]),
        "per_update_s": times,
    }
    # Update i of each trainer ran back to back: the median of these paired ratios is robust to load drifting over the
    # run (shared machines), which the ratio of the two medians is not.
    result["ratio_paired_median"] = statistics.median(b / a for a, b in zip(times["ppo"], times["lenvm_ppo"]))
    result["ratio_median"] = result["lenvm_ppo"]["median_s"] / result["ppo"]["median_s"]
    result["ratio_mean"] = result["lenvm_ppo"]["mean_s"] / result["ppo"]["mean_s"]
    result["lenvm_forward_share"] = result["lenvm_forward"]["median_s"] / result["lenvm_ppo"]["median_s"]
    return result


# ---------------------------------------------------------------------------------------------- 2. TRL 1.12


class StepTimes(TrainerCallback):
    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def child_trl_style_run(implementation, updates, threads):
    """A TRL 1.12 PPO script; only the import differs between the implementations. Prints per-update seconds."""
    torch.set_num_threads(threads)
    if implementation == "trl112":
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    else:
        from lenvm_rl import PPOConfig, PPOTrainer
    config = CONFIGS["tiny"]
    tokenizer = make_tokenizer(config["vocab"])
    dataset = make_prompts(config, 64, tokenized=True)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PPOTrainer(
            PPOConfig(**ppo_kwargs(config, updates, tmp)),
            tokenizer,
            make_policy(config, seed=0),
            make_policy(config, seed=0),
            make_classifier(config, seed=1),
            dataset,
            make_classifier(config, seed=2),
            eval_dataset=dataset,
            callbacks=[timer],
        )
        trainer.train()
    times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    print(json.dumps({"per_update_s": times}))


def ensure_trl112_venv():
    python = TRL112_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL112_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL112_PACKAGES], check=True)
    return python


def trl112_comparison(updates, repeats, threads):
    pythons = {"ours": sys.executable, "trl112": str(ensure_trl112_venv())}
    times = {"ours": [], "trl112": []}
    for _ in range(repeats):
        for implementation, python in pythons.items():
            command = [
                python,
                __file__,
                "--child",
                implementation,
                "--updates",
                str(updates),
                "--threads",
                str(threads),
            ]
            env = {**os.environ, "PYTHONPATH": str(ROOT) if implementation == "ours" else ""}
            out = subprocess.run(command, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{implementation} run failed:\n{out.stderr[-4000:]}")
            times[implementation] += json.loads(out.stdout.strip().splitlines()[-1])["per_update_s"]
    result = {key: summary(value) for key, value in times.items()}
    result["ratio_median"] = result["ours"]["median_s"] / result["trl112"]["median_s"]
    result["ratio_mean"] = result["ours"]["mean_s"] / result["trl112"]["mean_s"]
    result["packages"] = TRL112_PACKAGES
    result["per_update_s"] = times
    return result


# ---------------------------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=8, help="PPO updates per trainer (2 are dropped)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--trl112", action="store_true", help="also compare with TRL 1.12's PPOTrainer")
    parser.add_argument("--repeats", type=int, default=2, help="alternating child runs per implementation (--trl112)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ppo_overhead.json"))
    parser.add_argument("--child", choices=["ours", "trl112"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_trl_style_run(args.child, args.updates, args.threads)
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    result = {"benchmark": "ppo_overhead", "torch_threads": args.threads, "lenvm_overhead": {}}
    print(
        f"{'config':<8} {'policy':>9} {'PPO s/update':>13} {'LenVM-PPO s/update':>19} {'ratio (paired)':>15} "
        f"{'LenVM fwd s':>12}"
    )
    for name in args.configs:
        out = lenvm_overhead(name, CONFIGS[name], args.updates)
        result["lenvm_overhead"][name] = out
        print(
            f"{name:<8} {out['parameters']['policy']:>9} {out['ppo']['median_s']:>13.3f} "
            f"{out['lenvm_ppo']['median_s']:>19.3f} {out['ratio_paired_median']:>15.3f} "
            f"{out['lenvm_forward']['median_s']:>12.4f}"
        )
    if args.trl112:
        out = trl112_comparison(args.updates, args.repeats, args.threads)
        result["vs_trl112"] = out
        print(
            f"tiny: ours {out['ours']['median_s']:.3f} s/update, TRL 1.12 {out['trl112']['median_s']:.3f} s/update, "
            f"ratio {out['ratio_median']:.3f}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
