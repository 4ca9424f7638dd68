"""Crash-consistent `Trainer` checkpoints: a checkpoint counts only once it is complete, and resumes skip the rest.

`transformers.Trainer` writes `checkpoint-N/` file by file (model, optimizer, scheduler, RNG state, then
`trainer_state.json`). A process killed in between leaves a folder that `get_last_checkpoint` still picks, and every
restart then fails (`FileNotFoundError`) until a person deletes it. Every lenvm-rl trainer therefore marks a
checkpoint complete with a last-written file, [`CHECKPOINT_COMPLETE_NAME`], after all processes finished writing
their part, and every resume path goes through [`last_complete_checkpoint`], which skips incomplete folders with a
warning (they are left on disk: the run never deletes what it did not finish writing itself).
"""

import logging
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..io import write_json_atomic
from ..run_manifest import check_model_files_owned, record_model_files

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_COMPLETE_NAME",
    "CompleteCheckpointsMixin",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
]

CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint whose writing finished (it holds [`CHECKPOINT_COMPLETE_NAME`])."""
    return (Path(path) / CHECKPOINT_COMPLETE_NAME).is_file()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-N` of `output_dir` with the largest `N`, or `None`.

    Incomplete checkpoints (killed while being written, or written by a trainer that does not mark completion) are
    skipped with a warning that names them.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = sorted(
        (int(match.group(1)), entry)
        for entry in output_dir.iterdir()
        if entry.is_dir() and (match := _CHECKPOINT_RE.match(entry.name))
    )
    skipped = []
    for _, entry in reversed(steps):
        if is_complete_checkpoint(entry):
            if skipped:
                logger.warning(
                    "Skipping incomplete checkpoint(s) %s (no %s: the run was interrupted while writing them); "
                    "resuming from %s.",
                    [str(path) for path in skipped],
                    CHECKPOINT_COMPLETE_NAME,
                    entry,
                )
            return str(entry)
        skipped.append(entry)
    if skipped:
        logger.warning(
            "No complete checkpoint in %s: %s lack %s (interrupted while being written); starting from scratch.",
            output_dir,
            [path.name for path in skipped],
            CHECKPOINT_COMPLETE_NAME,
        )
    return None


class CompleteCheckpointsMixin:
    """For `transformers.Trainer` subclasses: mark each checkpoint complete once every process has written it, and
    resume only from complete checkpoints (`train(resume_from_checkpoint=True)` takes the last complete one; an
    explicit incomplete path is refused)."""

    def _save_checkpoint(self, model, trial):
        # Older checkpoints are rotated out only once the new one is complete: transformers rotates right after
        # writing, so a crash before the marker would otherwise leave no complete checkpoint at all.
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()  # ZeRO-3 processes write their own optimizer shards
        run_dir = self._get_output_dir(trial=trial)
        if self.args.should_save:
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            write_json_atomic(os.path.join(folder, CHECKPOINT_COMPLETE_NAME), {"global_step": self.state.global_step})
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # The final model goes to the top of output_dir: never over model files that lenvm-rl did not save there (the
        # policy the run started from, another run's model). Checkpoints (internal calls) go to fresh folders.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not _internal_call:
            check_model_files_owned(output_dir)  # read-only, on every process: they all raise or none does
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            record_model_files(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                logger.warning(
                    "resume_from_checkpoint=True but %s holds no complete checkpoint.", self.args.output_dir
                )
        elif resume_from_checkpoint and not is_complete_checkpoint(resume_from_checkpoint):
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint (no {CHECKPOINT_COMPLETE_NAME}: it was "
                "interrupted while being written, or written by another trainer). Resume from an earlier one, or "
                "pass resume_from_checkpoint=True to take the last complete checkpoint."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)
