import json
from decimal import Decimal
from pathlib import Path

import pytest

from lenvm_rl.rewards import (
    extract_gsm8k_answer,
    gsm8k_accuracy_reward,
    gsm8k_format_reward,
    kimi_length_reward,
    length_penalty_reward,
)

GSM8K_DIR = Path(__file__).parents[1] / ".." / "shared" / "data" / "gsm8k"
GSM8K_FILES = ("train.jsonl", "test.jsonl")
GSM8K_ROWS = 7473 + 1319  # train + test in the public release


def read_gsm8k_rows():
    if not GSM8K_DIR.is_dir():
        pytest.skip(f"GSM8K reference data not found at {GSM8K_DIR.resolve()} (expects {', '.join(GSM8K_FILES)})")
    rows = []
    for name in GSM8K_FILES:
        path = GSM8K_DIR / name
        if path.exists():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        pytest.skip(f"no GSM8K jsonl files in {GSM8K_DIR.resolve()}")
    return rows


@pytest.mark.parametrize(
    "text, expected",
    [
        # marker formats
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        (r"So she pays \boxed{18} dollars.", "18"),
        ("The answer is 18.", "18"),
        ("the ANSWER IS 18", "18"),
        ("Answer: 18", "18"),
        ("Final answer = 18", "18"),
        ("The answer is: **18** apples", "18"),
        ("The answer is\n\n18", "18"),
        ("####\n18", "18"),
        ("She has 3 apples and buys 15 more, 18 in all.", "18"),  # last number
        # thousands commas, `$`, `%`, units, trailing words and dots
        ("#### 1,000", "1000"),
        ("#### 109,200,000", "109200000"),
        (r"\boxed{1{,}000}", "1000"),
        ("The answer is $1,000.", "1000"),
        (r"\boxed{\$1000}", "1000"),
        ("The answer is 50%.", "50"),
        (r"\boxed{50\%}", "50"),
        ("#### 18 dollars", "18"),
        ("The answer is 18 apples per day.", "18"),
        ("18.", "18"),
        # trailing decimal zeros, decimals, signs, leading zeros
        ("18.0", "18"),
        ("#### 18.00", "18"),
        ("0.50", "0.5"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("$1,234.50", "1234.5"),
        ("#### -5", "-5"),
        ("The answer is -5 degrees.", "-5"),
        ("The answer is $-5.", "-5"),
        ("The answer is -$5.", "-5"),
        ("The answer is \u22125.", "-5"),  # Unicode minus
        ("#### +7", "7"),
        ("#### -0", "0"),
        ("#### -0.0", "0"),
        ("#### 007", "7"),
        # a minus glued to a word, digit or bracket is a hyphen or an operator, not a sign
        ("They are 3-5 years old.", "5"),
        ("10 - 5", "5"),
        ("x = -3", "-3"),
        ("(-5)", "-5"),
        # fractions, exponents, space-grouped thousands and decimal commas are read whole, never cut short
        ("#### 1/2", "0.5"),
        ("The answer is 3/4 cups.", "0.75"),
        ("#### 24/2", "12"),
        ("#### 2/6", "1/3"),
        ("#### -1/3", "-1/3"),
        ("#### 5e3", "5000"),
        ("#### 2.5e-3", "0.0025"),
        ("#### 1 000", "1000"),
        ("#### 1 000 000", "1000000"),
        ("#### 12,5", "12.5"),
        ("#### 12,50", "12.5"),
        ("#### 12,500", "12500"),
        # Unicode digits read as their ASCII digits
        ("#### \uff11\uff18", "18"),  # full-width
        ("#### \u0661\u0668", "18"),  # Arabic-Indic
        ("The answer is \u06f1\u06f8.", "18"),  # Extended Arabic-Indic (Persian)
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 cookies, the answer is 5\n#### 6", "6"),  # `####` beats "the answer is"
        (r"\boxed{7}, so the answer is 8", "7"),  # `\boxed{}` beats "the answer is"
        (r"#### 6 (not \boxed{7})", "6"),  # `####` beats `\boxed{}`
        ("The answer is 5. 12 is wrong.", "5"),  # "the answer is" beats the last number
        ("#### 5\nthinking again...\n#### 6", "6"),  # last occurrence wins
        ("The answer is 5. I hope this answer is correct.", "5"),  # the last marker holding a number wins
        ("####\nso 4 + 4 = 8", "4"),  # first number after the marker
        ("we have to answer 3 questions, 4 in total", "4"),  # bare "answer" is not a marker
    ],
)
def test_extract_gsm8k_answer_priority(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize("text", ["", "I don't know.", "#### ", r"\boxed{x}", "The answer is seven.", "#### 1/0"])
def test_extract_gsm8k_answer_none(text):
    assert extract_gsm8k_answer(text) is None


def test_accuracy_reward_plain_completions():
    answer = ["Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"] * 5 + ["1,000"]
    completions = ["#### 72", "The answer is 72.0 clips.", r"\boxed{72}", "#### 73", "no idea", "#### $1000.00"]
    assert gsm8k_accuracy_reward(completions, answer) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_accuracy_reward_conversational_completions():
    answer = ["#### 18", "#### 18", "#### 18", "#### 18"]
    completions = [
        [{"role": "assistant", "content": "9 * 2 = 18\n#### 18"}],
        [{"content": "#### 18"}],  # TRL's examples leave out the role
        [  # tool-calling turn: only the last assistant message counts
            {"role": "assistant", "content": "#### 18"},
            {"role": "tool", "content": "17"},
            {"role": "assistant", "content": "The tool says 17.\n#### 17"},
        ],
        [{"role": "user", "content": "#### 18"}],  # no assistant message
    ]
    assert gsm8k_accuracy_reward(completions, answer) == [1.0, 1.0, 0.0, 0.0]


def test_accuracy_reward_trl_signature():
    rewards = gsm8k_accuracy_reward(
        prompts=["q1", "q2"],
        completions=["#### 3", "#### 4"],
        completion_ids=[[1], [2]],
        answer=["#### 3", 3],  # a bare number may also be stored as an int
        question=["q1", "q2"],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0]
    # TRL logs each reward as `rewards/<__name__>/mean`.
    assert gsm8k_accuracy_reward.__name__ == "gsm8k_accuracy_reward"
    assert gsm8k_format_reward.__name__ == "gsm8k_format_reward"


def test_accuracy_reward_reads_unicode_digits_like_the_format_reward():
    completions = ["3 * 6 = \uff11\uff18\n#### \uff11\uff18", "#### \u0661\u0668"]
    assert gsm8k_format_reward(completions) == [1.0, 1.0]
    assert gsm8k_accuracy_reward(completions, ["#### 18", "#### 18"]) == [1.0, 1.0]
    assert (
        gsm8k_accuracy_reward(["#### 1/2", "#### 5e3", "#### 1 000", "#### 12,5"], ["0.5", "5000", "1000", "12.5"])
        == [1.0] * 4
    )


def test_accuracy_reward_rejects_answer_without_number():
    with pytest.raises(ValueError, match=r"answer\[1\] holds no number"):
        gsm8k_accuracy_reward(["#### 1", "#### 2"], ["#### 1", "seven"])


def test_accuracy_reward_length_mismatch():
    with pytest.raises(ValueError):
        gsm8k_accuracy_reward(["#### 1", "#### 2"], ["#### 1"])


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("6 * 3 = 18\n#### 18", 1.0),
        ("#### 18", 1.0),
        ("Total:\n####18  \n\n", 1.0),
        ("#### -5", 1.0),
        ("#### 1,000", 1.0),
        ("#### 0.5", 1.0),
        ("#### 18 apples", 0.0),  # trailing words
        ("#### $18", 0.0),  # currency sign
        ("#### 18.", 0.0),  # trailing dot
        ("#### 18\nHope this helps!", 0.0),  # not the last line
        ("#### 1\n#### 2", 0.0),  # more than one `####`
        ("##### 18", 0.0),
        ("The answer is 18.", 0.0),
        (r"\boxed{18}", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert gsm8k_format_reward([completion]) == [expected]
    assert gsm8k_format_reward([[{"role": "assistant", "content": completion}]]) == [expected]


def test_every_gsm8k_reference_solution_scores_itself():
    """Each reference solution earns 1.0 against its own answer and 0.0 against that answer plus one."""
    rows = read_gsm8k_rows()
    solutions = [row["answer"] for row in rows]
    golds = [extract_gsm8k_answer(solution) for solution in solutions]
    assert None not in golds
    perturbed = [str(Decimal(gold) + 1) for gold in golds]

    own = gsm8k_accuracy_reward(solutions, solutions)
    bare = gsm8k_accuracy_reward(solutions, golds)
    wrong = gsm8k_accuracy_reward(solutions, perturbed)
    conversational = gsm8k_accuracy_reward([[{"role": "assistant", "content": s}] for s in solutions], solutions)
    formatted = gsm8k_format_reward(solutions)

    print(f"GSM8K reference solutions checked: {len(rows)}")
    assert sum(own) == sum(bare) == sum(conversational) == sum(formatted) == len(rows)
    assert sum(wrong) == 0.0
    if all((GSM8K_DIR / name).exists() for name in GSM8K_FILES):
        assert len(rows) == GSM8K_ROWS


def test_length_penalty_reward_by_hand_and_correct_only():
    completions, ids, answer = ["#### 4", "#### 5"], [[1] * 10, [1] * 20], ["4", "4"]
    assert length_penalty_reward(0.5)(completions=completions, completion_ids=ids, answer=answer) == [-5.0, -10.0]
    correct_only = length_penalty_reward(0.5, correct_only=True)
    assert correct_only(completions=completions, completion_ids=ids, answer=answer) == [-5.0, -0.0]
    assert correct_only.__name__ == "correct_length_penalty_reward"


def test_kimi_length_reward_by_hand_per_group():
    prompts = ["a", "a", "a", "b", "b"]
    completions = ["#### 4", "#### 4", "#### 5", "#### 5", "#### 4"]
    ids = [[1] * 10, [1] * 20, [1] * 30, [1] * 8, [1] * 8]
    answer = ["4"] * 5
    rewards = kimi_length_reward(2.0)(prompts=prompts, completions=completions, completion_ids=ids, answer=answer)
    lam = [0.5 - 0 / 20, 0.5 - 10 / 20, 0.5 - 20 / 20]  # group a: lengths 10, 20, 30
    expected = [2.0 * lam[0], 2.0 * lam[1], 2.0 * min(0.0, lam[2]), 0.0, 0.0]  # group b: equal lengths
    assert rewards == pytest.approx(expected)


def test_kimi_length_reward_never_rewards_a_short_wrong_answer():
    rewards = kimi_length_reward()(
        prompts=["a", "a"], completions=["#### 5", "#### 4"], completion_ids=[[1] * 5, [1] * 50], answer=["4", "4"]
    )
    assert rewards[0] == 0.0 and rewards[1] == -0.5
