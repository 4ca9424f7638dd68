"""The demo world's tokenizer: word-level, trained with `tokenizers`, every integer 0..199 one token.

[`build_demo_tokenizer`] trains it on a corpus and wraps it for `transformers` with the chat template
`<|role|>content<|end|>`. A world's tokenizer is trained on its training data plus [`demo_vocabulary_texts`], a
fixed corpus that covers every word the problem generator can write, so it never meets an unknown word in demo
text whatever the world's seed and size.
"""

import itertools
import random
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .problems import DEMO_STYLES, generate_demo_problems, write_demo_solution

__all__ = [
    "DEMO_CHAT_TEMPLATE",
    "DEMO_EOS_TOKEN",
    "DEMO_MAX_INTEGER",
    "DEMO_PAD_TOKEN",
    "DEMO_SPECIAL_TOKENS",
    "DEMO_UNK_TOKEN",
    "build_demo_tokenizer",
    "demo_vocabulary_texts",
]

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


def demo_vocabulary_texts() -> Iterator[str]:
    """A fixed corpus in which every word the generator can write occurs, whatever the world's seed and size."""
    problems = generate_demo_problems(2000, seed=-1, id_prefix="vocabulary")
    rng = random.Random("demo-vocabulary")
    for problem in problems:
        yield problem.question
        for style in DEMO_STYLES:
            yield write_demo_solution(problem, rng, style)[0]
