"""recipes/ppo_gsm8k.py end to end on tiny offline models: in process (full and LoRA, resume) and under
`accelerate launch` with 2 processes (DDP and DeepSpeed ZeRO-3, gloo on CPU)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LoadingThePolicy, make_tiny_causal_lm, make_tiny_tokenizer, prompt_check_setup
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification
from trl import ModelConfig, TrlParser

from lenvm_rl.evaluation import evaluate_gsm8k
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import ppo_gsm8k  # noqa: E402
from ppo_gsm8k import PPOScriptArguments, main  # noqa: E402

CONFIGS = [ROOT / "recipes" / "configs" / "demo.yaml", *sorted((ROOT / "recipes" / "configs").glob("ppo_*.yaml"))]
EVAL_KEYS = {"accuracy", "mean_tokens", "median_tokens", "p90_tokens", "p99_tokens", "fraction_truncated"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_configs_train_a_lenvm_ppo_policy(path):
    parser = TrlParser((PPOScriptArguments, LenVMPPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "true"])
    assert training_args.lenvm_model_name_or_path and training_args.length_mode == "advantage"
    assert training_args.length_coef > 0 and script_args.num_eval_problems > 0
    if "qwen2.5" in path.name:
        assert training_args.lenvm_gamma == 0.997 and training_args.bf16
        assert model_args.use_peft == path.name.endswith("_lora.yaml")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A policy, a LenVM, a critic checkpoint and GSM8K-format train/test files, all tiny and offline."""
    root = tmp_path_factory.mktemp("ppo_world")
    tokenizer = make_tiny_tokenizer()
    policy = make_tiny_causal_lm("llama")
    policy.generation_config.eos_token_id = 1
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=7), gamma=0.9).save_pretrained(
        root / "lenvm", tokenizer=tokenizer
    )
    torch.manual_seed(3)
    critic_config = make_tiny_causal_lm("llama", seed=3).config
    critic_config.num_labels = 1
    critic = AutoModelForSequenceClassification.from_config(critic_config)
    critic.save_pretrained(root / "critic")
    for split, numbers in (("train", range(1, 9)), ("test", range(20, 24))):
        rows = [{"question": f"what is {i} + {i} ?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in numbers]
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def write_config(path, world, output_dir, **overrides):
    """A tiny run: 2 updates of 4 rollouts on one process, 6 response tokens, 4 held-out problems."""
    config = {
        "model_name_or_path": str(world / "policy"),
        "dataset_name": str(world / "data"),
        "instruction": None,
        "num_eval_problems": 4,
        "eval_batch_size": 4,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "total_episodes": 8,
        "response_length": 6,
        "num_ppo_epochs": 2,
        "learning_rate": 1.0e-2,
        "lr_scheduler_type": "constant",  # the resume test extends the run by one update
        "local_rollout_forward_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "disable_tqdm": True,
        "seed": 0,
        "lenvm_model_name_or_path": str(world / "lenvm"),
        "length_mode": "advantage",
        "length_coef": 0.5,
        **overrides,
    }
    config = {key: value for key, value in config.items() if value != "<unset>"}
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))  # JSON is YAML
    return path


def parse(config_path):
    parser = TrlParser((PPOScriptArguments, LenVMPPOConfig, ModelConfig))
    return parser.parse_args_and_config(["--config", str(config_path)])


def policy_weights(path):
    return load_file(Path(path) / "model.safetensors")


@pytest.fixture(scope="module")
def full_run(tiny_world, tmp_path_factory):
    """One in-process run, logged to TensorBoard; returns its output directory and main()'s return value."""
    tmp_path = tmp_path_factory.mktemp("ppo_full")
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo_tiny.yaml", tiny_world, output_dir, report_to="tensorboard")
    return output_dir, main(*parse(config))


def test_main_trains_saves_and_writes_results(tiny_world, full_run):
    output_dir, results = full_run
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(json.dumps(results, default=str))
    assert set(results) == {"start", "final", "eval_settings", "train", "config"}
    for stage in ("start", "final"):
        assert EVAL_KEYS <= set(results[stage])
        assert results[stage]["num_problems"] == 4 and len(results[stage]["lengths"]) == 4
        assert 1 <= results[stage]["mean_tokens"] <= 6 and 0 <= results[stage]["accuracy"] <= 1
    train = results["train"]
    assert train["global_step"] == 2 and train["episodes"] == 8 and train["num_processes"] == 1
    assert train["resumed_from_checkpoint"] is None
    assert {"objective/scores", "length/coef", "rewards/gsm8k_accuracy_reward/mean"} <= set(train["last_log"])
    assert results["config"]["training_args"]["length_coef"] == 0.5
    assert results["config"]["model_args"]["model_name_or_path"] == str(tiny_world / "policy")

    start, final = policy_weights(tiny_world / "policy"), policy_weights(output_dir)
    assert start.keys() == final.keys()
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the policy trained
    assert (output_dir / "value_model" / "model.safetensors").is_file()  # the critic is saved ...
    assert not list(output_dir.rglob("value_head.safetensors"))  # ... the LenVM never is
    assert (output_dir / "checkpoint-2").is_dir()
    assert list((output_dir / "runs").rglob("events.out.tfevents.*"))  # report_to: tensorboard


def test_restart_resumes_from_the_last_checkpoint_and_reuses_the_start_evaluation(
    tiny_world, full_run, tmp_path, monkeypatch
):
    first_dir, first = full_run
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo_tiny.yaml", tiny_world, output_dir)
    real_save_checkpoint = LenVMPPOTrainer._save_checkpoint

    def crash_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed before checkpoint-2")
        return real_save_checkpoint(self, model, trial)

    monkeypatch.setattr(LenVMPPOTrainer, "_save_checkpoint", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        main(*parse(config))
    monkeypatch.setattr(LenVMPPOTrainer, "_save_checkpoint", real_save_checkpoint)
    assert json.loads((output_dir / "run_manifest.json").read_text())["runs"]["ppo_gsm8k"]["state"] == "running"

    calls = []
    evaluate = ppo_gsm8k.evaluate_gsm8k

    def counting_evaluate(*args, **kwargs):
        calls.append(1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(ppo_gsm8k, "evaluate_gsm8k", counting_evaluate)
    results = main(*parse(config))
    assert len(calls) == 1  # the final policy only: the start evaluation came from results.json
    assert results["start"] == first["start"]
    assert results["train"]["resumed_from_checkpoint"] == str(output_dir / "checkpoint-1")
    assert results["train"]["global_step"] == 2
    resumed, uninterrupted = policy_weights(output_dir), policy_weights(first_dir)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # the same run, bit for bit


def test_finished_run_with_new_flags_is_a_no_op(tiny_world, full_run, tmp_path, monkeypatch, caplog):
    """Re-running a finished run (even with other flags, which are refused) neither trains nor evaluates again."""
    first_dir, first = full_run
    output_dir = tmp_path / "run"
    shutil.copytree(first_dir, output_dir)
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file() and p.name != ".run.lock"}
    monkeypatch.setattr(ppo_gsm8k, "evaluate_gsm8k", None)  # any evaluation would fail
    with caplog.at_level("WARNING", logger="lenvm_rl.run_manifest"):
        results = main(*parse(write_config(tmp_path / "same.yaml", tiny_world, output_dir, report_to="tensorboard")))
    assert "already holds this complete run" in caplog.text and "--reevaluate" in caplog.text
    assert results == json.loads((first_dir / "results.json").read_text())
    assert {p: p.read_bytes() for p in before} == before  # nothing written

    # --reevaluate evaluates the saved policy again: the same numbers, the training record kept.
    monkeypatch.setattr(ppo_gsm8k, "evaluate_gsm8k", evaluate_gsm8k)
    again = main(*parse(write_config(tmp_path / "again.yaml", tiny_world, output_dir, reevaluate=True)))
    assert again["final"] == first["final"] and again["start"] == first["start"] and again["train"] == first["train"]
    assert policy_weights(output_dir).keys() == policy_weights(first_dir).keys()

    (output_dir / "results.json").write_text((output_dir / "results.json").read_text()[:40])  # truncated
    with pytest.raises(ValueError, match=rf"{output_dir / 'results.json'} is not valid JSON \(truncated"):
        main(*parse(write_config(tmp_path / "same.yaml", tiny_world, output_dir)))
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file() and p.name != ".run.lock"}

    changed = write_config(tmp_path / "new.yaml", tiny_world, output_dir, length_coef=0.0, learning_rate=0.1)
    with pytest.raises(ValueError) as error:
        main(*parse(changed))
    message = str(error.value)
    assert "training_args.length_coef: 0.5 -> 0.0" in message and "training_args.learning_rate: 0.01 -> 0.1" in message
    assert "--output_dir" in message and "--overwrite_output_dir" in message
    assert {p: p.read_bytes() for p in before} == before


def test_changed_config_or_inputs_are_refused_and_overwrite_moves_the_run_aside(tiny_world, full_run, tmp_path):
    first_dir, _ = full_run
    output_dir = tmp_path / "run"
    shutil.copytree(first_dir, output_dir)
    other_lenvm = tmp_path / "lenvm2"  # another LenVM: the same files but for the value head
    shutil.copytree(tiny_world / "lenvm", other_lenvm)
    with safe_open(tiny_world / "lenvm" / "value_head.safetensors", framework="pt") as handle:
        head = {key: handle.get_tensor(key) + 1.0 for key in handle.keys()}
    save_file(head, other_lenvm / "value_head.safetensors", metadata={"format": "pt"})
    config = write_config(tmp_path / "ppo.yaml", tiny_world, output_dir, eval_temperature=0.5,
                          lenvm_model_name_or_path=str(other_lenvm))  # fmt: skip
    with pytest.raises(ValueError) as error:
        main(*parse(config))
    message = str(error.value)
    assert "script_args.eval_temperature: null -> 0.5" in message
    assert (
        f"inputs.lenvm_model_name_or_path: {tiny_world / 'lenvm'} -> {other_lenvm}, other files "
        "(value_head.safetensors)" in message
    )

    old_policy = policy_weights(output_dir)
    config = write_config(tmp_path / "ppo.yaml", tiny_world, output_dir, eval_temperature=0.5, num_eval_problems=2,
                          overwrite_output_dir=True)  # fmt: skip
    results = main(*parse(config))
    assert results["eval_settings"]["temperature"] == 0.5 and results["start"]["num_problems"] == 2
    (aside,) = (output_dir / "superseded").iterdir()
    assert aside.name.endswith("-ppo_gsm8k")
    moved = policy_weights(aside)
    assert all(torch.equal(moved[k], v) for k, v in old_policy.items())  # moved, not deleted
    assert json.loads((aside / "results.json").read_text()) == json.loads((first_dir / "results.json").read_text())


def test_lora_with_a_given_critic_and_a_format_reward(tiny_world, tmp_path):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "ppo_tiny.yaml",
        tiny_world,
        output_dir,
        use_peft=True,
        lora_r=2,
        lora_alpha=4,
        lora_target_modules=["q_proj", "v_proj"],
        value_model_name_or_path=str(tiny_world / "critic"),
        format_reward_weight=0.5,
        num_eval_problems=2,
        save_strategy="no",
    )
    script_args, training_args, model_args = parse(config)
    results = main(script_args, training_args, model_args)

    assert training_args.reward_weights == [1.0, 0.5]
    assert "rewards/gsm8k_format_reward/mean" in results["train"]["last_log"]
    assert (output_dir / "adapter_model.safetensors").is_file() and not (output_dir / "model.safetensors").exists()
    assert results["final"]["num_problems"] == 2  # evaluated with the adapter merged into its base
    # The critic started from the given checkpoint (not the policy's backbone with a zero head) and trained.
    given, trained = (
        load_file(tiny_world / "critic" / "model.safetensors"),
        load_file(output_dir / "value_model" / "model.safetensors"),
    )
    assert given.keys() == trained.keys() and not torch.equal(given["score.weight"], trained["score.weight"])
    assert torch.count_nonzero(given["score.weight"]) > 0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(accelerate_config, recipe_config, use_cpu, recipe="ppo_gsm8k.py"):
    """`accelerate launch recipes/<recipe>` on 2 processes. Success = both ranks printed "done" (the recipe leaves
    with `os._exit(0)` after it, shared/docs/distributed_on_cpu.md)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
               accelerate_config), "--main_process_port", str(free_port()), str(ROOT / "recipes" / recipe),
               "--config", str(recipe_config)]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    done = set(re.findall(r"done rank=(\d)", proc.stdout))
    assert done == {"0", "1"}, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


def check_two_process_run(output_dir, distributed_type):
    """Two processes trained together (4 rollouts each, 8 per update) and the main process alone evaluated and wrote
    results.json."""
    results = json.loads((output_dir / "results.json").read_text())
    train = results["train"]
    assert train["num_processes"] == 2 and train["distributed_type"] == distributed_type
    assert train["rollouts_per_update"] == 8 and train["global_step"] == 2
    for stage in ("start", "final"):
        assert EVAL_KEYS <= set(results[stage]) and results[stage]["num_problems"] == 4
    return results


@pytest.mark.distributed
def test_accelerate_launch_ddp(tiny_world, tmp_path):
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo_ddp.yaml", tiny_world, output_dir, total_episodes=16,
                          save_strategy="no")  # fmt: skip
    launch("cpu_ddp.yaml", config, use_cpu=True)
    check_two_process_run(output_dir, "DistributedType.MULTI_CPU")
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "value_model").is_dir()
    # Launched again, both processes read the finished run from its manifest and end without training.
    written = {p: p.stat().st_mtime_ns for p in output_dir.rglob("*") if p.is_file() and p.name != ".run.lock"}
    launch("cpu_ddp.yaml", config, use_cpu=True)
    assert {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.distributed
def test_accelerate_launch_zero3(tiny_world, tmp_path):
    pytest.importorskip("deepspeed")  # in the `dev` extra
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "ppo_zero3.yaml", tiny_world, output_dir, total_episodes=16,
                          save_strategy="no",
                          use_cpu="<unset>", ddp_backend="gloo")  # fmt: skip
    launch("cpu_zero3.yaml", config, use_cpu=False)
    check_two_process_run(output_dir, "DistributedType.DEEPSPEED")
    # The policy was gathered from its ZeRO-3 shards into a whole, loadable checkpoint.
    start, final = policy_weights(tiny_world / "policy"), policy_weights(output_dir)
    assert start.keys() == final.keys() and all(start[k].shape == final[k].shape for k in start)
    assert any(not torch.equal(start[k], final[k]) for k in start)


# ---------------------------------------------------------------------------------------------------------------------
# The prompt-format check


@pytest.mark.parametrize("instruction, warned", [("End.", False), ("Think first.", True), ("null", True)])
def test_main_warns_when_its_prompts_are_not_the_lenvms(tmp_path, monkeypatch, caplog, instruction, warned):
    flags = prompt_check_setup(tmp_path, monkeypatch, ppo_gsm8k)
    parser = TrlParser((PPOScriptArguments, LenVMPPOConfig, ModelConfig))
    with caplog.at_level("WARNING", logger="lenvm_rl.data"), pytest.raises(LoadingThePolicy):
        main(*parser.parse_args_and_config([*flags, f"--instruction={instruction}"]))
    assert ("not built like the LenVM's training prompts" in caplog.text) == warned
    assert ("--instruction (LenVM: 'End.'" in caplog.text) == warned
