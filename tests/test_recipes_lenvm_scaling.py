"""recipes/lenvm_scaling.py: whole-prompt subsets, one gamma, resumability, the table and the figure (tiny offline models)."""

import functools
import json
import sys
from pathlib import Path

import pytest
from conftest import make_rollout_records, make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from trl import TrlParser

from lenvm_rl.lenvm_checkpoint import SAVE_IN_PROGRESS_NAME
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import load_rollouts
from lenvm_rl.targets import tokenize_rollouts
from lenvm_rl.trainers.lenvm import LenVMConfig, _gamma_from_lengths

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))

import lenvm_scaling  # noqa: E402
from lenvm_scaling import (  # noqa: E402
    LenVMScalingArguments,
    first_prompts,
    format_table,
    lenvm_is_complete,
    main,
    percentile_gamma,
    plot_scaling,
    write_subset,
)

# Longer completions for odd prompts: the prompt carries some of the length.
make_records = functools.partial(
    make_rollout_records, prefix="p", max_prompt_tokens=7, odd_prompt_extra=4, generator_model="tiny-policy"
)


def write_rollouts(directory: Path, records, chunk_size):
    """The sampler's layout: one shard, `chunk_size` records per chunk file, and rollouts_config.json."""
    shard = directory / "shard-00000-of-00001"
    shard.mkdir(parents=True)
    for i in range(0, len(records), chunk_size):
        lines = "".join(json.dumps(r) + "\n" for r in records[i : i + chunk_size])
        (shard / f"chunk-{i // chunk_size:06d}.jsonl").write_text(lines)
    (directory / "rollouts_config.json").write_text(json.dumps({"generator_model": "tiny-policy", "seed": 0}))
    return directory


# ---------------------------------------------------------------- pure parts
def test_first_prompts_takes_whole_prompts_in_sampling_order():
    ids = ["b", "b", "a", "a", "c", "c", "c"]
    assert first_prompts(ids, 2) == [0, 1]
    assert first_prompts(ids, 4) == [0, 1, 2, 3]
    assert first_prompts(ids, 7) == list(range(7))
    # Records of one prompt need not be adjacent (two shards interleave them): they still travel together.
    assert first_prompts(["a", "b", "a", "b"], 2) == [0, 2]
    with pytest.raises(ValueError, match="prompt boundary: whole prompts give 4 or 7"):
        first_prompts(ids, 5)
    with pytest.raises(ValueError, match="Only 7 training completions \\(3 prompts\\)"):
        first_prompts(ids, 8)


def test_percentile_gamma_is_the_trainers_rule(tmp_path):
    records = make_records(num_prompts=6, per_prompt=4, seed=3, max_new_tokens=40, cut_every=5)
    dataset = Dataset.from_list(records)
    for percentile in (99.0, 90.0, 50.0):
        config = LenVMConfig(output_dir=str(tmp_path), gamma_percentile=percentile, use_cpu=True, report_to="none")
        expected = _gamma_from_lengths(tokenize_rollouts(dataset), config)
        gamma = percentile_gamma(
            [len(r["completion_ids"]) for r in records],
            [r["finish_reason"] == "stop" for r in records],
            percentile,
            0.99,
        )
        assert gamma == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="no finished completion"):
        percentile_gamma([5, 6], [False, False], 99.0, 0.99)


def test_write_subset_is_a_loadable_rollout_directory(tmp_path):
    source = write_rollouts(tmp_path / "train", make_records(4, 3), chunk_size=6)
    dataset = load_rollouts(source)
    subset = dataset.select(first_prompts(dataset["prompt_id"], 6)).to_list()
    target = write_subset(subset, source, tmp_path / "subset")
    loaded = load_rollouts(target)
    assert loaded.to_list() == subset and sorted(set(loaded["prompt_id"])) == ["p-0", "p-1"]
    assert json.loads((target / "rollouts_config.json").read_text())["generator_model"] == "tiny-policy"
    before = (target / "shard-00000-of-00001" / "chunk-000000.jsonl").read_bytes()
    write_subset(subset, source, target)  # a resumed run rewrites the same bytes
    assert (target / "shard-00000-of-00001" / "chunk-000000.jsonl").read_bytes() == before


def test_lenvm_is_complete(tmp_path):
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=0), gamma=0.9)
    assert not lenvm_is_complete(tmp_path / "lenvm")
    lenvm.save_pretrained(tmp_path / "lenvm")
    assert lenvm_is_complete(tmp_path / "lenvm")
    (tmp_path / "lenvm" / SAVE_IN_PROGRESS_NAME).write_text("")
    assert not lenvm_is_complete(tmp_path / "lenvm")


def test_arguments_from_yaml_and_validation(tmp_path):
    config = tmp_path / "scaling.yaml"
    config.write_text("lenvm_config: a.yaml\neval_config: b.yaml\noutput_dir: out\nnum_completions: [512, 256]\n")
    (args,) = TrlParser(LenVMScalingArguments).parse_args_and_config(["--config", str(config)])
    assert args.num_completions == [256, 512] and args.gamma is None and not args.eval_bf16 and args.keep_models
    (args,) = TrlParser(LenVMScalingArguments).parse_args_and_config(
        ["--lenvm_config", "a", "--eval_config", "b", "--output_dir", "o", "--num_completions", "8", "4"]
    )
    assert args.num_completions == [4, 8]
    for bad in ([], [0, 4], [4, 4]):
        with pytest.raises(ValueError, match="--num_completions"):
            LenVMScalingArguments(lenvm_config="a", eval_config="b", output_dir="o", num_completions=bad)
    with pytest.raises(ValueError, match="--gamma"):
        LenVMScalingArguments(lenvm_config="a", eval_config="b", output_dir="o", gamma=1.0)


def result_of(rows):
    return {"gamma": 0.98, "rows": rows, "pending": []}


def row(n, lenvm, value_mse):
    errors = {"0%": 0.4, "25%": 0.2, "50%": None, "75%": 0.3}
    return {
        "num_completions": n,
        "num_prompts": n // 8,
        "prompt_mre": {
            "lenvm": lenvm,
            "constant": 0.3,
            "prompt_length_regression": 0.28,
            "linear_prompt_length": None,
        },
        "value_mse": value_mse,
        "relative_length_error": errors,
        "relative_length_error_remaining_baseline": {"0%": 0.5, "25%": 0.4, "50%": 0.45, "75%": 0.6},
    }


def test_table_and_plot_render_missing_numbers(tmp_path):
    result = result_of([row(256, 0.25, 0.05), row(512, 0.2, None)])
    table = format_table(result)
    assert table.splitlines()[2].startswith("| 256 | 32 | 25.0% | 30.0% | 28.0% | n/a | 0.0500 | 20.0% / n/a / 30.0%")
    assert "(40.0% / 45.0% / 60.0%)" in table and "| 512 | 64 | 20.0% |" in table
    assert "| 256 | n/a | n/a | n/a |" in table  # rows without intervals (older scaling.json) still render
    interval = {"mean": -0.05, "ci_low": -0.09, "ci_high": -0.01}
    result["rows"][1]["prompt_mre_intervals"] = {"mre": {}, "lenvm_minus": {"constant": interval}}
    assert "| 512 | -5.0% [-9.0%, -1.0%] | n/a | n/a |" in format_table(result)
    plot_scaling(result, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0


# ---------------------------------------------------------------- the recipe on a tiny model
@pytest.fixture
def tiny_world(tmp_path):
    """A tiny policy, 6 training prompts x 3 completions (two chunk files), 3 held-out prompts x 3, two configs."""
    tokenizer = make_tiny_tokenizer()
    make_tiny_causal_lm("llama", seed=0).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    vocab = len(tokenizer)
    train = write_rollouts(tmp_path / "train", make_records(6, 3, seed=1, vocab=vocab, cut_every=7), chunk_size=9)
    held_out = write_rollouts(tmp_path / "eval", make_records(3, 3, seed=2, vocab=vocab, prefix="t"), chunk_size=9)
    lenvm_config = tmp_path / "lenvm.yaml"
    lenvm_config.write_text(
        f"model_name_or_path: {tmp_path / 'policy'}\ntrain_rollouts: {train}\ngamma: null\ngamma_percentile: 90\n"
        "max_prompt_length: 16\nmax_length: 64\npadding_free: true\ntrainable_layers: 1\noutput_dir: unused\nlearning_rate: 1.0e-3\n"
        "num_train_epochs: 1\nper_device_train_batch_size: 4\nsave_strategy: 'no'\nreport_to: none\nuse_cpu: true\n"
        "disable_tqdm: true\nseed: 0\n"
    )
    eval_config = tmp_path / "eval.yaml"
    eval_config.write_text(f"lenvm_path: unused\neval_rollouts: {held_out}\noutput_dir: unused\nbatch_size: 4\n")
    return tmp_path, lenvm_config, eval_config


def test_scaling_recipe_end_to_end_and_resumes(tiny_world, monkeypatch, capsys):
    root, lenvm_config, eval_config = tiny_world
    out = root / "scaling"
    args = LenVMScalingArguments(
        lenvm_config=str(lenvm_config), eval_config=str(eval_config), output_dir=str(out), num_completions=[18, 6]
    )
    result = main(args)

    # One gamma, the percentile rule (90th, from the config) on the largest subset = every training record.
    records = load_rollouts(root / "train")
    expected_gamma = percentile_gamma(
        [len(ids) for ids in records["completion_ids"]], [r == "stop" for r in records["finish_reason"]], 90.0, 0.99
    )
    assert result["gamma"] == pytest.approx(expected_gamma) and result["pending"] == []
    assert [r["num_completions"] for r in result["rows"]] == [6, 18]
    assert [r["num_prompts"] for r in result["rows"]] == [2, 6]
    for r in result["rows"]:
        assert r["gamma"] == pytest.approx(expected_gamma)
        assert set(r["prompt_mre"]) == set(lenvm_scaling.MRE_KEYS)
        assert r["num_eval_prompts"] == 3 and r["train"]["global_steps"] >= 1
        # The intervals are those of the subset's own evaluation: the same MREs, paired differences with each baseline.
        intervals = r["prompt_mre_intervals"]
        for key, value in r["prompt_mre"].items():
            if value is not None:
                assert intervals["mre"][key]["mean"] == pytest.approx(value)
        for key in ("constant", "prompt_length_regression"):
            difference = intervals["lenvm_minus"][key]
            assert difference["mean"] == pytest.approx(r["prompt_mre"]["lenvm"] - r["prompt_mre"][key])
            assert difference["ci_low"] <= difference["mean"] <= difference["ci_high"]
    # The small subset is the first two prompts, and its baselines were fitted on it alone.
    assert sorted(set(load_rollouts(out / "n6" / "rollouts")["prompt_id"])) == ["p-0", "p-1"]
    finished_6 = sum(r["finish_reason"] == "stop" for r in records.select(range(6)))
    assert result["rows"][0]["num_train_finished"] == finished_6
    assert LengthValueModel.from_pretrained(out / "n6" / "lenvm").generator_model == "tiny-policy"
    saved = json.loads((out / "scaling.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (out / "scaling.png").stat().st_size > 0
    assert format_table(result) in capsys.readouterr().out

    # A second run trains and evaluates nothing.
    def refuse(*_, **__):
        raise AssertionError("a finished subset ran again")

    monkeypatch.setattr(lenvm_scaling, "_train", refuse)
    monkeypatch.setattr(lenvm_scaling, "_evaluate", refuse)
    assert main(args)["rows"] == result["rows"]
    # Without its evaluation, a subset with a complete LenVM is evaluated again but not retrained.
    (out / "n18" / "eval_length_prediction.json").unlink()
    evaluated = []
    monkeypatch.setattr(lenvm_scaling, "_evaluate", lambda *a: evaluated.append(a[3]) or {"wall_seconds": 0})
    partial = main(args)
    assert evaluated == [out / "n18"] and partial["pending"] == [18]
    # collect_only summarises what exists without loading anything.
    monkeypatch.setattr(lenvm_scaling, "load_rollouts", refuse)
    only = main(LenVMScalingArguments(**{**vars(args), "collect_only": True}))
    assert [r["num_completions"] for r in only["rows"]] == [6] and only["gamma"] == pytest.approx(expected_gamma)
    monkeypatch.undo()

    # A finished subset is never reused under another gamma, other training records or another config ...
    with pytest.raises(ValueError, match="other gamma than this run"):
        main(LenVMScalingArguments(**{**vars(args), "num_completions": [6], "gamma": 0.5}))
    lenvm_text = lenvm_config.read_text()
    lenvm_config.write_text(lenvm_text + "learning_rate: 0.5\n")
    same = {**vars(args), "num_completions": [6], "gamma": expected_gamma}
    with pytest.raises(ValueError, match="other lenvm_config_sha256 than"):
        main(LenVMScalingArguments(**same))
    lenvm_config.write_text(lenvm_text + "# a comment changes nothing\n")
    assert main(LenVMScalingArguments(**same))["rows"][0] == result["rows"][0]
    # ... nor without the record of what it was trained on.
    summary = json.loads((out / "n6" / "train_summary.json").read_text())
    del summary["identity"]
    (out / "n6" / "train_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="without the record of what they were trained on"):
        main(LenVMScalingArguments(**same))


def test_subsets_of_two_gammas_are_not_one_curve(tmp_path):
    for n, gamma in ((6, 0.9), (18, 0.95)):
        (tmp_path / f"n{n}").mkdir()
        evaluation = {
            "gamma": gamma,
            "prompt_mre": {"lenvm": 0.3},
            "per_prompt": {"true_length": [10.0], "predicted_length": [12.0]},
            "value_mse": 0.1,
            "relative_length_error": {},
            "relative_length_error_remaining_baseline": {},
            "mean_true_length": 10.0,
            "mean_predicted_length": 12.0,
            "num_prompts": 1,
            "num_completions": 1,
        }
        (tmp_path / f"n{n}" / "eval_length_prediction.json").write_text(json.dumps(evaluation))
    args = LenVMScalingArguments(
        lenvm_config="l.yaml", eval_config="e.yaml", output_dir=str(tmp_path), num_completions=[6, 18]
    )
    with pytest.raises(ValueError, match="different gammas"):
        lenvm_scaling.collect(args, None)


def test_impossible_sizes_fail_before_training(tiny_world, monkeypatch):
    root, lenvm_config, eval_config = tiny_world
    monkeypatch.setattr(lenvm_scaling, "_train", lambda *a: pytest.fail("trained before checking the sizes"))
    for sizes, message in (([6, 7], "prompt boundary"), ([6, 21], "Only 18 training completions")):
        args = LenVMScalingArguments(
            lenvm_config=str(lenvm_config),
            eval_config=str(eval_config),
            output_dir=str(root / "o"),
            num_completions=sizes,
        )
        with pytest.raises(ValueError, match=message):
            main(args)
