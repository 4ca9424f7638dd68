"""Tiny tokenizers and causal LMs built offline, shared by the whole test suite.

Nothing here touches a hub: tokenizers are trained-free word-level vocabularies and models are randomly
initialised Llama- and Qwen2-style configs small enough to run a forward in milliseconds on a CPU.
"""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny matmuls on 2 shared cores are far slower with 2 threads (spinning workers) than with one.
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "the a is of and to in what how many much has have total each more less than if then so answer "
    "apples pens books coins bags boxes he she they buys sells gives gets left now + - * / = ? . , ####"
).split()
NUMBERS = [str(i) for i in range(100)]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tiny_tokenizer(extra_words=()):
    """A word-level fast tokenizer with a chat template; pad (id 0) differs from eos (id 1)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *WORDS, *NUMBERS, *extra_words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_pad_past_vocabulary_tokenizer():
    """The tiny tokenizer with a `[PAD]` pad token added without resizing any model, as TRL's PPO recipe does: its
    pad id is the embedding size of the tiny models (one past the vocabulary)."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == len(make_tiny_tokenizer())
    return tokenizer


def make_eos_prone_causal_lm(arch="llama", eos_bias=2.0, seed=0):
    """A tiny causal LM whose untied head has a bias towards EOS (id 1): about one sampled token in ten is EOS at
    temperature 0.7, so a batch of short responses mixes stopped rows (padding after the stop token) with rows cut at
    the limit."""
    model = make_tiny_causal_lm(arch, seed=seed, tie=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[1] = eos_bias
    model.lm_head = head
    return model


def make_tiny_causal_lm(arch="llama", vocab_size=None, seed=0, hidden_size=32, num_layers=2, tie=True):
    """A randomly initialised causal LM (Llama- or Qwen2-style) with a few thousand parameters."""
    vocab_size = vocab_size or len(make_tiny_tokenizer())
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(f"unknown arch {arch!r}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_tokenizer, tiny_arch):
    """A saved tiny causal LM plus tokenizer, the layout a hub checkpoint has."""
    path = tmp_path_factory.mktemp(f"tiny-{tiny_arch}")
    make_tiny_causal_lm(tiny_arch).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


class LoadingThePolicy(Exception):
    """Raised in place of loading the policy: main() has run its checks on the arguments by then."""


def prompt_check_setup(tmp_path, monkeypatch, recipe):
    """A tokenizer, a one-problem GSM8K file and a LenVM directory whose metadata says its prompts carried an
    instruction; loading the policy stops main()."""
    make_tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"question": "what is 2 + 3 ?", "answer": "#### 5"}))
    (tmp_path / "lenvm").mkdir()
    lenvm_config = {"format_version": 1, "gamma": 0.9, "prompt_format": {"system_prompt": None, "instruction": "End."}}
    (tmp_path / "lenvm" / "lenvm_config.json").write_text(json.dumps(lenvm_config))

    def stop(*args, **kwargs):
        raise LoadingThePolicy

    monkeypatch.setattr(recipe.AutoModelForCausalLM, "from_pretrained", stop)
    return [
        f"--model_name_or_path={tmp_path / 'tokenizer'}",
        f"--dataset_name={tmp_path / 'data'}",
        f"--lenvm_model_name_or_path={tmp_path / 'lenvm'}",
        "--num_eval_problems=0",
        f"--output_dir={tmp_path / 'run'}",
        "--report_to=none",
    ]


def write_guided_eval_world(root, lenvm, num_problems=6) -> dict:
    """A tiny policy (generation stops at EOS, pads with 0) with its tokenizer, `lenvm` and `num_problems` held-out
    problems saved under `root`; returns the keyword arguments the guided-evaluation recipes share."""
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm(seed=0)
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = tokenizer.eos_token_id, 0
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    lenvm.save_pretrained(root / "lenvm", tokenizer=tokenizer)
    (root / "data").mkdir()
    problems = [
        {"question": f"he has {i} pens and gets {i + 1} more", "answer": f"#### {2 * i + 1}"}
        for i in range(num_problems)
    ]
    (root / "data" / "test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    return dict(policy_path=str(root / "policy"), lenvm_path=str(root / "lenvm"), dataset_name=str(root / "data"),
                num_problems=num_problems, max_new_tokens=20, batch_size=4, num_threads=1)  # fmt: skip


def make_rollout_records(
    num_prompts=4, per_prompt=3, *, seed=0, vocab=150, max_new_tokens=12, cut_every=0, prefix=None,
    max_prompt_tokens=8, odd_prompt_extra=0, generator_model="tiny",
):  # fmt: skip
    """Rollout records in the format of `recipes/sample_rollouts.py` with random token ids (EOS = 1 ends each finished
    completion); every `cut_every`-th completion hit the cap instead, and completions of odd prompts are at least
    `odd_prompt_extra` tokens longer (the prompt then carries some of the length)."""
    g = torch.Generator().manual_seed(seed)
    prefix = f"q{seed}" if prefix is None else prefix
    records = []
    for p in range(num_prompts):
        num_prompt_tokens = int(torch.randint(3, max_prompt_tokens + 1, (1,), generator=g))
        prompt_ids = torch.randint(10, vocab, (num_prompt_tokens,), generator=g).tolist()
        for k in range(per_prompt):
            cut = bool(cut_every) and (p * per_prompt + k) % cut_every == 0
            shortest = 1 + odd_prompt_extra * (p % 2)
            length = max_new_tokens if cut else int(torch.randint(shortest, max_new_tokens, (1,), generator=g))
            completion_ids = torch.randint(10, vocab, (length,), generator=g).tolist()
            if not cut:
                completion_ids[-1] = 1
            records.append(
                {
                    "prompt_id": f"{prefix}-{p}",
                    "prompt": [{"role": "user", "content": "how many apples ?"}],
                    "prompt_ids": prompt_ids,
                    "completion": "",
                    "completion_ids": completion_ids,
                    "length": length,
                    "finish_reason": "length" if cut else "stop",
                    "sample_index": k,
                    "generator_model": generator_model,
                    "temperature": 1.0,
                    "top_p": 1.0,
                    "top_k": 0,
                    "max_new_tokens": max_new_tokens,
                    "seed": seed,
                    "answer": "3",
                }
            )
    return records
