"""A tiny LenVM-GRPO run launched with 2 processes by tests/test_distributed_grpo.py; prints one line per fact checked.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \
        tests/scripts/lenvm_grpo_distributed.py --scenario ddp --policy <dir> --lenvm <dir> --output_dir <dir>
    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero3.yaml \
        tests/scripts/lenvm_grpo_distributed.py --scenario zero3 --policy <dir> --lenvm <dir> --output_dir <dir>

Facts go to `<output_dir>/facts_rank<R>.txt`, one `KEY tag rank=R value` line each (the ranks share one stdout, where
lines of two processes can interleave); stdout only gets the final `done rank=R`. Both scenarios train 2 optimizer steps with `length_coef=0.5` (LenVM placed by the trainer) and print per-rank
parameter checksums, the prompts each rank generated for, and each rank's share of the length-advantage
normalisation. `ddp` trains the full policy with KL (`beta > 0`, reference model rebuilt from the saved policy) and
saves a checkpoint; `zero3` saves each rank's LenVM inputs and values and the gathered LenVM weights, for the test to
compare with an unsharded single-process forward.
"""

import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

from conftest import make_tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402

from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer  # noqa: E402


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def make_dataset(num=16):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "answer": str(2 * i)} for i in range(num)]
    )


def checksum(state_dict):
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class RecordingTrainer(LenVMGRPOTrainer):
    """Keeps this process's LenVM inputs and values, and its length advantages, of every generation batch."""

    records: list

    def compute_length_values(self, prompt_ids, prompt_mask, completion_ids, response_mask):
        values = super().compute_length_values(prompt_ids, prompt_mask, completion_ids, response_mask)
        self.records = getattr(self, "records", [])
        self.records.append(
            {
                "prompt_ids": prompt_ids.cpu(),
                "prompt_mask": prompt_mask.cpu(),
                "completion_ids": completion_ids.cpu(),
                "response_mask": response_mask.cpu(),
                "length_values": values.cpu(),
            }
        )
        return values

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        self.records[-1]["prompts"] = [str(x["prompt"]) for x in inputs]
        self.records[-1]["length_advantages"] = output["length_advantages"].cpu()
        self.records[-1]["completion_mask"] = output["completion_mask"].cpu()
        return output


def build(args, output_dir, **kwargs):
    config = LenVMGRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=5,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,  # GRPOConfig defaults to bf16, which TrainingArguments refuses on CPU without use_cpu
        disable_tqdm=True,
        seed=0,
        lenvm_model_name_or_path=args.lenvm,
        length_coef=0.5,
        **kwargs,
    )
    return RecordingTrainer(
        model=args.policy,
        reward_funcs=[word_count_reward],
        args=config,
        train_dataset=make_dataset(),
        processing_class=make_tiny_tokenizer(),
    )


def fact(args, line):
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(args.output_dir, f"facts_rank{rank}.txt"), "a") as file:
        file.write(line + "\n")


def report_common(args, trainer, name, rank, policy_state):
    fact(args, f"PROMPTS {name} rank={rank} {trainer.records[0]['prompts']}")
    fact(args, f"CHECKSUM {name} rank={rank} {checksum(policy_state)}")
    # This rank's sum of squared normalised length advantages and token count: over both ranks the mean is 1.
    for step, record in enumerate(trainer.records):
        mask = record["completion_mask"].bool()
        sum_squares = record["length_advantages"][mask].double().pow(2).sum().item()
        fact(args, f"LENGTH_SQUARES {name}{step} rank={rank} {sum_squares:.8f} {int(mask.sum())}")
    logged = [log["length/response_tokens_mean"] for log in trainer.state.log_history if "loss" in log]
    fact(args, f"LOGGED_LENGTHS {name} rank={rank} {logged}")


def run_ddp(args, rank):
    trainer = build(args, args.output_dir, beta=0.1, save_strategy="steps", save_steps=1)
    lenvm_before = checksum(trainer.lenvm.state_dict())
    trainer.train()
    report_common(args, trainer, "ddp", rank, trainer.accelerator.unwrap_model(trainer.model).state_dict())
    fact(args, f"LENVM_UNCHANGED ddp rank={rank} {checksum(trainer.lenvm.state_dict()) == lenvm_before}")
    return trainer


def run_zero3(args, rank):
    import deepspeed

    trainer = build(args, args.output_dir, save_strategy="no", ddp_backend="gloo")
    trainer.train()
    engine = trainer.lenvm
    params = list(engine.module.parameters())
    local = sum(param.ds_tensor.numel() for param in params)
    full = sum(param.ds_numel for param in params)
    fact(args, f"LENVM_ENGINE rank={rank} {type(engine).__name__} local={local} full={full}")
    with deepspeed.zero.GatheredParameters(params):
        lenvm_state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(trainer.model_wrapped.module.parameters())):
        policy_state = {k: v.detach().clone() for k, v in trainer.model_wrapped.module.state_dict().items()}
    report_common(args, trainer, "zero3", rank, policy_state)
    torch.save(trainer.records, os.path.join(args.output_dir, f"records_rank{rank}.pt"))
    if rank == 0:
        torch.save(lenvm_state, os.path.join(args.output_dir, "lenvm_gathered.pt"))
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["ddp", "zero3"], required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--lenvm", required=True)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    trainer = run_ddp(args, rank) if args.scenario == "ddp" else run_zero3(args, rank)
    # A gloo worker thread can race interpreter shutdown (shared/docs/distributed_on_cpu.md): end cleanly, then
    # leave without running the interpreter's teardown.
    fact(args, f"WORLD rank={rank} {trainer.accelerator.num_processes} {trainer.accelerator.distributed_type}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    print(f"done rank={rank}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
