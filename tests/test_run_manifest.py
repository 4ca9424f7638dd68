"""Run manifests and the directory lock (lenvm_rl/run_manifest.py): resume, no-op, refusal, moving aside, one writer."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenvm_rl.run_manifest import (
    FULL_HASH_BYTES,
    LOCK_NAME,
    MANIFEST_NAME,
    OutputDirLockedError,
    check_model_files_owned,
    fingerprint_path,
    read_manifest,
    record_model_files,
    start_run,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "policy"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights-1")
    return path


def start(output_dir, model_dir, learning_rate=0.1, logging_steps=1, **kwargs):
    config = {"training_args": {"learning_rate": learning_rate, "logging_steps": logging_steps, "seed": 0}}
    return start_run(output_dir, "train", config, {"model_name_or_path": model_dir}, **kwargs)


def test_unfinished_run_resumes_and_finished_run_is_a_no_op(tmp_path, model_dir, caplog):
    output_dir = tmp_path / "run"
    run = start(output_dir, model_dir)
    assert run.status == "new" and not run.done
    (output_dir / "checkpoint-1").mkdir()
    run.release()  # interrupted: never completed

    run = start(output_dir, model_dir, logging_steps=50)  # logging may change on resume
    assert run.status == "resumed" and not run.done
    run.complete()
    entry = read_manifest(output_dir)["runs"]["train"]
    assert entry["state"] == "complete" and len(entry["starts"]) == 2
    assert entry["inputs"]["model_name_or_path"]["files"]["model.safetensors"]["size"] == len(b"weights-1")

    with caplog.at_level("WARNING", logger="lenvm_rl.run_manifest"):
        run = start(output_dir, model_dir)
    assert run.done and "nothing to do" in caplog.text and "--reevaluate" in caplog.text
    assert len(read_manifest(output_dir)["runs"]["train"]["starts"]) == 2  # a no-op writes nothing
    run = start(output_dir, model_dir, reevaluate=True)
    assert run.status == "complete" and run.reevaluate and not run.done
    run.complete()


def test_another_config_or_changed_inputs_are_refused_with_every_field(tmp_path, model_dir):
    output_dir = tmp_path / "run"
    start(output_dir, model_dir).release()
    (model_dir / "model.safetensors").write_bytes(b"weights-2")  # the same path, other weights
    with pytest.raises(ValueError) as error:
        start(output_dir, model_dir, learning_rate=0.01)
    message = str(error.value)
    assert "training_args.learning_rate: 0.1 -> 0.01" in message
    assert f"inputs.model_name_or_path: the files at {model_dir} changed (model.safetensors)" in message
    assert "a new --output_dir" in message and "--overwrite_output_dir" in message and "nothing is deleted" in message
    assert "logging_steps" not in message


def test_an_input_copied_elsewhere_is_the_same_input(tmp_path, model_dir):
    output_dir = tmp_path / "run"
    start(output_dir, model_dir).release()
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    start(output_dir, copy).release()  # the same files at another path: the same run
    (model_dir / "model.safetensors").write_bytes(b"weights-2")
    with pytest.raises(ValueError, match=rf"inputs.model_name_or_path: {copy} -> {model_dir}, other files "):
        start(output_dir, model_dir)


def test_overwrite_moves_the_old_run_aside(tmp_path, model_dir):
    output_dir = tmp_path / "run"
    start(output_dir, model_dir).complete()
    (output_dir / "model.safetensors").write_bytes(b"trained")
    run = start(output_dir, model_dir, learning_rate=0.01, overwrite=True)
    assert run.status == "new"
    (aside,) = (output_dir / "superseded").iterdir()
    assert (aside / "model.safetensors").read_bytes() == b"trained"  # moved, not deleted
    assert (
        json.loads((aside / MANIFEST_NAME).read_text())["runs"]["train"]["config"]["training_args"]["learning_rate"]
        == 0.1
    )
    assert not (output_dir / "model.safetensors").exists()
    assert read_manifest(output_dir)["runs"]["train"]["config"]["training_args"]["learning_rate"] == 0.01
    run.complete()
    # A second overwrite keeps the first superseded run where it is.
    start(output_dir, model_dir, learning_rate=0.02, overwrite=True).release()
    assert len(list((output_dir / "superseded").iterdir())) == 2


def test_files_of_no_run_are_refused_then_moved_aside(tmp_path, model_dir):
    output_dir = tmp_path / "other_model"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match=r"holds files that are not a run of train \(\['model.safetensors'\]"):
        start(output_dir, model_dir)
    start(output_dir, model_dir, overwrite=True).release()
    assert (next((output_dir / "superseded").iterdir()) / "model.safetensors").read_bytes() == b"someone else's"


def test_output_dir_that_is_an_input_is_refused(tmp_path, model_dir):
    with pytest.raises(ValueError, match="is also --model_name_or_path: a run never writes into its own inputs"):
        start(model_dir, model_dir)
    with pytest.raises(ValueError, match="lies inside --output_dir .* would move it aside"):
        start(tmp_path, model_dir, overwrite=True)
    assert (model_dir / "model.safetensors").read_bytes() == b"weights-1"


def test_jobs_that_own_files_share_a_directory(tmp_path, model_dir):
    """Evaluations write named files into a shared directory: each is a run of its own, moved aside alone."""
    output_dir = tmp_path / "evals"
    for job in ("eval_a", "eval_b"):
        run = start_run(output_dir, job, {"args": {"n": 1}}, {}, outputs=[f"{job}.json"])
        (output_dir / f"{job}.json").write_text("{}")
        run.complete()
    assert start_run(output_dir, "eval_a", {"args": {"n": 1}}, {}, outputs=["eval_a.json"]).done
    with pytest.raises(ValueError, match="args.n: 1 -> 2"):
        start_run(output_dir, "eval_a", {"args": {"n": 2}}, {}, outputs=["eval_a.json"])
    start_run(output_dir, "eval_a", {"args": {"n": 2}}, {}, outputs=["eval_a.json"], overwrite=True).complete()
    assert (output_dir / "eval_b.json").is_file() and not (output_dir / "eval_a.json").exists()
    assert set(read_manifest(output_dir)["runs"]) == {"eval_a", "eval_b"}
    (aside,) = (output_dir / "superseded").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["eval_a.json", MANIFEST_NAME]
    assert set(json.loads((aside / MANIFEST_NAME).read_text())["runs"]) == {"eval_a"}


def test_truncated_manifest_names_the_file(tmp_path, model_dir):
    output_dir = tmp_path / "run"
    start(output_dir, model_dir).release()
    text = (output_dir / MANIFEST_NAME).read_text()
    (output_dir / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME} is not valid JSON .* --overwrite_output_dir"):
        start(output_dir, model_dir)


def test_model_files_of_another_model_are_never_overwritten(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    check_model_files_owned(directory)  # empty: fine
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no lenvm-rl save wrote there \(\['config.json', 'model.safetensors'\]\)"):
        check_model_files_owned(directory)
    record_model_files(directory)  # after a lenvm-rl save wrote them
    check_model_files_owned(directory)


def test_fingerprints_hash_small_files_and_sample_large_ones(tmp_path):
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(b"a" * 10)
    large.write_bytes(bytes(FULL_HASH_BYTES + 5 * 2**20))
    assert set(fingerprint_path(small)["file"]) == {"size", "sha256"}
    before = fingerprint_path(large)["file"]
    assert set(before) == {"size", "sampled_sha256"}
    with open(large, "r+b") as file:  # a change in the last window (as retraining changes every window)
        file.seek(FULL_HASH_BYTES + 5 * 2**20 - 10)
        file.write(b"\1")
    assert fingerprint_path(large)["file"] != before
    assert fingerprint_path("org/model-on-the-hub") == {"path": "org/model-on-the-hub", "not_local": True}


# ---------------------------------------------------------------------- one writer per directory

HOLDER = """
import sys, time
from lenvm_rl.run_manifest import start_run
start_run(sys.argv[1], "train", {}, {})
print("locked", flush=True)
time.sleep(60)
"""


def hold_the_lock(output_dir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    output_dir = tmp_path / "run"
    holder = hold_the_lock(output_dir)
    try:
        with pytest.raises(OutputDirLockedError, match=rf"being written by another process \(PID {holder.pid} on"):
            start_run(output_dir, "train", {}, {})
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    output_dir = tmp_path / "run"
    holder = hold_the_lock(output_dir)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level("WARNING", logger="lenvm_rl.run_manifest"):
        run = start_run(output_dir, "train", {}, {})
    assert run.status == "resumed" and f"from PID {holder.pid}" in caplog.text
    run.complete()
    assert (output_dir / LOCK_NAME).read_text() == ""  # released


def test_a_process_retakes_its_own_lock_after_a_failed_start(tmp_path):
    output_dir = tmp_path / "run"
    start_run(output_dir, "train", {}, {})  # raised later in the recipe: never completed nor released
    start_run(output_dir, "train", {}, {}).complete()
    holder = hold_the_lock(output_dir)  # released: another process takes it
    holder.kill()
    holder.wait()
