"""GRPO on GSM8K with a frozen LenVM as a per-token length critic (method doc section 6).

    # the offline demo world (after `bash recipes/demo.sh` built outputs/demo/world and outputs/demo/lenvm)
    python recipes/grpo_gsm8k.py --config recipes/configs/grpo_demo.yaml
    # GPU scale: Qwen2.5-1.5B-Instruct policy + the LenVM of recipes/configs/lenvm_qwen2.5_1.5b.yaml, ZeRO-3
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml recipes/grpo_gsm8k.py \
        --config recipes/configs/grpo_gsm8k_qwen2.5_1.5b.yaml

The reward is GSM8K accuracy ([`~lenvm_rl.gsm8k_accuracy_reward`]). Without `lenvm_model_name_or_path` the run is
plain `trl.GRPOTrainer`; with it, [`~lenvm_rl.LenVMGRPOTrainer`] (`length_coef: 0` is then plain GRPO plus the
`length/` metrics). Two sequence-level length baselines for ablations: `length_penalty_coef` (reward `-alpha * L`)
and `soft_overlong_cache` (TRL's `get_soft_overlong_punishment`, DAPO eq. 13). With `num_eval_problems > 0`, the
main process samples one completion per held-out problem before and after training and writes `results.json`
(accuracy, mean completion tokens, fraction cut at the length cap) next to the saved policy.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field

from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOTrainer, ModelConfig, TrlParser, get_peft_config
from trl.rewards import get_soft_overlong_punishment

from lenvm_rl.data import DEFAULT_INSTRUCTION, load_gsm8k, prepare_prompt_dataset
from lenvm_rl.evaluation import evaluate_gsm8k
from lenvm_rl.rewards import gsm8k_accuracy_reward
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class GRPOScriptArguments:
    """Data, baseline and evaluation arguments of `recipes/grpo_gsm8k.py`."""

    dataset_name: str = field(
        default="openai/gsm8k",
        metadata={
            "help": "Hub id or local path of GSM8K-format data (question, answer), e.g. outputs/demo/world/data."
        },
    )
    dataset_config: str = field(default="main", metadata={"help": "Hub configuration (main or socratic)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split of the held-out evaluation problems."})
    system_prompt: str | None = field(default=None, metadata={"help": "Content of a leading system message."})
    instruction: str | None = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Text appended to each question (null for the demo world, whose policy saw none)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N problems only."})
    length_penalty_coef: float = field(
        default=0.0, metadata={"help": "Baseline: add the sequence-level reward -alpha * completion tokens."}
    )
    soft_overlong_cache: int | None = field(
        default=None,
        metadata={"help": "Baseline: add TRL's soft overlong punishment over the last N tokens before the cap."},
    )
    num_eval_problems: int = field(
        default=0, metadata={"help": "Held-out problems sampled before and after training for results.json (0: skip)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Rows decoded together in the evaluation."})


def length_penalty_reward(coef: float):
    """The sequence-level length penalty `-coef * L` (L = completion tokens, EOS included) as a TRL reward."""

    def length_penalty_reward(completion_ids, **kwargs) -> list[float]:
        return [-coef * len(ids) for ids in completion_ids]

    return length_penalty_reward


def evaluate_policy(model, tokenizer, dataset, max_new_tokens: int, temperature: float, batch_size: int, seed: int):
    """Accuracy, mean completion tokens (EOS included) and fraction cut at the cap, one sample per problem
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
    }


def main(script_args: GRPOScriptArguments, training_args: LenVMGRPOConfig, model_args: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
    if script_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
    train_dataset = prepare_prompt_dataset(train_dataset, script_args.system_prompt, script_args.instruction)
    if training_args.model_init_kwargs is None:
        training_args.model_init_kwargs = {"dtype": model_args.dtype or "float32"}
        if model_args.attn_implementation:
            training_args.model_init_kwargs["attn_implementation"] = model_args.attn_implementation

    reward_funcs = [gsm8k_accuracy_reward]
    if script_args.length_penalty_coef:
        reward_funcs.append(length_penalty_reward(script_args.length_penalty_coef))
    if script_args.soft_overlong_cache is not None:
        max_length, cache = training_args.max_completion_length, script_args.soft_overlong_cache
        reward_funcs.append(get_soft_overlong_punishment(max_length, cache))

    eval_dataset, results = None, {}
    evaluate = script_args.num_eval_problems > 0 and training_args.process_index == 0
    if script_args.num_eval_problems > 0:
        eval_dataset = load_gsm8k(script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_config)
        eval_dataset = eval_dataset.select(range(min(script_args.num_eval_problems, len(eval_dataset))))
        eval_dataset = prepare_prompt_dataset(eval_dataset, script_args.system_prompt, script_args.instruction)
    if evaluate:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **training_args.model_init_kwargs)
        results["before"] = _evaluate(model, tokenizer, eval_dataset, script_args, training_args)
        del model

    trainer_class = LenVMGRPOTrainer if training_args.lenvm_model_name_or_path else GRPOTrainer
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    start_time = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start_time
    trainer.save_model(training_args.output_dir)

    if evaluate:
        results["after"] = _evaluate(_trained_policy(trainer), tokenizer, eval_dataset, script_args, training_args)
        last_logs = [log for log in trainer.state.log_history if "loss" in log]
        results.update(
            trainer=trainer_class.__name__,
            global_step=trainer.state.global_step,
            train_seconds=round(train_seconds, 1),
            length_coef=getattr(training_args, "length_coef", 0.0),
            length_penalty_coef=script_args.length_penalty_coef,
            soft_overlong_cache=script_args.soft_overlong_cache,
            seed=training_args.seed,
            last_log=last_logs[-1] if last_logs else {},
        )
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        logger.info("results: %s", json.dumps(results))
    trainer.accelerator.wait_for_everyone()
    return trainer, results


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


def _trained_policy(trainer):
    """The trained policy as a plain causal LM: reloaded from disk when ZeRO-3 shards it, LoRA merged otherwise."""
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return AutoModelForCausalLM.from_pretrained(trainer.args.output_dir, **trainer.args.model_init_kwargs)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


if __name__ == "__main__":
    parser = TrlParser((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
