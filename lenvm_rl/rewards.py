"""GSM8K rewards with TRL's reward-function signature.

TRL's GRPO/RLOO trainers call every reward function as `func(prompts=..., completions=..., completion_ids=...,
**dataset_columns)` and log it as `rewards/<func.__name__>/mean`, so the functions below log as
`rewards/gsm8k_accuracy_reward/mean` and `rewards/gsm8k_format_reward/mean`. Completions arrive as strings
(standard format) or as lists of chat messages (conversational format); both are accepted.

Everything here is pure Python (`re`, `fractions`, `unicodedata`): no torch, no tokenizer.
"""

import re
import unicodedata
from fractions import Fraction

__all__ = [
    "extract_gsm8k_answer",
    "gsm8k_accuracy_reward",
    "gsm8k_format_reward",
    "kimi_length_reward",
    "length_penalty_reward",
]

# A number as written in prose or LaTeX: an optional sign (not read as a minus when glued to a preceding word,
# digit or bracket, so "3-5" is 5), an optional `$`/`\$` (the sign may also follow it: "$-5"), an integer part whose
# thousands are grouped by commas or by spaces ("1,000", "1 000"; groups of exactly 3 digits), an optional decimal
# part after a `.` or a decimal comma ("12,5": a comma not followed by a group of 3 digits), an optional exponent
# ("5e3") and an optional denominator ("1/2"). `%`, units and a sentence-ending "." are simply not matched.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-+\u2212]))?"
    r"(?:\\?\$(?P<dollar_sign>[-+\u2212])?)?"
    r"(?:(?P<integer>\d{1,3}(?:,\d{3}(?!\d))+|\d{1,3}(?:[ \u00a0\u2009\u202f]\d{3}(?!\d))+|\d+)"
    r"(?:[.,](?P<decimals>\d+))?|\.(?P<bare_decimals>\d+))"
    r"(?:[eE](?P<exponent>[-+\u2212]?\d{1,3})(?![\w.]))?"
    r"(?:/(?P<denominator>\d+)(?![\d.,/]))?"
)
# Final-answer markers, strongest first. `####` is the GSM8K reference format.
_HASH_MARKER = re.compile(r"####")
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\b|[:=])", re.IGNORECASE)
# The whole last non-blank line of a well-formatted completion (see `gsm8k_format_reward`).
_FORMAT_LINE = re.compile(r"####[ \t]*-?\d+(?:,\d{3})*(?:\.\d+)?")


def _ascii_digits(text: str) -> str:
    """Every Unicode decimal digit as its ASCII digit: full-width '１８' and Arabic-Indic '١٨' read as '18'."""
    return "".join(str(unicodedata.decimal(char)) if char.isdecimal() else char for char in text)


def _canonical_number(match: re.Match) -> str | None:
    """The number's exact value as a string: '1,000.50' -> '1000.5', '-018.0' -> '-18', '.5' -> '0.5', '-0' -> '0',
    '5e3' -> '5000', '2/4' -> '0.5', '1/3' -> '1/3' (a fraction without a finite decimal stays a reduced fraction);
    `None` for a division by zero."""
    integer = re.sub(r"\D", "", match["integer"] or "0")
    decimals = match["decimals"] or match["bare_decimals"] or ""
    value = Fraction(int(integer + decimals), 10 ** len(decimals))
    if match["exponent"]:
        value *= Fraction(10) ** int(match["exponent"].replace("\u2212", "-"))
    if match["denominator"]:
        if int(match["denominator"]) == 0:
            return None
        value /= int(match["denominator"])
    if (match["sign"] or match["dollar_sign"]) in ("-", "\u2212"):
        value = -value
    return _format_exact(value)


def _format_exact(value: Fraction) -> str:
    """A decimal string when the value has one (its denominator divides a power of 10), else 'p/q'."""
    sign, value = ("-" if value < 0 else ""), abs(value)
    rest, powers = value.denominator, {}
    for prime in (2, 5):
        powers[prime] = 0
        while rest % prime == 0:
            rest, powers[prime] = rest // prime, powers[prime] + 1
    places = max(powers.values())  # 1 / (2^a 5^b) has max(a, b) decimal places
    if rest != 1:
        return f"{sign}{value.numerator}/{value.denominator}"
    integer, fraction = divmod(int(value * 10**places), 10**places)
    text = f"{integer}.{fraction:0{places}d}".rstrip("0").rstrip(".") if places else str(integer)
    return sign + text


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _canonical_number(match) if match else None


def _rest_of_line(text: str, start: int) -> str:
    """The text after a marker up to the end of its line; the answer may also start on the next line."""
    return text[start:].lstrip().split("\n", 1)[0]


def _marked_segments(text: str):
    """Where a final answer may be written, strongest marker first, last occurrence first within a marker."""
    for match in reversed(list(_HASH_MARKER.finditer(text))):
        yield _rest_of_line(text, match.end())
    yield from reversed(_BOXED.findall(text))
    for match in reversed(list(_ANSWER_MARKER.finditer(text))):
        yield _rest_of_line(text, match.end())


def extract_gsm8k_answer(text: str) -> str | None:
    r"""
    Extract the final numeric answer from a GSM8K solution or a model completion, as a canonical string.

    The answer is looked for in this order; within each rule the last occurrence that holds a number wins:

    1. `#### N`: the first number on the rest of the line after `####` (the GSM8K reference format).
    2. `\boxed{N}`: the first number inside the braces.
    3. `The answer is N` / `answer: N` / `answer = N` (case-insensitive): the first number on the rest of the line.
    4. Otherwise the last number anywhere in the text.

    How a number is read: Unicode decimal digits count as their ASCII digits (full-width `１８`, Arabic-Indic `١٨`);
    thousands may be grouped by commas (and LaTeX `{,}`) or spaces, in groups of exactly 3 digits (`1,000`,
    `1 000 000`); a comma followed by anything but such a group is a decimal comma (`12,5` is 12.5); an exponent
    is read (`5e3` is 5000, `2.5e-3` is 0.0025); a fraction of two plain numbers is read as its value (`1/2` is
    0.5, `24/2` is 12); `$`, `\$`, `%`, units and any trailing words or `.` are ignored. A `-` glued to a
    preceding word, digit or bracket is read as a hyphen, not a sign (`3-5` gives `5`).

    The canonical string is the number's exact value: a decimal without leading zeros or trailing decimal zeros
    (`18.0` and `18.00` become `18`, `.5` becomes `0.5`, `-0` becomes `0`, `1/2` becomes `0.5`), or a reduced
    fraction when it has no finite decimal (`2/6` becomes `1/3`); a minus sign is kept (`-5`, `$-5`, `-$5`; also
    the Unicode minus). Two canonical strings are equal exactly when the numbers are equal.

    Args:
        text (`str`):
            A reference solution, a bare number, or a model completion.

    Returns:
        `str` or `None`:
            The canonical answer, for example `"18"`, `"-5"` or `"0.5"`; `None` when the text holds no number.

    Example:
        >>> from lenvm_rl.rewards import extract_gsm8k_answer
        >>> extract_gsm8k_answer("She pays 2 * 9 = <<2*9=18>>18 dollars.\n#### 18")
        '18'
        >>> extract_gsm8k_answer(r"So the total is \boxed{\$1{,}000.00}.")
        '1000'
        >>> extract_gsm8k_answer("The answer is -5 degrees.")
        '-5'
        >>> extract_gsm8k_answer("Half of 3 is 1.50")
        '1.5'
        >>> extract_gsm8k_answer("#### 1/2"), extract_gsm8k_answer("#### 5e3"), extract_gsm8k_answer("#### １８")
        ('0.5', '5000', '18')
        >>> extract_gsm8k_answer("I don't know.") is None
        True
    """
    text = _ascii_digits(text.replace("{,}", ","))
    for segment in _marked_segments(text):
        if (number := _first_number(segment)) is not None:
            return number
    numbers = list(_NUMBER.finditer(text))
    return _canonical_number(numbers[-1]) if numbers else None


def _completion_text(completion: str | list[dict[str, str]]) -> str:
    """The text of a standard completion, or the content of the last assistant message of a conversational one."""
    if isinstance(completion, str):
        return completion
    for message in reversed(completion):
        if message.get("role", "assistant") == "assistant":  # TRL's own examples omit the role
            return message.get("content") or ""
    return ""


def gsm8k_accuracy_reward(
    completions: list[str] | list[list[dict[str, str]]], answer: list[str], **kwargs
) -> list[float]:
    r"""
    Reward function that checks whether a completion's final answer equals the GSM8K reference answer.

    Both sides go through [`extract_gsm8k_answer`], so the reference may be a full GSM8K solution ending in
    `#### N` (the dataset's `answer` column) or a bare number, and `1,000`, `$1000` and `1000.0` all match `1000`.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions to score: strings, or lists of chat messages of which the last assistant message is scored.
        answer (`list[str]`):
            The dataset's `answer` column, one entry per completion (a GSM8K solution or a bare number).
        **kwargs:
            Other arguments passed by trainers like [`GRPOTrainer`] (`prompts`, `completion_ids`, other dataset
            columns); unused.

    Returns:
        `list[float]`:
            1.0 where the extracted answers are equal, 0.0 otherwise (including when the completion has no number).

    Raises:
        `ValueError`: if a reference answer holds no number, which means the `answer` column is not GSM8K's.

    Example:
        >>> from lenvm_rl.rewards import gsm8k_accuracy_reward
        >>> answer = ["Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "1,000"]
        >>> gsm8k_accuracy_reward(["48 + 24 = 72\n#### 72", "The answer is $1000."], answer)
        [1.0, 1.0]
        >>> completions = [
        ...     [{"role": "assistant", "content": "#### 71"}],
        ...     [{"role": "assistant", "content": "I am not sure."}],
        ... ]
        >>> gsm8k_accuracy_reward(completions, answer)
        [0.0, 0.0]
    """
    rewards = []
    for i, (completion, reference) in enumerate(zip(completions, answer, strict=True)):
        gold = extract_gsm8k_answer(str(reference))
        if gold is None:
            raise ValueError(
                f"answer[{i}] holds no number: {reference!r}. The `answer` column must hold a GSM8K solution "
                "ending in '#### N' or a bare number."
            )
        rewards.append(1.0 if extract_gsm8k_answer(_completion_text(completion)) == gold else 0.0)
    return rewards


def gsm8k_format_reward(completions: list[str] | list[list[dict[str, str]]], **kwargs) -> list[float]:
    r"""
    Reward function that checks whether a completion ends with its final answer in GSM8K's `#### N` form.

    The rule: `####` occurs exactly once in the completion, and the last non-blank line is `#### N` and nothing
    else, where `N` is a plain number: an optional `-`, digits with optional thousands commas, an optional
    decimal part (no `$`, `%`, units or trailing `.`). Spaces around the line and between `####` and `N` are allowed.
    Every GSM8K reference solution satisfies it.

    Args:
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions to score: strings, or lists of chat messages of which the last assistant message is scored.
        **kwargs:
            Other arguments passed by trainers like [`GRPOTrainer`]; unused.

    Returns:
        `list[float]`:
            1.0 where the completion follows the format, 0.0 otherwise.

    Example:
        >>> from lenvm_rl.rewards import gsm8k_format_reward
        >>> gsm8k_format_reward(["6 * 3 = 18\n#### 18", "#### 18 apples", "#### 1\n#### 2", "The answer is 18."])
        [1.0, 0.0, 0.0, 0.0]
        >>> gsm8k_format_reward([[{"role": "assistant", "content": "Total: 1,000.\n\n#### 1,000\n"}]])
        [1.0]
    """
    rewards = []
    for completion in completions:
        text = _completion_text(completion)
        lines = text.strip().splitlines()
        well_formed = text.count("####") == 1 and bool(lines) and _FORMAT_LINE.fullmatch(lines[-1].strip())
        rewards.append(1.0 if well_formed else 0.0)
    return rewards


# ---------------------------------------------------------------------- sequence-level length rewards (baselines)


def length_penalty_reward(coef: float, correct_only: bool = False):
    r"""
    The sequence-level length penalty `-coef * L` as a TRL reward function (`L` = completion tokens, EOS included).

    With `correct_only`, only correct completions ([`gsm8k_accuracy_reward`] = 1) pay it, a common choice in
    efficient-reasoning work: length is traded only once the answer is right, so the penalty never pushes a wrong
    completion to give up early.

    Example:
        >>> penalty = length_penalty_reward(0.01, correct_only=True)
        >>> penalty(completions=["#### 4", "#### 5"], completion_ids=[[1] * 10, [1] * 20], answer=["4", "4"])
        [-0.1, -0.0]
    """

    def length_penalty_reward(completion_ids, completions=None, answer=None, **kwargs) -> list[float]:
        rewards = [-coef * len(ids) for ids in completion_ids]
        if correct_only:
            correct = gsm8k_accuracy_reward(completions, answer)
            rewards = [reward * c for reward, c in zip(rewards, correct)]
        return rewards

    # TRL logs a reward function under its name (`rewards/<name>/mean`).
    length_penalty_reward.__name__ = "correct_length_penalty_reward" if correct_only else "length_penalty_reward"
    return length_penalty_reward


def kimi_length_reward(coef: float = 1.0):
    r"""
    Kimi k1.5's group-relative length reward (Kimi Team 2025, section 2.3.3) as a TRL reward function.

    Among the completions of one prompt, with lengths `L_min .. L_max`:

        lambda = 0.5 - (L - L_min) / (L_max - L_min)            (0 when all have the same length)
        reward = coef * lambda               for a correct completion
        reward = coef * min(0, lambda)       for a wrong one (short wrong answers are not rewarded)

    Completions are grouped by their prompt among those the function receives in one call (GRPO's generation batch
    on this process; TRL keeps a prompt's group together on one process when `num_generations` divides the
    per-process generation batch).

    Example:
        >>> kimi = kimi_length_reward()
        >>> kimi(prompts=["p", "p", "p"], completions=["#### 4", "#### 4", "#### 5"],
        ...      completion_ids=[[1] * 10, [1] * 20, [1] * 30], answer=["4", "4", "4"])
        [0.5, 0.0, -0.5]
    """

    def kimi_length_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float]:
        correct = gsm8k_accuracy_reward(completions, answer)
        lengths = [len(ids) for ids in completion_ids]
        groups = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(str(prompt), []).append(i)
        rewards = [0.0] * len(lengths)
        for rows in groups.values():
            low, high = min(lengths[i] for i in rows), max(lengths[i] for i in rows)
            for i in rows:
                lam = 0.5 - (lengths[i] - low) / (high - low) if high > low else 0.0
                rewards[i] = coef * (lam if correct[i] else min(0.0, lam))
        return rewards

    return kimi_length_reward
