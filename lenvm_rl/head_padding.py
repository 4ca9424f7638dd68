"""Give a Llama- or Qwen2-style model a larger attention head size without changing what it computes.

vLLM's CPU attention has kernels for head sizes 32, 64, 80, 96, 112, 128, ... only; a model with heads of 24 (the demo
world's policy) cannot run on it. [`pad_head_dim`] returns an equivalent model with heads of the size asked for: every
head's query, key and value get zero dimensions, placed so that rotary position embedding rotates the original
dimensions exactly as before:

- Rotary embedding pairs dimension `j` with `j + d/2` and turns the pair by `position * theta^(-2j/d)`. With `d`
  original dimensions padded to `D`, the original halves go to `[0, d/2)` and `[D/2, D/2 + d/2)`, and the base becomes
  `theta' = theta^(D/d)`, so that `theta'^(-2j/D) = theta^(-2j/d)` for every original pair `j < d/2`. The padded pairs
  are zero in queries and keys, so whatever angle they turn by, they add nothing to `q . k`.
- Attention scales `q . k` by `1/sqrt(head_dim)`: the query weights are multiplied by `sqrt(D/d)`.
- The values' padded dimensions are zero and the output projection reads them with zero weights.

So the logits are those of the original model (up to float rounding). In training, the gradient of every padded
weight is zero (a padded query dimension only meets a zero key dimension and vice versa; a padded value dimension is
read by a zero output column, and that column only sees the zero value), so the padding stays zero under any optimiser
and the model stays a padded copy of one of the original shape. Every weight but the queries' also gets the original's
gradient; the query weights are stored multiplied by `c = sqrt(D/d)`, a reparametrisation: an SGD step moves the
original query weights by `1/c^2` of the original's step, an Adam step by `1/c` (24 -> 32: x0.75 and x0.87). To train
exactly as the original, give the query projections `c^2` (SGD) or `c` (Adam) times the learning rate; to compare two
runs, pad both.

From the command line (a checkpoint directory in, a new directory out, the tokenizer copied along):

    python -m lenvm_rl.head_padding outputs/demo/world/policy outputs/demo/policy_head_dim_32 --head_dim 32
"""

import argparse
import copy
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

__all__ = ["pad_head_dim", "save_padded_checkpoint"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def pad_head_dim(model: PreTrainedModel, head_dim: int) -> PreTrainedModel:
    """An equivalent copy of `model` whose attention heads have `head_dim` dimensions (see the module docstring).

    Args:
        model ([`~transformers.PreTrainedModel`]): A Llama- or Qwen2-style causal LM (`self_attn.{q,k,v,o}_proj`,
            rotary embedding of type `"default"` on the whole head).
        head_dim (`int`): The new head size, even and at least the current one.

    Returns:
        [`~transformers.PreTrainedModel`]: A new model of the same class and dtype (the input is not changed).
    """
    config = model.config
    old = _head_dim(config)
    if head_dim == old:
        return copy.deepcopy(model)
    if head_dim < old or head_dim % 2 or old % 2:
        raise ValueError(f"Can only pad an even head size to a larger even one, got {old} -> {head_dim}.")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Only plain rotary embedding over the whole head can be padded exactly, got {rope}.")
    if "rope_theta" not in rope:
        raise ValueError("The model config has no rope_parameters['rope_theta'].")
    state = model.state_dict()
    if not any(name.endswith("self_attn.q_proj.weight") for name in state):
        raise ValueError(f"{type(model).__name__} has no self_attn.q_proj: only Llama-style attention is supported.")

    half_old, half_new = old // 2, head_dim // 2
    placement = torch.cat([torch.arange(half_old), half_new + torch.arange(half_old)])  # new index of each old dim
    query_scale = math.sqrt(head_dim / old)
    heads = {"q_proj": config.num_attention_heads}
    heads["k_proj"] = heads["v_proj"] = getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    padded = {}
    for name, tensor in state.items():
        parts = name.split(".")
        projection = parts[-2] if len(parts) >= 2 and parts[-3:-2] == ["self_attn"] else None
        if projection not in _PROJECTIONS:
            padded[name] = tensor
            continue
        scale = query_scale if projection == "q_proj" else 1.0
        if projection == "o_proj":  # (hidden, heads * old) -> (hidden, heads * head_dim), columns per head
            if parts[-1] == "bias":
                padded[name] = tensor
                continue
            rows = tensor.shape[0]
            grouped = tensor.reshape(rows, config.num_attention_heads, old)
            new = tensor.new_zeros(rows, config.num_attention_heads, head_dim)
            new[:, :, placement] = grouped
            padded[name] = new.reshape(rows, -1)
        else:  # weight (heads * old, hidden) or bias (heads * old,): rows per head
            grouped = tensor.reshape(heads[projection], old, *tensor.shape[1:])
            new = tensor.new_zeros(heads[projection], head_dim, *tensor.shape[1:])
            new[:, placement] = grouped * scale
            padded[name] = new.reshape(heads[projection] * head_dim, *tensor.shape[1:])

    new_config = copy.deepcopy(config)
    new_config.head_dim = head_dim
    new_config.rope_parameters = {**rope, "rope_theta": float(rope["rope_theta"]) ** (head_dim / old)}
    new_model = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    missing, unexpected = new_model.load_state_dict(padded, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"Padding left weights unmatched: missing {missing}, unexpected {unexpected}.")
    if tied:
        new_model.tie_weights()
    new_model.generation_config = copy.deepcopy(model.generation_config)
    return new_model.train(model.training)


def save_padded_checkpoint(model_dir: str | os.PathLike, output_dir: str | os.PathLike, head_dim: int) -> Path:
    """Load the checkpoint in `model_dir`, pad its heads to `head_dim` and save it with its tokenizer in the new
    directory `output_dir` (written beside it, then renamed into place: never half-written, never over a file)."""
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists; pick a new --output_dir (nothing is written over).")
    if Path(model_dir).resolve() == output_dir.resolve():
        raise ValueError("output_dir must differ from model_dir.")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    padded = pad_head_dim(model, head_dim)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    try:
        padded.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="Checkpoint directory (model and tokenizer).")
    parser.add_argument("output_dir", help="New directory for the padded checkpoint.")
    parser.add_argument("--head_dim", type=int, default=32, help="New head size (vLLM's CPU build: a multiple of 32).")
    args = parser.parse_args(argv)
    path = save_padded_checkpoint(args.model_dir, args.output_dir, args.head_dim)
    print(path)
    return path


if __name__ == "__main__":
    main()
