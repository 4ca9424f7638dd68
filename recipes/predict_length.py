"""Predict the completion length of prompts with a LenVM, or evaluate its predictions on held-out rollouts.

    # predicted total length (tokens, EOS included) of each prompt of a jsonl file
    python recipes/predict_length.py --lenvm_path outputs/demo/lenvm --input_file prompts.jsonl \
        --output_file outputs/demo/predicted_lengths.jsonl
    # evaluate against sampled rollouts (reuses lenvm_rl.evaluation.evaluate_length_prediction)
    python recipes/predict_length.py --lenvm_path outputs/demo/lenvm --eval_rollouts outputs/demo/rollouts/eval

Each input line holds `prompt` (chat messages, rendered with the LenVM's chat template and a generation prompt) or
`question` (wrapped as one user message, with the optional `--system_prompt` / `--instruction`). The prediction is
read at the last prompt token, ``L_hat = log(1 + V(s_0)) / log(gamma)``; being the inverse of a predicted mean
value, it sits at or below the mean length (paper section 1).
"""

import json
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import TrlParser

from lenvm_rl.configs import PredictLengthArguments
from lenvm_rl.data import make_conversational_prompt
from lenvm_rl.evaluation import evaluate_length_prediction, format_length_prediction_table
from lenvm_rl.generation import left_pad, tokenize_prompts
from lenvm_rl.io import write_json_atomic, write_jsonl_atomic
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import load_rollouts


def main(script_args: PredictLengthArguments) -> list[dict] | dict:
    lenvm = LengthValueModel.from_pretrained(script_args.lenvm_path, gamma=script_args.gamma).eval()
    if script_args.eval_rollouts is not None:
        train = _load_records(script_args.train_rollouts) if script_args.train_rollouts else None
        results = evaluate_length_prediction(lenvm, _load_records(script_args.eval_rollouts), train)
        print(format_length_prediction_table(results))
        if script_args.output_file:
            write_json_atomic(script_args.output_file, results)
        return results

    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer_path or script_args.lenvm_path)
    rows = [json.loads(line) for line in Path(script_args.input_file).read_text().splitlines() if line.strip()]
    prompts = []
    for i, row in enumerate(rows):
        if "prompt" in row:
            prompts.append(row["prompt"])
        elif "question" in row:
            prompts.append(
                make_conversational_prompt(row["question"], script_args.system_prompt, script_args.instruction)
            )
        else:
            raise ValueError(f"{script_args.input_file} line {i + 1} has neither `prompt` nor `question`.")
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    predictions = []
    for start in range(0, len(rows), script_args.batch_size):
        input_ids, attention_mask = left_pad(
            prompt_ids[start : start + script_args.batch_size], tokenizer.pad_token_id
        )
        predictions += lenvm.predict_prompt_lengths(input_ids, attention_mask).tolist()
    outputs = [
        {**{key: row[key] for key in ("question", "prompt") if key in row}, "predicted_length": length}
        for row, length in zip(rows, predictions)
    ]
    for i, out in enumerate(outputs):
        print(f"{i:>4}  {out['predicted_length']:8.1f} tokens")
    if script_args.output_file:
        write_jsonl_atomic(script_args.output_file, outputs)
        print(f"Wrote {script_args.output_file}")
    return outputs


def _load_records(path: str):
    return load_rollouts(path) if Path(path).is_dir() else load_dataset("json", data_files=path, split="train")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    (script_args,) = TrlParser(PredictLengthArguments).parse_args_and_config()
    main(script_args)
