"""Key/value cache surgery for decoding loops whose rows join and leave the batch.

The decoding loops of lenvm-rl ([`~lenvm_rl.generation.generate_completions`],
[`~lenvm_rl.guidance.generate_with_length_guidance`]) keep one [`~transformers.DynamicCache`] per model with the
layout ``(B, H, T, D)`` per layer, rows left-aligned: row ``b``'s real tokens are the columns where its attention
mask is 1, padding sits in front and position ids count real tokens only. This module owns every operation on that
layout:

- [`forward_with_cache`]: run new tokens against a cache, appending their columns (the one call that hands a
  cache to a model);
- [`prefill`]: run a prompt batch into a fresh cache with padding-aware positions;
- [`append_rows`]: splice the rows of a second cache into the batch (the narrower side is left-padded);
- [`keep_rows`]: retire rows, and drop the leading columns no remaining row attends to;
- [`keep_chosen_candidates`]: after a forward of ``k`` candidate columns, keep each row's chosen one;
- [`check_plain_cache`]: the layout above needs plain [`~transformers.cache_utils.DynamicLayer`]s (no sliding
  window), which every operation here edits in place.

[`prefill`] makes caches of [`AppendInPlaceLayer`]s: a `DynamicLayer` grows by `torch.cat`, a copy of the whole
cache per layer and per decoding step, which at 135M parameters and a few hundred cached tokens moves about as many
bytes as the weights themselves (measured in `benchmarks/guided_decoding.py`).
"""

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .modeling import fill_padding, position_ids_from_mask
from .transformers_compat import cache_kwargs

__all__ = [
    "AppendInPlaceLayer",
    "append_rows",
    "check_plain_cache",
    "forward_with_cache",
    "keep_chosen_candidates",
    "keep_rows",
    "prefill",
]


class AppendInPlaceLayer(DynamicLayer):
    """
    A [`~transformers.cache_utils.DynamicLayer`] whose `keys` and `values` are the first `T` columns of buffers with
    spare columns, so that appending `n` tokens writes `n` columns instead of copying all `T + n` (`torch.cat`).

    Every operation that reads `keys`/`values` sees an ordinary `(B, H, T, D)` tensor. Row surgery in this module
    writes its result straight into new buffers; other code that assigns them a new tensor (`crop`, ...) needs no
    special care: `update` notices that `keys` is no longer a column prefix of its buffer and copies it into a new
    one, with `headroom` spare columns (one copy per `headroom` decoding steps instead of one per step).
    """

    headroom = 32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T, n = (self.keys.size(-2) if self.keys.dim() == 4 else 0), key_states.size(-2)  # empty: a 1-D placeholder
        in_buffer = _is_column_prefix(self.keys, self.key_buffer) and _is_column_prefix(self.values, self.value_buffer)
        if not in_buffer or T + n > self.key_buffer.size(-2):
            self.key_buffer = _with_headroom(self.keys, key_states, n + self.headroom)
            self.value_buffer = _with_headroom(self.values, value_states, n + self.headroom)
        self.key_buffer[:, :, T : T + n] = key_states
        self.value_buffer[:, :, T : T + n] = value_states
        self.keys, self.values = self.key_buffer[:, :, : T + n], self.value_buffer[:, :, : T + n]
        return self.keys, self.values


def _is_column_prefix(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether `tensor` is `buffer[:, :, :T]` for some `T` (the same memory, rows, heads and strides)."""
    return (
        buffer is not None
        and tensor.dim() == 4
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.size(3) == buffer.size(3)
    )


def _with_headroom(tensor: torch.Tensor, like: torch.Tensor, spare: int) -> torch.Tensor:
    """A `(B, H, T + spare, D)` buffer whose first `T` columns are a copy of `tensor` (`T = 0` if it is empty)."""
    T = tensor.size(-2) if tensor.dim() == 4 else 0
    buffer = like.new_empty(*like.shape[:2], T + spare, like.size(3))
    if T:
        buffer[:, :, :T] = tensor
    return buffer


def check_plain_cache(cache: DynamicCache) -> None:
    """Raise a `ValueError` unless every layer of `cache` is a plain `DynamicLayer` (no sliding window)."""
    if any(type(layer) not in (DynamicLayer, AppendInPlaceLayer) for layer in cache.layers):
        raise ValueError(
            "lenvm-rl's decoding loops need a model whose cache is a plain DynamicCache (no sliding-window layers), "
            "such as Llama or Qwen2 without sliding window."
        )


def forward_with_cache(
    model,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    **kwargs,
):
    """
    Forward `input_ids` against `cache`, which gains their key/value columns; returns the model's outputs.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~lenvm_rl.LengthValueModel`]):
            The model that filled `cache`.
        cache (`transformers.DynamicCache`):
            Its cache of the `(B, T)` prefix (empty for a prefill).
        input_ids (`torch.Tensor`):
            `(B, n)` new tokens.
        attention_mask (`torch.Tensor`):
            `(B, T + n)` over cached and new columns, or a 4D additive mask (candidate scoring).
        position_ids (`torch.Tensor`):
            `(B, n)` position of each new token, counting real tokens only.
        **kwargs:
            Passed to the forward (e.g. `logits_to_keep=1`).
    """
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **cache_kwargs(cache),  # `cache` since transformers 5.24, `past_key_values` before
        use_cache=True,
        **kwargs,
    )


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> tuple:
    """
    Run a left-padded prompt batch through `model` into a new cache, with padding-aware position ids and padding
    embedded as a valid id ([`~lenvm_rl.modeling.fill_padding`]: the pad id may lie past the vocabulary).

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~lenvm_rl.LengthValueModel`]):
            The model; its `config` builds the cache.
        input_ids (`torch.Tensor`):
            `(B, P)` prompt ids, left-padded (any id on padding).
        attention_mask (`torch.Tensor`):
            `(B, P)` 1 on real tokens.
        **kwargs:
            Passed to the forward (e.g. `logits_to_keep=1`).

    Returns:
        `tuple`: the model's outputs and the filled [`~transformers.DynamicCache`] of [`AppendInPlaceLayer`]s
        (checked by [`check_plain_cache`]).
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [AppendInPlaceLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    positions = position_ids_from_mask(attention_mask)  # (B, P)
    outputs = forward_with_cache(
        model, cache, fill_padding(input_ids, attention_mask), attention_mask, positions, **kwargs
    )
    check_plain_cache(cache)
    return outputs, cache


def append_rows(
    cache: DynamicCache, attention_mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor
) -> torch.Tensor:
    """
    Append the rows of `new_cache` to `cache`, in place, after left-padding the narrower one with masked columns.

    Args:
        cache (`transformers.DynamicCache`): The batch in flight, `T` columns.
        attention_mask (`torch.Tensor`): `(B, T)` its mask.
        new_cache (`transformers.DynamicCache`): The rows to add, `T'` columns (same model).
        new_mask (`torch.Tensor`): `(B', T')` their mask.

    Returns:
        `torch.Tensor`: `(B + B', max(T, T'))` the mask of the joined batch.
    """
    B, T, T_new = attention_mask.size(0), attention_mask.size(1), new_mask.size(1)
    width = max(T, T_new)
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        joined = []
        for old, new in ((layer.keys, new_layer.keys), (layer.values, new_layer.values)):
            buffer = _new_buffer(layer, old, B + new.size(0), width)  # (B + B', H, width + spare, D)
            buffer[:B, :, : width - T].zero_()  # padding: masked, but it still enters q.k, so it must be finite
            buffer[B:, :, : width - T_new].zero_()
            buffer[:B, :, width - T : width] = old
            buffer[B:, :, width - T_new : width] = new
            joined.append(buffer)
        _install(layer, *joined, width)
    pad = torch.nn.functional.pad
    return torch.cat([pad(attention_mask, (width - T, 0)), pad(new_mask, (width - T_new, 0))], dim=0)


def keep_rows(attention_mask: torch.Tensor, rows: torch.Tensor, *caches: DynamicCache) -> torch.Tensor:
    """
    Keep `rows` of every cache, in place, and drop the leading columns that no kept row attends to.

    Left padding is only as wide as the longest kept row needs, so the caches never outgrow the rows in flight.

    Args:
        attention_mask (`torch.Tensor`): `(B, T)` the mask of the caches.
        rows (`torch.Tensor`): `(b,)` long indices of the rows to keep (may be empty).
        *caches (`transformers.DynamicCache`): Caches sharing that mask (the policy's, the LenVM's).

    Returns:
        `torch.Tensor`: `(b, T - start)` the mask of the kept rows and columns.

    Example:
        >>> mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
        >>> keep_rows(mask, torch.tensor([1, 2])).tolist()  # column 0 is padding of both kept rows
        [[0, 1, 1], [1, 1, 1]]
    """
    attention_mask = attention_mask[rows]
    start = int((attention_mask.sum(dim=0) > 0).long().argmax()) if len(rows) else attention_mask.size(1)
    for cache in caches:
        for layer in cache.layers:
            width = max(layer.keys.size(2) - start, 0)  # a cache may lag its mask by the token being decoded
            kept = []
            for old in (layer.keys, layer.values):
                buffer = _new_buffer(layer, old, len(rows), width)
                torch.index_select(old[:, :, start:], 0, rows, out=buffer[:, :, :width])  # one pass, no temporary
                kept.append(buffer)
            _install(layer, *kept, width)
    return attention_mask[:, start:]


def _new_buffer(layer: DynamicLayer, like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """An uninitialised `(rows, H, width (+ headroom for an AppendInPlaceLayer), D)` tensor for `layer`."""
    spare = layer.headroom if isinstance(layer, AppendInPlaceLayer) else 0
    return like.new_empty(rows, like.size(1), width + spare, like.size(3))


def _install(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
    """Make the first `width` columns of `keys` and `values` the layer's cache (and its buffers, if it has any)."""
    layer.keys, layer.values = keys[:, :, :width], values[:, :, :width]
    if isinstance(layer, AppendInPlaceLayer):
        layer.key_buffer, layer.value_buffer = keys, values


def keep_chosen_candidates(cache: DynamicCache, choices: torch.Tensor, num_candidates: int) -> None:
    """
    Drop the candidate columns a candidate-scoring forward appended to the cache, except each row's chosen one.

    [`~lenvm_rl.guidance.score_candidates`] appends `k` columns, one per candidate, each attending to the prefix
    and to itself only; the chosen candidate's keys and values are therefore those of a plain forward of that
    token, and this is the cache extended by the chosen token, in place.

    Args:
        cache (`transformers.DynamicCache`):
            Cache of `P` prefix columns followed by `num_candidates` candidate columns.
        choices (`torch.Tensor`):
            `(B,)` index of the chosen candidate of each row.
        num_candidates (`int`):
            `k`, the number of candidate columns.
    """
    for layer in cache.layers:
        P = layer.keys.size(2) - num_candidates
        index = (P + choices)[:, None, None, None].expand(-1, layer.keys.size(1), 1, layer.keys.size(3))
        # Gathered before column P is overwritten (the chosen column may be P itself); slicing keeps the tensors
        # column prefixes of an AppendInPlaceLayer's buffers, so no step copies the prefix.
        chosen_keys, chosen_values = layer.keys.gather(2, index), layer.values.gather(2, index)  # (B, H, 1, D)
        layer.keys[:, :, P : P + 1] = chosen_keys
        layer.values[:, :, P : P + 1] = chosen_values
        layer.keys, layer.values = layer.keys[:, :, : P + 1], layer.values[:, :, : P + 1]
