"""The argument dataclasses of the recipes: the one place for script arguments (as in open-r1's ``configs.py``).

A recipe in ``recipes/`` parses one of these with ``TrlParser(...).parse_args_and_config()`` (flags or ``--config``
YAML) and hands it to its ``main``. A class here holds what several scripts share; a field used by one script only
stays in that script's subclass. The library's own configs live with the code they configure (trainer configs in
[`lenvm_rl.trainers`], the decoding config [`~lenvm_rl.guidance.LengthGuidanceConfig`] in [`lenvm_rl.guidance`]);
script arguments reuse their fields by inheritance instead of repeating them, so each default is written once.
"""

from dataclasses import dataclass, field, fields

from .guidance import CandidateSamplingConfig, GuidanceMode, LengthGuidanceConfig

__all__ = ["GuidedEvalArguments"]


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
