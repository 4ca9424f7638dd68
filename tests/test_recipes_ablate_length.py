"""recipes/ablate_length.py: its rows and flags, the run order and resume (with a stand-in recipe), the statistics and
outputs on fake results, the removable-verbosity floor; a real tiny GRPO ablation end to end (slow)."""

import json
import random
import sys
from pathlib import Path

import pytest
from test_recipes_grpo import tiny_world  # noqa: F401  (the fixture of the slow test)
from trl import ModelConfig, TrlParser

from lenvm_rl.configs import GRPOScriptArguments, PPOScriptArguments
from lenvm_rl.demo import build_demo_tokenizer, demo_rows, generate_demo_problems, write_demo_solution
from lenvm_rl.trainers.checkpointing import CHECKPOINT_COMPLETE_NAME
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import ablate_length  # noqa: E402
from ablate_length import (  # noqa: E402
    AblationArguments,
    _command,
    ablation_rows,
    base_lenvm_gamma,
    main,
    pending_runs,
    read_finished_run,
    reference_floor,
)


def ablation_args(**kwargs):
    return AblationArguments(**{"base_config": "x.yaml", "output_dir": "y", **kwargs})


# ---------------------------------------------------------------------- rows


def test_ppo_rows_cover_every_method_and_coefficient():
    rows = ablation_rows(ablation_args(), lenvm_gamma=0.98)
    assert list(rows) == [
        "none",
        *(f"penalty a={a}" for a in ("0.003", "0.01", "0.03")),
        *(f"correct-only penalty a={a}" for a in ("0.003", "0.01", "0.03")),
        *(f"advantage s={s}" for s in ("0.3", "1", "3")),
        "shaping b=1",
        *(f"unpretrained s={s}" for s in ("0.3", "1", "3")),
        *(f"online s={s}" for s in ("0.3", "1", "3")),
    ]
    assert rows["none"] == {"method": "none", "coef": 0.0, "flags": ["--length_mode", "none", "--length_coef", "0"]}
    assert rows["correct-only penalty a=0.01"]["flags"] == [
        "--length_mode", "penalty", "--length_coef", "0.01", "--length_penalty_correct_only", "true"
    ]  # fmt: skip
    assert rows["online s=3"]["flags"] == [
        "--length_mode",
        "advantage",
        "--length_coef",
        "3",
        "--lenvm_update",
        "online",
    ]
    assert rows["unpretrained s=1"] == {
        "method": "unpretrained",
        "coef": 1.0,
        "flags": ["--length_mode", "advantage", "--length_coef", "1", "--lenvm_init", "policy", "--lenvm_update",
                  "online", "--lenvm_gamma", "0.98", "--lenvm_model_name_or_path", "none"],
    }  # fmt: skip


def test_grpo_rows_cover_every_method_and_coefficient():
    rows = ablation_rows(ablation_args(trainer="grpo", penalty_coefs=[0.01], kimi_coefs=[1.0]), lenvm_gamma=0.98)
    assert list(rows) == [
        "grpo",
        "grpo+penalty a=0.01",
        *(f"grpo+correct-only penalty a={a}" for a in ("0.003", "0.01", "0.03")),
        "grpo+kimi c=1",
        *(f"grpo+overlong L={n}" for n in (48, 96, 384)),
        *(f"grpo+lenvm s={s}" for s in ("0.3", "1", "3")),
        *(f"grpo+unpretrained s={s}" for s in ("0.3", "1", "3")),
        *(f"grpo+online s={s}" for s in ("0.3", "1", "3")),
    ]
    assert rows["grpo"]["flags"] == ["--length_coef", "0"]
    assert rows["grpo+kimi c=1"]["flags"] == ["--length_coef", "0", "--kimi_length_coef", "1"]
    assert rows["grpo+overlong L=384"]["flags"] == [
        "--length_coef", "0", "--soft_overlong_max_length", "384", "--soft_overlong_cache", "128"
    ]  # fmt: skip
    assert rows["grpo+correct-only penalty a=0.03"]["flags"][2:] == [
        "--length_penalty_coef", "0.03", "--length_penalty_correct_only", "true"
    ]  # fmt: skip
    assert rows["grpo+unpretrained s=0.3"]["flags"][:2] == ["--length_coef", "0.3"]


def test_methods_select_rows_in_canonical_order():
    rows = ablation_rows(ablation_args(methods=["penalty", "none"], penalty_coefs=[0.1]))
    assert list(rows) == ["none", "penalty a=0.1"]  # no unpretrained rows: no gamma needed
    assert list(ablation_rows(ablation_args(trainer="grpo", methods=["overlong"], overlong_max_lengths=[]))) == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="--trainer"):
        ablation_args(trainer="dpo")
    with pytest.raises(ValueError, match="--seeds"):
        ablation_args(seeds=[])
    with pytest.raises(ValueError, match="--num_parallel"):
        ablation_args(num_parallel=0)
    with pytest.raises(ValueError, match=r"--overlong_max_lengths must be >= 3.*\[2\]"):
        ablation_args(trainer="grpo", overlong_max_lengths=[48, 2])
    with pytest.raises(ValueError, match=r"\['kimi'\] are not ppo methods"):
        ablation_args(methods=["none", "kimi"])
    with pytest.raises(ValueError, match="gamma of the base config's LenVM"):
        ablation_rows(ablation_args(methods=["unpretrained"]), lenvm_gamma=None)


def test_unpretrained_flags_unset_the_base_config_lenvm(tmp_path):
    """The rows' flags on top of a YAML with a LenVM parse into a length critic without pretraining."""
    config = tmp_path / "base.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nlenvm_model_name_or_path: outputs/demo/lenvm\nuse_cpu: true\n")
    for trainer, classes in (
        ("ppo", (PPOScriptArguments, LenVMPPOConfig, ModelConfig)),
        ("grpo", (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig)),
    ):
        rows = ablation_rows(ablation_args(trainer=trainer, methods=["unpretrained"], unpretrained_coefs=[1.0]), 0.98)
        (row,) = rows.values()
        _, training_args, _ = TrlParser(classes).parse_args_and_config(["--config", str(config), *row["flags"]])
        assert training_args.lenvm_model_name_or_path is None
        assert (training_args.lenvm_init, training_args.lenvm_update, training_args.lenvm_gamma) == (
            "policy", "online", 0.98
        )  # fmt: skip


def test_base_lenvm_gamma(tmp_path):
    assert base_lenvm_gamma({"lenvm_gamma": 0.99, "lenvm_model_name_or_path": "anything"}) == 0.99
    (tmp_path / "lenvm").mkdir()
    (tmp_path / "lenvm" / "lenvm_config.json").write_text('{"gamma": 0.98}')
    assert base_lenvm_gamma({"lenvm_model_name_or_path": str(tmp_path / "lenvm")}) == 0.98
    assert base_lenvm_gamma({"lenvm_model_name_or_path": str(tmp_path / "missing")}) is None


# ---------------------------------------------------------------------- runs (a stand-in recipe)

FAKE_RECIPE = """
import json, sys
from pathlib import Path
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
output_dir = Path(flag("--output_dir"))
with open(output_dir.parents[1] / "launches.txt", "a") as file:
    file.write(output_dir.name + "\\n")
if flag("--length_coef") == "0.666":
    print("boom")
    sys.exit(1)
evaluation = {"accuracy": 1.0, "mean_tokens": 5.0, "num_samples": 1, "lengths": [5, 5], "correct": [True, True]}
(output_dir / "results.json").write_text(json.dumps({"start": evaluation, "final": evaluation}))
"""


def test_runs_go_seed_by_seed_resume_and_stop_on_failure(tmp_path, monkeypatch):
    recipe = tmp_path / "fake_recipe.py"
    recipe.write_text(FAKE_RECIPE)
    monkeypatch.setitem(ablate_length.RECIPES, "ppo", recipe)
    monkeypatch.setattr(ablate_length, "POLL_SECONDS", 0.05)
    config = tmp_path / "base.yaml"
    config.write_text("num_eval_problems: 2\n")
    output_dir = tmp_path / "ablation"
    args = AblationArguments(
        base_config=str(config), output_dir=str(output_dir), methods=["none", "penalty"], penalty_coefs=[0.1],
        seeds=[0, 1], num_parallel=1,
    )  # fmt: skip
    result = main(args)
    launches = (output_dir / "launches.txt").read_text().split()
    assert launches == ["none-seed0", "penalty_a0.1-seed0", "none-seed1", "penalty_a0.1-seed1"]
    assert [row["n_seeds"] for row in result["rows"].values()] == [2, 2]

    # Resumed: finished runs are reused; a PPO run that wrote only its start evaluation runs again.
    (output_dir / "runs" / "none-seed1" / "results.json").write_text(
        json.dumps({"start": {"lengths": []}, "final": None})
    )
    assert pending_runs(args, ablation_rows(args)) == [("none", 1)]
    main(args)
    assert (output_dir / "launches.txt").read_text().split() == [*launches, "none-seed1"]

    # A failing run stops the ablation with the end of its log.
    args.penalty_coefs = [0.666]
    with pytest.raises(RuntimeError, match=r"(?s)penalty a=0.666 seed 0 failed \(exit 1\).*boom"):
        main(args)


def test_unfinished_results_count_as_missing(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert read_finished_run(run_dir) is None
    (run_dir / "results.json").write_text(json.dumps({"start": {"accuracy": 1.0}, "final": None}))  # PPO, mid-run
    assert read_finished_run(run_dir) is None
    trimmed = {"accuracy": 1.0, "mean_tokens": 3.0, "truncated_frac": 0.0}  # an older GRPO recipe's evaluations
    (run_dir / "results.json").write_text(json.dumps({"before": trimmed, "after": trimmed}))
    assert read_finished_run(run_dir) is None


# ---------------------------------------------------------------------- statistics and outputs (fake results)


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    """The files of a demo world that the floor reads: 6 held-out problems, build_info.json and a tokenizer."""
    world = tmp_path_factory.mktemp("world")
    problems = generate_demo_problems(6, seed=0)
    (world / "data").mkdir()
    (world / "data" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo_rows(problems, 0)))
    (world / "build_info.json").write_text(json.dumps({"seed": 0}))
    build_demo_tokenizer(row["answer"] for row in demo_rows(problems, 0)).save_pretrained(world / "policy")
    return world, problems


def test_reference_floor_is_the_concise_style(demo_world):
    world, problems = demo_world
    floor = reference_floor(world, {"dataset_name": str(world / "data"), "num_eval_problems": 4})
    # Concise: one line per step `First: a op b = c.` (8 tokens + newline), then `#### N` (2 tokens) and the EOS.
    assert floor["style"] == "concise" and floor["num_problems"] == 4
    assert floor["tokens"] == [9 * problem.num_steps + 3 for problem in problems[:4]]
    assert floor["mean_tokens"] == sum(9 * problem.num_steps + 3 for problem in problems[:4]) / 4
    with pytest.raises(ValueError, match="--world_dir"):
        reference_floor(world, {"dataset_name": "outputs/demo/world/data", "num_eval_problems": 4})


def test_reference_floor_counts_with_the_base_configs_tokenizer(demo_world, tmp_path):
    """A real model fine-tuned on the world (ppo_demo_smollm2.yaml) is scored in its own tokens, not the world's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    world, problems = demo_world
    characters = sorted(
        {c for p in generate_demo_problems(4) for c in p.question}
        | set("0123456789+-*/=.:#\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,'")
    )
    chars = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *characters])}, unk_token="<unk>"))
    chars.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=chars, unk_token="<unk>").save_pretrained(tmp_path / "char_model")
    config = {
        "dataset_name": str(world / "data"),
        "num_eval_problems": 4,
        "model_name_or_path": str(tmp_path / "char_model"),
    }
    floor = reference_floor(world, config)
    concise = [len(write_demo_solution(p, random.Random(0), style="concise")[0]) + 1 for p in problems[:4]]
    assert floor["style"] == "concise" and floor["tokens"] == concise  # characters + the EOS
    assert floor["tokens"] != reference_floor(world, {**config, "model_name_or_path": None})["tokens"]


def test_max_steps_sets_the_updates_of_ppo_and_grpo_runs(tmp_path):
    """PPO ignores max_steps (its updates follow total_episodes), so --max_steps must become total_episodes there."""
    base = tmp_path / "base.yaml"
    base.write_text("per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\n")
    ppo = _command(ablation_args(base_config=str(base), max_steps=100), [], 0, tmp_path / "run")
    assert ppo[ppo.index("--total_episodes") + 1] == "800" and "--max_steps" not in ppo
    grpo = _command(ablation_args(base_config=str(base), max_steps=100, trainer="grpo"), [], 0, tmp_path / "run")
    assert grpo[grpo.index("--max_steps") + 1] == "100" and "--total_episodes" not in grpo


def test_recipe_flags_reach_every_run_after_the_base_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("per_device_train_batch_size: 2\n")
    command = _command(
        ablation_args(base_config=str(base), recipe_flags="--use_vllm false"), ["--x", "1"], 3, tmp_path
    )
    assert command[-2:] == ["--use_vllm", "false"] and command.index("--config") < command.index("--use_vllm")
    assert "--use_vllm" not in _command(ablation_args(base_config=str(base)), [], 3, tmp_path)


def fake_evaluation(num_wrong: int, tokens: int, num_problems: int = 6) -> dict:
    """Two completions per problem; the last `num_wrong` problems are answered wrong, every completion has `tokens`."""
    correct = [problem < num_problems - num_wrong for problem in range(num_problems) for _ in range(2)]
    lengths = [tokens] * (2 * num_problems)
    return {"accuracy": sum(correct) / len(correct), "mean_tokens": float(tokens), "num_problems": num_problems,
            "num_samples": 2, "lengths": lengths, "correct": correct}  # fmt: skip


def write_fake_run(run_dir: Path, num_wrong: int, tokens: int, stop_advantages=None) -> None:
    run_dir.mkdir(parents=True)
    results = {"start": fake_evaluation(1, 40), "final": fake_evaluation(num_wrong, tokens)}
    (run_dir / "results.json").write_text(json.dumps(results))
    if stop_advantages is not None:
        checkpoint = run_dir / "checkpoint-3"
        checkpoint.mkdir()
        history = [
            {
                "step": step,
                "length/stop_token_advantage_mean": stop,
                "length/other_token_advantage_mean": 0.1,
                "length/response_tokens_mean": 40.0 + step,
            }
            for step, stop in enumerate(stop_advantages, start=1)
        ]
        (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 1.0}, *history]}))
        (checkpoint / CHECKPOINT_COMPLETE_NAME).write_text("{}")


def test_collect_statistics_and_outputs_with_missing_runs(demo_world, tmp_path):
    world, problems = demo_world
    config = tmp_path / "base.yaml"
    config.write_text(f"dataset_name: {world / 'data'}\nnum_eval_problems: 6\nlenvm_gamma: 0.98\n")
    output_dir = tmp_path / "ablation"
    args = AblationArguments(
        base_config=str(config), output_dir=str(output_dir), world_dir=str(world), collect_only=True
    )
    runs = output_dir / "runs"
    # The start: 5 of 6 problems right at 40 tokens. Penalty rows trade accuracy for tokens; seed 2 is missing.
    for seed in (0, 1, 2):
        write_fake_run(runs / f"none-seed{seed}", 1, 38, stop_advantages=[0.0, -0.1, -0.2])
    for seed in (0, 1):
        write_fake_run(runs / f"penalty_a0.003-seed{seed}", 1, 34, stop_advantages=[-0.3, -0.5, -0.7])
        write_fake_run(runs / f"penalty_a0.01-seed{seed}", 2, 30)
        write_fake_run(runs / f"penalty_a0.03-seed{seed}", 3, 26)
    write_fake_run(runs / "advantage_s1-seed0", 0, 31)
    result = main(args)

    floor = sum(9 * problem.num_steps + 3 for problem in problems) / 6
    assert result["floor"]["mean_tokens"] == pytest.approx(floor)
    rows = result["rows"]
    assert [rows[name]["n_seeds"] for name in ("none", "penalty a=0.01", "advantage s=1", "online s=1")] == [
        3,
        2,
        1,
        0,
    ]
    assert rows["online s=1"]["statistics"] is None
    none = rows["none"]["statistics"]
    assert none["accuracy"]["mean"] == pytest.approx(5 / 6) and none["mean_tokens"]["mean"] == 38.0
    assert none["tokens_vs_start"]["mean"] == pytest.approx(38 / 40 - 1)
    assert none["removable_share"]["mean"] == pytest.approx((40 - 38) / (40 - floor))
    assert result["start"]["seeds"] == [0, 1, 2] and result["start"]["mean_tokens"]["mean"] == 40.0

    # Matched accuracy 5/6 - 0.02: the penalty frontier crosses it between (30 tokens, 4/6) and (34 tokens, 5/6).
    target = 5 / 6 - 0.02
    assert result["matched_accuracy"] == pytest.approx(target)
    penalty = result["methods"]["penalty"]
    assert penalty["rows"] == ["none", "penalty a=0.003", "penalty a=0.01", "penalty a=0.03"]
    assert penalty["matched"]["reached"]
    assert penalty["matched"]["tokens"] == pytest.approx(30 + (target - 4 / 6) * (34 - 30) / (5 / 6 - 4 / 6))
    advantage = result["methods"]["advantage"]["matched"]  # 31 tokens at accuracy 1: never pushed down to the target
    assert (advantage["reached"], advantage["side"], advantage["bound"]) == (False, "above", 31.0)
    assert result["methods"]["online"] == {"rows": [], "matched": None}  # no run of its own yet

    # The stop-token advantage series of the PPO runs.
    series = rows["penalty a=0.003"]["runs"][0]["advantage_series"]
    assert series == {
        "steps": [1, 2, 3],
        "stop_token_advantage": [-0.3, -0.5, -0.7],
        "other_token_advantage": [0.1] * 3,
        "response_tokens": [41.0, 42.0, 43.0],
    }
    assert rows["penalty a=0.01"]["runs"][0]["advantage_series"] == {}  # no checkpoint

    written = json.loads((output_dir / "ablation.json").read_text())
    assert written["rows"].keys() == rows.keys()
    assert "lengths" not in written["rows"]["none"]["runs"][0]["after"]  # the lists stay in each run's results.json
    markdown = (output_dir / "ablation.md").read_text()
    assert "| online s=1 | 0 | not run yet |" in markdown
    assert "| none | 3 | 0.833 [" in markdown and "removable verbosity removed" in markdown
    assert "not reached (accuracy above it down to 31.0 tokens)" in markdown
    assert "| penalty a=0.003 | -0.5000 | +0.1000 |" in markdown
    for name in ("ablation.png", "stop_advantage.png"):
        assert (output_dir / name).stat().st_size > 0


def test_grpo_row_with_a_length_critic_that_ran_plain_grpo_is_refused(tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("num_eval_problems: 6\nlenvm_gamma: 0.98\n")
    output_dir = tmp_path / "ablation"
    args = AblationArguments(
        base_config=str(config), output_dir=str(output_dir), trainer="grpo", methods=["unpretrained"],
        unpretrained_coefs=[1.0], collect_only=True,
    )  # fmt: skip
    run_dir = output_dir / "runs" / "grpo_unpretrained_s1-seed0"
    run_dir.mkdir(parents=True)
    evaluation = fake_evaluation(0, 30)
    results = {"before": evaluation, "after": evaluation, "trainer": "CheckpointedGRPOTrainer"}
    (run_dir / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="not LenVMGRPOTrainer"):
        main(args)


# ---------------------------------------------------------------------- a real ablation


@pytest.mark.slow
def test_grpo_ablation_end_to_end(tiny_world, tmp_path):  # noqa: F811
    config = tmp_path / "grpo_tiny.yaml"
    config.write_text(
        f"""
model_name_or_path: {tiny_world / "policy"}
dataset_name: {tiny_world / "data"}
instruction: null
num_eval_problems: 4
lenvm_model_name_or_path: {tiny_world / "lenvm"}
length_coef: 0.5
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 6
max_steps: 1
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
"""
    )
    args = AblationArguments(
        base_config=str(config), output_dir=str(tmp_path / "ablation"), trainer="grpo", seeds=[0],
        methods=["grpo", "advantage"], advantage_coefs=[0.5],
    )  # fmt: skip
    result = main(args)
    assert [row["n_seeds"] for row in result["rows"].values()] == [1, 1]
    for row in result["rows"].values():
        (run,) = row["runs"]
        assert 0.0 <= run["after"]["accuracy"] <= 1.0 and run["after"]["mean_tokens"] > 0
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 0
