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
from .modeling import LengthValueModel, LengthValueModelOutput, check_tokenizers_compatible, freeze_model  # noqa: F401
from .rewards import extract_gsm8k_answer, gsm8k_accuracy_reward, gsm8k_format_reward  # noqa: F401
