"""One job of tests/test_fault_injection.py, run as a subprocess that the test kills.

    python fault_injection_job.py {sample,train_lenvm,ppo} --config CONFIG [--kill_in_checkpoint N]

`--kill_in_checkpoint N` SIGKILLs this process in the middle of writing its N-th checkpoint (trainers: after the
model and optimizer, before the RNG state, the trainer state and the completion marker; sampling: after the N-th
chunk's temporary file is written, before its rename), the worst moment for a crash. Without it the job runs to the
end, and the test may kill it at a random time instead. `--fill_disk_after_checkpoint N` (trainers) fills the file
system of the output directory, with a file `filler` next to it, once the N-th checkpoint is complete, so that the
next write runs out of space.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))


def die_on_call(owner, name: str, call: int) -> None:
    """Replace `owner.name` so that its `call`-th call SIGKILLs the process (before doing anything)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def fill_disk_after_call(call: int) -> None:
    """After the `call`-th complete checkpoint, write `<output_dir>/../filler` until the file system is full."""
    from lenvm_rl.trainers.checkpointing import CompleteCheckpointsMixin

    original = CompleteCheckpointsMixin._save_checkpoint
    calls = {"n": 0}

    def wrapper(self, model, trial):
        original(self, model, trial)
        calls["n"] += 1
        if calls["n"] == call:
            with open(Path(self.args.output_dir).parent / "filler", "wb", buffering=0) as filler:
                for block in (2**16, 2**10, 1):  # down to the last byte
                    try:
                        while True:
                            filler.write(bytes(block))
                    except OSError:
                        pass

    CompleteCheckpointsMixin._save_checkpoint = wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["sample", "train_lenvm", "ppo"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--kill_in_checkpoint", type=int, default=None)
    parser.add_argument("--fill_disk_after_checkpoint", type=int, default=None)
    args = parser.parse_args()
    if args.fill_disk_after_checkpoint is not None:
        fill_disk_after_call(args.fill_disk_after_checkpoint)
    if args.kill_in_checkpoint is not None:
        if args.job == "sample":
            # The first three renames publish the run manifest, the sampling config and the layout.
            die_on_call(os, "replace", args.kill_in_checkpoint + 3)
        else:
            from transformers import Trainer

            die_on_call(Trainer, "_save_rng_state", args.kill_in_checkpoint)
    from trl import ModelConfig, TrlParser

    if args.job == "sample":
        import sample_rollouts

        (script_args,) = TrlParser((sample_rollouts.SampleRolloutsArguments,)).parse_args_and_config(
            ["--config", args.config]
        )
        sample_rollouts.main(script_args)
    elif args.job == "train_lenvm":
        import train_lenvm

        from lenvm_rl.trainers.lenvm import LenVMConfig

        parser = TrlParser((train_lenvm.TrainLenVMScriptArguments, LenVMConfig, ModelConfig))
        train_lenvm.main(*parser.parse_args_and_config(["--config", args.config]))
    else:
        import ppo_gsm8k

        from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig

        parser = TrlParser((ppo_gsm8k.PPOScriptArguments, LenVMPPOConfig, ModelConfig))
        ppo_gsm8k.main(*parser.parse_args_and_config(["--config", args.config]))
    print("JOB DONE", flush=True)


if __name__ == "__main__":
    main()
