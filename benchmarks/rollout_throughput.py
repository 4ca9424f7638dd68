"""Rollout sampling throughput: lenvm-rl's continuous-batching sampler against plain padded `model.generate`.

    python benchmarks/rollout_throughput.py --model tiny
    python benchmarks/rollout_throughput.py --model smollm2 --num_prompts 32 --num_samples 4 --batch_size 32 \
        --max_new_tokens 256 --repeats 2

Completion lengths are long-tailed, and a static batch decodes until its longest row: padded generation spends its
steps on rows that have finished. The arms, each sampling `num_prompts x num_samples` completions with the same
temperature (top-k and top-p off) and cap, alternating A B, B A, ... after one short warm-up each:

- `ours`: [`lenvm_rl.generation.generate_completions`] (what `sample_rollouts` calls), `batch_size` rows in flight;
- `padded`: `model.generate(do_sample=True)` on consecutive left-padded batches of `batch_size` rows (every sample of
  a prompt in one batch, as TRL's samplers lay them out), tokens counted up to and including each row's EOS;
- `hf_continuous` (with `--hf_continuous`): transformers' own continuous batching, `model.generate_batch`.

The headline is the median over repeats of the paired ratio of tokens/s (ours / padded). Each arm draws its own
samples, so the length distribution of every arm is reported (mean, fraction at the cap) to show they match.

Models. `tiny`: a random Llama (vocab 128, 4 layers) whose near-uniform next-token distribution ends a completion
with probability ~1/128 per token (geometric lengths, ~13% reach a cap of 256). `smollm2`: the real
SmolLM2-135M-Instruct (`outputs/smollm2/model`) on GSM8K train questions (`--dataset`, chat template and the rollout
recipes' instruction), temperature 0.7 as in `recipes/configs/rollouts_gsm8k_smollm2.yaml` (~28% of its completions
reach 256 tokens).
"""

import argparse
import os
import statistics
import sys
import time

import torch
from bench_utils import DTYPES, RESULTS, machine, paired_ratio, save, smollm2_dir, spread
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lenvm_rl.generation import generate_completions, left_pad, tokenize_prompts


def tiny_model_and_prompts(num_prompts):
    vocab = 128
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(f"w{i}" for i in torch.randint(0, vocab - 3, (int(torch.randint(16, 48, (1,), generator=g)),),
                                                 generator=g).tolist())
        for _ in range(num_prompts)
    ]  # fmt: skip
    return model, tokenizer, prompts, "random Llama (vocab 128, hidden 256, 4 layers), random word prompts"


def smollm2_model_and_prompts(num_prompts, dtype, dataset):
    from lenvm_rl.data import load_gsm8k, prepare_prompt_dataset

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = list(prepare_prompt_dataset(load_gsm8k(dataset, "train").select(range(num_prompts)))["prompt"])
    description = f"real SmolLM2-135M-Instruct ({dtype}); the first {num_prompts} GSM8K train questions"
    return model, tokenizer, prompts, description


def run_ours(model, tokenizer, prompts, args, seed):
    completions = generate_completions(
        model, tokenizer, prompts, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, batch_size=args.batch_size, seed=seed,
    )  # fmt: skip
    return [len(c.completion_ids) for c in completions]


def run_padded(model, tokenizer, prompts, args, seed):
    torch.manual_seed(seed)
    rows = [ids for ids in tokenize_prompts(tokenizer, prompts) for _ in range(args.num_samples)]
    eos = tokenizer.eos_token_id
    lengths = []
    for start in range(0, len(rows), args.batch_size):
        input_ids, attention_mask = left_pad(rows[start : start + args.batch_size], tokenizer.pad_token_id)
        out = model.generate(
            input_ids, attention_mask=attention_mask, do_sample=True, temperature=args.temperature, top_k=0,
            top_p=1.0, max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )[:, input_ids.size(1) :]  # fmt: skip
        for row in out.tolist():
            lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


def run_hf_continuous(model, tokenizer, prompts, args, seed):
    torch.manual_seed(seed)
    rows = [ids for ids in tokenize_prompts(tokenizer, prompts) for _ in range(args.num_samples)]
    config = GenerationConfig(
        do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    outputs = model.generate_batch(inputs=rows, generation_config=config, progress_bar=False)
    return [len(out.generated_tokens) for out in outputs.values()]


ARMS = {"ours": run_ours, "padded": run_padded, "hf_continuous": run_hf_continuous}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="smollm2 weights (as the recipes)")
    parser.add_argument("--dataset", default="/work/shared/data/gsm8k", help="GSM8K (smollm2)")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf_continuous", action="store_true", help="also time transformers' generate_batch")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="default: benchmarks/results/rollout_throughput_<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    output = args.output or RESULTS / f"rollout_throughput_{args.model}.json"

    if args.model == "tiny":
        model, tokenizer, prompts, description = tiny_model_and_prompts(args.num_prompts)
    else:
        model, tokenizer, prompts, description = smollm2_model_and_prompts(args.num_prompts, args.dtype, args.dataset)
    arms = ["ours", "padded"] + (["hf_continuous"] if args.hf_continuous else [])
    warmup = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    for arm in arms:
        ARMS[arm](model, tokenizer, prompts[: max(1, args.batch_size // args.num_samples)], warmup, seed=0)

    seconds = {arm: [] for arm in arms}
    lengths = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            start = time.perf_counter()
            run_lengths = ARMS[arm](model, tokenizer, prompts, args, seed=repeat)
            seconds[arm].append(time.perf_counter() - start)
            lengths[arm].append(run_lengths)
            print(
                f"repeat {repeat} {arm:<14} {seconds[arm][-1]:7.1f} s  {sum(run_lengths) / seconds[arm][-1]:7.1f} "
                f"tokens/s  mean length {statistics.mean(run_lengths):.1f}",
                flush=True,
            )
    tokens_per_second = {arm: [sum(n) / s for n, s in zip(lengths[arm], seconds[arm])] for arm in arms}
    result = {
        "benchmark": "rollout_throughput",
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "setup": {
            "models": description,
            "completions_per_run": len(prompts) * args.num_samples,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": "off",
            "top_p": 1.0,
        },
        "tokens_per_second": {arm: spread(values) | {"runs": values} for arm, values in tokens_per_second.items()},
        "seconds": {arm: spread(values) for arm, values in seconds.items()},
        "lengths": {
            arm: {
                "mean": statistics.mean(n for run in runs for n in run),
                "median": statistics.median(n for run in runs for n in run),
                "fraction_at_cap": sum(n >= args.max_new_tokens for run in runs for n in run)
                / sum(len(run) for run in runs),
            }
            for arm, runs in lengths.items()
        },
        "ours_over_padded_tokens_per_second": paired_ratio(tokens_per_second["ours"], tokens_per_second["padded"]),
    }
    if args.hf_continuous:
        result["hf_continuous_over_padded_tokens_per_second"] = paired_ratio(
            tokens_per_second["hf_continuous"], tokens_per_second["padded"]
        )
        result["ours_over_hf_continuous_tokens_per_second"] = paired_ratio(
            tokens_per_second["ours"], tokens_per_second["hf_continuous"]
        )
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ratio = result["ours_over_padded_tokens_per_second"]
    print(
        f"ours / padded tokens/s: {ratio['median']:.2f}x (min {ratio['min']:.2f}, max {ratio['max']:.2f}; target >= 1.5x)"
    )
    if args.hf_continuous:
        print(
            f"transformers continuous / padded: {result['hf_continuous_over_padded_tokens_per_second']['median']:.2f}x"
        )
    save(result, output)


if __name__ == "__main__":
    main()
