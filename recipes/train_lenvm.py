"""Pretrain a Length Value Model on sampled completions (paper section 3).

    # the offline demo world (after recipes/sample_rollouts.py --config recipes/configs/rollouts_demo.yaml)
    python recipes/train_lenvm.py --config recipes/configs/lenvm_demo.yaml
    # paper scale: Qwen2.5-1.5B-Instruct init, DeepSpeed ZeRO-3 on 8 GPUs
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/train_lenvm.py \
        --config recipes/configs/lenvm_qwen2.5_1.5b.yaml

The LenVM starts from `model_name_or_path` (a causal LM, typically the policy itself, with a fresh value head)
or from a saved LenVM (ours or the reference format) to continue training. `gamma: null` picks gamma by the
99th-percentile rule on the training lengths at the first start; `output_dir/run_manifest.json` records it
([`~lenvm_rl.run_manifest.start_run`]), and a resumed run trains with that gamma. A restart with the same config and
inputs resumes from the last complete checkpoint, a finished run is left as it is (`--reevaluate` evaluates the saved
LenVM on `eval_rollouts` again), and another config or other rollouts are refused (`--overwrite_output_dir` moves the
old run aside).
"""

import logging
import os

from transformers import AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from lenvm_rl.configs import TrainLenVMScriptArguments
from lenvm_rl.data import prompt_format_of
from lenvm_rl.io import read_json
from lenvm_rl.rollouts import ROLLOUTS_CONFIG_NAME, load_rollouts
from lenvm_rl.run_manifest import start_run
from lenvm_rl.trainers.checkpointing import last_complete_checkpoint
from lenvm_rl.trainers.lenvm import LenVMConfig, LenVMTrainer

logger = logging.getLogger(__name__)


def main(script_args: TrainLenVMScriptArguments, training_args: LenVMConfig, model_args: ModelConfig):
    run = start_run(
        training_args.output_dir,
        "train_lenvm",
        config={"script_args": script_args, "training_args": training_args, "model_args": model_args},
        inputs={
            "model_name_or_path": model_args.model_name_or_path,
            "train_rollouts": script_args.train_rollouts,
            "eval_rollouts": script_args.eval_rollouts,
        },
        overwrite=script_args.overwrite_output_dir,
        reevaluate=script_args.reevaluate,
    )
    if run.done:
        return None
    if training_args.gamma is None and "gamma" in run.resolved:
        # Gamma is fixed at the first start: the percentile rule is not run again on a resume.
        training_args.gamma = run.resolved["gamma"]
        logger.info("Resuming with gamma=%s chosen at the first start (%s).", training_args.gamma, run.output_dir)
    if run.reevaluate:
        model_args.model_name_or_path = training_args.output_dir  # the saved LenVM, evaluated again
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset = load_rollouts(script_args.train_rollouts)
    eval_dataset = load_rollouts(script_args.eval_rollouts) if script_args.eval_rollouts else None
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype or "float32"}
        if model_args.attn_implementation:
            training_args.model_init_kwargs["attn_implementation"] = model_args.attn_implementation

    trainer = LenVMTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generator_model = _generator_model(script_args.train_rollouts)
    model.data_description = script_args.data_description or f"rollouts from {script_args.train_rollouts}"
    first = train_dataset[0]
    model.prompt_format = prompt_format_of(first.get("prompt"), first.get("question"))  # checked by the RL recipes
    if "gamma" not in run.resolved:
        run.record(gamma=model.gamma)

    if not run.reevaluate:
        # A restarted run resumes from the last complete checkpoint of output_dir (incomplete ones are skipped).
        checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(training_args.output_dir)
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model(training_args.output_dir)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    run.complete()
    return trainer


def _generator_model(rollouts_path: str) -> str | None:
    config = os.path.join(rollouts_path, ROLLOUTS_CONFIG_NAME)
    if not os.path.isfile(config):
        return None
    return read_json(config, fix="restore it from the sampling run").get("generator_model")


if __name__ == "__main__":
    parser = TrlParser((TrainLenVMScriptArguments, LenVMConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
