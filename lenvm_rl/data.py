"""GSM8K loading and prompts in TRL's conversational format.

`load_gsm8k` reads the hub dataset (`openai/gsm8k`) or a local copy with the same `question` and `answer` columns;
`prepare_prompt_dataset` adds the `prompt` column of chat messages that TRL's GRPO/PPO trainers render with the
tokenizer's chat template. The other columns are kept, so `answer` reaches reward functions such as
[`~lenvm_rl.rewards.gsm8k_accuracy_reward`].
"""

import logging
from collections import Counter
from pathlib import Path

from datasets import Dataset, load_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "check_prompt_format",
    "load_gsm8k",
    "make_conversational_prompt",
    "prepare_prompt_dataset",
    "prompt_format_of",
]

DEFAULT_INSTRUCTION = 'Solve the problem step by step. Write the final answer on its own last line as "#### <number>".'
GSM8K_COLUMNS = ("question", "answer")
# Local formats, in the order a directory is searched; the value is the `datasets` builder that reads it.
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _local_data_files(path: Path, split: str, config_name: str) -> list[Path]:
    """The files of `split` in a local copy: the file itself, or `{split}.jsonl|json|parquet` (also sharded as
    `{split}-*.parquet`, the hub layout) in `path/config_name/` or `path/`."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"No such file or directory: {path}")
    for folder in (path / config_name, path):
        for suffix in _LOCAL_BUILDERS:
            files = sorted(folder.glob(f"{split}{suffix}")) + sorted(folder.glob(f"{split}-*{suffix}"))
            if files:
                return files
    raise FileNotFoundError(
        f"No '{split}' split in {path}: expected {split}.jsonl, {split}.json, {split}.parquet or "
        f"{split}-*.parquet in {path / config_name} or {path}."
    )


def load_gsm8k(name_or_path: str = "openai/gsm8k", split: str = "train", config_name: str = "main") -> Dataset:
    """
    Load one split of GSM8K from the Hugging Face Hub or from a local copy.

    Args:
        name_or_path (`str`, *optional*, defaults to `"openai/gsm8k"`):
            A hub dataset id, read with `datasets.load_dataset(name_or_path, config_name, split=split)`; or a local
            `.jsonl`/`.json`/`.parquet` file (which is the split: `split` and `config_name` are then ignored); or a
            local directory holding `{split}.jsonl` (or `.json`, `.parquet`, or `{split}-*.parquet` shards), directly
            or under `{config_name}/` as in a download of the hub repository.
        split (`str`, *optional*, defaults to `"train"`):
            Split to load (`"train"` or `"test"` for GSM8K).
        config_name (`str`, *optional*, defaults to `"main"`):
            Hub configuration (`"main"` or `"socratic"`).

    Returns:
        [`~datasets.Dataset`]: the rows, with at least the `question` and `answer` columns.

    Raises:
        `FileNotFoundError`: if `name_or_path` looks like a local path (or names a local directory) but holds no
            file for `split`.
        `ValueError`: if the data lacks the `question` or `answer` column, holds no rows, or has an `id` column with
            the same id on several rows (records of sampled completions are keyed by it).

    Example:
        >>> from lenvm_rl.data import load_gsm8k
        >>> dataset = load_gsm8k("../shared/data/gsm8k/test.jsonl")  # doctest: +SKIP
        >>> dataset.column_names  # doctest: +SKIP
        ['question', 'answer']
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or path.suffix in _LOCAL_BUILDERS or name_or_path.startswith((".", "/", "~")):
        files = _local_data_files(path, split, config_name)
        builder = _LOCAL_BUILDERS.get(files[0].suffix)
        if builder is None:
            raise ValueError(f"Cannot read {files[0]}: use a .jsonl, .json or .parquet file.")
        empty = [file for file in files if _is_blank(file)]
        if empty:  # the json builder would raise a bare StopIteration
            raise ValueError(f"{empty[0]} holds no rows: fill it with GSM8K-format rows (question, answer).")
        dataset = load_dataset(builder, data_files=[str(file) for file in files], split="train")
    else:
        dataset = load_dataset(name_or_path, config_name, split=split)

    missing = [column for column in GSM8K_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"GSM8K data from {name_or_path!r} lacks the column(s) {missing} (found {dataset.column_names}); "
            "rename them to 'question' and 'answer'."
        )
    if len(dataset) == 0:
        raise ValueError(f"GSM8K data from {name_or_path!r} (split {split!r}) holds no rows.")
    if "id" in dataset.column_names:
        counts = Counter(dataset["id"])
        duplicates = [key for key, count in counts.items() if count > 1]
        if duplicates:
            raise ValueError(
                f"GSM8K data from {name_or_path!r} (split {split!r}) has {len(duplicates)} ids on several rows, e.g. "
                f"{duplicates[:5]}: every row needs its own id (sampled completions are keyed by it). Make them unique."
            )
    return dataset


def _is_blank(file: Path) -> bool:
    """A text file with nothing but whitespace in it (read up to its first non-blank bytes)."""
    with open(file, "rb") as handle:
        while block := handle.read(2**16):
            if block.strip():
                return False
    return file.suffix != ".parquet"


def make_conversational_prompt(
    question: str, system_prompt: str | None = None, instruction: str | None = None
) -> list[dict[str, str]]:
    """
    Build a conversational prompt: an optional system message, then the question as the user message.

    Args:
        question (`str`):
            The problem statement.
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            Content of a leading system message; no system message when `None`.
        instruction (`str` or `None`, *optional*, defaults to `None`):
            Text appended to the user message after a blank line, such as [`DEFAULT_INSTRUCTION`]; nothing when
            `None`.

    Returns:
        `list[dict[str, str]]`: the messages, in TRL's conversational prompt format.

    Example:
        >>> from lenvm_rl.data import make_conversational_prompt
        >>> make_conversational_prompt("What is 2 + 3?", system_prompt="Be brief.", instruction="End with #### N.")
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2 + 3?\\n\\nEnd with #### N.'}]
    """
    user_content = f"{question}\n\n{instruction}" if instruction else question
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": user_content}]


def prepare_prompt_dataset(
    dataset: Dataset, system_prompt: str | None = None, instruction: str | None = DEFAULT_INSTRUCTION
) -> Dataset:
    """
    Add the `prompt` column of chat messages built by [`make_conversational_prompt`] from the `question` column.

    All other columns are kept: TRL's GRPO trainer passes them to reward functions as keyword arguments, which is
    how `answer` reaches [`~lenvm_rl.rewards.gsm8k_accuracy_reward`]. An existing `prompt` column is replaced.

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Rows with a `question` column, for example from [`load_gsm8k`].
        system_prompt (`str` or `None`, *optional*, defaults to `None`):
            Content of a leading system message; no system message when `None`.
        instruction (`str` or `None`, *optional*, defaults to [`DEFAULT_INSTRUCTION`]):
            Text appended to each question, asking for step-by-step reasoning and a final `#### <number>` line;
            `None` leaves the question as it is.

    Returns:
        [`~datasets.Dataset`]: the dataset with a `prompt` column.

    Raises:
        `ValueError`: if the dataset has no `question` column.

    Example:
        >>> from datasets import Dataset
        >>> from lenvm_rl.data import prepare_prompt_dataset
        >>> dataset = prepare_prompt_dataset(Dataset.from_list([{"question": "What is 2 + 3?", "answer": "#### 5"}]))
        >>> dataset.column_names
        ['question', 'answer', 'prompt']
        >>> dataset[0]["prompt"][0]["content"].startswith("What is 2 + 3?")
        True
    """
    # An `IterableDataset` may not know its columns before iterating (`column_names` is then `None`).
    if dataset.column_names is not None and "question" not in dataset.column_names:
        raise ValueError(f"The dataset needs a 'question' column to build prompts from; found {dataset.column_names}.")
    return dataset.map(
        lambda example: {"prompt": make_conversational_prompt(example["question"], system_prompt, instruction)}
    )


def prompt_format_of(prompt: list[dict[str, str]] | str, question: str | None) -> dict[str, str | None] | None:
    """How a conversational prompt was built from its question: `{"system_prompt": ..., "instruction": ...}` (the
    inverse of [`make_conversational_prompt`]); `None` when it cannot be told (a text prompt, no question, or a user
    message that does not start with the question).

    Example:
        >>> prompt_format_of(make_conversational_prompt("What is 2 + 3?", "Be brief.", "End with #### N."), "What is 2 + 3?")
        {'system_prompt': 'Be brief.', 'instruction': 'End with #### N.'}
    """
    if not isinstance(prompt, list) or not prompt or question is None:
        return None
    system = prompt[0]["content"] if prompt[0].get("role") == "system" else None
    user = prompt[-1].get("content") or ""
    if not user.startswith(question):
        return None
    return {"system_prompt": system, "instruction": user[len(question) :].strip() or None}


def check_prompt_format(
    lenvm_prompt_format: dict | None,
    system_prompt: str | None,
    instruction: str | None,
    prompts: str = "RL prompts",
) -> None:
    """Warn when RL (or evaluation: `prompts` names them) prompts are not built the way the LenVM's training prompts
    were: LenVM values are conditioned on the prompt, so another system prompt or instruction shifts every predicted
    length."""
    if not lenvm_prompt_format:
        return
    ours = {"system_prompt": system_prompt or None, "instruction": (instruction or "").strip() or None}
    differing = {
        key: (lenvm_prompt_format.get(key), ours[key]) for key in ours if lenvm_prompt_format.get(key) != ours[key]
    }
    if differing:
        flags = ", ".join(f"--{key} (LenVM: {theirs!r}, here: {mine!r})" for key, (theirs, mine) in differing.items())
        logger.warning(
            "The %s are not built like the LenVM's training prompts: %s. Its length predictions are "
            "conditioned on the prompt; pass the same values (or retrain the LenVM on these prompts).",
            prompts,
            flags,
        )
