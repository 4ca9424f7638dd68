"""LenVM-guided versus unguided decoding, and cached versus naive candidate scoring: paired ratios in one run.

    python benchmarks/guided_decoding.py --model tiny                       # random 4-layer Llama, seconds
    python benchmarks/guided_decoding.py --model smollm2 --batch_sizes 4 1  # SmolLM2-135M policy + 135M LenVM
    python benchmarks/guided_decoding.py --model smollm2 --dtype bfloat16 --batch_sizes 4 1

Models. `tiny`: a randomly initialised Llama (vocab 2048, hidden 256, 4 layers) as the policy and a LenVM built
`from_backbone` on another random Llama of the same config. `smollm2`: the real SmolLM2-135M-Instruct checkpoint
(`outputs/smollm2/model`, `make smollm2`) as the policy and `LengthValueModel.from_backbone(policy, gamma=0.997)`
(a 135M LenVM with a seeded random head: timing does not depend on what the head learned). Stop tokens are disabled
so every row generates exactly `max_new_tokens` tokens after a random prompt of `prompt_length` tokens (rows
left-padded to different lengths).

1. Generation, per batch size: `generate_with_length_guidance` with `mode="none"` (unguided: the same candidate-set
   sampler, no LenVM) and `mode="tilt"` (the LenVM scores all `top_k` candidates every step), and with `--hf_generate`
   also transformers' `model.generate(do_sample=True, top_k=...)`. The arms alternate (A B, B A, ...) after one
   warm-up each; the headline is the median over repeats of the paired ratio guided / unguided time. Forward hooks
   split each run into the policy's forwards, the LenVM's forwards and the rest (the decoding loop); the *floor* is
   the ratio the forwards alone would give (one policy forward of `B` tokens plus one LenVM forward of `B * k`
   tokens per step, over one policy forward of `B` tokens).
2. Candidate scoring alone, replaying the first `replay_tokens` tokens of the guided run: (a) cached, one `(B, k)`
   forward against the LenVM cache with a 4D tree mask, then keep the chosen column (`lenvm_rl.guidance`); (b) cached
   with the prefix cache repeated `k` times (`(B * k, 1)` forward); (c) naive, re-encode the prefix for every
   candidate. Interleaved repeats; the scores of (a) and (c) are compared (max |diff|).
3. `--profile`: `torch.profiler` over one guided run of `profile_tokens` tokens; the aten time is grouped (matrix
   multiplies, attention, copies, other) and what is outside aten (Python, dispatch) is the remainder.
4. The GEMM floor: the ratio the weight matrix multiplies alone set (policy layers and LM head at `B` rows; plus the
   LenVM's layers at `B * k` rows for a guided step), timed with `F.linear` on the models' own weights.

Prints a table and saves JSON with the machine description.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from bench_utils import RESULTS, load_smollm2, machine, paired_ratio, save, spread
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lenvm_rl.generation import left_pad
from lenvm_rl.guidance import (
    LengthGuidanceConfig,
    generate_with_length_guidance,
    score_candidates,
    score_candidates_by_reencoding,
)
from lenvm_rl.kv_cache import keep_chosen_candidates, prefill
from lenvm_rl.modeling import LengthValueModel

TINY_VOCAB = 2048


def make_tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
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


def make_models(name: str, dtype: str):
    """(policy, LenVM, description)."""
    if name == "tiny":
        policy = make_tiny_llama(seed=0)
        lenvm = LengthValueModel.from_backbone(make_tiny_llama(seed=1), gamma=0.997).eval()
        return policy, lenvm, (
            "random Llama (vocab 2048, hidden 256, 4 layers, 4 heads) as policy; LenVM from_backbone of another random "
            "Llama of the same config"
        )  # fmt: skip
    policy = load_smollm2(dtype)
    torch.manual_seed(1)  # the LenVM's fresh value head
    lenvm = LengthValueModel.from_backbone(policy, gamma=0.997).eval()
    return policy, lenvm, (
        f"real SmolLM2-135M-Instruct ({dtype}) as policy; LenVM = from_backbone(policy, gamma=0.997) (135M backbone, "
        "seeded random head)"
    )  # fmt: skip


def make_prompts(batch_size: int, prompt_length: int, vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randint(3, vocab_size, (prompt_length - 8 * (i % 3),), generator=g).tolist() for i in range(batch_size)
    ]
    return left_pad(rows, pad_token_id=0)


class ForwardTimer:
    """Wall seconds spent inside each named model's forward, through forward pre/post hooks."""

    def __init__(self, **models):
        self.seconds = dict.fromkeys(models, 0.0)
        self.handles = []
        for name, model in models.items():
            self.handles.append(model.register_forward_pre_hook(lambda *_, n=name: self._start(n)))
            self.handles.append(model.register_forward_hook(lambda *_, n=name: self._stop(n)))

    def _start(self, name):
        self.started = time.perf_counter()

    def _stop(self, name):
        self.seconds[name] += time.perf_counter() - self.started

    def take(self) -> dict:
        seconds, self.seconds = self.seconds, dict.fromkeys(self.seconds, 0.0)
        return seconds

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_arm(arm, policy, lenvm, input_ids, attention_mask, args, stop_ids, max_new_tokens, seed=0):
    """One generation; returns (seconds, output or None)."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    if arm == "hf_generate":
        policy.generate(
            input_ids, attention_mask=attention_mask, do_sample=True, top_k=args.top_k, top_p=1.0, temperature=1.0,
            max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0,
        )  # fmt: skip
        return time.perf_counter() - start, None
    config = LengthGuidanceConfig(
        mode="none" if arm == "unguided" else "tilt", beta=-1.0, top_k=args.top_k,
        max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
    )  # fmt: skip
    out = generate_with_length_guidance(
        policy, input_ids, attention_mask, lenvm if arm == "guided" else None, config, generator=generator
    )
    return time.perf_counter() - start, out


def generation(policy, lenvm, batch_size, args, stop_ids, vocab_size):
    input_ids, attention_mask = make_prompts(batch_size, args.prompt_length, vocab_size)
    arms = ["unguided", "guided"] + (["hf_generate"] if args.hf_generate else [])
    for arm in arms:  # warm-up
        run_arm(arm, policy, lenvm, input_ids, attention_mask, args, stop_ids, max_new_tokens=4)
    timer = ForwardTimer(policy=policy, lenvm=lenvm)
    seconds = {arm: [] for arm in arms}
    forwards = {arm: [] for arm in arms}
    guided_run = None
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            timer.take()
            wall, out = run_arm(arm, policy, lenvm, input_ids, attention_mask, args, stop_ids, args.max_new_tokens)
            seconds[arm].append(wall)
            forwards[arm].append(timer.take())
            guided_run = out if arm == "guided" else guided_run
            print(f"  B={batch_size} repeat {repeat} {arm:<12} {wall:7.2f} s", flush=True)
    timer.remove()
    tokens = batch_size * args.max_new_tokens
    result = {
        "batch_size": batch_size,
        "tokens_per_run": tokens,
        "seconds": {arm: spread(values) | {"runs": values} for arm, values in seconds.items()},
        "tokens_per_second": {arm: tokens / statistics.median(values) for arm, values in seconds.items()},
        "guided_over_unguided": paired_ratio(seconds["guided"], seconds["unguided"]),
        # What the forwards alone cost: policy forwards of the unguided run vs policy + LenVM forwards of the guided one.
        "floor_forwards_only": paired_ratio(
            [f["policy"] + f["lenvm"] for f in forwards["guided"]], [f["policy"] for f in forwards["unguided"]]
        ),
        "time_split": {
            arm: {
                "policy_forward_share": statistics.median(
                    f["policy"] / s for f, s in zip(forwards[arm], seconds[arm])
                ),
                "lenvm_forward_share": statistics.median(f["lenvm"] / s for f, s in zip(forwards[arm], seconds[arm])),
                "outside_forwards_share": statistics.median(
                    1 - (f["policy"] + f["lenvm"]) / s for f, s in zip(forwards[arm], seconds[arm])
                ),
            }
            for arm in arms
        },
    }
    if args.hf_generate:
        result["guided_over_hf_generate"] = paired_ratio(seconds["guided"], seconds["hf_generate"])
        result["unguided_over_hf_generate"] = paired_ratio(seconds["unguided"], seconds["hf_generate"])
    return result, (input_ids, attention_mask, guided_run)


@torch.no_grad()
def replay_scoring(lenvm, input_ids, attention_mask, completions, top_k, strategy, vocab_size, seed=0):
    """Score `top_k` candidates at every step of fixed completions; returns (seconds, scores (steps, B, k))."""
    g = torch.Generator().manual_seed(seed)
    B, steps = input_ids.size(0), len(completions[0])
    chosen = torch.tensor(completions)  # (B, steps)
    candidates = torch.randint(3, vocab_size, (steps, B, top_k), generator=g)
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
    return time.perf_counter() - start, torch.stack(scores)


def scoring(lenvm, input_ids, attention_mask, guided_run, args, vocab_size):
    completions = [c[: args.replay_tokens] for c in guided_run.completion_ids]
    strategies = ("tree_mask", "expand", "naive")
    for strategy in strategies:  # warm-up
        replay_scoring(
            lenvm, input_ids, attention_mask, [c[:2] for c in completions], args.top_k, strategy, vocab_size
        )
    seconds = {s: [] for s in strategies}
    scores = {}
    for repeat in range(args.replay_repeats):
        for strategy in strategies if repeat % 2 == 0 else strategies[::-1]:
            wall, scores[strategy] = replay_scoring(
                lenvm, input_ids, attention_mask, completions, args.top_k, strategy, vocab_size
            )
            seconds[strategy].append(wall)
    steps = input_ids.size(0) * len(completions[0])
    return {
        "replayed_tokens_per_row": len(completions[0]),
        "tokens_per_second": {s: steps / statistics.median(v) for s, v in seconds.items()},
        "cached_over_naive_speedup": paired_ratio(seconds["naive"], seconds["tree_mask"]),
        "tree_mask_over_expand_speedup": paired_ratio(seconds["expand"], seconds["tree_mask"]),
        "max_abs_score_diff_cached_vs_naive": float((scores["tree_mask"] - scores["naive"]).abs().max()),
        "max_abs_score_diff_expand_vs_naive": float((scores["expand"] - scores["naive"]).abs().max()),
    }


PROFILE_GROUPS = {
    "matrix multiplies (weights)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkl_linear", "mkldnn"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "copies (cat, copy_, clone, index, gather)": (
        "aten::cat",
        "aten::copy_",
        "aten::clone",
        "aten::index",
        "aten::gather",
        "aten::_to_copy",
    ),  # fmt: skip
}


@torch.no_grad()
def gemm_floor(policy, lenvm, batch_size, top_k, repeats=5):
    """
    The floor of the guided / unguided ratio set by the matrix multiplies alone: one pass of `F.linear` over every
    weight matrix of the policy's layers and LM head at `B` rows against the same plus the LenVM's layers at `B * k`
    rows (a guided step), alternating, median of `repeats`. On a CPU whose GEMM is not flat in the row count (fp32
    here), this floor is above 2.
    """

    def weights(model):
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dim() == 2]

    policy_weights, lenvm_weights = weights(policy), weights(lenvm.backbone)

    def one_pass(matrices, rows):
        inputs = {w.size(1): torch.randn(rows, w.size(1), dtype=w.dtype) for w in matrices}
        start = time.perf_counter()
        for w in matrices:
            torch.nn.functional.linear(inputs[w.size(1)], w)
        return time.perf_counter() - start

    seconds = {"policy_B": [], "lenvm_Bk": []}
    for _ in range(repeats):
        seconds["policy_B"].append(one_pass(policy_weights, batch_size))
        seconds["lenvm_Bk"].append(one_pass(lenvm_weights, batch_size * top_k))
    policy_s, lenvm_s = (statistics.median(v) for v in seconds.values())
    return {
        "policy_gemm_seconds_B_rows": policy_s,
        "lenvm_gemm_seconds_Bk_rows": lenvm_s,
        "floor_guided_over_unguided": (policy_s + lenvm_s) / policy_s,
    }


def profile(policy, lenvm, batch_size, args, stop_ids, vocab_size):
    """Where one guided run's time goes: grouped aten self time, and the rest (Python, dispatch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    input_ids, attention_mask = make_prompts(batch_size, args.prompt_length, vocab_size)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_arm("guided", policy, lenvm, input_ids, attention_mask, args, stop_ids, args.profile_tokens)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in events}
    total = sum(self_us.values()) / 1e6
    groups = {
        group: sum(t for key, t in self_us.items() if any(p in key for p in patterns)) / 1e6
        for group, patterns in PROFILE_GROUPS.items()
    }
    groups["other aten ops"] = total - sum(groups.values())
    groups["outside aten (Python loop, dispatch, profiler)"] = max(wall - total, 0.0)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table)
    return {
        "batch_size": batch_size,
        "tokens": args.profile_tokens,
        "wall_seconds_under_profiler": wall,
        "share": {group: seconds / wall for group, seconds in groups.items()},
        "top_ops_self_seconds": {e.key: e.self_cpu_time_total / 1e6 for e in top},
        "top_ops_calls": {e.key: e.count for e in top},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="smollm2 weights")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4])
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="paired generation runs per batch size")
    parser.add_argument("--hf_generate", action="store_true", help="also time transformers' model.generate")
    parser.add_argument("--replay_tokens", type=int, default=None, help="default: 64 (tiny), 8 (smollm2)")
    parser.add_argument("--replay_repeats", type=int, default=None, help="default: 3 (tiny), 2 (smollm2)")
    parser.add_argument("--no_replay", action="store_true", help="skip the candidate-scoring replay")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over one guided run")
    parser.add_argument("--profile_tokens", type=int, default=32)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="default: benchmarks/results/guided_decoding_<model>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    small = args.model == "tiny"
    args.replay_tokens = args.replay_tokens or (64 if small else 8)  # naive re-encoding is quadratic in it
    args.replay_repeats = args.replay_repeats or (3 if small else 2)
    suffix = "" if args.model == "tiny" or args.dtype == "float32" else f"_{args.dtype}"
    output = args.output or RESULTS / f"guided_decoding_{args.model}{suffix}.json"

    policy, lenvm, description = make_models(args.model, args.dtype)
    vocab_size = policy.config.vocab_size
    stop_ids = [vocab_size]  # an id no model emits: every row runs to max_new_tokens
    results = {
        "benchmark": "guided_decoding",
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "setup": {
            "models": description,
            "parameters": {
                "policy": sum(p.numel() for p in policy.parameters()),
                "lenvm": sum(p.numel() for p in lenvm.parameters()),
            },
            "prompt_length": args.prompt_length,
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "mode": "tilt, beta = -1 (guided); none (unguided)",
        },
        "reference": "SGLang fork, H100, Qwen2.5-7B + 1.5B LenVM, top-k 5: guided 4.55x slower end to end",
        "generation": {},
    }
    print(f"{description}; {results['setup']['parameters']}")
    guided_runs = {}
    for batch_size in args.batch_sizes:
        out, guided_runs[batch_size] = generation(policy, lenvm, batch_size, args, stop_ids, vocab_size)
        results["generation"][f"batch_{batch_size}"] = out
        ratio, floor = out["guided_over_unguided"], out["floor_forwards_only"]
        print(
            f"B={batch_size}: guided / unguided {ratio['median']:.2f}x (min {ratio['min']:.2f}, max {ratio['max']:.2f}); "
            f"forwards-only floor {floor['median']:.2f}x; outside forwards: "
            f"{out['time_split']['guided']['outside_forwards_share']:.1%} of guided, "
            f"{out['time_split']['unguided']['outside_forwards_share']:.1%} of unguided",
            flush=True,
        )
    if not args.no_replay:
        input_ids, attention_mask, guided_run = guided_runs[args.batch_sizes[0]]
        out = scoring(lenvm, input_ids, attention_mask, guided_run, args, vocab_size)
        results["scoring"] = {"batch_size": args.batch_sizes[0], **out}
        print(
            f"scoring, B={args.batch_sizes[0]}, {out['replayed_tokens_per_row']} tokens: cached / naive "
            f"{out['cached_over_naive_speedup']['median']:.1f}x faster, tree mask / expanded cache "
            f"{out['tree_mask_over_expand_speedup']['median']:.2f}x, max |diff| "
            f"{out['max_abs_score_diff_cached_vs_naive']:.1e}"
        )
    if args.profile:
        results["profile"] = profile(policy, lenvm, args.batch_sizes[0], args, stop_ids, vocab_size)
        print({group: f"{share:.1%}" for group, share in results["profile"]["share"].items()})
    results["gemm_floor"] = {f"batch_{b}": gemm_floor(policy, lenvm, b, args.top_k) for b in args.batch_sizes}
    print({key: round(value["floor_guided_over_unguided"], 2) for key, value in results["gemm_floor"].items()})
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save(results, output)


if __name__ == "__main__":
    main()
