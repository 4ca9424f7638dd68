"""Script arguments of the RL recipes: `recipes/ppo_gsm8k.py`, `recipes/grpo_gsm8k.py`, `recipes/ablate_length.py`."""

from dataclasses import dataclass, field

from ..data import DEFAULT_INSTRUCTION
from .common import RunArguments, check_at_least, null_to_none

__all__ = ["AblationArguments", "GRPOScriptArguments", "GSM8KScriptArguments", "PPOScriptArguments"]


@dataclass
class GSM8KScriptArguments(RunArguments):
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
        check_at_least(self, 1, "max_train_samples")


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

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "num_eval_problems")
        check_at_least(self, 1, "eval_num_samples", "eval_max_new_tokens", "eval_batch_size")


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
        metadata={"help": "Baseline: add TRL's soft overlong punishment over the last N tokens before its length."},
    )
    soft_overlong_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Length L_max of the soft overlong punishment (default: max_completion_length). Below the "
            "generation cap it is a length target: 0 up to L_max - cache, linear to -1 at L_max, -1 beyond."
        },
    )
    num_eval_problems: int = field(
        default=0, metadata={"help": "Held-out problems sampled before and after training for results.json (0: skip)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Rows decoded together in the evaluation."})

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "num_eval_problems")
        check_at_least(self, 1, "eval_batch_size")
        cache, max_length = self.soft_overlong_cache, self.soft_overlong_max_length
        if max_length is not None and cache is None:
            raise ValueError("--soft_overlong_max_length needs --soft_overlong_cache (the punishment's ramp).")
        if cache is not None and cache < 1:
            raise ValueError(f"--soft_overlong_cache must be >= 1, got {cache}.")
        if max_length is not None and max_length <= cache:
            raise ValueError(
                f"--soft_overlong_max_length ({max_length}) must exceed --soft_overlong_cache ({cache}): the "
                "punishment starts at max_length - cache tokens."
            )


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
        overlong_max_lengths (`list[int]`): L_max grid of TRL's soft overlong punishment (GRPO only), each with a
            cache of a third of it: `L_max = 384` (the demo's generation cap) is DAPO's use, a penalty on the last
            128 tokens before the cap; the shorter ones turn it into a length target (`48`: 0 up to 32 tokens, -1
            from 48 on).
        world_dir (`str` or `None`): The demo world (`outputs/demo/world`) the base config evaluates on: adds the
            share of removable verbosity removed, against its most concise reference style.
        max_steps (`int` or `None`): Updates of every run (PPO: `total_episodes` = this x rollouts per update).
        recipe_flags (`str` or `None`): Flags appended to every run's command after the base config's (quoted, e.g.
            `"--use_vllm false"`): one base config, two settings that are not a length method.
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
    overlong_max_lengths: list[int] = field(
        default_factory=lambda: [48, 96, 384],
        metadata={"help": "L_max grid of TRL's soft overlong punishment (GRPO only), cache L_max // 3 each."},
    )
    world_dir: str | None = field(
        default=None,
        metadata={"help": "The demo world the base config evaluates on: adds the removable-verbosity column."},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Updates of every run (PPO: total_episodes = this x rollouts per update)."}
    )
    recipe_flags: str | None = field(
        default=None,
        metadata={"help": 'Flags appended to every run\'s command, quoted (e.g. "--use_vllm false").'},
    )
    num_parallel: int = field(default=2, metadata={"help": "Runs at once (one CPU thread each)."})
    collect_only: bool = field(default=False, metadata={"help": "Launch nothing; summarise the runs finished so far."})

    def __post_init__(self):
        if self.trainer not in self.METHODS:
            raise ValueError(f"--trainer must be one of ['grpo', 'ppo'], got {self.trainer!r}.")
        known = self.METHODS[self.trainer]
        if self.methods is None:
            self.methods = list(known)
        unknown = [method for method in self.methods if method not in known]
        if unknown:
            raise ValueError(f"--methods {unknown} are not {self.trainer} methods: pick from {list(known)}.")
        if not self.seeds:
            raise ValueError("--seeds must not be empty.")
        check_at_least(self, 1, "num_parallel", "max_steps")
        too_short = [length for length in self.overlong_max_lengths if length < 3]
        if too_short:
            raise ValueError(f"--overlong_max_lengths must be >= 3 (a cache of a third of it), got {too_short}.")
        null_to_none(self, "world_dir")
