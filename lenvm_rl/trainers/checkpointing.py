"""Crash-consistent `Trainer` checkpoints: a checkpoint counts only once it is complete, and resumes skip the rest.

`transformers.Trainer` writes `checkpoint-N/` file by file (model, optimizer, scheduler, RNG state, then
`trainer_state.json`). A process killed in between leaves a folder that `get_last_checkpoint` still picks, and every
restart then fails (`FileNotFoundError`) until a person deletes it. Every lenvm-rl trainer therefore marks a
checkpoint complete with a last-written file, [`CHECKPOINT_COMPLETE_NAME`], after all processes finished writing
their part, and every resume path goes through [`last_complete_checkpoint`], which skips incomplete folders with a
warning (they are left on disk: the run never deletes what it did not finish writing itself).

The marker lists every file of the checkpoint with its size (and, for safetensors files, a hash of the header), so a
checkpoint whose files were truncated or replaced after it was marked (a disk that filled, a copy that stopped half
way) is skipped like a half-written one, with a warning that names the file. A disk that fills while a checkpoint or
the final model is written gives an `OSError` (`ENOSPC`) naming the path being written and the previous complete
checkpoint, which is intact ([`naming_disk_full`]).
"""

import errno
import hashlib
import logging
import os
import re
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..io import read_json, write_json_atomic
from ..run_manifest import check_model_files_owned, record_model_files

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_COMPLETE_NAME",
    "CompleteCheckpointsMixin",
    "checkpoint_problem",
    "is_complete_checkpoint",
    "last_complete_checkpoint",
    "naming_disk_full",
]

CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint whose writing finished and whose files are still whole
    ([`checkpoint_problem`] is `None`)."""
    return checkpoint_problem(path) is None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint (no marker, an unreadable marker, or a file that is missing, of another
    size or with another safetensors header than when the checkpoint was marked), or `None` if it is one."""
    path = Path(path)
    marker = path / CHECKPOINT_COMPLETE_NAME
    if not marker.is_file():
        return f"no {CHECKPOINT_COMPLETE_NAME}: the run was interrupted while writing it"
    try:
        recorded = read_json(marker, fix="")
    except ValueError:
        return f"{marker} is truncated or corrupt"
    for name, expected in (recorded.get("files") or {}).items():  # markers without a file list are trusted
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return (
                f"{file} has {file.stat().st_size} bytes, {expected['size']} when the checkpoint was marked complete"
            )
        if (
            "safetensors_header_sha256" in expected
            and _safetensors_header_sha256(file) != expected["safetensors_header_sha256"]
        ):
            return f"{file} has another safetensors header than when the checkpoint was marked complete"
    return None


def _checkpoint_files(folder: Path) -> dict[str, dict]:
    files = {}
    for file in sorted(folder.rglob("*")):
        if file.is_file() and file.name != CHECKPOINT_COMPLETE_NAME:
            entry = {"size": file.stat().st_size}
            if file.name.endswith(".safetensors"):
                entry["safetensors_header_sha256"] = _safetensors_header_sha256(file)
            files[str(file.relative_to(folder))] = entry
    return files


def _safetensors_header_sha256(file: Path) -> str | None:
    """sha256 of a safetensors file's header (8-byte length + JSON: every tensor's dtype, shape and offsets)."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        header = handle.read(min(length, 100 * 2**20))
    return hashlib.sha256(prefix + header).hexdigest()


@contextmanager
def naming_disk_full(path: str | os.PathLike, run_dir: str | os.PathLike):
    """Turn a full disk while writing `path` into an `OSError` (`ENOSPC`) that names `path` and the last complete
    checkpoint of `run_dir`, which the failed write did not touch.

    torch's checkpoint writer reports a full disk as `RuntimeError: [enforce fail at inline_container.cc] ... file
    write failed`, without the cause or the path; such an error (or any error) counts as a full disk when the file
    system of `path` has less than 1 MiB left."""
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error, Path(path)):
            raise
        previous = last_complete_checkpoint(run_dir)
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous is not None
            else "no earlier complete checkpoint exists"
        )
        raise OSError(
            errno.ENOSPC,
            f"no space left on device while writing {path}; {kept}. Free space (the unfinished {Path(path).name} may "
            "be deleted) or point --output_dir at a larger disk, then restart: the run resumes from the last complete "
            "checkpoint.",
        ) from error


def _is_disk_full(error: BaseException, path: Path) -> bool:
    chain = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(chain) or "StorageFull" in str(chain):
            return True
        chain = chain.__cause__ or chain.__context__
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < 2**20


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
        problem = checkpoint_problem(entry)
        if problem is None:
            if skipped:
                logger.warning("Skipping incomplete checkpoint(s) %s; resuming from %s.", "; ".join(skipped), entry)
            return str(entry)
        skipped.append(f"{entry}: {problem}")
    if skipped:
        logger.warning("No complete checkpoint in %s (%s); starting from scratch.", output_dir, "; ".join(skipped))
    return None


class CompleteCheckpointsMixin:
    """For `transformers.Trainer` subclasses: mark each checkpoint complete once every process has written it, and
    resume only from complete checkpoints (`train(resume_from_checkpoint=True)` takes the last complete one; an
    explicit incomplete path is refused)."""

    def _save_checkpoint(self, model, trial):
        # Older checkpoints are rotated out only once the new one is complete: transformers rotates right after
        # writing, so a crash before the marker would otherwise leave no complete checkpoint at all.
        save_total_limit, self.args.save_total_limit = self.args.save_total_limit, None
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            with naming_disk_full(folder, run_dir):
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        self.accelerator.wait_for_everyone()  # ZeRO-3 processes write their own optimizer shards
        if self.args.should_save:
            marker = {"global_step": self.state.global_step, "files": _checkpoint_files(folder)}
            with naming_disk_full(folder, run_dir):
                write_json_atomic(folder / CHECKPOINT_COMPLETE_NAME, marker)
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
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        check_model_files_owned(output_dir)  # read-only, on every process: they all raise or none does
        with naming_disk_full(output_dir, self.args.output_dir):
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            record_model_files(output_dir)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                logger.warning(
                    "resume_from_checkpoint=True but %s holds no complete checkpoint.", self.args.output_dir
                )
        elif resume_from_checkpoint and (problem := checkpoint_problem(resume_from_checkpoint)) is not None:
            raise ValueError(
                f"{resume_from_checkpoint} is not a complete checkpoint ({problem}; or it was written by another "
                "trainer). Resume from an earlier one, or pass resume_from_checkpoint=True to take the last complete "
                "checkpoint."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)
