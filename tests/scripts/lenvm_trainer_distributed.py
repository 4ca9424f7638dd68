"""One LenVMTrainer step on 2 processes (launched by tests/test_distributed.py); prints per-rank parameter sums.

The step's loss is the squared error summed over every target token of both ranks divided by their total count,
so the updated parameters must equal a single-process step on the union of the two ranks' batches.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest and test helpers
from conftest import make_tiny_causal_lm  # noqa: E402
from test_lenvm_trainer import make_records, tiny_args  # noqa: E402

from lenvm_rl.modeling import LengthValueModel  # noqa: E402
from lenvm_rl.trainers.lenvm import LenVMTrainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    model = LengthValueModel.from_backbone(make_tiny_causal_lm("qwen2", seed=3), gamma=0.9)
    config = tiny_args(args.output_dir, per_device_train_batch_size=2, max_steps=1, ddp_backend="gloo")
    trainer = LenVMTrainer(model, args=config, train_dataset=make_records(num=8))
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    # One file per rank: lines printed by two processes interleave in the shared stdout.
    facts = Path(args.output_dir) / f"facts-rank{rank}.json"
    facts.write_text(json.dumps({"world": world, "checksum": checksum}))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    print(f"done rank={rank}", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
