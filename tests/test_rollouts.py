"""Rollout sampling: records, sharding across processes, atomic chunks and resuming, and the recipe."""

import json
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset

from lenvm_rl.rollouts import SamplingConfig, load_rollouts, sample_rollouts

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))


@pytest.fixture(scope="module")
def policy():
    return make_tiny_causal_lm("llama", seed=5), make_tiny_tokenizer()


def prompts(num=5):
    return Dataset.from_list(
        [
            {"prompt_id": f"p{i}", "prompt": [{"role": "user", "content": f"how many apples ? {i}"}], "answer": str(i)}
            for i in range(num)
        ]
    )


SAMPLING = SamplingConfig(num_samples=3, max_new_tokens=6, seed=1, generator_model="tiny")


def read_chunks(path):
    return {f.relative_to(path): f.read_text() for f in sorted(Path(path).glob("shard-*/chunk-*.jsonl"))}


def test_records_have_every_field(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(), tmp_path, SAMPLING, batch_size=4, chunk_size=2)
    records = load_rollouts(tmp_path)
    assert len(records) == 5 * 3
    for record in records:
        assert record["length"] == len(record["completion_ids"]) >= 1
        ends_with_eos = record["completion_ids"][-1] == tokenizer.eos_token_id
        assert record["finish_reason"] == ("stop" if ends_with_eos else "length")
        if record["finish_reason"] == "length":
            assert record["length"] == SAMPLING.max_new_tokens
        assert record["prompt_ids"] == list(
            tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)["input_ids"]
        )
        assert record["answer"] == record["prompt_id"][1:]  # dataset columns travel with the record
        assert record["generator_model"] == "tiny" and record["temperature"] == 1.0
    per_prompt = {}
    for record in records:
        per_prompt.setdefault(record["prompt_id"], set()).add(record["sample_index"])
    assert per_prompt == {f"p{i}": {0, 1, 2} for i in range(5)}
    assert json.loads((tmp_path / "rollouts_config.json").read_text())["num_samples"] == 3


def test_resume_after_interruption_gives_the_same_records(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(), tmp_path, SAMPLING, batch_size=4, chunk_size=2)
    complete = read_chunks(tmp_path)
    assert len(complete) == 3  # chunks of 2, 2 and 1 prompts
    # An interrupted run: the last two chunks never made it to disk, a temp file of the one in flight remains.
    shard = next(tmp_path.glob("shard-*"))
    (shard / "chunk-000001.jsonl").unlink()
    (shard / "chunk-000002.jsonl").unlink()
    (shard / ".chunk-000001.jsonl.partial").write_text('{"truncated')
    assert len(load_rollouts(tmp_path)) == 2 * 3  # the temp file is never read
    sample_rollouts(model, tokenizer, prompts(), tmp_path, SAMPLING, batch_size=4, chunk_size=2)
    assert read_chunks(tmp_path) == complete


def test_resume_with_other_sampling_parameters_is_refused(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(2), tmp_path, SAMPLING, batch_size=4)
    other = SamplingConfig(**{**SAMPLING.__dict__, "temperature": 0.7})
    with pytest.raises(ValueError, match="temperature"):
        sample_rollouts(model, tokenizer, prompts(2), tmp_path, other, batch_size=4)


def test_processes_write_disjoint_shards(tmp_path, policy):
    model, tokenizer = policy
    for rank in range(2):
        sample_rollouts(
            model, tokenizer, prompts(), tmp_path, SAMPLING, batch_size=4, process_index=rank, num_processes=2
        )
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    records = load_rollouts(tmp_path)
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 15


def test_missing_columns_are_a_clear_error(tmp_path, policy):
    model, tokenizer = policy
    with pytest.raises(ValueError, match="prompt_id"):
        sample_rollouts(model, tokenizer, Dataset.from_list([{"prompt": "x"}]), tmp_path, SAMPLING)


def test_sample_rollouts_recipe(tmp_path, policy):
    from sample_rollouts import SampleRolloutsArguments, main

    model, tokenizer = policy
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": f"how many apples ? {i}", "answer": f"he has {i} . #### {i}"} for i in range(4)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = SampleRolloutsArguments(
        model_name_or_path=str(tmp_path / "policy"),
        output_dir=str(tmp_path / "rollouts"),
        dataset_name=str(data),
        instruction=None,
        num_prompts=3,
        num_samples=2,
        max_new_tokens=5,
    )
    main(args)
    records = load_rollouts(tmp_path / "rollouts")
    assert len(records) == 6
    assert records[0]["prompt"] == [{"role": "user", "content": "how many apples ? 0"}]
    assert sorted(set(records["prompt_id"])) == ["train-0", "train-1", "train-2"]

    # Finished: a re-run samples nothing; another prompt count is another run.
    chunks = {p: p.stat().st_mtime_ns for p in (tmp_path / "rollouts").glob("shard-*/chunk-*.jsonl")}
    main(args)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "rollouts").glob("shard-*/chunk-*.jsonl")} == chunks
    args.num_prompts = 4
    with pytest.raises(ValueError, match="script_args.num_prompts: 3 -> 4"):
        main(args)


# ---------------------------------------------------------------------------------------------- resumes that would
# lose or duplicate records are refused


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(chunk_size=3), "chunk_size"),
        (dict(prompts=prompts(7)), "num_prompts"),
        (dict(prompts=prompts(5).map(lambda row: {"prompt_id": row["prompt_id"] + "x"})), "prompts_sha256"),
        (dict(num_processes=2), "num_processes"),
    ],
)
def test_resume_that_changes_which_records_exist_is_refused(tmp_path, policy, change, field):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(), tmp_path, SAMPLING, batch_size=4, chunk_size=2)
    before = read_chunks(tmp_path)
    kwargs = {"prompts": prompts(), "batch_size": 4, "chunk_size": 2, **change}
    with pytest.raises(ValueError, match=rf"different {field}.*lose or duplicate records"):
        sample_rollouts(model, tokenizer, kwargs.pop("prompts"), tmp_path, SAMPLING, **kwargs)
    assert read_chunks(tmp_path) == before  # nothing written, nothing lost


def test_resume_with_other_policy_weights_is_refused(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(2), tmp_path, SAMPLING, batch_size=4)
    other = make_tiny_causal_lm("llama", seed=6)
    with pytest.raises(ValueError, match="model_sha256"):
        sample_rollouts(other, tokenizer, prompts(2), tmp_path, SAMPLING, batch_size=4)


def test_broken_chunk_files_are_named(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(4), tmp_path, SAMPLING, batch_size=4, chunk_size=2)
    chunk = next(tmp_path.glob("shard-*/chunk-000001.jsonl"))
    text = chunk.read_text()
    chunk.write_text(text[: len(text) - 20])  # a truncated last line
    with pytest.raises(ValueError, match=r"chunk-000001.jsonl, line 6: not a JSON record"):
        load_rollouts(tmp_path)
    chunk.write_text("")
    with pytest.raises(ValueError, match=r"chunk-000001.jsonl is empty"):
        load_rollouts(tmp_path)


def test_records_of_two_runs_in_one_directory_are_refused(tmp_path, policy):
    model, tokenizer = policy
    sample_rollouts(model, tokenizer, prompts(2), tmp_path / "a", SAMPLING, batch_size=4)
    shard = next((tmp_path / "a").glob("shard-*"))
    copy = shard.parent / "shard-00000-of-00002"
    copy.mkdir()
    (copy / "chunk-000000.jsonl").write_text((shard / "chunk-000000.jsonl").read_text())
    with pytest.raises(ValueError, match=r"also appears in .*mixed"):
        load_rollouts(tmp_path / "a")


def test_rollout_files_follow_the_umask(tmp_path, policy):
    import os
    import stat

    model, tokenizer = policy
    old = os.umask(0o022)
    try:
        sample_rollouts(model, tokenizer, prompts(2), tmp_path, SAMPLING, batch_size=4)
    finally:
        os.umask(old)
    chunk = next(tmp_path.glob("shard-*/chunk-*.jsonl"))
    assert stat.S_IMODE(chunk.stat().st_mode) == 0o644
