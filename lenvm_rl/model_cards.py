"""Model cards (`README.md`) for what lenvm-rl saves: RL-trained policies and Length Value Models.

The RL trainers ([`~lenvm_rl.PPOTrainer`], [`~lenvm_rl.LenVMPPOTrainer`]) write a TRL-style card (front matter,
quick start, training procedure, framework versions, citations) next to the policy; [`~lenvm_rl.LengthValueModel`]
writes one with its checkpoint (backbone, generator model, gamma, training data and figures). Both are plain text
built here from plain values, so the cards can be tested without a model and the two stay in one style.
"""

import os
import textwrap

from huggingface_hub import ModelCardData

__all__ = ["LENVM_CITATION", "PPO_CITATION", "TRL_CITATION", "lenvm_model_card", "policy_model_card"]

LENVM_CITATION = textwrap.dedent("""\
    @article{zhang2026lenvm,
        title   = {{Length Value Model: Scalable Value Pretraining for Token-Level Length Modeling}},
        author  = {Zhang and others},
        year    = 2026,
        eprint  = {arXiv:2604.27039}
    }""")

# The paper TRL 1.12's PPOTrainer cites for its method.
PPO_CITATION = textwrap.dedent("""\
    @article{mziegler2019fine-tuning,
        title   = {{Fine-Tuning Language Models from Human Preferences}},
        author  = {Daniel M. Ziegler and Nisan Stiennon and Jeffrey Wu and Tom B. Brown and Alec Radford and Dario Amodei and Paul F. Christiano and Geoffrey Irving},
        year    = 2019,
        eprint  = {arXiv:1909.08593}
    }""")

TRL_CITATION = textwrap.dedent("""\
    @software{vonwerra2020trl,
        title   = {{TRL: Transformers Reinforcement Learning}},
        author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
        license = {Apache-2.0},
        url     = {https://github.com/huggingface/trl},
        year    = {2020}
    }""")

LENVM_RL_URL = "https://github.com/lenvm-rl/lenvm-rl"


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository, `None` for a local directory or an unnamed model.

    >>> hub_id("Qwen/Qwen2.5-0.5B"), hub_id(""), hub_id(None)
    ('Qwen/Qwen2.5-0.5B', None, None)
    """
    if not name_or_path or os.path.isdir(name_or_path):
        return None
    return name_or_path


def markdown_table(rows: dict[str, object], header: tuple[str, str]) -> str:
    """A two-column Markdown table; floats with 4 significant digits.

    >>> print(markdown_table({"gamma": 0.997, "mode": "advantage"}, ("setting", "value")))
    | setting | value |
    | --- | --- |
    | gamma | 0.997 |
    | mode | advantage |
    """
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for key, value in rows.items():
        lines.append(f"| {key} | {f'{value:.4g}' if isinstance(value, float) else value} |")
    return "\n".join(lines)


def _model_link(name_or_path: str | None) -> str:
    repo = hub_id(name_or_path)
    if repo is not None:
        return f"[{repo}](https://huggingface.co/{repo})"
    return f"`{name_or_path}`" if name_or_path else "a model built in memory"


def _framework_versions() -> str:
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    from . import __version__

    return "\n".join(
        [
            f"- lenvm-rl: {__version__}",
            f"- TRL: {trl.__version__}",
            f"- Transformers: {transformers.__version__}",
            f"- PyTorch: {torch.__version__}",
            f"- Datasets: {datasets.__version__}",
            f"- Tokenizers: {tokenizers.__version__}",
        ]
    )


def _bibtex(text: str) -> str:
    return f"```bibtex\n{text}\n```"


def policy_model_card(
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    model_id: str,
    tags: list[str],
    trainer_name: str,
    facts: dict[str, object],
) -> str:
    """The `README.md` of a policy trained by lenvm-rl's RL trainers, in TRL's layout.

    Args:
        model_name (`str`): the card's title (the output directory's or Hub repository's name).
        base_model (`str` or `None`): the policy it was fine-tuned from (Hub id or local path).
        dataset_name (`str` or `None`): the training dataset's Hub id, if known.
        model_id (`str`): what the quick start loads: the Hub repository, or the local directory.
        tags (`list[str]`): Hub tags.
        trainer_name (`str`): the trainer class, e.g. `"LenVMPPOTrainer"`.
        facts (`dict`): the training settings to list (the trainer's `model_card_facts()`).
    """
    card_data = ModelCardData(
        base_model=hub_id(base_model),
        datasets=dataset_name,
        library_name="transformers",
        model_name=model_name,
        tags=["generated_from_trainer", *tags],
    )
    dataset = (
        f" on the [{dataset_name}](https://huggingface.co/datasets/{dataset_name}) dataset" if dataset_name else ""
    )
    sections = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# Model Card for {model_name}",
        f"This model is a fine-tuned version of {_model_link(base_model)}{dataset}.\nIt has been trained with "
        f"[lenvm-rl]({LENVM_RL_URL})'s `{trainer_name}` (TRL-compatible PPO with a learned critic) on "
        "[TRL](https://github.com/huggingface/trl) and Transformers.",
        "## Quick start",
        textwrap.dedent(f"""\
            ```python
            from transformers import pipeline

            question = "If you had a time machine, but could only go to the past or the future once and never return, which would you choose and why?"
            generator = pipeline("text-generation", model="{model_id}", device_map="auto")
            output = generator([{{"role": "user", "content": question}}], max_new_tokens=128, return_full_text=False)[0]
            print(output["generated_text"])
            ```"""),
        "The trained task critic is saved next to the policy, in `value_model/`.",
        "## Training procedure",
        f"This model was trained with PPO (`{trainer_name}`), the method of [Fine-Tuning Language Models from Human "
        "Preferences](https://huggingface.co/papers/1909.08593).",
        markdown_table(facts, ("setting", "value")),
        f"### Framework versions\n\n{_framework_versions()}",
        "## Citations",
        f"Cite PPO for language models as:\n\n{_bibtex(PPO_CITATION)}",
        f"Cite the Length Value Model (lenvm-rl) as:\n\n{_bibtex(LENVM_CITATION)}",
        f"Cite TRL as:\n\n{_bibtex(TRL_CITATION)}",
    ]
    return "\n\n".join(sections) + "\n"


def lenvm_model_card(
    name: str,
    backbone: str | None,
    model_type: str,
    generator_model: str | None,
    gamma: float,
    data_description: str | None,
    metrics: dict[str, float] | None = None,
    repo_id: str | None = None,
) -> str:
    """The `README.md` of a [`~lenvm_rl.LengthValueModel`] checkpoint.

    Args:
        name (`str`): the checkpoint's name (its directory's or Hub repository's).
        backbone (`str` or `None`): the causal LM the LenVM was built on (`config._name_or_path`).
        model_type (`str`): the backbone's architecture (`config.model_type`).
        generator_model (`str` or `None`): the policy whose completions the LenVM predicts.
        gamma (`float`): the discount of its values.
        data_description (`str` or `None`): the prompts it was trained on.
        metrics (`dict[str, float]`, *optional*): training or evaluation figures (e.g. prompt-boundary MRE).
        repo_id (`str`, *optional*): the Hub repository it is pushed to; the quick start downloads it from there.
    """
    card_data = ModelCardData(
        base_model=hub_id(backbone), model_name=name, tags=["lenvm-rl", "length-value-model", "value-model"]
    )
    facts = {
        "backbone": f"{_model_link(backbone)} ({model_type})",
        "generator model (whose completion lengths it predicts)": generator_model or "not recorded",
        "gamma": gamma,
        "horizon `1 / (1 - gamma)`": f"{1 / (1 - gamma):.0f} tokens",
        "training data": data_description or "not recorded",
    }
    source = f'snapshot_download("{repo_id}")' if repo_id else f'"path/to/{name}"'
    sections = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# Length Value Model {name}",
        "A Length Value Model (LenVM; Zhang et al., 2026, arXiv 2604.27039) is a causal LM with a small value head "
        "that predicts, at every token, how many tokens of the completion remain, as the bounded return "
        "`V(s_t) = -(1 - gamma^(L - t))` (`L` the completion length, EOS included). Its values hold for the "
        "generator model's completions: a LenVM is policy-dependent.",
        markdown_table(facts, ("property", "value")),
    ]
    if metrics:
        sections += ["## Evaluation", markdown_table(metrics, ("metric", "value"))]
    sections += [
        "## Quick start",
        textwrap.dedent(f"""\
            ```python
            from huggingface_hub import snapshot_download
            from lenvm_rl import LengthValueModel, values_to_lengths

            lenvm = LengthValueModel.from_pretrained({source})
            values = lenvm(input_ids, attention_mask=attention_mask).values  # (B, T), in (-1, 0)
            remaining_tokens = values_to_lengths(values, lenvm.gamma)
            ```"""),
        "Files: the backbone as a causal-LM checkpoint, `value_head.safetensors` (the reference implementation's "
        "layout, so its loaders read it too) and `lenvm_config.json` (gamma, generator model, data, metrics).",
        f"### Framework versions\n\n{_framework_versions()}",
        "## Citation",
        _bibtex(LENVM_CITATION),
    ]
    return "\n\n".join(sections) + "\n"
