"""The argument dataclasses of the recipes: the one place for script arguments (as in open-r1's ``configs.py``).

A recipe in ``recipes/`` parses one of these with ``TrlParser(...).parse_args_and_config()`` (flags or ``--config``
YAML) and hands it to its ``main``. A class here holds what several scripts share; a field used by one script only
stays in that script's subclass. The library's own configs live with the code they configure (trainer configs in
[`lenvm_rl.trainers`], the decoding config [`~lenvm_rl.guidance.LengthGuidanceConfig`] in [`lenvm_rl.guidance`]);
script arguments reuse their fields by inheritance instead of repeating them, so each default is written once.
"""

from dataclasses import dataclass, field, fields

from .candidates import CONSTRAINT_MODES
from .data import DEFAULT_INSTRUCTION
from .guidance import CandidateSamplingConfig, GuidanceMode, LengthGuidanceConfig

__all__ = [
    "null_to_none",
    "AblationArguments",
    "EvalGSM8KArguments",
    "EvalLengthControlArguments",
    "EvalLengthPredictionArguments",
    "EvalTradeoffArguments",
    "GRPOScriptArguments",
    "GSM8KScriptArguments",
    "GuidedEvalArguments",
    "LengthTokensArguments",
    "PPOScriptArguments",
    "PredictLengthArguments",
    "SampleRolloutsArguments",
    "TrainLenVMScriptArguments",
]


def null_to_none(args, *names: str) -> None:
    """Read `--instruction null` as None: on the command line it arrives as the string "null" (`null` in a YAML
    config already arrives as None), and the help of these fields promises that null disables them."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            setattr(args, name, None)


@dataclass
class GuidedEvalArguments(CandidateSamplingConfig):
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

        > Candidate set and sampling ([`~lenvm_rl.guidance.CandidateSamplingConfig`], the defaults of
        > [`~lenvm_rl.guidance.LengthGuidanceConfig`]): `top_k`, `top_p`, `min_p`, `temperature`, and
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
    # The one sampling default that differs from LengthGuidanceConfig's 256: eval_length_control's default targets
    # reach 256 tokens and At Least needs room above the largest target; demo-policy completions run to ~300 tokens.
    max_new_tokens: int = field(default=512, kw_only=True, metadata={"help": "Length cap."})

    def guidance_config(self, mode: GuidanceMode, beta: float = 0.0) -> LengthGuidanceConfig:
        """The [`~lenvm_rl.guidance.LengthGuidanceConfig`] of one run: `mode` and `beta` with these arguments'
        candidate set and sampling."""
        sampling = {f.name: getattr(self, f.name) for f in fields(CandidateSamplingConfig)}
        return LengthGuidanceConfig(mode=mode, beta=beta, **sampling)


@dataclass
class GSM8KScriptArguments:
    """
    The data arguments shared by the RL recipes (`recipes/ppo_gsm8k.py`, `recipes/grpo_gsm8k.py`): where the
    GSM8K-format problems come from and how they become chat prompts ([`load_gsm8k`], [`prepare_prompt_dataset`]).

    Parameters:
        dataset_name (`str`): Hub id or local path of GSM8K-format data (question, answer).
        dataset_config (`str`): Hub configuration (main or socratic).
        dataset_train_split (`str`): Split to train on.
        dataset_test_split (`str`): Split of the held-out evaluation problems.
        system_prompt (`str` or `None`): Content of a leading system message.
        instruction (`str` or `None`): Text appended to each question (null for the demo world).
        max_train_samples (`int` or `None`): Train on the first N problems only.
    """

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

    def __post_init__(self):
        null_to_none(self, "system_prompt", "instruction")


# ---------------------------------------------------------------------- recipes/ablate_length.py


@dataclass
class AblationArguments:
    """
    Arguments of `recipes/ablate_length.py`: which length methods run, their coefficient grids (a grid left empty
    drops its rows), the seeds, and how the runs are launched.

    Parameters:
        base_config (`str`): YAML of the recipe every row starts from (with a LenVM and `num_eval_problems > 0`).
        output_dir (`str`): Where each run's directory and `ablation.json` / `.md` / `.png` go.
        trainer (`str`): `ppo` (`recipes/ppo_gsm8k.py`) or `grpo` (`recipes/grpo_gsm8k.py`).
        methods (`list[str]` or `None`): Methods that run (default: every method of the trainer). PPO: `none`,
            `penalty`, `correct_only_penalty`, `advantage`, `shaping`, `unpretrained`, `online`; GRPO: `grpo`,
            `penalty`, `correct_only_penalty`, `kimi`, `overlong`, `advantage`, `unpretrained`, `online`.
        seeds (`list[int]`): Seeds of every row; runs go seed by seed (every row of the first seed first).
        penalty_coefs (`list[float]`): alpha grid of the sequence-level penalty `score - alpha * tokens`.
        correct_only_penalty_coefs (`list[float]`): alpha grid of the same penalty on correct answers only.
        advantage_coefs (`list[float]`): s grid of the frozen, pretrained LenVM advantage `A_task + s * A_len`.
        shaping_coefs (`list[float]`): beta grid of LenVM potential shaping (PPO only).
        unpretrained_coefs (`list[float]`): s grid of the length critic without pretraining (the policy's backbone
            with a fresh head, trained online, with the gamma of the base config's LenVM).
        online_coefs (`list[float]`): s grid of the pretrained LenVM refreshed online during RL.
        kimi_coefs (`list[float]`): Weight grid of Kimi k1.5's group-relative length reward (GRPO only).
        overlong_cache (`int` or `None`): Cache of the row with TRL's soft overlong punishment (GRPO only).
        world_dir (`str` or `None`): The demo world (`outputs/demo/world`) the base config evaluates on: adds the
            share of removable verbosity removed, against its most concise reference style.
        max_steps (`int` or `None`): Overrides `max_steps` in every run.
        num_parallel (`int`): Runs at once (one CPU thread each).
        collect_only (`bool`): Launch nothing; summarise the runs finished so far.
    """

    # Method names per trainer (a plain class attribute, not a field). "none" / "grpo" is the row without length term.
    METHODS = {
        "ppo": ("none", "penalty", "correct_only_penalty", "advantage", "shaping", "unpretrained", "online"),
        "grpo": ("grpo", "penalty", "correct_only_penalty", "kimi", "overlong", "advantage", "unpretrained", "online"),
    }

    base_config: str = field(
        metadata={"help": "YAML of the recipe every row starts from (with a LenVM and num_eval_problems > 0)."}
    )
    output_dir: str = field(metadata={"help": "Where each run's directory, ablation.json/.md/.png go."})
    trainer: str = field(default="ppo", metadata={"help": "`ppo` (recipes/ppo_gsm8k.py) or `grpo` (grpo_gsm8k.py)."})
    methods: list[str] | None = field(
        default=None, metadata={"help": "Methods that run (default: every method of the trainer)."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds of every row."})
    penalty_coefs: list[float] = field(
        default_factory=lambda: [0.003, 0.01, 0.03],
        metadata={"help": "alpha grid of the sequence-level penalty `score - alpha * tokens`."},
    )
    correct_only_penalty_coefs: list[float] = field(
        default_factory=lambda: [0.003, 0.01, 0.03],
        metadata={"help": "alpha grid of the sequence-level penalty on correct answers only."},
    )
    advantage_coefs: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={"help": "s grid of the frozen LenVM advantage `A_task + s * A_len`."},
    )
    shaping_coefs: list[float] = field(
        default_factory=lambda: [1.0], metadata={"help": "beta grid of LenVM potential shaping (PPO only)."}
    )
    unpretrained_coefs: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={"help": "s grid of the length critic without pretraining (fresh head, trained online)."},
    )
    online_coefs: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={"help": "s grid of the pretrained LenVM refreshed online during RL."},
    )
    kimi_coefs: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={"help": "Weight grid of Kimi k1.5's group-relative length reward (GRPO only)."},
    )
    overlong_cache: int | None = field(
        default=128, metadata={"help": "GRPO only: a row with TRL's soft overlong punishment over this many tokens."}
    )
    world_dir: str | None = field(
        default=None,
        metadata={"help": "The demo world the base config evaluates on: adds the removable-verbosity column."},
    )
    max_steps: int | None = field(default=None, metadata={"help": "Overrides max_steps in every run."})
    num_parallel: int = field(default=2, metadata={"help": "Runs at once (one CPU thread each)."})
    collect_only: bool = field(default=False, metadata={"help": "Launch nothing; summarise the runs finished so far."})

    def __post_init__(self):
        if self.trainer not in self.METHODS:
            raise ValueError(f"`trainer` must be one of ['grpo', 'ppo'], got {self.trainer!r}.")
        known = self.METHODS[self.trainer]
        if self.methods is None:
            self.methods = list(known)
        unknown = [method for method in self.methods if method not in known]
        if unknown:
            raise ValueError(f"--methods {unknown} are not {self.trainer} methods: pick from {list(known)}.")
        if not self.seeds:
            raise ValueError("`seeds` must not be empty.")
        if self.num_parallel < 1:
            raise ValueError("`num_parallel` must be at least 1.")
        if self.overlong_cache is not None and self.overlong_cache < 1:
            raise ValueError(f"--overlong_cache must be >= 1 (or None), got {self.overlong_cache}.")
        null_to_none(self, "world_dir")


# ---------------------------------------------------------------------- recipes/eval_gsm8k.py


@dataclass
class EvalGSM8KArguments:
    """Arguments of `recipes/eval_gsm8k.py`.

    Parameters:
        model_name_or_path (`list[str]`): Checkpoints to evaluate (model directories, hub ids or adapter directories).
        output_dir (`str`): Where `eval_gsm8k.json` and `eval_gsm8k.png` go.
        labels (`list[str]` or `None`): One label per checkpoint; default the checkpoint paths.
        dataset_name (`str`): Hub id or local path of GSM8K-format data (question, answer).
        dataset_config (`str`): Hub configuration (main or socratic).
        dataset_split (`str`): Split of the evaluated problems.
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
        if isinstance(self.model_name_or_path, str):
            self.model_name_or_path = [self.model_name_or_path]
        if self.labels is not None and len(self.labels) != len(self.model_name_or_path):
            raise ValueError(
                f"--labels has {len(self.labels)} entries for {len(self.model_name_or_path)} checkpoints: give one "
                "label per --model_name_or_path, or none."
            )


# ---------------------------------------------------------------------- recipes/eval_length_control.py


@dataclass
class EvalLengthControlArguments(GuidedEvalArguments):
    """Arguments of `recipes/eval_length_control.py`.

    Parameters:
        > The arguments of [`~lenvm_rl.configs.GuidedEvalArguments`], then:

        target_lengths (`list[int]`): Target lengths `T` in tokens, stop token included.
        constraints (`list[str]`): Any of equal_to, at_most, at_least.
    """

    target_lengths: list[int] = field(
        default_factory=lambda: [16, 32, 64, 128, 256], metadata={"help": "Target lengths in tokens (EOS included)."}
    )
    constraints: list[str] = field(
        default_factory=lambda: list(CONSTRAINT_MODES), metadata={"help": "Any of equal_to, at_most, at_least."}
    )

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.constraints) - set(CONSTRAINT_MODES)
        if unknown:
            raise ValueError(f"--constraints must be among {CONSTRAINT_MODES}, got {sorted(unknown)}")
        if not self.target_lengths or min(self.target_lengths) < 1:
            raise ValueError("--target_lengths must be positive token counts")
        if max(self.target_lengths) >= self.max_new_tokens:
            raise ValueError("--max_new_tokens must exceed the largest target length (At Least needs room)")


# ---------------------------------------------------------------------- recipes/eval_length_prediction.py


@dataclass
class EvalLengthPredictionArguments:
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
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")


# ---------------------------------------------------------------------- recipes/eval_tradeoff.py


@dataclass
class EvalTradeoffArguments(GuidedEvalArguments):
    """Arguments of `recipes/eval_tradeoff.py`.

    Parameters:
        > The arguments of [`~lenvm_rl.configs.GuidedEvalArguments`], then:

        num_problems (`int`): Problems evaluated.
        num_samples (`int`): Completions per problem and beta.
        betas (`list[float]`): Tilt strengths; 0 must be included (the budget baseline uses it).
        budgets (`list[int]` or `None`): Token budgets of the baseline; default every 8 tokens up to the longest.
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

    def __post_init__(self):
        super().__post_init__()
        if 0.0 not in self.betas:
            raise ValueError("--betas must include 0.0: the token-budget baseline cuts the untilted completions")


# ---------------------------------------------------------------------- recipes/grpo_gsm8k.py


@dataclass
class GRPOScriptArguments(GSM8KScriptArguments):
    """Data, baseline and evaluation arguments of `recipes/grpo_gsm8k.py`."""

    length_penalty_coef: float = field(
        default=0.0, metadata={"help": "Baseline: add the sequence-level reward -alpha * completion tokens."}
    )
    length_penalty_correct_only: bool = field(
        default=False, metadata={"help": "Baseline: the length penalty applies to correct completions only."}
    )
    kimi_length_coef: float = field(
        default=0.0, metadata={"help": "Baseline: add Kimi k1.5's group-relative length reward with this weight."}
    )
    soft_overlong_cache: int | None = field(
        default=None,
        metadata={"help": "Baseline: add TRL's soft overlong punishment over the last N tokens before the cap."},
    )
    num_eval_problems: int = field(
        default=0, metadata={"help": "Held-out problems sampled before and after training for results.json (0: skip)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Rows decoded together in the evaluation."})


# ---------------------------------------------------------------------- recipes/length_tokens.py


@dataclass
class LengthTokensArguments:
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


# ---------------------------------------------------------------------- recipes/ppo_gsm8k.py


@dataclass
class PPOScriptArguments(GSM8KScriptArguments):
    """Data, critic, reward and evaluation arguments of `recipes/ppo_gsm8k.py`.

    Parameters:
        > The data arguments of [`~lenvm_rl.configs.GSM8KScriptArguments`], then:

        value_model_name_or_path (`str` or `None`): Initial task critic (a sequence classifier with one label);
            `None` builds it from the policy's backbone with a zero head.
        format_reward_weight (`float`): Weight of the GSM8K format reward next to accuracy (weight 1); 0 leaves it out.
        num_eval_problems (`int`): Held-out problems evaluated before and after training (0: no evaluation).
        eval_num_samples (`int`): Completions per held-out problem.
        eval_temperature (`float` or `None`): Evaluation temperature; `None` uses the training `temperature`.
        eval_top_p (`float`): Evaluation nucleus threshold.
        eval_max_new_tokens (`int` or `None`): Evaluation length cap; `None` uses `response_length`.
        eval_batch_size (`int`): Rows decoded together in the evaluation.
    """

    value_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Initial task critic (sequence classifier, 1 label); None: the policy with a zero head."},
    )
    format_reward_weight: float = field(
        default=0.0, metadata={"help": "Weight of the GSM8K format reward next to accuracy (0: left out)."}
    )
    num_eval_problems: int = field(
        default=200, metadata={"help": "Held-out problems evaluated before and after training (0: no evaluation)."}
    )
    eval_num_samples: int = field(default=1, metadata={"help": "Completions per held-out problem."})
    eval_temperature: float | None = field(
        default=None, metadata={"help": "Evaluation temperature (None: the training temperature)."}
    )
    eval_top_p: float = field(default=1.0, metadata={"help": "Evaluation nucleus threshold."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Evaluation length cap (None: response_length)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Rows decoded together in the evaluation."})


# ---------------------------------------------------------------------- recipes/predict_length.py


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
        if (self.input_file is None) == (self.eval_rollouts is None):
            raise ValueError("Pass exactly one of --input_file (predict) and --eval_rollouts (evaluate).")


# ---------------------------------------------------------------------- recipes/sample_rollouts.py


@dataclass
class SampleRolloutsArguments:
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

    def __post_init__(self):
        null_to_none(self, "system_prompt", "instruction")


# ---------------------------------------------------------------------- recipes/train_lenvm.py


@dataclass
class TrainLenVMScriptArguments:
    """Data arguments of `recipes/train_lenvm.py`."""

    train_rollouts: str = field(metadata={"help": "Rollout directory (or jsonl file) written by sample_rollouts."})
    eval_rollouts: str | None = field(default=None, metadata={"help": "Held-out rollouts for the eval loss."})
    data_description: str | None = field(
        default=None, metadata={"help": "Free text stored in the checkpoint (what the prompts were)."}
    )
