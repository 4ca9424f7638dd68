"""Supervised fine-tuning on GSM8K-format solutions with TRL's SFTTrainer: the starting policy of an RL run.

    # SmolLM2-135M-Instruct on the demo world's problems (its own chat template): the real-model RL policy
    python recipes/sft.py --config recipes/configs/sft_demo_smollm2.yaml
    # any chat model on any GSM8K-format data (a hub id or a directory of train.jsonl / test.jsonl)
    python recipes/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name openai/gsm8k \
        --output_dir outputs/sft-gsm8k --use_peft true

Each row's `question` becomes the user message (with `system_prompt` and `instruction`, built exactly as the RL
recipes build their prompts, [`~lenvm_rl.data.make_conversational_prompt`]) and its `answer` the assistant message,
in TRL's conversational prompt-completion format, so the loss covers the completion only. With `use_peft: true` the
LoRA adapter is merged into the base weights at the end (`merge_adapter: true`), so that the RL recipes, the LenVM
recipes and the evaluators load `output_dir` as a plain model.

`output_dir/run_manifest.json` records the run ([`~lenvm_rl.run_manifest.start_run`]). A run restarted in the same
`output_dir` with the same config and inputs resumes from its last complete `checkpoint-*`; a finished run (the final
model and `sft_complete.json` written) is left as it is, which is what makes `recipes/real.sh` resumable; another
config or other inputs are refused (`--overwrite_output_dir` moves the old run aside).
"""

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from lenvm_rl.configs import RunArguments
from lenvm_rl.data import load_gsm8k, make_conversational_prompt
from lenvm_rl.io import write_json_atomic
from lenvm_rl.run_manifest import check_model_files_owned, record_model_files, start_run
from lenvm_rl.trainers.checkpointing import CompleteCheckpointsMixin, last_complete_checkpoint, naming_disk_full
from lenvm_rl.trainers.lenvm import train_last_decoder_layers

logger = logging.getLogger(__name__)

COMPLETE_NAME = "sft_complete.json"  # written last: the final model in output_dir is complete


class CheckpointedSFTTrainer(CompleteCheckpointsMixin, SFTTrainer):
    """TRL's SFTTrainer whose checkpoints are marked complete once written, and resumed only when complete."""


@dataclass
class SFTScriptArguments(RunArguments):
    """
    Data of [`recipes/sft.py`]: GSM8K-format rows rendered as the RL recipes render their prompts (and what to do with
    an `output_dir` that holds a run, [`~lenvm_rl.configs.RunArguments`]).

    Parameters:
        dataset_name (`str`): Hub id or local directory of GSM8K-format `train.jsonl` / `test.jsonl`.
        dataset_config (`str`): Dataset configuration name (`main` for GSM8K).
        dataset_train_split (`str`): Split to train on.
        max_train_samples (`int` or `None`): Train on the first rows only.
        system_prompt (`str` or `None`): Content of a leading system message (`None`: the chat template's default).
        instruction (`str` or `None`): Text appended to each question (`None`: the bare question).
        merge_adapter (`bool`): With LoRA, save the merged model instead of the adapter.
        trainable_layers (`int` or `None`): Train only the last N decoder layers and the final norm (embeddings and
            the tied LM head frozen); `None` trains everything.
    """

    dataset_name: str = field(metadata={"help": "Hub id or local directory of GSM8K-format train/test jsonl."})
    dataset_config: str = field(default="main", metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first rows only."})
    system_prompt: str | None = field(default=None, metadata={"help": "Leading system message; null: none."})
    instruction: str | None = field(default=None, metadata={"help": "Text appended to each question; null: none."})
    merge_adapter: bool = field(default=True, metadata={"help": "With LoRA, save the merged model."})
    trainable_layers: int | None = field(
        default=None,
        metadata={"help": "Train only the last N decoder layers and the final norm; null: everything."},
    )

    def __post_init__(self):
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1 or null, got {self.max_train_samples}.")
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise ValueError(f"--trainable_layers must be >= 1 or null, got {self.trainable_layers}.")


def sft_dataset(script_args: SFTScriptArguments) -> Dataset:
    """The rows as TRL conversational prompt-completion pairs (`prompt`, `completion` message lists)."""
    dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    if script_args.max_train_samples is not None:
        dataset = dataset.select(range(min(script_args.max_train_samples, len(dataset))))
    return dataset.map(
        lambda row: {
            "prompt": make_conversational_prompt(row["question"], script_args.system_prompt, script_args.instruction),
            "completion": [{"role": "assistant", "content": row["answer"]}],
        },
        remove_columns=dataset.column_names,
    )


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> Path:
    output_dir = Path(training_args.output_dir)
    run = start_run(
        output_dir,
        "sft",
        config={"script_args": script_args, "training_args": training_args, "model_args": model_args},
        inputs={"model_name_or_path": model_args.model_name_or_path, "dataset_name": script_args.dataset_name},
        overwrite=script_args.overwrite_output_dir,
    )
    if run.done:
        return output_dir
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype or "float32"
    )
    if script_args.trainable_layers is not None:
        if model_args.use_peft:
            raise ValueError("Use either LoRA (--use_peft) or --trainable_layers, not both.")
        train_last_decoder_layers(model.get_decoder(), script_args.trainable_layers)
    trainer = CheckpointedSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=sft_dataset(script_args),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)

    model = trainer.model
    if model_args.use_peft and script_args.merge_adapter:
        model = model.merge_and_unload()
    check_model_files_owned(output_dir)  # the policy at the top of output_dir: never over another model
    with naming_disk_full(output_dir, output_dir):
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    record_model_files(output_dir)
    write_json_atomic(
        output_dir / COMPLETE_NAME,
        {
            "seconds": round(time.perf_counter() - start, 1),
            "global_step": trainer.state.global_step,
            "train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
            "config": {
                "script_args": asdict(script_args),
                "model_args": asdict(model_args),
                "training_args": training_args.to_dict(),
            },
        },
    )
    run.complete()
    return output_dir


if __name__ == "__main__":
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
