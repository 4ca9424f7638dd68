"""Script arguments of the policy evaluations: accuracy versus tokens (`eval_gsm8k.py`) and LenVM-guided decoding
(`eval_length_control.py`, `eval_tradeoff.py`, sharing [`GuidedEvalArguments`])."""

import math
from dataclasses import dataclass, field, fields

from ..candidates import CONSTRAINT_MODES
from ..data import DEFAULT_INSTRUCTION
from ..guidance import CandidateSamplingConfig, GuidanceMode, LengthGuidanceConfig
from .common import RunArguments, check_at_least

GUIDED_EVAL_DTYPES = ("float32", "bfloat16", "float16", "auto")

__all__ = [
    "EvalGSM8KArguments",
    "EvalLengthControlArguments",
    "EvalTradeoffArguments",
    "GuidedEvalArguments",
    "SeedSummaryArguments",
]


@dataclass
class GuidedEvalArguments(RunArguments, CandidateSamplingConfig):
    """
    The arguments the guided-decoding evaluation recipes share (`recipes/eval_length_control.py`,
    `recipes/eval_tradeoff.py`): the policy and its LenVM, the held-out problems, the candidate set and sampling.

    Parameters:
        policy_path (`str`): The policy (causal LM directory with its tokenizer).
        lenvm_path (`str`): A LenVM trained on that policy's completions.
        output_dir (`str`): Where the JSON and the PNG go.
        dataset_name (`str`): Problems with `question` and `answer` (a local directory, file or hub id).
        dataset_split (`str`): Split of held-out problems.
        num_problems (`int`): Problems evaluated (the first ones of the split).
        system_prompt (`str` or `None`): System message of the prompts.
        instruction (`str` or `None`): Text appended to each question.
        gamma (`float` or `None`): The LenVM's discount, for reference-format checkpoints.
        batch_size (`int`): Prompts per batch.
        seed (`int`): Sampling seed.
        num_threads (`int`): `torch.set_num_threads`.
        dtype (`str`): Weights dtype of the policy and the LenVM backbone (`float32`, `bfloat16`, `auto`); the
            LenVM's value head stays float32. `bfloat16` roughly halves the step time on CPUs with avx512_bf16 / AMX.

        > Candidate set and sampling ([`~lenvm_rl.guidance.CandidateSamplingConfig`], the defaults of
        > [`~lenvm_rl.guidance.LengthGuidanceConfig`]): `top_k`, `top_p`, `min_p`, `bound_min_prob`, `temperature`, and
        > `max_new_tokens`, whose default is 512 here (see the comment on the field).
    """

    policy_path: str = field(metadata={"help": "The policy (causal LM directory with its tokenizer)."})
    lenvm_path: str = field(metadata={"help": "A LenVM trained on that policy's completions."})
    output_dir: str = field(metadata={"help": "Where the JSON and the PNG go."})
    dataset_name: str = field(
        default="outputs/demo/world/data", metadata={"help": "Problems with question/answer (dir, file or hub id)."}
    )
    dataset_split: str = field(default="test", metadata={"help": "Split of held-out problems."})
    num_problems: int = field(default=64, metadata={"help": "Problems evaluated (the first ones of the split)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message of the prompts."})
    instruction: str | None = field(default=None, metadata={"help": "Text appended to each question."})
    gamma: float | None = field(default=None, metadata={"help": "The LenVM's discount (reference checkpoints)."})
    batch_size: int = field(default=32, metadata={"help": "Prompts per batch."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    num_threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    dtype: str = field(
        default="float32", metadata={"help": "Policy and LenVM backbone dtype: float32, bfloat16 or auto."}
    )
    # The one sampling default that differs from LengthGuidanceConfig's 256: eval_length_control's default targets
    # reach 256 tokens and At Least needs room above the largest target; demo-policy completions run to ~300 tokens.
    max_new_tokens: int = field(default=512, kw_only=True, metadata={"help": "Length cap."})

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "num_problems", "batch_size", "num_threads")
        if self.dtype not in GUIDED_EVAL_DTYPES:
            raise ValueError(f"--dtype must be one of {GUIDED_EVAL_DTYPES}, got {self.dtype!r}")

    def guidance_config(self, mode: GuidanceMode, beta: float = 0.0) -> LengthGuidanceConfig:
        """The [`~lenvm_rl.guidance.LengthGuidanceConfig`] of one run: `mode` and `beta` with these arguments'
        candidate set and sampling."""
        sampling = {f.name: getattr(self, f.name) for f in fields(CandidateSamplingConfig)}
        return LengthGuidanceConfig(mode=mode, beta=beta, **sampling)


@dataclass
class EvalGSM8KArguments(RunArguments):
    """Arguments of `recipes/eval_gsm8k.py`.

    Parameters:
        model_name_or_path (`list[str]`): Checkpoints to evaluate (model directories, hub ids or adapter directories).
        output_dir (`str`): Where `eval_gsm8k.json` and `eval_gsm8k.png` go.
        labels (`list[str]` or `None`): One label per checkpoint; default the checkpoint paths.
        dataset_name (`str`): Hub id or local path of GSM8K-format data (question, answer).
        dataset_config (`str`): Hub configuration (main or socratic).
        dataset_split (`str`): Split of the evaluated problems.
        task_name (`str`): What the problems are, for the plot's title ("demo world" for the demo's problems).
        num_problems (`int` or `None`): Evaluate the first N problems; `None` for all.
        system_prompt (`str` or `None`): Content of a leading system message.
        instruction (`str` or `None`): Text appended to each question (null for the demo world).
        num_samples (`int`): Completions per problem.
        temperature (`float`): Sampling temperature (0 is greedy).
        top_p (`float`): Nucleus sampling threshold.
        top_k (`int`): Top-k filtering (0 disables it).
        max_new_tokens (`int`): Length cap.
        budgets (`list[int]` or `None`): Token budgets of the hard-budget curves; default every 8 tokens up to the
            longest completion of each checkpoint.
        batch_size (`int`): Rows decoded together.
        seed (`int`): Sampling seed (the same for every checkpoint).
        dtype (`str`): Weights dtype of the loaded checkpoints (`float32`, `bfloat16`, `auto`).
        save_completion_stats (`bool`): Keep each run's per-completion `lengths` and `correct` lists in the JSON.
        num_threads (`int` or `None`): `torch.set_num_threads`; `None` keeps torch's default.
        summary_file (`str` or `None`): Also write `{label: {accuracy, mean_tokens, median_tokens, p90_tokens,
            p99_tokens, fraction_truncated}}` to this JSON file (the demo's `outputs/demo/results.json`).
    """

    model_name_or_path: list[str] = field(
        metadata={"help": "Checkpoints to evaluate (model directories, hub ids or adapter directories)."}
    )
    output_dir: str = field(metadata={"help": "Where eval_gsm8k.json and eval_gsm8k.png go."})
    labels: list[str] | None = field(
        default=None, metadata={"help": "One label per checkpoint; default the checkpoint paths."}
    )
    dataset_name: str = field(
        default="openai/gsm8k",
        metadata={"help": "Hub id or local path of GSM8K-format data, e.g. outputs/demo/world/data."},
    )
    dataset_config: str = field(default="main", metadata={"help": "Hub configuration (main or socratic)."})
    dataset_split: str = field(default="test", metadata={"help": "Split of the evaluated problems."})
    task_name: str = field(default="GSM8K", metadata={"help": "What the problems are, for the plot's title."})
    num_problems: int | None = field(default=None, metadata={"help": "Evaluate the first N problems (None: all)."})
    system_prompt: str | None = field(default=None, metadata={"help": "Content of a leading system message."})
    instruction: str | None = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Text appended to each question (null for the demo world, whose policy saw none)."},
    )
    num_samples: int = field(default=1, metadata={"help": "Completions per problem."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 is greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    top_k: int = field(default=0, metadata={"help": "Top-k filtering (0 disables it)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Length cap."})
    budgets: list[int] | None = field(
        default=None, metadata={"help": "Token budgets of the hard-budget curves (default: every 8 tokens)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Rows decoded together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (the same for every checkpoint)."})
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or auto."})
    save_completion_stats: bool = field(
        default=True, metadata={"help": "Keep per-completion lengths and correctness in the JSON."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (None: torch's default)."})
    summary_file: str | None = field(
        default=None, metadata={"help": "Also write {label: accuracy and token statistics} to this JSON file."}
    )

    def __post_init__(self):
        check_at_least(self, 1, "num_problems", "num_samples", "max_new_tokens", "batch_size", "num_threads")
        if isinstance(self.model_name_or_path, str):
            self.model_name_or_path = [self.model_name_or_path]
        if self.labels is not None and len(self.labels) != len(self.model_name_or_path):
            raise ValueError(
                f"--labels has {len(self.labels)} entries for {len(self.model_name_or_path)} checkpoints: give one "
                "label per --model_name_or_path, or none."
            )


@dataclass
class EvalLengthControlArguments(GuidedEvalArguments):
    """Arguments of `recipes/eval_length_control.py`.

    Parameters:
        > The arguments of [`~lenvm_rl.configs.GuidedEvalArguments`], then:

        target_lengths (`list[int]`): Target lengths `T` in tokens, stop token included.
        constraints (`list[str]`): Any of equal_to, at_most, at_least.
        num_examples (`int`): Decoded completions kept in the JSON per run (the first problems).
    """

    target_lengths: list[int] = field(
        default_factory=lambda: [16, 32, 64, 128, 256], metadata={"help": "Target lengths in tokens (EOS included)."}
    )
    constraints: list[str] = field(
        default_factory=lambda: list(CONSTRAINT_MODES), metadata={"help": "Any of equal_to, at_most, at_least."}
    )
    num_examples: int = field(default=2, metadata={"help": "Decoded completions kept in the JSON per run."})

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "num_examples")
        unknown = set(self.constraints) - set(CONSTRAINT_MODES)
        if unknown:
            raise ValueError(f"--constraints must be among {CONSTRAINT_MODES}, got {sorted(unknown)}")
        if not self.target_lengths or min(self.target_lengths) < 1:
            raise ValueError(f"--target_lengths must be positive token counts, got {self.target_lengths}")
        if max(self.target_lengths) >= self.max_new_tokens:
            raise ValueError("--max_new_tokens must exceed the largest target length (At Least needs room)")


@dataclass
class EvalTradeoffArguments(GuidedEvalArguments):
    """Arguments of `recipes/eval_tradeoff.py`.

    Parameters:
        > The arguments of [`~lenvm_rl.configs.GuidedEvalArguments`], then:

        num_problems (`int`): Problems evaluated.
        num_samples (`int`): Completions per problem and beta.
        betas (`list[float]`): Tilt strengths; 0 must be included (the budget baseline uses it).
        budgets (`list[int]` or `None`): Token budgets of the baseline; default every 8 tokens up to the longest.
        num_examples (`int`): Decoded completions kept in the JSON per beta (the first ones).
    """

    num_problems: int = field(default=200, metadata={"help": "Problems evaluated."})
    num_samples: int = field(default=1, metadata={"help": "Completions per problem and beta."})
    betas: list[float] = field(
        default_factory=lambda: [0.0, -2.0, -5.0, -10.0, -20.0, -50.0],
        metadata={"help": "Tilt strengths; must include 0 (the budget baseline cuts its completions)."},
    )
    budgets: list[int] | None = field(
        default=None, metadata={"help": "Token budgets of the baseline; default every 8 tokens up to the longest."}
    )
    num_examples: int = field(default=2, metadata={"help": "Decoded completions kept in the JSON per beta."})

    def __post_init__(self):
        super().__post_init__()
        if 0.0 not in self.betas:
            raise ValueError("--betas must include 0.0: the token-budget baseline cuts the untilted completions")
        if not all(math.isfinite(beta) for beta in self.betas):
            raise ValueError(f"--betas must be finite numbers, got {self.betas}")
        check_at_least(self, 1, "num_samples")
        check_at_least(self, 0, "num_examples")


@dataclass
class SeedSummaryArguments:
    """Arguments of `recipes/summarize_seeds.py`: evaluations of one setting over several seeds.

    Parameters:
        length_prediction_dirs (`list[str]`): Output directories of `recipes/eval_length_prediction.py`, one per
            LenVM training seed (same held-out rollouts).
        length_control_dirs (`list[str]`): Output directories of `recipes/eval_length_control.py`, one per seed.
        tradeoff_dirs (`list[str]`): Output directories of `recipes/eval_tradeoff.py`, one per seed.
        output_dir (`str`): Where `inference_seeds.json` / `.md` / `.png` go.
        num_resamples (`int`): Bootstrap resamples (over seeds, then problems within each seed).
    """

    output_dir: str = field(metadata={"help": "Where inference_seeds.json / .md / .png go."})
    length_prediction_dirs: list[str] = field(
        default_factory=list, metadata={"help": "eval_length_prediction.py output directories, one per LenVM seed."}
    )
    length_control_dirs: list[str] = field(
        default_factory=list, metadata={"help": "eval_length_control.py output directories, one per seed."}
    )
    tradeoff_dirs: list[str] = field(
        default_factory=list, metadata={"help": "eval_tradeoff.py output directories, one per seed."}
    )
    num_resamples: int = field(default=2000, metadata={"help": "Bootstrap resamples over seeds and problems."})

    def __post_init__(self):
        if not (self.length_prediction_dirs or self.length_control_dirs or self.tradeoff_dirs):
            raise ValueError(
                "Pass --length_prediction_dirs, --length_control_dirs and/or --tradeoff_dirs (one directory per seed)."
            )
        if self.num_resamples < 1:
            raise ValueError(f"--num_resamples must be >= 1, got {self.num_resamples}.")
