"""GRPO on GSM8K with a frozen LenVM as a per-token length critic (method doc section 6).

    # the offline demo world (after `bash recipes/demo.sh` built outputs/demo/world and outputs/demo/lenvm)
    python recipes/grpo_gsm8k.py --config recipes/configs/grpo_demo.yaml
    # GPU scale: Qwen2.5-1.5B-Instruct policy + the LenVM of recipes/configs/lenvm_qwen2.5_1.5b.yaml, ZeRO-3
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/grpo_gsm8k.py \
        --config recipes/configs/grpo_gsm8k_qwen2.5_1.5b.yaml

The reward is GSM8K accuracy ([`~lenvm_rl.gsm8k_accuracy_reward`]). Without `lenvm_model_name_or_path` the run is
plain `trl.GRPOTrainer`; with it, [`~lenvm_rl.LenVMGRPOTrainer`] (`length_coef: 0` is then plain GRPO plus the
`length/` metrics). Sequence-level length baselines for ablations: `length_penalty_coef` (reward `-alpha * L`, with
`length_penalty_correct_only` on correct completions only), `kimi_length_coef` (Kimi k1.5's group-relative length
reward) and `soft_overlong_cache` (TRL's `get_soft_overlong_punishment`, DAPO eq. 13, over
`soft_overlong_max_length`, by default the generation cap; a shorter one makes it a length target). With
`num_eval_problems > 0`, the main process samples one completion per held-out problem before and after training and
writes `results.json` (accuracy, mean completion tokens, fraction cut at the length cap) next to the saved policy.
`output_dir/run_manifest.json` records the run ([`~lenvm_rl.run_manifest.start_run`]): a restart with the same config
and inputs resumes from the last complete checkpoint, a finished run is left as it is (`--reevaluate` evaluates its
saved policy again), another config or other inputs are refused (`--overwrite_output_dir` moves the old run aside).
"""

import json
import logging
import os
import time
from pathlib import Path

from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import GRPOTrainer, ModelConfig, TrlParser, get_peft_config
from trl.rewards import get_soft_overlong_punishment

from lenvm_rl.configs import GRPOScriptArguments
from lenvm_rl.data import check_prompt_format, load_gsm8k, prepare_prompt_dataset
from lenvm_rl.distributed import end_launched_process, gathered_parameters
from lenvm_rl.evaluation import evaluate_gsm8k
from lenvm_rl.io import read_json, write_json_atomic
from lenvm_rl.lenvm_checkpoint import read_lenvm_config
from lenvm_rl.rewards import gsm8k_accuracy_reward, kimi_length_reward, length_penalty_reward
from lenvm_rl.run_manifest import start_run
from lenvm_rl.trainers.checkpointing import CompleteCheckpointsMixin, last_complete_checkpoint
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer

logger = logging.getLogger(__name__)


def evaluate_policy(model, tokenizer, dataset, max_new_tokens: int, temperature: float, batch_size: int, seed: int):
    """Accuracy, mean completion tokens (EOS included), fraction cut at the cap and the per-completion `lengths` and
    `correct` lists (for bootstrap intervals over problems), one sample per problem
    ([`~lenvm_rl.evaluation.evaluate_gsm8k`])."""
    out = evaluate_gsm8k(
        model,
        tokenizer,
        dataset["prompt"],
        dataset["answer"],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
    )
    return {
        "accuracy": out["accuracy"],
        "mean_tokens": out["mean_tokens"],
        "truncated_frac": out["fraction_truncated"],
        **{key: out[key] for key in ("num_problems", "num_samples", "lengths", "correct")},
    }


class CheckpointedGRPOTrainer(CompleteCheckpointsMixin, GRPOTrainer):
    """TRL's GRPOTrainer with checkpoints marked complete, so a restarted plain-GRPO row skips a half-written one."""


def main(script_args: GRPOScriptArguments, training_args: LenVMGRPOConfig, model_args: ModelConfig):
    results_path = os.path.join(training_args.output_dir, "results.json")
    run = start_run(
        training_args.output_dir,
        "grpo_gsm8k",
        config={"script_args": script_args, "training_args": training_args, "model_args": model_args},
        inputs={
            "model_name_or_path": model_args.model_name_or_path,
            "lenvm_model_name_or_path": training_args.lenvm_model_name_or_path,
            "dataset_name": script_args.dataset_name,
        },
        overwrite=script_args.overwrite_output_dir,
        reevaluate=script_args.reevaluate,
    )
    if run.done:
        return None, _read_results(results_path)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    train_dataset = prepare_prompt_dataset(train_dataset, script_args.system_prompt, script_args.instruction)
    if training_args.lenvm_model_name_or_path:  # the LenVM's values are conditioned on how its prompts were built
        lenvm_metadata = read_lenvm_config(Path(training_args.lenvm_model_name_or_path))
        check_prompt_format(lenvm_metadata.get("prompt_format"), script_args.system_prompt, script_args.instruction)
    # The policy's loading kwargs: GRPOConfig's model_init_kwargs if set, otherwise ModelConfig's dtype / attention.
    model_kwargs = training_args.model_init_kwargs or {"dtype": model_args.dtype or "float32"}
    if training_args.model_init_kwargs is None and model_args.attn_implementation:
        model_kwargs["attn_implementation"] = model_args.attn_implementation

    reward_funcs = [gsm8k_accuracy_reward]
    if script_args.length_penalty_coef:
        reward_funcs.append(
            length_penalty_reward(
                script_args.length_penalty_coef, correct_only=script_args.length_penalty_correct_only
            )
        )
    if script_args.kimi_length_coef:
        reward_funcs.append(kimi_length_reward(script_args.kimi_length_coef))
    if script_args.soft_overlong_cache is not None:
        max_length = script_args.soft_overlong_max_length or training_args.max_completion_length
        if script_args.soft_overlong_cache >= max_length:
            raise ValueError(
                f"--soft_overlong_cache ({script_args.soft_overlong_cache}) must be below the punishment's length "
                f"({max_length}, --soft_overlong_max_length or --max_completion_length)."
            )
        reward_funcs.append(get_soft_overlong_punishment(max_length, script_args.soft_overlong_cache))

    eval_dataset, results = None, {}
    is_main_process = PartialState().is_main_process
    evaluate = script_args.num_eval_problems > 0
    if evaluate:
        eval_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_problems, len(eval_dataset))))
        eval_dataset = prepare_prompt_dataset(eval_dataset, script_args.system_prompt, script_args.instruction)

    # The policy is loaded here (on every process: under ZeRO-3 loading shards it, a collective) so that the start
    # evaluation sees exactly the weights training starts from.
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    if evaluate:
        with gathered_parameters(model.parameters()):  # every process takes part in gathering; the main one evaluates
            if is_main_process:
                results["before"] = _evaluate(model, tokenizer, eval_dataset, script_args, training_args)
            PartialState().wait_for_everyone()

    if run.reevaluate:  # the trained policy saved in output_dir, evaluated again
        if evaluate:
            results = {**_read_results(results_path), **results}
            policy = AutoModelForCausalLM.from_pretrained(training_args.output_dir, **model_kwargs)
            with gathered_parameters(policy.parameters()):
                if is_main_process:
                    results["after"] = _evaluate(policy, tokenizer, eval_dataset, script_args, training_args)
                    write_json_atomic(results_path, results)
                PartialState().wait_for_everyone()
        run.complete()
        return None, results

    uses_length_critic = training_args.lenvm_model_name_or_path or training_args.lenvm_init == "policy"
    trainer_class = LenVMGRPOTrainer if uses_length_critic else CheckpointedGRPOTrainer
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    start_time = time.perf_counter()
    # A restarted run resumes from the last complete checkpoint of output_dir (incomplete ones are skipped).
    checkpoint = training_args.resume_from_checkpoint or last_complete_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = time.perf_counter() - start_time
    trainer.save_model(training_args.output_dir)

    if evaluate:
        if is_deepspeed_zero3_enabled():
            # The engine's ZeRO-3 hooks turn every forward into a collective, so a forward on the main process alone
            # would hang: reload the saved policy on every process instead (sharded as it loads) and gather it.
            trainer.accelerator.wait_for_everyone()  # the main process has finished writing the checkpoint
            policy = AutoModelForCausalLM.from_pretrained(training_args.output_dir, **model_kwargs)
        else:
            policy = trainer.accelerator.unwrap_model(trainer.model)  # with its LoRA adapter, if any
        with gathered_parameters(policy.parameters()):  # every process takes part in gathering; the main one evaluates
            if is_main_process:
                results["after"] = _evaluate(policy, tokenizer, eval_dataset, script_args, training_args)
            trainer.accelerator.wait_for_everyone()
    if evaluate and is_main_process:
        last_logs = [log for log in trainer.state.log_history if "loss" in log]
        results.update(
            trainer=trainer_class.__name__,
            global_step=trainer.state.global_step,
            train_seconds=round(train_seconds, 1),
            length_coef=getattr(training_args, "length_coef", 0.0),
            length_penalty_coef=script_args.length_penalty_coef,
            length_penalty_correct_only=script_args.length_penalty_correct_only,
            kimi_length_coef=script_args.kimi_length_coef,
            soft_overlong_cache=script_args.soft_overlong_cache,
            soft_overlong_max_length=script_args.soft_overlong_max_length,
            seed=training_args.seed,
            num_processes=trainer.accelerator.num_processes,
            distributed_type=str(trainer.accelerator.distributed_type),
            last_log=last_logs[-1] if last_logs else {},
        )
        write_json_atomic(results_path, results)
        logger.info("results: %s", json.dumps(results))
    trainer.accelerator.wait_for_everyone()
    run.complete()
    return trainer, results


def _read_results(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    return read_json(path, fix="restore it, or re-run with --reevaluate to evaluate the saved policy again")


def _evaluate(model, tokenizer, dataset, script_args, training_args) -> dict:
    return evaluate_policy(
        model,
        tokenizer,
        dataset,
        max_new_tokens=training_args.max_completion_length,
        temperature=training_args.temperature,
        batch_size=script_args.eval_batch_size,
        seed=training_args.seed,
    )


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
    end_launched_process()
