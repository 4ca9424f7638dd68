"""Crash-safe file writes: a file appears whole or not at all, with the user's usual permissions.

Every result file, rollout chunk, manifest and checkpoint metadata file of lenvm-rl goes through these helpers. A
write goes to a temporary file in the target's directory (same file system, so the final ``os.replace`` is an
atomic rename), is flushed and fsynced, and only then renamed over the target. A crash leaves either the old file
or the new one, never a truncated mixture, and the temporary file is removed on any error.

A full disk is an `OSError` (`ENOSPC`) that names the file being written (the bare one names none).

``tempfile.mkstemp`` creates files readable by their owner only (0600); the helpers give the result the
permissions a plain ``open(path, "w")`` would (0666 minus the umask), so results stay readable by a team.
"""

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "default_dir_mode",
    "default_file_mode",
    "move_files_into",
    "read_json",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 without the process's umask bits."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode `os.mkdir` gives a new directory: 0o777 without the process's umask bits."""
    return default_file_mode() | (0o111 & ~_umask())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temporary file, fsync, rename); the parent directory must exist.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = write_text_atomic(pathlib.Path(tmp) / "a.txt", "hello")
        ...     path.read_text(), sorted(p.name for p in pathlib.Path(tmp).iterdir())
        ('hello', ['a.txt'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # the bare error names no file
            kept = "its previous version is intact" if path.exists() else "no partial file was left"
            raise OSError(
                errno.ENOSPC, f"no space left on device while writing {path}; {kept}. Free space and run again."
            ) from error
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (with a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write `records` as JSON lines to `path` atomically."""
    return write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def read_json(path: str | os.PathLike, fix: str) -> Any:
    """The content of the JSON file `path`; a truncated or malformed file is a `ValueError` that names it and says
    what to do (`fix`), instead of a bare `JSONDecodeError` at every restart.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp) / "results.json"
        ...     _ = path.write_text('{"accuracy": 0.')
        ...     try:
        ...         read_json(path, fix="delete it")
        ...     except ValueError as error:
        ...         print(str(error).replace(tmp, "<tmp>"))
        <tmp>/results.json is not valid JSON (truncated or corrupt: Expecting ',' delimiter: line 1 column 15 (char 14)); delete it.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt: {error}); {fix}.") from None


def move_files_into(staging: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Rename every file under `staging` to the same relative path under `target` (each rename atomic), then remove
    `staging`. Both must be on one file system (put `staging` inside `target`). Files of `target` that `staging`
    does not hold are left alone.

    Returns:
        `list[str]`: the relative paths moved, sorted.
    """
    staging, target = Path(staging), Path(target)
    names = sorted(str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file())
    for name in names:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, destination)
    shutil.rmtree(staging, ignore_errors=True)
    return names
