"""The setup shared by the evaluations of LenVM-guided decoding (``recipes/eval_length_control.py``,
``recipes/eval_tradeoff.py``): the policy, its LenVM and the held-out problems named by a
[`~lenvm_rl.configs.GuidedEvalArguments`]."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..data import check_prompt_format
from ..modeling import load_frozen_lenvm
from .gsm8k import load_eval_problems

__all__ = ["load_guided_eval"]


def load_guided_eval(script_args) -> tuple:
    """
    Load what a guided-decoding evaluation runs on.

    Args:
        script_args ([`~lenvm_rl.configs.GuidedEvalArguments`]):
            The recipe's arguments: `policy_path`, `lenvm_path`, `gamma`, `dtype` (policy and LenVM backbone; the
            value head stays float32) and the problems (`dataset_name`, `dataset_split`, `num_problems`,
            `system_prompt`, `instruction`). A warning names `--system_prompt` / `--instruction` when the prompts
            are not built the way the LenVM's training prompts were (its recorded `prompt_format`).

    Returns:
        `tuple`: `(policy, tokenizer, lenvm, problems)`: the policy in eval mode, its tokenizer, its LenVM frozen and
        checked to read the policy's token ids ([`~lenvm_rl.modeling.load_frozen_lenvm`]), and the first
        `num_problems` problems with their chat prompts ([`~lenvm_rl.evaluation.load_eval_problems`]).
    """
    dtype = getattr(script_args, "dtype", "float32")
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(script_args.policy_path)
    policy = AutoModelForCausalLM.from_pretrained(script_args.policy_path, dtype=dtype).eval()
    lenvm = load_frozen_lenvm(script_args.lenvm_path, tokenizer, gamma=script_args.gamma, dtype=dtype)
    check_prompt_format(lenvm.prompt_format, script_args.system_prompt, script_args.instruction, "evaluation prompts")
    problems = load_eval_problems(
        script_args.dataset_name,
        script_args.dataset_split,
        script_args.num_problems,
        script_args.system_prompt,
        script_args.instruction,
    )
    return policy, tokenizer, lenvm, problems
