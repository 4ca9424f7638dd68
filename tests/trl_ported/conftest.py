"""TRL's test models and dataset, built offline into a folder laid out like the Hub.

TRL's tests load `trl-internal-testing/tiny-Qwen2ForCausalLM-2.5`, `.../tiny-Qwen2ForSequenceClassification-2.5` and
the `trl-internal-testing/zen` dataset by their Hub ids. TRL builds those models with its generator scripts
(`scripts/generate_tiny_models/`); [`build_trl_hub`] builds them the same way without a network: the same model
classes and sizes, saved in bfloat16, weights initialised like TRL's (Xavier-uniform linear layers with zero biases,
normal(0, 0.02) embeddings), the tokenizer's vocabulary size as the causal LM's `vocab_size`, and a generation config
with Qwen2.5-Instruct's sampling settings. The one substitute is the tokenizer: Qwen2.5's cannot be downloaded here,
so a byte-level BPE is trained on the Zen of Python, with Qwen2.5's special tokens (`<|endoftext|>` pads,
`<|im_end|>` ends a turn) and a ChatML chat template. What TRL's tests depend on is kept: the causal LM embeds exactly
`len(tokenizer.vocab)` ids, so a `[PAD]` token added by a test gets the id one past its embedding, as with Qwen2.5.

The dataset holds the three configurations the ported tests load (`standard_prompt_only`, `conversational_prompt_only`,
`conversational_language_modeling`), 17 train and 2 test rows each like TRL's, written from PEP 20's aphorisms.

Every test in this folder runs from the built folder, so `from_pretrained("trl-internal-testing/...")` and
`load_dataset("trl-internal-testing/zen", ...)` find the local copies (a relative path that exists is read as a local
directory), and the datasets cache goes to a temporary directory.
"""

import json
import os
from pathlib import Path

# TRL's tests name Hub ids; with the Hub offline, an id that is not found in the built folder is an error, never a
# download. Set here as well as in the top-level conftest, before huggingface_hub and datasets read them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets  # noqa: E402
import huggingface_hub  # noqa: E402
import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

ORGANIZATION = "trl-internal-testing"
CAUSAL_LM = f"{ORGANIZATION}/tiny-Qwen2ForCausalLM-2.5"
SEQUENCE_CLASSIFIER = f"{ORGANIZATION}/tiny-Qwen2ForSequenceClassification-2.5"
ZEN = f"{ORGANIZATION}/zen"

# PEP 20, the text TRL's zen dataset is made of.
APHORISMS = [
    "Beautiful is better than ugly.",
    "Explicit is better than implicit.",
    "Simple is better than complex.",
    "Complex is better than complicated.",
    "Flat is better than nested.",
    "Sparse is better than dense.",
    "Readability counts.",
    "Special cases aren't special enough to break the rules.",
    "Although practicality beats purity.",
    "Errors should never pass silently.",
    "Unless explicitly silenced.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "There should be one-- and preferably only one --obvious way to do it.",
    "Although that way may not be obvious at first unless you're Dutch.",
    "Now is better than never.",
    "Although never is often better than *right* now.",
    "If the implementation is hard to explain, it's a bad idea.",
    "If the implementation is easy to explain, it may be a good idea.",
    "Namespaces are one honking great idea -- let's do more of those!",
]
NUM_TEST_ROWS = 2  # TRL splits with test_size=0.1 without shuffling: the last 2 of 19 rows

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 512 ids trained on the aphorisms, then Qwen2.5's three special tokens after them."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(APHORISMS * 4 + ["user assistant system"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens(
        {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def init_weights_tiny_model(model: nn.Module) -> None:
    """TRL's initialisation of its tiny models: no NaNs from uninitialised memory, small embeddings."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


def qwen2_instruct_generation_config(tokenizer) -> GenerationConfig:
    """The sampling settings Qwen2.5-Instruct ships in its generation_config.json, with this tokenizer's ids."""
    end_of_text, end_of_turn = tokenizer.pad_token_id, tokenizer.eos_token_id
    return GenerationConfig(
        bos_token_id=end_of_text,
        pad_token_id=end_of_text,
        eos_token_id=[end_of_turn, end_of_text],
        do_sample=True,
        repetition_penalty=1.05,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    )


def save_tiny_model(model, tokenizer, directory: Path) -> None:
    torch.manual_seed(0)
    init_weights_tiny_model(model)
    model.to(dtype=torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    qwen2_instruct_generation_config(tokenizer).save_pretrained(directory)


def write_zen(directory: Path) -> None:
    """The zen dataset's configurations as JSON-lines files, declared in the dataset card like a Hub dataset."""
    prompts, completions = [], []
    for line in APHORISMS:
        words = line.split()
        cut = max(1, len(words) // 2)
        prompts.append(" ".join(words[:cut]))
        completions.append(" " + " ".join(words[cut:]) if words[cut:] else "")
    configs = {
        "standard_prompt_only": [{"prompt": prompt} for prompt in prompts],
        "conversational_prompt_only": [{"prompt": [{"role": "user", "content": prompt}]} for prompt in prompts],
        "conversational_language_modeling": [
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion.strip()}]}
            for prompt, completion in zip(prompts, completions)
        ],
    }
    card = ["---", "configs:"]
    for name, rows in configs.items():
        card += [f"- config_name: {name}", "  data_files:"]
        for split, split_rows in (("train", rows[:-NUM_TEST_ROWS]), ("test", rows[-NUM_TEST_ROWS:])):
            path = directory / name / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
            card += [f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    (directory / "README.md").write_text("\n".join([*card, "---", ""]))


def build_trl_hub(root: Path) -> Path:
    """The tiny causal LM, the tiny reward model and the zen dataset under `root/trl-internal-testing/`."""
    tokenizer = build_tokenizer()
    causal_lm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer.vocab),
            hidden_size=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=32,
        )
    )
    save_tiny_model(causal_lm, tokenizer, root / CAUSAL_LM)
    # TRL's reward model takes Qwen2.5's own config, whose embedding is padded past the tokenizer (152064 ids for
    # 151665 tokens, a multiple of 128): here too.
    classifier = Qwen2ForSequenceClassification(
        Qwen2Config(
            vocab_size=-(-len(tokenizer.vocab) // 128) * 128,
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            intermediate_size=32,
            num_labels=1,
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    save_tiny_model(classifier, tokenizer, root / SEQUENCE_CLASSIFIER)
    write_zen(root / ZEN)
    return root


@pytest.fixture(scope="session")
def trl_hub(tmp_path_factory) -> Path:
    return build_trl_hub(tmp_path_factory.mktemp("trl-hub"))


@pytest.fixture(autouse=True)
def run_from_trl_hub(trl_hub, monkeypatch, tmp_path_factory):
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE, "the Hub must be offline"
    monkeypatch.chdir(trl_hub)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "datasets-cache")
