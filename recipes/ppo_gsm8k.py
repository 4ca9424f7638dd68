"""PPO on GSM8K with a learned task critic and a frozen LenVM as a length critic (method doc section 6).

    # the offline demo world (after `bash recipes/demo.sh` built outputs/demo/world and outputs/demo/lenvm)
    python recipes/ppo_gsm8k.py --config recipes/configs/demo.yaml
    # GPU scale: Qwen2.5-1.5B-Instruct with the released LenVM, DeepSpeed ZeRO-3 (full) or DDP (LoRA)
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/ppo_gsm8k.py \
        --config recipes/configs/ppo_gsm8k_qwen2.5_1.5b.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml recipes/ppo_gsm8k.py \
        --config recipes/configs/ppo_gsm8k_qwen2.5_1.5b_lora.yaml

The policy is `model_name_or_path` (LoRA with `use_peft: true`; otherwise the frozen reference is a second copy);
the task critic is the policy's backbone with a zero head, or `value_model_name_or_path` (a sequence classifier with
one label); the LenVM comes from `lenvm_model_name_or_path` (lenvm-rl or reference format; `lenvm_gamma` for the
latter). The reward is GSM8K accuracy ([`~lenvm_rl.gsm8k_accuracy_reward`]), plus `format_reward_weight` x
[`~lenvm_rl.gsm8k_format_reward`]. Training is [`~lenvm_rl.LenVMPPOTrainer`]; `length_coef: 0` is plain PPO.

With `num_eval_problems > 0`, the main process samples the held-out problems with the starting policy before training
and with the trained policy after (gathered from its shards under ZeRO-3), with
[`~lenvm_rl.evaluation.evaluate_gsm8k`]; the other processes wait at a barrier (raise `ddp_timeout` if an evaluation
takes longer than its default 30 minutes). `output_dir/results.json`:

    {"start": {...}, "final": {...},            # evaluate_gsm8k's dicts (accuracy, mean/median/p90/p99 tokens, ...)
     "eval_settings": {...},                     # what the evaluations depend on
     "train": {"seconds", "global_step", ...},   # this invocation's training
     "config": {"script_args", "training_args", "model_args"}}

`output_dir/run_manifest.json` records the run ([`~lenvm_rl.run_manifest.start_run`]). A run restarted in the same
`output_dir` with the same config and inputs resumes from its last complete `checkpoint-*` (or
`resume_from_checkpoint`) and reuses the start evaluation already in `results.json`; a finished run is left as it is
(`--reevaluate` evaluates its saved policy again); another config or other inputs are refused (`--overwrite_output_dir`
moves the old run aside).
"""

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import ModelConfig, TrlParser, get_peft_config
from trl.models.utils import unwrap_model_for_generation

from lenvm_rl.configs import PPOScriptArguments
from lenvm_rl.data import check_prompt_format, load_gsm8k, prepare_prompt_dataset
from lenvm_rl.distributed import end_launched_process, gathered_parameters
from lenvm_rl.evaluation import evaluate_gsm8k
from lenvm_rl.io import read_json, write_json_atomic
from lenvm_rl.lenvm_checkpoint import read_lenvm_config
from lenvm_rl.rewards import gsm8k_accuracy_reward, gsm8k_format_reward
from lenvm_rl.run_manifest import start_run
from lenvm_rl.trainers.checkpointing import last_complete_checkpoint
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.json"


def main(script_args: PPOScriptArguments, training_args: LenVMPPOConfig, model_args: ModelConfig) -> dict:
    """Train, save and evaluate; returns the content of `results.json` (evaluations on the main process only)."""
    is_main_process = training_args.process_index == 0  # also sets up the distributed state
    results_path = os.path.join(training_args.output_dir, RESULTS_NAME)
    run = start_run(
        training_args.output_dir,
        "ppo_gsm8k",
        config={"script_args": script_args, "training_args": training_args, "model_args": model_args},
        inputs={
            "model_name_or_path": model_args.model_name_or_path,
            "value_model_name_or_path": script_args.value_model_name_or_path,
            "lenvm_model_name_or_path": training_args.lenvm_model_name_or_path,
            "dataset_name": script_args.dataset_name,
        },
        overwrite=script_args.overwrite_output_dir,
        reevaluate=script_args.reevaluate,
    )
    if run.done:
        return _read_json(results_path)
    model_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype or "float32"}
    if model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation

    # Data
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    train_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    train_dataset = prepare_prompt_dataset(train_dataset, script_args.system_prompt, script_args.instruction)
    if training_args.lenvm_model_name_or_path:  # the LenVM's values are conditioned on how its prompts were built
        lenvm_metadata = read_lenvm_config(Path(training_args.lenvm_model_name_or_path))
        check_prompt_format(lenvm_metadata.get("prompt_format"), script_args.system_prompt, script_args.instruction)
    eval_dataset = None
    if script_args.num_eval_problems > 0:
        eval_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_problems, len(eval_dataset))))
        eval_dataset = prepare_prompt_dataset(eval_dataset, script_args.system_prompt, script_args.instruction)

    # Models. The critic and the reference are loaded here rather than copied from the policy by the trainer: under
    # ZeRO-3 `from_pretrained` shards each model as it loads it, and a sharded policy cannot be copied.
    policy = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        script_args.value_model_name_or_path or model_args.model_name_or_path, num_labels=1, **model_kwargs
    )
    if script_args.value_model_name_or_path is None:
        with gathered_parameters([value_model.score.weight], modifier_rank=0):
            nn.init.zeros_(value_model.score.weight)  # every value starts at 0, like the trainer's default critic
    peft_config = get_peft_config(model_args)
    ref_model = None  # a LoRA policy is its own reference, with its adapter disabled
    if peft_config is None:
        ref_model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)

    # Rewards
    reward_funcs = [gsm8k_accuracy_reward]
    if script_args.format_reward_weight:
        if training_args.reward_weights is not None:
            raise ValueError("Set either --format_reward_weight or --reward_weights, not both.")
        reward_funcs.append(gsm8k_format_reward)
        training_args.reward_weights = [1.0, script_args.format_reward_weight]

    # Start evaluation (main process), reused from an earlier invocation of the same run.
    eval_settings = _eval_settings(script_args, training_args, model_args)
    results = {"start": None, "final": None, "eval_settings": eval_settings}
    results["config"] = {
        "script_args": asdict(script_args),
        "training_args": training_args.to_dict(),
        "model_args": asdict(model_args),
    }
    if eval_dataset is not None:
        if not is_deepspeed_zero3_enabled():
            policy.to(training_args.device)
        with gathered_parameters(
            policy.parameters()
        ):  # sharded under ZeRO-3: every process takes part in gathering it
            if is_main_process:
                previous = _read_json(results_path)
                if previous.get("start") and previous.get("eval_settings") == eval_settings and not run.reevaluate:
                    logger.info("Reusing the start evaluation of %s.", results_path)
                    results["start"] = previous["start"]
                else:
                    results["start"] = _evaluate(policy, tokenizer, eval_dataset, eval_settings)
                    if not run.reevaluate:
                        _write_json(results, results_path)
            PartialState().wait_for_everyone()
    if run.reevaluate:  # the trained policy saved in output_dir, evaluated again; the training record is kept
        results["train"] = _read_json(results_path).get("train")
        if eval_dataset is not None:
            del policy, ref_model, value_model
            trained = AutoModelForCausalLM.from_pretrained(training_args.output_dir, **model_kwargs)
            if not is_deepspeed_zero3_enabled():
                trained.to(training_args.device)
            with gathered_parameters(trained.parameters()):
                if is_main_process:
                    results["final"] = _evaluate(trained, tokenizer, eval_dataset, eval_settings)
                PartialState().wait_for_everyone()
        if is_main_process:
            _write_json(results, results_path)
        run.complete()
        return results

    # Training, resumed from the last checkpoint of output_dir if there is one.
    trainer = LenVMPPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_model,
        value_model=value_model,
        train_dataset=train_dataset,
        peft_config=peft_config,
        reward_funcs=reward_funcs,
    )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        checkpoint = last_complete_checkpoint(training_args.output_dir)  # incomplete checkpoints are skipped
    if checkpoint is not None:
        logger.info("Resuming from %s.", checkpoint)
    start_time = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start_time
    trainer.save_model(training_args.output_dir)

    update_logs = [log for log in trainer.state.log_history if "objective/scores" in log]
    results["train"] = {
        "seconds": round(train_seconds, 1),
        "global_step": trainer.state.global_step,
        "num_updates": trainer.num_updates,
        "episodes": trainer.state.global_step * trainer.batch_size,
        "rollouts_per_update": trainer.batch_size,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "resumed_from_checkpoint": checkpoint,
        "last_log": update_logs[-1] if update_logs else {},
    }
    # Final evaluation of the trained policy (gathered under ZeRO-3, with its adapter under LoRA).
    if eval_dataset is not None:
        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
            if is_main_process:
                results["final"] = _evaluate(unwrapped.policy, tokenizer, eval_dataset, eval_settings)
            trainer.accelerator.wait_for_everyone()
    if is_main_process:
        _write_json(results, results_path)
        logger.info("Wrote %s", results_path)
    trainer.accelerator.wait_for_everyone()
    run.complete()
    return results


def _eval_settings(script_args: PPOScriptArguments, training_args: LenVMPPOConfig, model_args: ModelConfig) -> dict:
    """Everything an evaluation's numbers depend on besides the weights."""
    temperature = script_args.eval_temperature
    max_new_tokens = script_args.eval_max_new_tokens
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "dataset_name": script_args.dataset_name,
        "dataset_config": script_args.dataset_config,
        "dataset_test_split": script_args.dataset_test_split,
        "num_eval_problems": script_args.num_eval_problems,
        "system_prompt": script_args.system_prompt,
        "instruction": script_args.instruction,
        "num_samples": script_args.eval_num_samples,
        "temperature": temperature if temperature is not None else training_args.temperature,
        "top_p": script_args.eval_top_p,
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else training_args.response_length,
        "batch_size": script_args.eval_batch_size,  # the batch composition changes the random draws
        "seed": training_args.seed,
    }


def _evaluate(model, tokenizer, dataset, settings: dict) -> dict:
    return evaluate_gsm8k(
        model,
        tokenizer,
        dataset["prompt"],
        dataset["answer"],
        num_samples=settings["num_samples"],
        max_new_tokens=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
    )


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    return read_json(path, fix="delete it (the start evaluation is then computed again) or restore it")


def _write_json(results: dict, path: str) -> None:
    """Atomic write: an interrupted job never leaves a truncated results.json behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json_atomic(path, json.loads(json.dumps(results, default=str)))


if __name__ == "__main__":
    parser = TrlParser((PPOScriptArguments, LenVMPPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
    end_launched_process()
