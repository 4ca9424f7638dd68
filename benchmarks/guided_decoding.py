"""LenVM-guided versus unguided decoding, and cached versus naive candidate scoring: tokens/s side by side in one run.

    python benchmarks/guided_decoding.py [--batch_size 4] [--max_new_tokens 256] [--top_k 8] [--repeats 3]
        [--output benchmarks/results/guided_decoding.json]

Models: a randomly initialised CPU-sized Llama-style policy and a LenVM of the same config (`from_backbone` of
another random Llama), so the LenVM is as large as the policy and the run does not depend on the demo world.
Stop tokens are disabled so that every row generates exactly `max_new_tokens` tokens (`prompt_length` prompt
tokens, left-padded to varying lengths).

1. Generation: `generate_with_length_guidance` with `mode="none"` (unguided; the same candidate-set sampler, no
   LenVM) versus `mode="tilt"` (every step scores all `top_k` candidates with the LenVM). Repeats are
   interleaved so machine noise hits both alike; the median is reported.
2. Candidate scoring alone, replaying the guided run's tokens: (a) cached, one `(B, k)` forward against the
   LenVM cache with a 4D tree mask, then keep the chosen column (what `lenvm_rl.guidance` does); (b) cached with
   the prefix cache repeated `k` times (`(B * k, 1)` forward), then keep the chosen copy; (c) naive, re-encode
   the whole prefix for every candidate without a cache. Scores of (a) and (c) are compared (max |diff|).

Prints a table and saves JSON with the ratios.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lenvm_rl.generation import left_pad
from lenvm_rl.guidance import (
    LengthGuidanceConfig,
    generate_with_length_guidance,
    score_candidates,
    score_candidates_by_reencoding,
)
from lenvm_rl.io import write_json_atomic
from lenvm_rl.kv_cache import keep_chosen_candidates, prefill
from lenvm_rl.modeling import LengthValueModel

VOCAB_SIZE = 2048
NO_STOP = [VOCAB_SIZE]  # an id no model emits: every row runs to max_new_tokens


def make_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def make_prompts(batch_size: int, prompt_length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randint(2, VOCAB_SIZE, (prompt_length - 8 * (i % 3),), generator=g).tolist() for i in range(batch_size)
    ]
    return left_pad(rows, pad_token_id=0)


def time_generation(policy, lenvm, input_ids, attention_mask, config, seed=0):
    start = time.perf_counter()
    out = generate_with_length_guidance(
        policy, input_ids, attention_mask, lenvm, config, generator=torch.Generator().manual_seed(seed)
    )
    seconds = time.perf_counter() - start
    return sum(map(len, out.completion_ids)) / seconds, out


@torch.no_grad()
def replay_scoring(lenvm, input_ids, attention_mask, completions, top_k, strategy, seed=0):
    """Score `top_k` candidates at every step of fixed completions; returns (tokens/s, scores (steps, B, k))."""
    g = torch.Generator().manual_seed(seed)
    B, steps = input_ids.size(0), len(completions[0])
    chosen = torch.tensor(completions)  # (B, steps)
    candidates = torch.randint(2, VOCAB_SIZE, (steps, B, top_k), generator=g)
    candidates[:, :, 0] = chosen.T  # candidate 0 is the token the run chose
    choices = torch.zeros(B, dtype=torch.long)
    scores = []
    start = time.perf_counter()
    prefix_ids, mask = input_ids, attention_mask
    positions = mask.sum(1)
    if strategy != "naive":
        _, cache = prefill(lenvm, input_ids, mask)
    for t in range(steps):
        if strategy == "tree_mask":
            scores.append(score_candidates(lenvm, candidates[t], cache, mask, positions))
            keep_chosen_candidates(cache, choices, top_k)
        elif strategy == "expand":
            expanded = DynamicCache(config=lenvm.config)
            for layer, source in zip(expanded.layers, cache.layers):  # a (B * k)-row copy of the prefix cache
                layer.lazy_initialization(source.keys, source.values)
                layer.keys = source.keys.repeat_interleave(top_k, dim=0)
                layer.values = source.values.repeat_interleave(top_k, dim=0)
            expanded_mask = torch.nn.functional.pad(mask.repeat_interleave(top_k, dim=0), (0, 1), value=1)
            scores.append(
                lenvm(
                    candidates[t].reshape(B * top_k, 1),
                    attention_mask=expanded_mask,
                    position_ids=positions.repeat_interleave(top_k)[:, None],
                    cache=expanded,
                    use_cache=True,
                ).values.reshape(B, top_k)
            )
            for layer, source in zip(cache.layers, expanded.layers):  # keep the chosen copy's new column
                index = torch.arange(B) * top_k + choices
                layer.keys = torch.cat([layer.keys, source.keys[index, :, -1:]], dim=2)
                layer.values = torch.cat([layer.values, source.values[index, :, -1:]], dim=2)
        else:
            scores.append(score_candidates_by_reencoding(lenvm, prefix_ids, mask, candidates[t]))
        prefix_ids = torch.cat([prefix_ids, chosen[:, t : t + 1]], dim=1)
        mask = torch.nn.functional.pad(mask, (0, 1), value=1)
        positions = positions + 1
    seconds = time.perf_counter() - start
    return B * steps / seconds, torch.stack(scores)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_threads", type=int, default=1)  # 2 threads spin on tiny matmuls
    parser.add_argument("--output", default="benchmarks/results/guided_decoding.json")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)

    policy = make_llama(seed=0)
    lenvm = LengthValueModel.from_backbone(make_llama(seed=1), gamma=0.997).eval()
    input_ids, attention_mask = make_prompts(args.batch_size, args.prompt_length)
    common = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, stop_token_ids=NO_STOP)
    configs = {
        "unguided": LengthGuidanceConfig(mode="none", **common),
        "guided": LengthGuidanceConfig(mode="tilt", beta=-1.0, **common),
    }

    # 1. End-to-end generation, interleaved repeats after one short warm-up each.
    warmup = dict(common, max_new_tokens=8)
    generate_with_length_guidance(policy, input_ids, attention_mask, None, LengthGuidanceConfig(mode="none", **warmup))
    generate_with_length_guidance(
        policy, input_ids, attention_mask, lenvm, LengthGuidanceConfig(mode="tilt", **warmup)
    )
    speeds = {name: [] for name in configs}
    guided_run = None
    for _ in range(args.repeats):
        for name, config in configs.items():
            tokens_per_second, out = time_generation(policy, lenvm if name == "guided" else None, input_ids,
                                                     attention_mask, config)  # fmt: skip
            speeds[name].append(tokens_per_second)
            guided_run = out if name == "guided" else guided_run
    generation = {name: statistics.median(values) for name, values in speeds.items()}

    # 2. Candidate scoring alone, replaying the guided completions.
    scoring, scores = {}, {}
    for strategy in ("tree_mask", "expand", "naive"):
        replay_scoring(
            lenvm, input_ids, attention_mask, [c[:4] for c in guided_run.completion_ids], args.top_k, strategy
        )  # fmt: skip  (warm-up)
        runs = [
            replay_scoring(lenvm, input_ids, attention_mask, guided_run.completion_ids, args.top_k, strategy)
            for _ in range(1 if strategy == "naive" else args.repeats)
        ]
        scoring[strategy] = statistics.median(r[0] for r in runs)
        scores[strategy] = runs[0][1]
    max_diff = float((scores["tree_mask"] - scores["naive"]).abs().max())
    max_diff_expand = float((scores["expand"] - scores["naive"]).abs().max())

    results = {
        "setup": {
            "models": "random Llama (vocab 2048, hidden 256, 4 layers, 4 heads) as policy; LenVM from_backbone of "
            "another random Llama of the same config (as large as the policy)",
            "batch_size": args.batch_size,
            "prompt_length": args.prompt_length,
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "repeats": args.repeats,
            "num_threads": args.num_threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "generation_tokens_per_second": generation,
        "guided_slowdown": generation["unguided"] / generation["guided"],
        "scoring_tokens_per_second": scoring,
        "cached_vs_naive_speedup": scoring["tree_mask"] / scoring["naive"],
        "tree_mask_vs_expand_speedup": scoring["tree_mask"] / scoring["expand"],
        "max_abs_score_diff_cached_vs_naive": max_diff,
        "max_abs_score_diff_expand_vs_naive": max_diff_expand,
        "reference": "SGLang fork, H100, Qwen2.5-7B + 1.5B LenVM, top-k 5: guided 4.55x slower end to end",
        "raw": {"generation": speeds},
    }
    rows = [
        ("generation, unguided (tokens/s)", f"{generation['unguided']:.1f}"),
        ("generation, LenVM-guided (tokens/s)", f"{generation['guided']:.1f}"),
        ("guided slowdown (unguided / guided)", f"{results['guided_slowdown']:.2f}x"),
        ("scoring, cached tree mask (tokens/s)", f"{scoring['tree_mask']:.1f}"),
        ("scoring, cached + k copies of the cache (tokens/s)", f"{scoring['expand']:.1f}"),
        ("scoring, naive re-encoding (tokens/s)", f"{scoring['naive']:.2f}"),
        ("cached / naive speedup", f"{results['cached_vs_naive_speedup']:.1f}x (target >= 5x)"),
        ("tree mask / expanded cache speedup", f"{results['tree_mask_vs_expand_speedup']:.2f}x"),
        ("max |score diff| cached vs naive", f"{max_diff:.2e}"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, results)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
