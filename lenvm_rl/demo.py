"""The offline demo world: GSM8K-style problems, a word-level tokenizer and a tiny policy, all built on a CPU.

Everything a LenVM/RL experiment needs, without a network or a GPU:

- [`generate_demo_problems`]: seeded word problems with 2-4 arithmetic steps and small numbers, in GSM8K's
  `question` / `answer` (`... #### N`) format, plus metadata columns;
- reference solutions in three styles (concise, explained, verbose with a random number of re-checks), so
  completion lengths are long-tailed and depend partly on the problem;
- [`build_demo_tokenizer`]: a word-level tokenizer trained with `tokenizers`, every integer 0..199 one token;
- [`build_demo_world`]: SFT of a tiny Llama-style policy with TRL's `SFTTrainer` on that data, saved with its
  tokenizer and the train/test splits.

Build and measure from the command line:

    python -m lenvm_rl.demo build --output_dir outputs/demo/world --seed 0
    python -m lenvm_rl.demo measure --world_dir outputs/demo/world --output_dir outputs/demo
"""

import datetime
import hashlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer, TrlParser

from . import __version__
from .generation import GeneratedCompletion, generate_completions
from .rewards import extract_gsm8k_answer

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_INSTRUCTION",
    "DEMO_SYSTEM_PROMPT",
    "DemoProblem",
    "demo_prompt",
    "generate_demo_problems",
    "write_demo_solution",
]

# Prompts are the question alone as one user message: no system prompt, no instruction. Recipes that build prompts
# for the demo policy must use `demo_prompt` (or these two constants) to match what it was trained on.
DEMO_SYSTEM_PROMPT = None
DEMO_INSTRUCTION = None

DEMO_MAX_VALUE = 30  # + and * never go above it; start values are 2..40, and every value stays >= 1
# Small operands and results keep the arithmetic a table a tiny model learns in minutes: 2..9 for + and -, 2..4 for
# * and /. Measured (see README): results up to 60 left the policy at 63% accuracy at T = 1.0, up to 30 at 89.5%.
_ADD_OPERANDS = range(2, 10)
_MUL_OPERANDS = range(2, 5)
DEMO_NUM_STEPS = (2, 3, 4)
# The sentence of step k in a question and the line of step k in a solution start with the same word, which lets a
# tiny model find the operand of step k by matching words instead of counting sentences.
_STEP_WORDS = ("First", "Then", "Next", "Finally")
_NAMES = (
    ("Ava", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"),
    ("Gina", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"), ("Kim", "she"), ("Leo", "he"),
    ("Mia", "she"), ("Noah", "he"), ("Olga", "she"), ("Paul", "he"),
)  # fmt: skip


@dataclass(frozen=True)
class _Theme:
    """Wording of one kind of problem, and how verbose its reference solutions tend to be."""

    item: str
    start: str  # "{name} has {n} apples"
    add: tuple[str, ...]  # "{p} picks {n} more apples"
    sub: tuple[str, ...]
    mul: str
    div: str
    style_weights: tuple[float, float, float]  # P(concise), P(explained), P(verbose)


_THEMES = {
    "farm": _Theme(
        item="apples",
        start="{name} picks {n} apples",
        add=("{p} picks {n} more apples", "{p} finds {n} more apples"),
        sub=("{p} eats {n} apples", "{p} drops {n} apples"),
        mul="{p} gets {n} times as many apples",
        div="{p} splits {n} ways and keeps one share",
        style_weights=(0.55, 0.3, 0.15),
    ),
    "shop": _Theme(
        item="dollars",
        start="{name} has {n} dollars",
        add=("{p} earns {n} more dollars", "{p} saves {n} more dollars"),
        sub=("{p} spends {n} dollars", "{p} loses {n} dollars"),
        mul="{p} gets {n} times as many dollars",
        div="{p} splits {n} ways and keeps one share",
        style_weights=(0.92, 0.06, 0.02),
    ),
    "library": _Theme(
        item="books",
        start="{name} has {n} books",
        add=("{p} borrows {n} more books", "{p} buys {n} more books"),
        sub=("{p} returns {n} books", "{p} sells {n} books"),
        mul="{p} gets {n} times as many books",
        div="{p} splits {n} ways and keeps one share",
        style_weights=(0.15, 0.4, 0.45),
    ),
    "bakery": _Theme(
        item="cookies",
        start="{name} bakes {n} cookies",
        add=("{p} bakes {n} more cookies", "{p} buys {n} more cookies"),
        sub=("{p} sells {n} cookies", "{p} eats {n} cookies"),
        mul="{p} gets {n} times as many cookies",
        div="{p} splits {n} ways and keeps one share",
        style_weights=(0.8, 0.15, 0.05),
    ),
    "toys": _Theme(
        item="marbles",
        start="{name} has {n} marbles",
        add=("{p} wins {n} more marbles", "{p} finds {n} more marbles"),
        sub=("{p} loses {n} marbles", "{p} trades {n} marbles"),
        mul="{p} gets {n} times as many marbles",
        div="{p} splits {n} ways and keeps one share",
        style_weights=(0.4, 0.4, 0.2),
    ),
}
DEMO_THEMES = tuple(_THEMES)
_MAX_CHECKS = 8  # per solution; bounds the longest reference solution
DEMO_STYLES = ("concise", "explained", "verbose")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
_OP_VERBS = {
    "+": "add {b} to {a}",
    "-": "take {b} away from {a}",
    "*": "multiply {a} by {b}",
    "/": "divide {a} by {b}",
}


@dataclass(frozen=True)
class DemoProblem:
    """A word problem: a start value and `num_steps` operations `(op, operand)` applied in order."""

    id: str
    theme: str
    name: str
    start: int
    operations: tuple[tuple[str, int], ...]
    question: str

    @property
    def num_steps(self) -> int:
        return len(self.operations)

    @property
    def values(self) -> list[int]:
        """The start value then the result of every step; the last one is the answer."""
        values = [self.start]
        for op, operand in self.operations:
            values.append(_OPS[op](values[-1], operand))
        return values

    @property
    def value(self) -> int:
        return self.values[-1]


def _sample_operation(rng: random.Random, value: int) -> tuple[str, int]:
    """One operation that keeps the running value in 1..DEMO_MAX_VALUE (exact division only)."""
    candidates = [("+", n) for n in _ADD_OPERANDS if value + n <= DEMO_MAX_VALUE]
    candidates += [("-", n) for n in _ADD_OPERANDS if value - n >= 1]
    multiplications = [("*", n) for n in _MUL_OPERANDS if value * n <= DEMO_MAX_VALUE]
    divisions = [("/", n) for n in _MUL_OPERANDS if value % n == 0]
    # Additions/subtractions have more operands; weight the other kinds up so all four are common.
    weights = [1.0] * len(candidates) + [3.0] * len(multiplications) + [4.0] * len(divisions)
    return rng.choices(candidates + multiplications + divisions, weights=weights)[0]


def _sample_problem(rng: random.Random, problem_id: str) -> DemoProblem:
    theme_name = rng.choice(DEMO_THEMES)
    theme = _THEMES[theme_name]
    name, pronoun = rng.choice(_NAMES)
    num_steps = rng.choice(DEMO_NUM_STEPS)
    start = rng.randint(2, 20) if rng.random() < 0.6 else rng.randint(21, 40)
    operations, value = [], start
    for _ in range(num_steps):
        op, operand = _sample_operation(rng, value)
        operations.append((op, operand))
        value = _OPS[op](value, operand)
    sentences = [theme.start.format(name=name, n=start)]
    for word, (op, operand) in zip(_STEP_WORDS, operations):
        template = {"+": rng.choice(theme.add), "-": rng.choice(theme.sub), "*": theme.mul, "/": theme.div}[op]
        sentences.append(f"{word}, " + template.format(p=pronoun, n=operand))
    question = ". ".join(sentences) + f". How many {theme.item} does {name} have now?"
    return DemoProblem(problem_id, theme_name, name, start, tuple(operations), question)


def generate_demo_problems(num_problems: int, seed: int = 0, id_prefix: str = "demo") -> list[DemoProblem]:
    """
    Generate distinct GSM8K-style word problems.

    Each problem has a start value (2..40) and 2-4 operations (`+`, `-` with operands 2..9; `*`, `/` by 2..4, exact);
    every value stays at least 1, and an addition or multiplication never leads above 30. Questions are distinct; the list is a pure function of `(num_problems, seed)` and a
    longer list extends a shorter one.

    Args:
        num_problems (`int`):
            Number of problems.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the generator.
        id_prefix (`str`, *optional*, defaults to `"demo"`):
            Problem ids are `f"{id_prefix}-{seed}-{index}"`.

    Returns:
        `list[DemoProblem]`: the problems.

    Example:
        >>> from lenvm_rl.demo import generate_demo_problems
        >>> problem = generate_demo_problems(1, seed=0)[0]
        >>> problem.num_steps in (2, 3, 4) and problem.question.endswith("have now?")
        True
    """
    rng = random.Random(f"demo-problems-{seed}")
    problems, seen = [], set()
    while len(problems) < num_problems:
        problem = _sample_problem(rng, f"{id_prefix}-{seed}-{len(problems)}")
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def write_demo_solution(problem: DemoProblem, rng: random.Random, style: str | None = None) -> tuple[str, str, int]:
    """
    Write a reference solution ending in `#### N`.

    The computation lines are formulaic (`a op b = c`, the same text in every style); what varies is the prose
    around them. `style` is drawn from the problem's theme when `None`. Re-checks (`Let me check: a op b = c. Yes.`)
    repeat with a probability that grows with the size of the numbers, so lengths have a long tail.

    Args:
        problem (`DemoProblem`):
            The problem to solve.
        rng (`random.Random`):
            Source of the style and of the number of re-checks.
        style (`str`, *optional*):
            One of `"concise"`, `"explained"`, `"verbose"`.

    Returns:
        `tuple[str, str, int]`: the solution text, its style and its number of re-check lines.
    """
    theme = _THEMES[problem.theme]
    if style is None:
        style = rng.choices(DEMO_STYLES, weights=theme.style_weights)[0]
    # Bigger numbers are checked more often: P(another check) goes from 0.15 to 0.7 with the largest value.
    check_probability = 0.15 + 0.55 * max(problem.values) / DEMO_MAX_VALUE
    values, step_sentences = problem.values, problem.question.split(". ")[1 : problem.num_steps + 1]
    lines, num_checks = [], 0
    if style == "verbose":
        # The restatement keeps the start and the goal but not the steps: the step lines below quote each step from
        # the question, so a slip while restating cannot change which problem gets solved.
        pronoun = dict(_NAMES)[problem.name]
        lines.append(
            f"Let me restate the problem. {problem.name} has {problem.start} {theme.item} at the start, and {pronoun} "
            f"changes them {problem.num_steps} times. We need to find how many {theme.item} {problem.name} has now."
        )
    elif style == "explained":
        lines.append(f"{problem.name} starts with {problem.start} {theme.item}.")
    for k, (op, operand) in enumerate(problem.operations):
        a, c = values[k], values[k + 1]
        equation = f"{a} {op} {operand} = {c}"
        step_sentence = step_sentences[k]
        if style == "concise":
            lines.append(f"{_STEP_WORDS[k]}: {equation}.")
        elif style == "explained":
            lines.append(f"{step_sentence}, so {equation}.")
        else:
            verb = _OP_VERBS[op].format(a=a, b=operand)
            lines.append(f"{step_sentence}. That means we {verb}. So {equation}.")
        if style != "concise":
            first_probability = check_probability if style == "verbose" else check_probability / 4
            if num_checks < _MAX_CHECKS and rng.random() < first_probability:
                lines.append(f"Let me check: {equation}. Yes.")
                num_checks += 1
                while num_checks < _MAX_CHECKS and rng.random() < check_probability:
                    lines.append(f"Let me check again: {equation}. Yes.")
                    num_checks += 1
    if style == "verbose":
        lines.append(f"So {problem.name} has {problem.value} {theme.item} now.")
    lines.append(f"#### {problem.value}")
    return "\n".join(lines), style, num_checks


def demo_prompt(question: str) -> list[dict[str, str]]:
    """The chat messages the demo policy was trained on for `question`: one user message, nothing else."""
    messages = [{"role": "system", "content": DEMO_SYSTEM_PROMPT}] if DEMO_SYSTEM_PROMPT else []
    return [*messages, {"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

DEMO_PAD_TOKEN, DEMO_EOS_TOKEN, DEMO_UNK_TOKEN = "<pad>", "<|end|>", "<unk>"
DEMO_SPECIAL_TOKENS = (DEMO_PAD_TOKEN, DEMO_EOS_TOKEN, DEMO_UNK_TOKEN, "<|system|>", "<|user|>", "<|assistant|>")
DEMO_MAX_INTEGER = 199  # every integer 0..199 is one token
# `<|role|>content<|end|>` per message; the EOS `<|end|>` closes every turn, so the policy stops by emitting it.
DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
# Words and numbers are tokens; so are `.,?:!` and the newline. Spaces are not: the decoder puts one between tokens
# except before `.,?:!`, around a newline, so text written that way (all demo text is) round-trips exactly.
_GLUED_LEFT = ".,?:!\n"


def build_demo_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """
    Train the demo world's word-level tokenizer on `texts` (with `tokenizers`) and wrap it for `transformers`.

    Every integer 0..199 is one token whatever the texts; pad (`<pad>`) differs from EOS (`<|end|>`), which ends
    every chat turn (see `DEMO_CHAT_TEMPLATE`). Words not seen in `texts` become `<unk>`.

    Args:
        texts (`Iterable[str]`):
            The training corpus.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: the tokenizer, with its chat template set.

    Example:
        >>> from lenvm_rl.demo import build_demo_tokenizer
        >>> tokenizer = build_demo_tokenizer(["Ava has 3 apples.\\n#### 3"])
        >>> tokenizer.tokenize("Ava has 157 apples.")
        ['Ava', 'has', '157', 'apples', '.']
        >>> tokenizer.decode(tokenizer("Ava has 3 apples.\\n#### 3")["input_ids"])
        'Ava has 3 apples.\\n#### 3'
    """
    backend = Tokenizer(models.WordLevel(unk_token=DEMO_UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split(Regex(r"####|\n|[^\w\s]"), "isolated")]
    )
    # The WordPiece decoder joins tokens with spaces (its "##" continuation prefix is set to a string that never
    # occurs); the replacements then glue punctuation and newlines back.
    backend.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="\u2581\u2581", cleanup=False), decoders.Fuse()]
        + [decoders.Replace(f" {mark}", mark) for mark in _GLUED_LEFT]
        + [decoders.Replace("\n ", "\n")]
    )
    integers = " ".join(str(n) for n in range(DEMO_MAX_INTEGER + 1))
    trainer = trainers.WordLevelTrainer(vocab_size=100_000, min_frequency=1, special_tokens=list(DEMO_SPECIAL_TOKENS))
    backend.train_from_iterator(itertools.chain([integers], texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=DEMO_PAD_TOKEN, eos_token=DEMO_EOS_TOKEN, unk_token=DEMO_UNK_TOKEN
    )
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# World: data, policy, build


@dataclass
class DemoWorldConfig:
    r"""
    Configuration of [`build_demo_world`]: data sizes, the policy's architecture and its SFT run.

    The defaults build a 0.62M-parameter policy in about 7 minutes on 2 CPU cores (one SFT thread: the model is too
    small for two to help) that solves about 90% of held-out problems at temperature 1.0 (99% greedily); see the
    README for the measured figures. Many small steps beat fewer large ones here: batch 32 for 1500 steps, or
    batch 8 for 3000, fitted the arithmetic far worse in the same time. Every field enters the fingerprint that
    decides whether a built world is reused.

    Parameters:
        num_train_problems (`int`, *optional*, defaults to `24000`):
            Problems in `data/train.jsonl`, each with one reference solution (SFT examples).
        num_test_problems (`int`, *optional*, defaults to `500`):
            Held-out problems in `data/test.jsonl`, disjoint from the training problems.
        hidden_size (`int`, *optional*, defaults to `96`):
            Width of the Llama-style policy.
        num_hidden_layers (`int`, *optional*, defaults to `4`):
            Decoder layers of the policy.
        num_attention_heads (`int`, *optional*, defaults to `4`):
            Attention heads per layer.
        intermediate_size (`int`, *optional*, defaults to `384`):
            Width of the MLP of each layer.
        max_steps (`int`, *optional*, defaults to `6000`):
            SFT optimizer steps (a fixed number, so the build is deterministic).
        per_device_train_batch_size (`int`, *optional*, defaults to `4`):
            Sequences per SFT step.
        learning_rate (`float`, *optional*, defaults to `2e-3`):
            Peak AdamW learning rate (linear warm-up, cosine decay).
        warmup_steps (`int`, *optional*, defaults to `30`):
            Linear warm-up steps.
        number_embedding_frequencies (`int`, *optional*, defaults to `24`):
            At initialization, the first `2 * number_embedding_frequencies` dimensions of the embedding of each
            integer token n hold `cos` / `sin` of `2 pi f n / 200` for f = 1..F (see `_init_number_embeddings`);
            `0` keeps the plain random initialization.
        num_threads (`int`, *optional*, defaults to `1`):
            `torch.set_num_threads` during the build; results are reproducible for a given thread count.
    """

    num_train_problems: int = field(
        default=24000, metadata={"help": "Problems in data/train.jsonl, each with one reference solution."}
    )
    num_test_problems: int = field(
        default=500, metadata={"help": "Held-out problems in data/test.jsonl, disjoint from the training problems."}
    )
    hidden_size: int = field(default=96, metadata={"help": "Width of the Llama-style policy."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Decoder layers of the policy."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per layer."})
    intermediate_size: int = field(default=384, metadata={"help": "Width of the MLP of each layer."})
    max_steps: int = field(
        default=6000, metadata={"help": "SFT optimizer steps (fixed, so builds are deterministic)."}
    )
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per SFT step."})
    learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine decay)."}
    )
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    number_embedding_frequencies: int = field(
        default=24,
        metadata={"help": "Fourier features of n written into the embedding of integer n at init (0 disables)."},
    )
    num_threads: int = field(
        default=1, metadata={"help": "torch.set_num_threads during the build; results are reproducible per count."}
    )

    def __post_init__(self):
        if self.num_train_problems < 1 or self.num_test_problems < 1:
            raise ValueError("`num_train_problems` and `num_test_problems` must be at least 1.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("`hidden_size` must be a multiple of `num_attention_heads`.")
        if 2 * self.number_embedding_frequencies > self.hidden_size:
            raise ValueError("`number_embedding_frequencies` must be at most `hidden_size / 2`.")
        if self.max_steps < 1:
            raise ValueError("`max_steps` must be at least 1.")


def demo_rows(problems: list[DemoProblem], seed: int) -> list[dict]:
    """GSM8K-format rows (`question`, `answer`) with one reference solution each, plus metadata columns."""
    rows = []
    for problem in problems:
        # One generator per problem: a row does not depend on the rows generated before it.
        answer, style, num_checks = write_demo_solution(problem, random.Random(f"demo-solution-{seed}-{problem.id}"))
        rows.append(
            {
                "id": problem.id,
                "question": problem.question,
                "answer": answer,
                "num_steps": problem.num_steps,
                "style": style,
                "theme": problem.theme,
                "num_checks": num_checks,
                "start": problem.start,
                "operations": [f"{op} {operand}" for op, operand in problem.operations],
            }
        )
    return rows


def _vocabulary_texts() -> Iterator[str]:
    """A fixed corpus in which every word the generator can write occurs, whatever the world's seed and size."""
    problems = generate_demo_problems(2000, seed=-1, id_prefix="vocabulary")
    rng = random.Random("demo-vocabulary")
    for problem in problems:
        yield problem.question
        for style in DEMO_STYLES:
            yield write_demo_solution(problem, rng, style)[0]


def _make_policy(config: DemoWorldConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config)
    if config.number_embedding_frequencies:
        _init_number_embeddings(model, tokenizer, config.number_embedding_frequencies)
    return model


@torch.no_grad()
def _init_number_embeddings(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, num_frequencies: int) -> None:
    """
    Write Fourier features of n into the first `2 * num_frequencies` embedding dimensions of each integer token n:

        e_n[2j] = s cos(2 pi (j + 1) n / N),  e_n[2j + 1] = s sin(2 pi (j + 1) n / N),  N = DEMO_MAX_INTEGER + 1

    with `s = sqrt(2) * std(embeddings)` so the scale matches the random initialization. Adding b to n rotates each
    (cos, sin) pair by a fixed angle, the structure small transformers learn for modular addition (Nanda et al.,
    "Progress measures for grokking", 2023); starting from it, and from integers that are distinguishable and ordered
    from step 0 (the embeddings are tied), makes copying and arithmetic on numbers much faster to learn.
    """
    embeddings = model.get_input_embeddings().weight  # (V, H)
    numbers = torch.arange(DEMO_MAX_INTEGER + 1, dtype=torch.float32)[:, None]  # (N, 1)
    frequencies = torch.arange(1, num_frequencies + 1, dtype=torch.float32)[None, :]  # (1, F)
    angles = 2 * math.pi * frequencies * numbers / (DEMO_MAX_INTEGER + 1)  # (N, F)
    features = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)  # (N, 2F)
    token_ids = tokenizer.convert_tokens_to_ids([str(n) for n in range(DEMO_MAX_INTEGER + 1)])
    embeddings[token_ids, : 2 * num_frequencies] = features * math.sqrt(2) * embeddings.std()


def _train_policy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train_rows: list[dict],
    config: DemoWorldConfig,
    seed: int,
    work_dir: Path,
) -> dict:
    """SFT on the reference solutions, loss on completion tokens only; returns the trainer's final metrics."""
    dataset = Dataset.from_list(
        [
            {"prompt": demo_prompt(row["question"]), "completion": [{"role": "assistant", "content": row["answer"]}]}
            for row in train_rows
        ]
    )
    args = SFTConfig(
        output_dir=str(work_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        # Batches of similar lengths: with long-tailed completions, random batches are mostly padding.
        train_sampling_strategy="group_by_length",
        completion_only_loss=True,
        max_length=512,
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        logging_steps=max(1, config.max_steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    return dict(result.metrics)


DEMO_WORLD_FORMAT = 1  # bump when the generator or the build changes what a given seed and config produce


def _fingerprint(seed: int, config: DemoWorldConfig) -> str:
    # A sample of the data is hashed too, so a change to the problem or solution generator invalidates old worlds.
    sample = demo_rows(generate_demo_problems(16, seed=seed), seed)
    payload = {"format": DEMO_WORLD_FORMAT, "seed": seed, "config": asdict(config), "sample": sample}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _reuse_world(output_dir: Path, fingerprint: str) -> Path:
    info_path = output_dir / "build_info.json"
    if not info_path.is_file():
        raise ValueError(f"{output_dir} exists and is not a demo world (no build_info.json): pass another output_dir.")
    info = json.loads(info_path.read_text())
    if info.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{output_dir} holds a demo world built with other arguments (seed {info.get('seed')}, config "
            f"{info.get('config')}): pass another output_dir, or delete it to rebuild."
        )
    logger.info("Reusing the demo world in %s (fingerprint %s).", output_dir, fingerprint)
    return output_dir


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f]


def length_variance_explained(lengths: list[list[int]]) -> float:
    r"""
    Share of the variance of completion lengths explained by the prompt, from several completions per prompt.

    One-way random-effects ANOVA: with `n` completions per prompt, the between-prompt variance is
    `Var(mean_p) - E[Var_p] / n` (the variance of the prompt means minus the sampling noise they carry), and the
    share is that over the total variance `Var(mean_p) - E[Var_p] / n + E[Var_p]`. Prompts with fewer than two
    completions are ignored; the result is clipped to [0, 1].

    Args:
        lengths (`list[list[int]]`):
            Completion lengths grouped by prompt, the same number per prompt.

    Returns:
        `float`: the between-prompt share of the length variance.

    Example:
        >>> from lenvm_rl.demo import length_variance_explained
        >>> length_variance_explained([[10, 10], [30, 30]])  # the prompt decides everything
        1.0
        >>> length_variance_explained([[10, 30], [30, 10]])  # the prompt decides nothing
        0.0
    """
    groups = np.array([group for group in lengths if len(group) >= 2], dtype=np.float64)  # (P, n)
    if groups.size == 0:
        return float("nan")
    within = groups.var(axis=1, ddof=1).mean()
    between = groups.mean(axis=1).var(ddof=1) - within / groups.shape[1]
    total = between + within
    return float(np.clip(between / total, 0.0, 1.0)) if total > 0 else 0.0


def _length_stats(lengths: list[int]) -> dict[str, float]:
    lengths = np.asarray(lengths, dtype=np.float64)
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }


def _data_length_stats(problems: list[DemoProblem], tokenizer: PreTrainedTokenizerFast, seed: int) -> dict:
    """Token lengths (with EOS) of reference solutions: 8 independent solutions for each of up to 1000 problems."""
    problems = problems[:1000]
    lengths = [
        [
            len(
                tokenizer(write_demo_solution(problem, random.Random(f"demo-stats-{seed}-{problem.id}-{k}"))[0])[
                    "input_ids"
                ]
            )
            + 1
            for k in range(8)
        ]
        for problem in problems
    ]
    return {
        **_length_stats([n for group in lengths for n in group]),
        "prompt_share": length_variance_explained(lengths),
    }


def build_demo_world(output_dir: str | os.PathLike, seed: int = 0, config: DemoWorldConfig | None = None) -> Path:
    """
    Build the demo world into `output_dir`, or reuse it if it was already built with the same arguments.

    The directory holds `policy/` (the SFT policy and its tokenizer, loadable with `AutoModelForCausalLM` and
    `AutoTokenizer`), `data/train.jsonl` and `data/test.jsonl` (GSM8K columns `question`, `answer` plus `id`,
    `num_steps`, `style`, `theme`, `num_checks`, `start`, `operations`; test problems never occur in train) and
    `build_info.json` (arguments, fingerprint, sizes, data length statistics, training metrics, build time,
    versions).

    Caching: `build_info.json` stores a fingerprint of `(seed, config)`; an existing world with the same fingerprint
    is returned as is, and one with another fingerprint raises a `ValueError` (it is never overwritten).
    Atomicity: the world is built in a temporary directory next to `output_dir` and moved into place with one
    `os.replace`, so an interrupted build leaves no partial world. Determinism: a fixed number of SFT steps and
    seeded data, initialization and data order; bit-identical for the same seed, config, thread count and versions.

    Args:
        output_dir (`str` or `os.PathLike`):
            Where the world goes; it must not exist, be empty, or hold a world built with the same arguments.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the problems, solutions, initialization and SFT data order.
        config ([`DemoWorldConfig`], *optional*):
            Sizes and training settings; defaults to `DemoWorldConfig()`.

    Returns:
        `Path`: `output_dir`.
    """
    config = config or DemoWorldConfig()
    output_dir = Path(output_dir)
    fingerprint = _fingerprint(seed, config)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        return _reuse_world(output_dir, fingerprint)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    work_dir.chmod(0o777 & ~umask)  # mkdtemp makes it private; the world is an ordinary directory
    try:
        _build_world_into(work_dir, seed, config, fingerprint)
        try:
            os.replace(work_dir, output_dir)
        except OSError:
            if not (output_dir / "build_info.json").is_file():
                raise
            # Another process built the same directory meanwhile: keep its world if it is ours.
            shutil.rmtree(work_dir)
            return _reuse_world(output_dir, fingerprint)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return output_dir


def _build_world_into(work_dir: Path, seed: int, config: DemoWorldConfig, fingerprint: str) -> None:
    start_time = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        # 1. Problems: the first `num_test_problems` are held out; questions are distinct, so the splits are disjoint.
        problems = generate_demo_problems(config.num_test_problems + config.num_train_problems, seed=seed)
        test_problems, train_problems = problems[: config.num_test_problems], problems[config.num_test_problems :]
        train_rows, test_rows = demo_rows(train_problems, seed), demo_rows(test_problems, seed)
        _write_jsonl(work_dir / "data" / "train.jsonl", train_rows)
        _write_jsonl(work_dir / "data" / "test.jsonl", test_rows)

        # 2. Tokenizer, trained on a fixed corpus that covers every word plus the training data.
        train_texts = (text for row in train_rows for text in (row["question"], row["answer"]))
        tokenizer = build_demo_tokenizer(itertools.chain(_vocabulary_texts(), train_texts))

        # 3. Policy: SFT from a seeded random initialization.
        model = _make_policy(config, tokenizer, seed)
        metrics = _train_policy(model, tokenizer, train_rows, config, seed, work_dir / "sft")
        shutil.rmtree(work_dir / "sft", ignore_errors=True)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(work_dir / "policy")
        tokenizer.save_pretrained(work_dir / "policy")

        # 4. Build info, written last.
        info = {
            "format": DEMO_WORLD_FORMAT,
            "fingerprint": fingerprint,
            "seed": seed,
            "config": asdict(config),
            "num_train_problems": len(train_rows),
            "num_test_problems": len(test_rows),
            "vocab_size": len(tokenizer),
            "num_parameters": model.num_parameters(),
            "prompt": {"system_prompt": DEMO_SYSTEM_PROMPT, "instruction": DEMO_INSTRUCTION},
            "data_lengths": _data_length_stats(train_problems, tokenizer, seed),
            "train_metrics": metrics,
            "build_seconds": round(time.perf_counter() - start_time, 1),
            "num_threads": config.num_threads,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "lenvm_rl": __version__,
                "python": platform.python_version(),
                **{name: importlib.metadata.version(name) for name in _VERSIONED_PACKAGES},
            },
        }
        (work_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    finally:
        torch.set_num_threads(previous_threads)


_VERSIONED_PACKAGES = ("torch", "transformers", "trl", "tokenizers", "datasets", "accelerate")


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


def measure_demo_policy(
    world_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_problems: int = 200,
    num_samples: int = 4,
    max_new_tokens: int = 384,
    batch_size: int = 32,
    seed: int = 0,
    num_threads: int = 2,
) -> dict:
    """
    Measure the demo policy on held-out problems: accuracy and the distribution of its own completion lengths.

    Samples `num_samples` completions per problem at temperature 1.0 (top-p 1, top-k 0) plus one greedy completion,
    scores them with [`~lenvm_rl.rewards.extract_gsm8k_answer`], and writes `demo_policy_stats.json` and
    `demo_policy_lengths.png` (histogram of sampled lengths next to the reference solutions') into `output_dir`.
    Lengths are in tokens and include EOS.

    Args:
        world_dir (`str` or `os.PathLike`):
            A world built by [`build_demo_world`].
        output_dir (`str` or `os.PathLike`):
            Where the JSON and the PNG go.
        num_problems (`int`, *optional*, defaults to `200`):
            The first `num_problems` problems of `data/test.jsonl`.
        num_samples (`int`, *optional*, defaults to `4`):
            Sampled completions per problem (at least 2 for the within-prompt statistics).
        max_new_tokens (`int`, *optional*, defaults to `384`):
            Length cap.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows decoded together.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed.
        num_threads (`int`, *optional*, defaults to `2`):
            `torch.set_num_threads` while measuring.

    Returns:
        `dict`: the statistics written to `demo_policy_stats.json`.
    """
    world_dir, output_dir = Path(world_dir), Path(output_dir)
    torch.set_num_threads(num_threads)
    model = AutoModelForCausalLM.from_pretrained(world_dir / "policy").eval()
    tokenizer = AutoTokenizer.from_pretrained(world_dir / "policy")
    rows = _read_jsonl(world_dir / "data" / "test.jsonl")[:num_problems]
    prompts = [demo_prompt(row["question"]) for row in rows]
    golds = [extract_gsm8k_answer(row["answer"]) for row in rows]

    start_time = time.perf_counter()
    sampled = generate_completions(
        model, tokenizer, prompts, num_samples, max_new_tokens, 1.0, 1.0, 0, batch_size, seed, progress=True
    )
    sample_seconds = time.perf_counter() - start_time
    greedy = generate_completions(
        model, tokenizer, prompts, 1, max_new_tokens, 0.0, 1.0, 0, batch_size, seed, progress=True
    )

    def accuracies(completions: list[GeneratedCompletion]) -> dict:
        correct = [extract_gsm8k_answer(c.text) == golds[c.prompt_index] for c in completions]
        by_steps = {}
        for steps in sorted({row["num_steps"] for row in rows}):
            hits = [ok for ok, c in zip(correct, completions) if rows[c.prompt_index]["num_steps"] == steps]
            by_steps[str(steps)] = float(np.mean(hits))
        return {"overall": float(np.mean(correct)), "by_num_steps": by_steps}

    lengths = [len(c.completion_ids) for c in sampled]
    by_prompt = [lengths[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]
    reference_lengths = [len(tokenizer(row["answer"])["input_ids"]) + 1 for row in rows]
    stats = {
        "world_dir": str(world_dir),
        "num_parameters": model.num_parameters(),
        "num_problems": len(rows),
        "num_samples": num_samples,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new_tokens, "seed": seed},
        "accuracy": accuracies(sampled),
        "greedy_accuracy": accuracies(greedy),
        "lengths": _length_stats(lengths),
        "fraction_truncated": float(np.mean([c.finish_reason == "length" for c in sampled])),
        "mean_within_prompt_std": float(np.mean([np.std(group, ddof=1) for group in by_prompt]))
        if num_samples > 1
        else float("nan"),
        "prompt_explained_variance": length_variance_explained(by_prompt) if num_samples > 1 else float("nan"),
        "greedy_lengths": _length_stats([len(c.completion_ids) for c in greedy]),
        "reference_lengths": _length_stats(reference_lengths),
        "sampling_seconds": round(sample_seconds, 1),
        "sampled_tokens_per_second": round(sum(lengths) / sample_seconds, 1),
        "num_threads": num_threads,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "demo_policy_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _plot_lengths(lengths, reference_lengths, output_dir / "demo_policy_lengths.png")
    return stats


def _plot_lengths(lengths: list[int], reference_lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.arange(0, max(max(lengths), max(reference_lengths)) + 10, 8)
    ax.hist(lengths, bins=bins, alpha=0.6, density=True, label=f"policy, T=1.0 (n={len(lengths)})")
    ax.hist(
        reference_lengths,
        bins=bins,
        alpha=0.6,
        density=True,
        label=f"reference solutions (n={len(reference_lengths)})",
    )
    for name, value in (("median", np.median(lengths)), ("p99", np.percentile(lengths, 99))):
        ax.axvline(value, color="k", linestyle="--", linewidth=0.8)
        ax.text(value, ax.get_ylim()[1] * 0.9, f" {name} {value:.0f}", fontsize=8)
    ax.set_xlabel("completion length (tokens, with EOS)")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title("Demo policy: completion lengths on held-out problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class DemoBuildArguments:
    """Arguments of `python -m lenvm_rl.demo build`; the other flags are the fields of [`DemoWorldConfig`]."""

    output_dir: str = field(metadata={"help": "Where the world goes (reused if built with the same arguments)."})
    seed: int = field(default=0, metadata={"help": "Seed of the problems, solutions, initialization and SFT."})


@dataclass
class DemoMeasureArguments:
    """Arguments of `python -m lenvm_rl.demo measure` (see [`measure_demo_policy`])."""

    world_dir: str = field(metadata={"help": "A world built by `python -m lenvm_rl.demo build`."})
    output_dir: str = field(metadata={"help": "Where demo_policy_stats.json and demo_policy_lengths.png go."})
    num_problems: int = field(default=200, metadata={"help": "Held-out problems to measure on."})
    num_samples: int = field(default=4, metadata={"help": "Sampled completions per problem (temperature 1.0)."})
    max_new_tokens: int = field(default=384, metadata={"help": "Length cap."})
    batch_size: int = field(default=32, metadata={"help": "Rows decoded together."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    num_threads: int = field(default=2, metadata={"help": "torch.set_num_threads while measuring."})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "measure"):
        raise SystemExit("usage: python -m lenvm_rl.demo {build,measure} [--help] [--config YAML] [flags]")
    command, argv = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if command == "build":
        build_args, config = TrlParser((DemoBuildArguments, DemoWorldConfig)).parse_args_and_config(argv)
        world_dir = build_demo_world(build_args.output_dir, seed=build_args.seed, config=config)
        info = json.loads((world_dir / "build_info.json").read_text())
        print(
            json.dumps({key: info[key] for key in ("fingerprint", "num_parameters", "data_lengths", "build_seconds")})
        )
    else:
        (measure_args,) = TrlParser((DemoMeasureArguments,)).parse_args_and_config(argv)
        stats = measure_demo_policy(**asdict(measure_args))
        print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
