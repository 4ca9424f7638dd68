"""Evaluate a LenVM's length predictions on held-out prompts (paper section 5), next to two baselines.

    # the offline demo world (after recipes/train_lenvm.py --config recipes/configs/lenvm_demo.yaml)
    python recipes/eval_length_prediction.py --lenvm_path outputs/demo/lenvm \
        --train_rollouts outputs/demo/rollouts/train --eval_rollouts outputs/demo/rollouts/eval \
        --output_dir outputs/demo
    # a reference-format LenVM (no gamma stored), rollouts given as a glob of jsonl files
    python recipes/eval_length_prediction.py --lenvm_path path/to/lenvm --gamma 0.997 \
        --eval_rollouts "rollouts/eval/*.jsonl" --output_dir outputs/eval
    # the same arguments from a YAML file
    python recipes/eval_length_prediction.py --config my_eval.yaml

Writes `eval_length_prediction.json` (the keys are documented in `lenvm_rl.evaluation.evaluate_length_prediction`)
and `eval_length_prediction.png` to `output_dir`, and prints a table. Completions cut at the sampling cap are
left out of the ground truth (their true length is unknown) and counted.
"""

from dataclasses import asdict
from pathlib import Path

import torch
from datasets import load_dataset
from trl import TrlParser

from lenvm_rl.configs import EvalLengthPredictionArguments
from lenvm_rl.evaluation import (
    evaluate_length_prediction,
    format_length_prediction_table,
    plot_length_prediction,
    start_evaluation,
    write_results,
)
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import load_rollouts

RESULTS_NAME = "eval_length_prediction"  # eval_length_prediction.json and eval_length_prediction.png


def main(script_args: EvalLengthPredictionArguments) -> dict:
    inputs = {key: getattr(script_args, key) for key in ("lenvm_path", "eval_rollouts", "train_rollouts")}
    run, finished = start_evaluation(script_args, RESULTS_NAME, inputs)
    if finished is not None:
        return finished
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LengthValueModel.from_pretrained(script_args.lenvm_path, gamma=script_args.gamma).to(device)
    train_dataset = _load_records(script_args.train_rollouts) if script_args.train_rollouts else None
    results = evaluate_length_prediction(
        model,
        _load_records(script_args.eval_rollouts),
        train_dataset,
        batch_size=script_args.batch_size,
        max_prompt_length=script_args.max_prompt_length,
        max_length=script_args.max_length,
        min_completions_per_prompt=script_args.min_completions_per_prompt,
    )
    results = {"args": asdict(script_args), **results}

    json_path, png_path = write_results(results, script_args.output_dir, RESULTS_NAME, plot_length_prediction)
    print(format_length_prediction_table(results))
    print(f"Wrote {json_path} and {png_path}")
    run.complete()
    return results


def _load_records(path: str):
    # A rollout directory has its own layout (shards of chunks); a file or a glob goes to the json builder.
    if Path(path).is_dir():
        return load_rollouts(path)
    return load_dataset("json", data_files=path, split="train")


if __name__ == "__main__":
    (script_args,) = TrlParser(EvalLengthPredictionArguments).parse_args_and_config()
    main(script_args)
