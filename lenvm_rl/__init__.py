"""lenvm-rl: Length Value Models as frozen length critics for RL fine-tuning with TRL."""

__version__ = "0.1.0.dev0"

# Public API (each helper module adds its own line below; keep one import per module).
from .core import (  # noqa: F401
    compute_gae,
    gamma_for_length,
    length_advantages,
    length_returns,
    length_shaping_rewards,
    length_td_residuals,
    lengths_to_values,
    values_to_lengths,
)
from .data import DEFAULT_INSTRUCTION, load_gsm8k, make_conversational_prompt, prepare_prompt_dataset  # noqa: F401
from .evaluation import (  # noqa: F401
    evaluate_gsm8k,
    evaluate_length_prediction,
    format_length_prediction_table,
    plot_length_prediction,
)
from .guidance import LengthGuidanceConfig, generate_with_length_guidance, guided_generate_completions  # noqa: F401
from .length_metrics import length_deviation, length_score, token_budget_curve  # noqa: F401
from .length_tokens import completion_td_residuals, count_length_tokens, length_tokens_html, top_length_tokens  # noqa: F401
from .metrics import (  # noqa: F401
    PromptBoundaryMRE,
    constant_baseline_value,
    fit_prompt_length_regression,
    predict_prompt_length_regression,
    prompt_boundary_mre,
    relative_length_error_at_fractions,
    value_mse,
)
from .modeling import (  # noqa: F401
    LengthValueModel,
    LengthValueModelOutput,
    check_tokenizers_compatible,
    fill_padding,
    freeze_model,
    load_frozen_lenvm,
    position_ids_from_mask,
)
from .rewards import (  # noqa: F401
    extract_gsm8k_answer,
    gsm8k_accuracy_reward,
    gsm8k_format_reward,
    kimi_length_reward,
    length_penalty_reward,
)
from .rl_math import (  # noqa: F401
    add_length_advantages,
    check_finite,
    combine_advantages,
    rms_normalize_length_advantages,
    scheduled_length_coef,
)
from .trainers.checkpointing import last_complete_checkpoint  # noqa: F401
from .trainers.lenvm import LenVMConfig, LenVMTrainer  # noqa: F401
from .trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer  # noqa: F401
from .trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer  # noqa: F401
from .trainers.ppo import PPOConfig, PPOTrainer  # noqa: F401

# Every public name; docs/reference/ renders each one from its docstring (tests/test_docs.py checks it).
__all__ = [
    "DEFAULT_INSTRUCTION",
    "LengthGuidanceConfig",
    "LengthValueModel",
    "LengthValueModelOutput",
    "LenVMConfig",
    "LenVMGRPOConfig",
    "LenVMGRPOTrainer",
    "LenVMPPOConfig",
    "LenVMPPOTrainer",
    "LenVMTrainer",
    "PPOConfig",
    "PPOTrainer",
    "PromptBoundaryMRE",
    "add_length_advantages",
    "check_finite",
    "check_tokenizers_compatible",
    "combine_advantages",
    "completion_td_residuals",
    "compute_gae",
    "constant_baseline_value",
    "count_length_tokens",
    "evaluate_gsm8k",
    "evaluate_length_prediction",
    "extract_gsm8k_answer",
    "fill_padding",
    "fit_prompt_length_regression",
    "format_length_prediction_table",
    "freeze_model",
    "gamma_for_length",
    "generate_with_length_guidance",
    "gsm8k_accuracy_reward",
    "gsm8k_format_reward",
    "guided_generate_completions",
    "kimi_length_reward",
    "last_complete_checkpoint",
    "length_advantages",
    "length_deviation",
    "length_penalty_reward",
    "length_returns",
    "length_score",
    "length_shaping_rewards",
    "length_td_residuals",
    "length_tokens_html",
    "lengths_to_values",
    "load_frozen_lenvm",
    "load_gsm8k",
    "make_conversational_prompt",
    "materialize_smollm2",
    "plot_length_prediction",
    "position_ids_from_mask",
    "predict_prompt_length_regression",
    "prepare_prompt_dataset",
    "prompt_boundary_mre",
    "relative_length_error_at_fractions",
    "rms_normalize_length_advantages",
    "scheduled_length_coef",
    "token_budget_curve",
    "top_length_tokens",
    "value_mse",
    "values_to_lengths",
]


def __getattr__(name: str):
    # `materialize_smollm2` is imported on first use: importing `lenvm_rl.smollm2` here would make
    # `python -m lenvm_rl.smollm2` run a module already in sys.modules (runpy's RuntimeWarning).
    if name == "materialize_smollm2":
        from .smollm2 import materialize_smollm2

        return materialize_smollm2
    raise AttributeError(f"module 'lenvm_rl' has no attribute {name!r}")
