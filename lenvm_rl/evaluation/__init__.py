"""Evaluation, one module per question.

- [`lenvm_rl.evaluation.length_prediction`]: how well a LenVM predicts lengths on held-out rollouts (paper
  section 5), next to two baselines: [`evaluate_length_prediction`], its table and plot.
- [`lenvm_rl.evaluation.gsm8k`]: how accurate a policy is on GSM8K-style problems and at what length:
  [`evaluate_gsm8k`], [`accuracy_length_stats`], [`load_eval_problems`] and the accuracy-versus-tokens results,
  plot and table.
- [`lenvm_rl.evaluation.guided`]: [`load_guided_eval`], the policy, LenVM and problems of a guided-decoding
  evaluation.
- [`lenvm_rl.evaluation.results`]: [`write_results`], an evaluation's JSON and its figure side by side, and
  [`start_evaluation`], the run that records them.
"""

from .gsm8k import (
    accuracy_length_stats,
    evaluate_gsm8k,
    format_tradeoff_table,
    load_eval_problems,
    plot_tradeoff,
    write_tradeoff_results,
)
from .guided import load_guided_eval
from .length_prediction import evaluate_length_prediction, format_length_prediction_table, plot_length_prediction
from .results import start_evaluation, write_results

__all__ = [
    "accuracy_length_stats",
    "evaluate_gsm8k",
    "evaluate_length_prediction",
    "format_length_prediction_table",
    "format_tradeoff_table",
    "load_eval_problems",
    "load_guided_eval",
    "plot_length_prediction",
    "plot_tradeoff",
    "start_evaluation",
    "write_results",
    "write_tradeoff_results",
]
