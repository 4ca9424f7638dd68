"""PPO's rollouts on a vLLM engine: building TRL's generation backend from a `PPOConfig`, turning what it returns
into PPO's padded `(B, T)` tensors, and measuring how far the engine's log-probabilities are from the trainer's."""

import math

import torch
from torch import nn

from ..rl_math import truncated_importance_weights
from ..vllm_engine import LenVMVLLMGeneration, torch_dtype_name

__all__ = ["make_ppo_vllm_generation", "pad_vllm_completions", "sampler_logprob_stats", "vllm_metrics"]


def make_ppo_vllm_generation(trainer, policy: nn.Module) -> LenVMVLLMGeneration:
    """The vLLM backend of a PPO run, sampling what the built-in sampler samples.

    The engine loads the policy's checkpoint (`policy.name_or_path`, which must be a saved model: vLLM reads weights
    from disk before the first sync), samples `response_length` tokens at `temperature` without top-k / top-p
    filters, and stops at the run's stop token only (`ignore_eos` keeps the model's other end-of-turn ids from
    stopping it, as `GenerationConfig(eos_token_id=stop_token_id)` does).
    """
    args = trainer.args
    name_or_path = getattr(policy, "name_or_path", "")
    if not name_or_path:
        raise ValueError(
            "use_vllm=True needs a policy loaded from a checkpoint (`model.name_or_path`): the vLLM engine loads it "
            "from disk. Save the policy with `save_pretrained(path)` and load it from `path`."
        )
    dtype = args.vllm_dtype or torch_dtype_name(next(policy.parameters()).dtype)
    return LenVMVLLMGeneration(
        model=policy,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        dtype=dtype,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=trainer.local_batch_size * args.vllm_tensor_parallel_size,
        enable_sleep_mode=args.vllm_enable_sleep_mode,
        model_impl=args.vllm_model_impl,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        max_completion_length=args.response_length,
        logprobs=0,  # the sampled token's log-probability: the engine/trainer gap and the importance weights
        generation_kwargs={"ignore_eos": True, "stop_token_ids": [trainer.stop_token_id]},
    )


def pad_vllm_completions(
    completion_ids: list[list[int]], logprobs: list[list[list[float | None]]], width: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the engine's completions and their sampled-token log-probabilities to `width` tokens.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `responses` `(B, width)` long, padded with `pad_token_id`, and
        `sampler_logprobs` `(B, width)` float32, 0 on padding.

    Example:
        >>> responses, logprobs = pad_vllm_completions([[5, 2], [7]], [[[-0.5], [-0.1]], [[-1.0]]], 3, 0)
        >>> responses.tolist(), logprobs.tolist()
        ([[5, 2, 0], [7, 0, 0]], [[-0.5, -0.10000000149011612, 0.0], [-1.0, 0.0, 0.0]])
    """
    responses = torch.full((len(completion_ids), width), pad_token_id, dtype=torch.long)  # (B, T)
    sampler_logprobs = torch.zeros((len(completion_ids), width), dtype=torch.float32)  # (B, T)
    for i, (ids, token_logprobs) in enumerate(zip(completion_ids, logprobs)):
        if len(ids) > width:
            raise ValueError(f"The engine returned {len(ids)} tokens, more than response_length={width}.")
        responses[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        # The engine reports NaN (None here) for a token it could not score; no such token can be trained on.
        sampler_logprobs[i, : len(ids)] = torch.tensor(
            [math.nan if top[0] is None else top[0] for top in token_logprobs], dtype=torch.float32
        )
    return responses, sampler_logprobs


def sampler_logprob_stats(sampler_logprobs, logprobs, mask, args) -> dict[str, torch.Tensor]:
    """The engine/trainer gap on the sampled tokens, `|log pi_old - log pi_vllm|` `(B, T)` (0 on padding), and, with
    `args.vllm_importance_sampling_correction`, the tokens' truncated importance weights `(B, T)`."""
    result = {"sampler_logprob_diff": (logprobs - sampler_logprobs).abs().masked_fill(~mask, 0.0)}
    if args.vllm_importance_sampling_correction:
        result["importance_weights"] = truncated_importance_weights(
            logprobs,
            sampler_logprobs,
            mask,
            args.vllm_importance_sampling_clip_max,
            args.vllm_importance_sampling_mode,
        )
    return result


def vllm_metrics(batch: dict, gather) -> dict[str, float]:
    """`vllm/logprob_diff_mean|max` and `vllm/importance_weight_mean` over all processes' real tokens (a collective:
    every process calls it); empty for rollouts that did not come from an engine."""
    if "sampler_logprob_diff" not in batch:
        return {}
    diff = gather(batch["sampler_logprob_diff"])  # (B * processes, T), 0 on padding
    real = gather(batch["response_mask"])
    metrics = {
        "vllm/logprob_diff_mean": diff[real].mean().item() if real.any() else 0.0,
        "vllm/logprob_diff_max": diff.max().item(),
    }
    if "importance_weights" in batch:
        metrics["vllm/importance_weight_mean"] = gather(batch["importance_weights"])[real].mean().item()
    return metrics
