"""The argument dataclasses of the recipes, in one place (as open-r1's ``configs.py``), one module per group.

A recipe in ``recipes/`` parses one of these with ``TrlParser(...).parse_args_and_config()`` (flags or ``--config``
YAML) and hands it to its ``main``. The library's own configs live with the code they configure (trainer configs in
[`lenvm_rl.trainers`], the decoding config [`~lenvm_rl.guidance.LengthGuidanceConfig`] in [`lenvm_rl.guidance`]);
script arguments reuse their fields by inheritance instead of repeating them, so each default is written once.

- [`lenvm_rl.configs.rl`]: PPO and GRPO recipes and the length ablation;
- [`lenvm_rl.configs.lenvm`]: sampling rollouts, training and evaluating a LenVM;
- [`lenvm_rl.configs.evaluation`]: evaluating policies, with and without LenVM guidance.
"""

from .common import RunArguments, null_to_none
from .evaluation import (
    EvalGSM8KArguments,
    EvalLengthControlArguments,
    EvalTradeoffArguments,
    GuidedEvalArguments,
    SeedSummaryArguments,
)
from .lenvm import (
    EvalLengthPredictionArguments,
    LengthTokensArguments,
    PredictLengthArguments,
    SampleRolloutsArguments,
    TrainLenVMScriptArguments,
)
from .rl import AblationArguments, GRPOScriptArguments, GSM8KScriptArguments, PPOScriptArguments

__all__ = [
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
    "RunArguments",
    "SeedSummaryArguments",
    "SampleRolloutsArguments",
    "TrainLenVMScriptArguments",
    "null_to_none",
]
