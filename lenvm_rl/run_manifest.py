"""Run manifests: an output directory records which run it holds, and one process at a time writes it.

Every recipe that writes an output directory starts with [`start_run`] and ends with [`Run.complete`]. The directory
then holds ``run_manifest.json``::

    {"format_version": 1,
     "runs": {"ppo_gsm8k": {"state": "running" | "complete",
                            "config": {...},        # the resolved arguments, grouped as the recipe parsed them
                            "inputs": {...},        # a fingerprint of every input path (models, data, rollouts)
                            "resolved": {...},      # values fixed at the first start (a LenVM's gamma)
                            "outputs": [...] | null,  # the files the run owns; null: the whole directory
                            "starts": [{"time", "pid", "host", "lenvm_rl_version"}, ...]}},
     "model_files": [...]}                          # top-level model files lenvm-rl saved here

A start in a directory that holds a run compares the two:

- the same config and inputs, unfinished: the run resumes (its checkpoints, sampled chunks, start evaluation);
- the same, finished: nothing to do, said in one line (`reevaluate=True` re-runs the evaluation only);
- anything else: a `ValueError` listing every differing field, stored and requested, and the two ways out: a new
  `--output_dir`, or `--overwrite_output_dir`, which moves the old run into ``superseded/<time>-<job>/`` inside the
  directory (nothing is deleted).

Fields in [`RESUMABLE_FIELDS`] (logging, evaluation and checkpoint frequency, process plumbing) may change on resume:
they do not change what the run computes.

A run holds an advisory lock (``fcntl.flock`` on ``.run.lock``) from its start to its end: a second process that
starts in the same directory gets a [`OutputDirLockedError`] naming the holder's PID and host. The kernel drops the
lock when its holder dies, so a killed run's lock is taken over by the next start. Under `accelerate launch` the main
process holds the lock and writes the manifest; every process reads the manifest and reaches the same decision.

Input fingerprints are cheap by design, since they are computed at every start: a file up to
[`FULL_HASH_BYTES`] is hashed whole (configs, tokenizers, data files, tiny models); a larger one by its size and three
1 MiB windows (start, middle, end), which every retraining changes while hashing a 3 GB checkpoint would take seconds
(an edit confined to bytes outside the windows is not detected). A rollout directory is fingerprinted by its
``rollouts_layout.json`` (which pins the prompts and the policy weights) and the names and sizes of its chunk files,
which are written whole once and never rewritten. A path that does not exist locally (a hub id) is recorded by name.
"""

import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from .io import read_json, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "RESUMABLE_FIELDS",
    "OutputDirLockedError",
    "Run",
    "check_model_files_owned",
    "fingerprint_path",
    "read_manifest",
    "record_model_files",
    "start_run",
]

MANIFEST_NAME = "run_manifest.json"
LOCK_NAME = ".run.lock"
SUPERSEDED_DIR = "superseded"
MANIFEST_FORMAT_VERSION = 1
FULL_HASH_BYTES = 16 * 2**20
_WINDOW_BYTES = 2**20

# Fields that may differ between the starts of one run: none of them changes what the run computes. Any other field
# of the config is compared.
RESUMABLE_FIELDS = frozenset(
    {
        # where the run is and how it is (re)started
        "output_dir",
        "overwrite_output_dir",
        "reevaluate",
        "resume_from_checkpoint",
        # logging
        "logging_dir",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "report_to",
        "run_name",
        "project",
        "disable_tqdm",
        "log_completions",
        "num_completions_to_print",
        # evaluation and checkpoint frequency
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        # process plumbing
        "dataloader_num_workers",
        "dataloader_prefetch_factor",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "ddp_timeout",
        "num_threads",
        # where a vLLM engine runs and how much memory it may take (not what it samples)
        "vllm_gpu_memory_utilization",
        "vllm_enable_sleep_mode",
        "vllm_server_base_url",
        "vllm_server_host",
        "vllm_server_port",
        "vllm_server_timeout",
        "vllm_group_port",
    }
)

# Model files: a save refuses to replace one that lenvm-rl did not save into that directory itself.
_MODEL_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")
_MODEL_CONFIGS = ("config.json", "adapter_config.json")
# Not part of an input's fingerprint: lenvm-rl's bookkeeping and reports, which change without the model changing.
_SKIPPED_DIRS = ("runs", SUPERSEDED_DIR)
_SKIPPED_FILES = (MANIFEST_NAME, LOCK_NAME, "README.md", "training_args.bin", "trainer_state.json")


class OutputDirLockedError(RuntimeError):
    """Another process is writing the output directory."""


# ---------------------------------------------------------------------- fingerprints


def fingerprint_path(path: str | os.PathLike) -> dict:
    """A fingerprint of an input path: a file, a directory (model, data or rollouts), a glob of files, or a name that
    is not a local path (a hub id), recorded as such. See the module docstring for what is hashed."""
    path_str = str(path)
    path = Path(path)
    if path.is_file():
        return {"path": path_str, "file": _file_fingerprint(path)}
    if path.is_dir():
        if (path / "rollouts_layout.json").is_file():
            chunks = sorted(path.glob("shard-*/chunk-*.jsonl"))
            return {
                "path": path_str,
                "rollouts_layout": read_json(path / "rollouts_layout.json", fix="restore it, or sample again"),
                "chunks": {str(chunk.relative_to(path)): chunk.stat().st_size for chunk in chunks},
            }
        return {"path": path_str, "files": {name: _file_fingerprint(path / name) for name in _input_files(path)}}
    matches = sorted(glob.glob(path_str)) if glob.has_magic(path_str) else []
    if matches:
        return {"path": path_str, "files": {name: _file_fingerprint(Path(name)) for name in matches}}
    return {"path": path_str, "not_local": True}


def _input_files(directory: Path) -> list[str]:
    names = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS and not d.startswith("checkpoint-")
        )
        for name in sorted(files):
            if name.startswith(".") or name in _SKIPPED_FILES or name.endswith(("results.json", ".png")):
                continue
            names.append(str((Path(root) / name).relative_to(directory)))
    return names


def _file_fingerprint(path: Path) -> dict:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: file.read(_WINDOW_BYTES), b""):
                digest.update(block)
            return {"size": size, "sha256": digest.hexdigest()}
        for offset in (0, (size - _WINDOW_BYTES) // 2, size - _WINDOW_BYTES):
            file.seek(offset)
            digest.update(file.read(_WINDOW_BYTES))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


# ---------------------------------------------------------------------- the manifest file


def read_manifest(output_dir: str | os.PathLike) -> dict:
    """The manifest of `output_dir` (`{}` when there is none); a truncated or malformed one is a `ValueError` that
    names the file."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    manifest = read_json(
        path,
        fix=f"restore it, or pass --overwrite_output_dir to move the run in {output_dir} aside and start anew",
    )
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs", {}), dict):
        raise ValueError(f"{path} is not a run manifest (a JSON object with a 'runs' object); restore it.")
    if manifest.get("format_version", 0) > MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {manifest['format_version']}, newer than this lenvm-rl understands "
            f"({MANIFEST_FORMAT_VERSION}); upgrade lenvm-rl."
        )
    return manifest


def _update_manifest(output_dir: Path, change) -> dict:
    """Read, change in place with `change(manifest)`, write atomically (the caller holds the directory's lock)."""
    manifest = read_manifest(output_dir) or {"format_version": MANIFEST_FORMAT_VERSION, "runs": {}}
    manifest.setdefault("runs", {})
    change(manifest)
    write_json_atomic(output_dir / MANIFEST_NAME, manifest)
    return manifest


def _model_files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.is_file()
        and entry.name != "training_args.bin"
        and (entry.name.endswith(_MODEL_SUFFIXES) or entry.name in _MODEL_CONFIGS)
    )


def check_model_files_owned(directory: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Refuse to save a model into `directory` if it holds model files (weights, `config.json`) that lenvm-rl did not
    save there itself: they belong to another model, which the save would overwrite in part. Files are lenvm-rl's when
    the directory holds a run ([`start_run`] checked it) or its manifest lists them ([`record_model_files`])."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if any(entry.get("outputs") is None for entry in manifest.get("runs", {}).values()):
        return  # the directory is a run's: its start checked that it held nothing else, and its lock kept others out
    foreign = sorted(set(_model_files(directory)) - set(manifest.get("model_files", [])))
    if foreign:
        raise ValueError(
            f"Refusing to save a model into {directory}: it holds model files that no lenvm-rl save wrote there "
            f"({foreign[:6]}), so they belong to another model, which the save would overwrite. Pass another "
            f"{flag}."
        )


def record_model_files(directory: str | os.PathLike) -> None:
    """List the top-level model files of `directory` in its manifest, after a lenvm-rl save wrote them."""
    directory = Path(directory)
    names = _model_files(directory)
    _update_manifest(directory, lambda manifest: manifest.update(model_files=names))


# ---------------------------------------------------------------------- the lock


class _DirectoryLock:
    """An exclusive `flock` on `directory/.run.lock`, whose content names the holder."""

    def __init__(self, directory: Path, job: str):
        self.path = directory / LOCK_NAME
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = _parse_holder(self.file.read())
            self.file.close()
            raise OutputDirLockedError(
                f"{directory} is being written by another process (PID {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, {holder.get('job', 'a lenvm-rl run')} started {holder.get('time', '?')}; "
                f"{self.path}). Two runs in one directory would overwrite each other's outputs: wait for it to end, "
                "stop it, or pass another --output_dir."
            ) from None
        self.file.seek(0)
        previous = _parse_holder(self.file.read())
        if previous.get("pid") not in (None, os.getpid()):
            logger.warning(
                "Taking over %s from PID %s on %s, which ended without releasing it (killed or crashed).",
                self.path,
                previous["pid"],
                previous.get("host"),
            )
        self.file.seek(0)
        self.file.truncate()
        self.file.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": job, "time": _now()}) + "\n"
        )
        self.file.flush()

    def release(self) -> None:
        if self.file.closed:
            return
        self.file.truncate(0)
        self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _parse_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


# A process that starts a run in a directory it already holds (an earlier in-process start that raised) takes its own
# lock back instead of refusing itself.
_HELD_LOCKS: dict[Path, _DirectoryLock] = {}


def _acquire(directory: Path, job: str) -> _DirectoryLock:
    held = _HELD_LOCKS.pop(directory, None)
    if held is not None:
        held.release()
    lock = _DirectoryLock(directory, job)
    _HELD_LOCKS[directory] = lock
    return lock


def _release(directory: Path, lock: _DirectoryLock | None) -> None:
    if lock is not None:
        lock.release()
        if _HELD_LOCKS.get(directory) is lock:
            del _HELD_LOCKS[directory]


# ---------------------------------------------------------------------- runs


class Run:
    """A started run: its directory, whether it is new, resumed or already complete, and its resolved values.

    Attributes:
        output_dir (`Path`): The run's directory.
        job (`str`): The job name (the recipe).
        status (`str`): `"new"`, `"resumed"` or `"complete"` (finished by an earlier start).
        reevaluate (`bool`): Complete, and the evaluation is to run again.
        resolved (`dict`): Values fixed at the first start ([`Run.record`]).
    """

    def __init__(self, output_dir: Path, job: str, status: str, reevaluate: bool, resolved: dict, lock, is_main: bool):
        self.output_dir, self.job, self.status, self.reevaluate = output_dir, job, status, reevaluate
        self.resolved = dict(resolved)
        self._lock, self._is_main = lock, is_main

    @property
    def done(self) -> bool:
        """Finished by an earlier start and not to be re-evaluated: the recipe has nothing to do."""
        return self.status == "complete" and not self.reevaluate

    def record(self, **values) -> None:
        """Fix values resolved at the first start (e.g. `gamma=`); later starts read them from `resolved`."""
        self.resolved.update(values)
        if self._is_main:
            _update_manifest(self.output_dir, lambda m: m["runs"][self.job].setdefault("resolved", {}).update(values))

    def complete(self) -> None:
        """Mark the run complete (a later start with the same config is a no-op) and release the directory."""
        if self._is_main:
            _update_manifest(self.output_dir, lambda m: m["runs"][self.job].update(state="complete", finished=_now()))
        self.release()

    def release(self) -> None:
        """Release the directory's lock (also released when the process ends)."""
        _release(self.output_dir, self._lock)
        self._lock = None


def start_run(
    output_dir: str | os.PathLike,
    job: str,
    config: dict[str, Any],
    inputs: dict[str, str | os.PathLike | None],
    *,
    overwrite: bool = False,
    reevaluate: bool = False,
    outputs: list[str] | None = None,
) -> Run:
    """Start, resume or skip the run `job` in `output_dir`, holding the directory's lock until [`Run.complete`].

    Args:
        output_dir (`str` or `os.PathLike`): The run's directory (created if needed).
        job (`str`): The job's name, e.g. `"ppo_gsm8k"`.
        config (`dict`): The resolved arguments by group, e.g. `{"script_args": ..., "training_args": ...}`:
            dataclasses (`TrainingArguments` through `to_dict()`, which masks tokens) or JSON-ready dicts.
        inputs (`dict`): Every input path by its flag, e.g. `{"model_name_or_path": ...}`; `None` values are skipped.
            A start whose `output_dir` is one of them is refused, as is moving aside a whole directory that contains
            one.
        overwrite (`bool`): `--overwrite_output_dir`: move a different run (or files of no run) aside instead of
            refusing.
        reevaluate (`bool`): `--reevaluate`: for a complete run, run the evaluation again.
        outputs (`list[str]` or `None`): The files the job owns in `output_dir` (evaluations, which may share a
            directory); `None`: the job owns the whole directory (training, sampling).

    Returns:
        [`Run`]: check `run.done` first (a finished run: return), then `run.status`.
    """
    from accelerate import PartialState

    state = PartialState()
    output_dir = Path(output_dir).absolute()
    # The process count is part of the run: it sets the global batch, hence which rows each update trains on.
    config = _normalise({**config, "num_processes": state.num_processes})
    fingerprints = {name: fingerprint_path(path) for name, path in inputs.items() if path is not None}
    for name, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        if Path(path).resolve() == output_dir.resolve():
            raise ValueError(
                f"--output_dir {output_dir} is also --{name}: a run never writes into its own inputs (its saves would "
                "replace that model or data). Pass another --output_dir."
            )
        if overwrite and outputs is None and output_dir.resolve() in Path(path).resolve().parents:
            raise ValueError(
                f"--{name} {path} lies inside --output_dir {output_dir}: --overwrite_output_dir would move it aside. "
                "Pass another --output_dir."
            )

    lock = None
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = _acquire(output_dir, job)
    try:
        status, move_aside, resolved = _decide(output_dir, job, config, fingerprints, overwrite, outputs)
        state.wait_for_everyone()  # every process decided on the directory as it was
        if state.is_main_process:
            if move_aside:
                aside = _move_aside(output_dir, job, move_aside)
                logger.warning("--overwrite_output_dir: moved the previous contents of %s to %s.", output_dir, aside)
            if status != "complete" or reevaluate:
                _write_start(output_dir, job, config, fingerprints, outputs, status)
        state.wait_for_everyone()
    except BaseException:
        _release(output_dir, lock)
        raise
    run = Run(output_dir, job, status, reevaluate and status == "complete", resolved, lock, state.is_main_process)
    if status == "complete":
        if reevaluate:
            logger.warning("%s holds a complete run of %s: --reevaluate runs its evaluation again.", output_dir, job)
        else:
            logger.warning(
                "%s already holds this complete run of %s (%s): nothing to do. Pass --reevaluate to run its "
                "evaluation again, or another --output_dir for a new run.",
                output_dir,
                job,
                MANIFEST_NAME,
            )
            run.release()
    elif status == "resumed":
        logger.info("Resuming the run of %s in %s.", job, output_dir)
    return run


def _decide(output_dir: Path, job: str, config: dict, fingerprints: dict, overwrite: bool, outputs):
    """`(status, what to move aside, resolved values)`; raises on a different run unless `overwrite`."""
    manifest = read_manifest(output_dir) if output_dir.is_dir() else {}
    entry = manifest.get("runs", {}).get(job)
    if entry is None:
        if outputs is None:
            present = sorted(
                p.name for p in output_dir.iterdir() if p.name not in (LOCK_NAME, SUPERSEDED_DIR, MANIFEST_NAME)
            ) if output_dir.is_dir() else []  # fmt: skip
            if manifest.get("model_files") or manifest.get("runs"):
                present = sorted({*present, MANIFEST_NAME})
        else:
            present = [name for name in outputs if (output_dir / name).exists()]
        if not present:
            return "new", None, {}
        if overwrite:
            return "new", present, {}
        raise ValueError(
            f"{output_dir} holds files that are not a run of {job} ({present[:6]}{' ...' if len(present) > 6 else ''}"
            f"; no {job} entry in {MANIFEST_NAME}): another job's outputs, a model, or a run of a lenvm-rl without "
            f"run manifests. {_WAYS_OUT.format(output_dir=output_dir)}"
        )
    differences = _differences(entry.get("config", {}), config, "") + _input_differences(
        entry.get("inputs", {}), fingerprints
    )
    if differences:
        if overwrite:
            return "new", _owned(output_dir, manifest, job, outputs), {}
        listed = "\n".join(f"  - {line}" for line in differences)
        raise ValueError(
            f"{output_dir} holds a run of {job} with another config or other inputs ({MANIFEST_NAME}; stored -> "
            f"requested):\n{listed}\nResuming would mix two runs in one directory. "
            f"{_WAYS_OUT.format(output_dir=output_dir)} Fields that may change on resume are "
            "lenvm_rl.run_manifest.RESUMABLE_FIELDS (logging, evaluation and checkpoint frequency, process plumbing)."
        )
    status = "complete" if entry.get("state") == "complete" else "resumed"
    return status, None, entry.get("resolved", {})


_WAYS_OUT = (
    "Either pass a new --output_dir, or pass --overwrite_output_dir to move them into "
    f"{{output_dir}}/{SUPERSEDED_DIR}/ (nothing is deleted) and start anew."
)


def _owned(output_dir: Path, manifest: dict, job: str, outputs) -> list[str]:
    """What a job's run consists of in its directory: everything (but the lock and older superseded runs) for a job
    that owns the directory, its listed files and its manifest entry otherwise."""
    if outputs is None:
        return sorted(p.name for p in output_dir.iterdir() if p.name not in (LOCK_NAME, SUPERSEDED_DIR))
    return [name for name in outputs if (output_dir / name).exists()]


def _move_aside(output_dir: Path, job: str, names: list[str]) -> Path:
    """Rename `names` (top-level entries of `output_dir`) into `output_dir/superseded/<time>-<job>/`; a job's
    manifest entry goes with its files."""
    aside = output_dir / SUPERSEDED_DIR / f"{time.strftime('%Y%m%dT%H%M%S')}-{job}"
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.rsplit('.', 1)[0]}.{suffix}")
    aside.mkdir(parents=True)
    for name in names:
        if name != MANIFEST_NAME:
            os.replace(output_dir / name, aside / name)
    manifest = read_manifest(output_dir)
    if manifest:
        entry = manifest.get("runs", {}).pop(job, None)
        owns_directory = MANIFEST_NAME in names
        if owns_directory:
            os.replace(output_dir / MANIFEST_NAME, aside / MANIFEST_NAME)
        else:
            if entry is not None:
                write_json_atomic(aside / MANIFEST_NAME, {**manifest, "runs": {job: entry}})
            write_json_atomic(output_dir / MANIFEST_NAME, manifest)
    return aside


def _write_start(output_dir: Path, job: str, config: dict, fingerprints: dict, outputs, status: str) -> None:
    from . import __version__

    start = {"time": _now(), "pid": os.getpid(), "host": socket.gethostname(), "lenvm_rl_version": __version__}
    if status == "complete":
        start["reevaluate"] = True

    def change(manifest):
        entry = manifest["runs"].get(job)
        if status == "new" or entry is None:
            entry = manifest["runs"][job] = {"state": "running", "resolved": {}, "starts": []}
        elif entry["starts"] and entry["starts"][-1].get("lenvm_rl_version") != __version__:
            logger.warning(
                "%s was started with lenvm-rl %s and resumes with %s.",
                output_dir,
                entry["starts"][-1].get("lenvm_rl_version"),
                __version__,
            )
        # The config of this start: equal to the stored one but for the resumable fields. A re-evaluation leaves a
        # complete run complete, so that an interrupted one is never taken for unfinished training.
        entry.update(config=config, inputs=fingerprints, outputs=outputs)
        if status != "complete":
            entry["state"] = "running"
        entry["starts"].append(start)

    _update_manifest(output_dir, change)


def _normalise(config: dict[str, Any]) -> dict:
    groups = {}
    for name, value in config.items():
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        elif is_dataclass(value):
            value = asdict(value)
        groups[name] = value
    return json.loads(json.dumps(groups, default=str))


def _differences(stored: Any, requested: Any, prefix: str) -> list[str]:
    if isinstance(stored, dict) and isinstance(requested, dict):
        lines = []
        for key in sorted(set(stored) | set(requested)):
            if key in RESUMABLE_FIELDS:
                continue
            name = f"{prefix}.{key}" if prefix else key
            if key not in requested:
                lines.append(f"{name}: {_short(stored[key])} -> (not set)")
            elif key not in stored:
                lines.append(f"{name}: (not set) -> {_short(requested[key])}")
            else:
                lines += _differences(stored[key], requested[key], name)
        return lines
    return [] if stored == requested else [f"{prefix}: {_short(stored)} -> {_short(requested)}"]


def _input_differences(stored: dict, requested: dict) -> list[str]:
    """Inputs whose content differs; a local input moved or copied elsewhere with the same content is the same."""
    lines = []
    for name in sorted(set(stored) | set(requested)):
        before, after = stored.get(name), requested.get(name)
        if _content(before) == _content(after):
            continue
        paths = [None if f is None else f.get("path") for f in (before, after)]
        if before is None or after is None or before.get("not_local") or after.get("not_local"):
            lines.append(f"inputs.{name}: {paths[0]} -> {paths[1]}")
            continue
        files_before = before.get("files") or before.get("chunks") or {"": before.get("file")}
        files_after = after.get("files") or after.get("chunks") or {"": after.get("file")}
        changed = sorted(k for k in set(files_before) | set(files_after) if files_before.get(k) != files_after.get(k))
        if before.get("rollouts_layout") != after.get("rollouts_layout"):
            changed.insert(0, "rollouts_layout.json")
        what = ", ".join(name or "its content" for name in changed[:6]) + (" ..." if len(changed) > 6 else "")
        where = (
            f"the files at {paths[1]} changed" if paths[0] == paths[1] else f"{paths[0]} -> {paths[1]}, other files"
        )
        lines.append(f"inputs.{name}: {where} ({what})")
    return lines


def _content(fingerprint: dict | None) -> dict | None:
    """What an input fingerprint says about the content: everything but the path, for a local input."""
    if fingerprint is None or fingerprint.get("not_local"):
        return fingerprint
    return {key: value for key, value in fingerprint.items() if key != "path"}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
