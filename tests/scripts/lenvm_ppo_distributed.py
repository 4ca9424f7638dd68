"""A tiny LenVM-PPO run launched with 2 processes by tests/test_distributed.py; prints one line per fact checked.

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/cpu_ddp.yaml \
        tests/scripts/lenvm_ppo_distributed.py --scenario ddp --lenvm <dir> --output_dir <dir>
    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero3.yaml \
        tests/scripts/lenvm_ppo_distributed.py --scenario zero3 --lenvm <dir> --output_dir <dir>

`ddp`: a full and a LoRA policy each train 2 updates (saving after each), then a second trainer resumes from the first
checkpoint; prints per-rank parameter checksums, whether the resumed run matches and whether the LenVM is unchanged.
`zero3`: trains 2 updates under ZeRO-3 and saves each rank's rollout tokens and LenVM values, and the gathered LenVM
weights, for the test to compare with an unsharded single-process computation.
"""

import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

from conftest import make_tiny_causal_lm, make_tiny_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer  # noqa: E402


def word_count_reward(completions, **kwargs):
    return [float(len(completion[0]["content"].split())) for completion in completions]


def make_dataset(num=16):
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}], "answer": str(2 * i)} for i in range(num)]
    )


def say(line):
    """One line in one write: both ranks share stdout, and print() writes the text and its newline separately."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def checksum(state_dict):
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class RecordingTrainer(LenVMPPOTrainer):
    """Keeps this process's rollout tokens and LenVM values of every update."""

    def compute_values(self, batch):
        out = super().compute_values(batch)
        self.records = getattr(self, "records", [])
        self.records.append(
            {
                "prompts": [str(prompt) for prompt in batch["prompts"]],
                "query_responses": batch["query_responses"].cpu(),
                "attention_mask": batch["attention_mask"].cpu(),
                "context_length": batch["context_length"],
                "length_values": out["length_values"].cpu(),
            }
        )
        return out


def build(args, output_dir, lora, **kwargs):
    config = LenVMPPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=kwargs.pop("gradient_accumulation_steps", 2),
        total_episodes=kwargs.pop("total_episodes", 16),  # 2 updates of 2 x 2 rollouts x 2 processes
        response_length=5,
        num_ppo_epochs=2,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        lenvm_model_name_or_path=args.lenvm,
        length_mode="advantage",
        length_coef=0.5,
        **kwargs,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = RecordingTrainer(
        config,
        make_tiny_tokenizer(),
        make_tiny_causal_lm("llama"),
        reward_funcs=[word_count_reward],
        train_dataset=make_dataset(),
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # keep stdout for the facts the test reads
    return trainer


def run_ddp(args, rank):
    for name, lora in (("full", False), ("lora", True)):
        output_dir = os.path.join(args.output_dir, name)
        trainer = build(args, os.path.join(output_dir, "a"), lora, save_strategy="steps", save_steps=1)
        lenvm_before = checksum(trainer.lenvm.state_dict())
        trainer.train()
        say(f"PROMPTS {name} rank={rank} {trainer.records[0]['prompts']}")
        say(f"CHECKSUM {name} rank={rank} {checksum(trainer.accelerator.unwrap_model(trainer.model).state_dict())}")
        say(f"LENVM_UNCHANGED {name} rank={rank} {checksum(trainer.lenvm.state_dict()) == lenvm_before}")
        expected = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
        trainer.accelerator.wait_for_everyone()

        resumed = build(args, os.path.join(output_dir, "b"), lora, save_strategy="no")
        resumed.train(resume_from_checkpoint=os.path.join(output_dir, "a", "checkpoint-1"))
        actual = resumed.accelerator.unwrap_model(resumed.model).state_dict()
        match = resumed.state.global_step == 2 and all(torch.equal(expected[k], actual[k]) for k in expected)
        say(f"RESUME_MATCH {name} rank={rank} {match}")
        resumed.accelerator.wait_for_everyone()
    return resumed


def run_zero3(args, rank):
    import deepspeed

    trainer = build(
        args,
        args.output_dir,
        lora=False,
        save_strategy="no",
        gradient_accumulation_steps=1,
        total_episodes=8,
        ddp_backend="gloo",
    )
    trainer.train()
    engine = trainer.lenvm
    params = list(engine.module.parameters())
    local = sum(param.ds_tensor.numel() for param in params)
    full = sum(param.ds_numel for param in params)
    say(f"LENVM_ENGINE rank={rank} {type(engine).__name__} local={local} full={full}")
    with deepspeed.zero.GatheredParameters(params):
        lenvm_state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(trainer.model_wrapped.module.parameters())):
        policy_state = {k: v.detach().clone() for k, v in trainer.model_wrapped.module.state_dict().items()}
    say(f"CHECKSUM zero3 rank={rank} {checksum(policy_state)}")
    torch.save(trainer.records, os.path.join(args.output_dir, f"records_rank{rank}.pt"))
    if rank == 0:
        torch.save(lenvm_state, os.path.join(args.output_dir, "lenvm_gathered.pt"))
    return trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["ddp", "zero3"], required=True)
    parser.add_argument("--lenvm", required=True)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))
    trainer = run_ddp(args, rank) if args.scenario == "ddp" else run_zero3(args, rank)
    # A gloo worker thread can race interpreter shutdown (shared/docs/distributed_on_cpu.md): end cleanly, then
    # leave without running the interpreter's teardown.
    say(f"WORLD rank={rank} {trainer.accelerator.num_processes} {trainer.accelerator.distributed_type}")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    say(f"done rank={rank}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
