"""The offline copies of TRL's test models and dataset have what the ported tests rely on."""

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .conftest import CAUSAL_LM, SEQUENCE_CLASSIFIER, ZEN


def test_hub_ids_resolve_to_the_tiny_models():
    tokenizer = AutoTokenizer.from_pretrained(CAUSAL_LM)
    policy = AutoModelForCausalLM.from_pretrained(CAUSAL_LM)
    reward_model = AutoModelForSequenceClassification.from_pretrained(SEQUENCE_CLASSIFIER, num_labels=1)
    assert policy.dtype == reward_model.dtype == torch.bfloat16  # saved in bfloat16, as TRL's generator does
    assert policy.get_input_embeddings().num_embeddings == len(tokenizer.vocab)
    assert reward_model.get_input_embeddings().num_embeddings % 128 == 0  # padded like Qwen2.5's config
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # what TRL's PPO test does
    assert tokenizer.pad_token_id == policy.get_input_embeddings().num_embeddings  # one past the vocabulary
    text = "Beautiful is better than ugly."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_zen_has_trl_s_configurations_and_splits():
    for name, column in [
        ("standard_prompt_only", "prompt"),
        ("conversational_prompt_only", "prompt"),
        ("conversational_language_modeling", "messages"),
    ]:
        dataset = load_dataset(ZEN, name)
        assert (dataset["train"].num_rows, dataset["test"].num_rows) == (17, 2)
        assert dataset["train"].column_names == [column]
