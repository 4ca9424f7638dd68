"""The demo world's problems: seeded GSM8K-style word problems, their reference solutions and the prompt format.

- [`generate_demo_problems`]: word problems with 2-4 arithmetic steps and small numbers, as [`DemoProblem`]s;
- [`write_demo_solution`]: a reference solution in one of three styles (concise, explained, verbose with a random
  number of re-checks), so completion lengths are long-tailed and depend partly on the problem;
- [`demo_rows`]: GSM8K-format rows (`question`, `answer` ending in `#### N`) plus metadata columns;
- [`demo_prompt`]: the chat messages the demo policy was trained on.

Pure Python (no torch): everything here is a function of its arguments and seeds.
"""

import random
from dataclasses import dataclass

__all__ = [
    "DEMO_INSTRUCTION",
    "DEMO_MAX_VALUE",
    "DEMO_NUM_STEPS",
    "DEMO_STYLES",
    "DEMO_SYSTEM_PROMPT",
    "DEMO_THEMES",
    "DemoProblem",
    "demo_prompt",
    "demo_rows",
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
