"""lenvm_rl.io: a full disk names the file being written and leaves its previous version whole."""

import errno
import io
import json
import os

import pytest

from lenvm_rl import io as lenvm_io
from lenvm_rl.io import read_json, write_json_atomic


class FullDiskFile(io.StringIO):
    """A text file on a full disk: every write fails with ENOSPC, as the kernel reports it (no file name)."""

    def __init__(self, fd, *args, **kwargs):
        super().__init__()
        os.close(fd)

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_keeps_its_previous_version(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "results.json", {"accuracy": 0.5})
    monkeypatch.setattr(lenvm_io.os, "fdopen", FullDiskFile)
    with pytest.raises(OSError) as error:
        write_json_atomic(path, {"accuracy": 0.9})
    assert error.value.errno == errno.ENOSPC
    assert f"no space left on device while writing {path}; its previous version is intact" in str(error.value)
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left
    with pytest.raises(OSError, match="while writing .*new.json; no partial file was left"):
        write_json_atomic(tmp_path / "new.json", {})


def test_a_truncated_json_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"start": {"accuracy": 0.5}, "fin')
    with pytest.raises(ValueError, match=rf"^{path} is not valid JSON \(truncated or corrupt: .*\); delete it\.$"):
        read_json(path, fix="delete it")
