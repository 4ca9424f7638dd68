"""What recipes and trainers need to run under `accelerate launch` (DDP, DeepSpeed ZeRO-2/3) and end cleanly."""

import os
import sys
from contextlib import nullcontext

__all__ = ["end_launched_process", "gathered_parameters"]


def gathered_parameters(parameters, modifier_rank: int | None = None):
    """
    Gather DeepSpeed ZeRO-3 shards for the duration of a `with` block; a no-op without ZeRO-3.

    Entering is a collective: every process must enter the block, even if only one uses the whole weights (e.g. to
    evaluate). With `modifier_rank`, that process's in-place changes are kept when the block ends.

    Args:
        parameters (`Iterable[torch.nn.Parameter]`):
            The parameters to gather (those not sharded by ZeRO-3 are left alone).
        modifier_rank (`int`, *optional*):
            The process whose changes are broadcast to the shards on exit.

    Returns:
        A context manager.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=modifier_rank)


def end_launched_process() -> None:
    """End a process started by `accelerate launch` with several processes, without a flaky exit.

    About one run in 30 that finished correctly aborts at interpreter exit on gloo ("terminate called without an
    active exception", exit code 1): a gloo worker thread races interpreter shutdown (``shared/docs/
    distributed_on_cpu.md``). Synchronise, destroy the process group, print `done rank=<i>` (one write: ranks share
    stdout), flush, then leave with `os._exit(0)`. A single process returns normally. Call it last.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes <= 1:
        return
    state.wait_for_everyone()
    state.destroy_process_group()
    sys.stdout.write(f"done rank={state.process_index}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
