"""The TRL-compatible surface of our trainers: half-swapped GRPO scripts, and the members TRL 1.12's PPOTrainer had."""

import json
import logging
import runpy
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_causal_lm, make_tiny_tokenizer
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification
from trl import GRPOConfig

from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.trainers import lenvm_grpo
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer
from lenvm_rl.trainers.ppo import PPOConfig, PPOTrainer
from lenvm_rl.trainers.trl_compat import TRLPPOCompatMixin


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def word_count_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def prompt_dataset(num=4):
    return Dataset.from_list([{"prompt": f"what is {i} + {i} ?"} for i in range(num)])


# ---------------------------------------------------------------------------------------------------------------- GRPO


def test_grpo_trainer_converts_a_plain_grpo_config(tmp_path, tokenizer, caplog):
    """Swapping only the trainer: TRL's config is kept value for value, the length fields take their defaults."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        steps_per_generation=2,  # GRPOConfig fills in generation_batch_size; re-running its checks would refuse both
        max_completion_length=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    with caplog.at_level(logging.WARNING, logger="lenvm_rl"):
        trainer = LenVMGRPOTrainer(
            model=make_tiny_causal_lm("llama"),
            reward_funcs=word_count_reward,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
            lenvm=LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=3), gamma=0.9),
            lenvm_processing_class=tokenizer,
        )
    assert isinstance(trainer.args, LenVMGRPOConfig)
    assert (trainer.args.learning_rate, trainer.args.generation_batch_size) == (1e-2, 8)
    assert (trainer.args.length_coef, trainer.args.lenvm_model_name_or_path, trainer.args.length_lam) == (
        0.0,
        None,
        1.0,
    )
    assert "length fields at their defaults" in caplog.text and "LenVMGRPOConfig" in caplog.text
    trainer.train()
    assert trainer.state.global_step == 1


@dataclass
class CPUConfig(LenVMGRPOConfig):
    use_cpu: bool = True
    bf16: bool = False


def test_grpo_trainer_without_args_uses_trl_default(tmp_path, tokenizer, monkeypatch):
    """`args=None` gives `LenVMGRPOConfig("<model name>-GRPO")`, as GRPOTrainer gives `GRPOConfig(...)`."""
    policy_dir = tmp_path / "tiny-policy"
    make_tiny_causal_lm("llama").save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    monkeypatch.chdir(tmp_path)
    # GRPOConfig's default bf16=True refuses a machine without a bf16 GPU; GRPOTrainer(args=None) fails there too.
    monkeypatch.setattr(lenvm_grpo, "LenVMGRPOConfig", CPUConfig)
    trainer = LenVMGRPOTrainer(
        model=str(policy_dir),
        reward_funcs=word_count_reward,
        train_dataset=prompt_dataset(8),
        lenvm=LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=3), gamma=0.9),
        lenvm_processing_class=tokenizer,
    )
    assert type(trainer.args) is CPUConfig
    assert trainer.args.output_dir == "tiny-policy-GRPO"


def test_grpo_trainer_refuses_a_config_of_another_trainer(tmp_path, tokenizer):
    from transformers import TrainingArguments

    with pytest.raises(
        ValueError, match="Expected a LenVMGRPOConfig .or a GRPOConfig. as `args`, got TrainingArguments"
    ):
        LenVMGRPOTrainer(
            model=make_tiny_causal_lm("llama"),
            reward_funcs=word_count_reward,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------------------------------------- PPO
# TRL <= 1.12's example scripts (tests/scripts/trl_ppo*.py), run in-process on tiny models saved like hub checkpoints.

SCRIPTS = Path(__file__).parent / "scripts"
TRAINER_IMPORT = "from lenvm_rl import PPOConfig, PPOTrainer\n"
LENVM_TRAINER_IMPORT = "from lenvm_rl import LenVMPPOConfig as PPOConfig, LenVMPPOTrainer as PPOTrainer\n"


@pytest.fixture(scope="module")
def trl_world(tmp_path_factory, tokenizer):
    """Saved tiny policy (+ tokenizer), reward classifier, LenVM and the two datasets of TRL's PPO scripts.

    The scripts add a `[PAD]` token to the tokenizer, so the models get a few spare embedding rows (as Pythia has) and
    the LenVM is saved with the padded tokenizer, the one its policy's trainer will check it against.
    """
    root = tmp_path_factory.mktemp("trl_world")
    vocab_size = len(tokenizer) + 8
    make_tiny_causal_lm("llama", vocab_size=vocab_size).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(1)
    reward_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(reward_config).save_pretrained(root / "reward")
    padded = make_tiny_tokenizer()
    padded.add_special_tokens({"pad_token": "[PAD]"})
    lenvm_backbone = make_tiny_causal_lm("llama", vocab_size=vocab_size, seed=5)
    LengthValueModel.from_backbone(lenvm_backbone, gamma=0.9, generator_model="policy").save_pretrained(
        root / "lenvm", tokenizer=padded
    )
    prompts = [f"how many apples has {i} and {i + 1} ?" for i in range(104)]
    write_jsonl(root / "descriptiveness" / "data" / "descriptiveness-00000-of-00001.jsonl", prompts)
    write_jsonl(root / "tldr" / "data" / "train-00000-of-00001.jsonl", prompts[:8])
    write_jsonl(root / "tldr" / "data" / "test-00000-of-00001.jsonl", prompts[8:11])
    return root


def write_jsonl(path, prompts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))


def run_script(path, argv, monkeypatch):
    """`python path *argv` in this process; returns every `generate_completions` call as `(sampling, table)`."""
    calls = []
    original = TRLPPOCompatMixin.generate_completions

    def spy(self, sampling=False):
        table = original(self, sampling)
        calls.append((sampling, table))
        return table

    monkeypatch.setattr(TRLPPOCompatMixin, "generate_completions", spy)
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, argv)])
    runpy.run_path(str(path), run_name="__main__")
    return calls


def ppo_argv(world, output_dir, dataset):
    return [
        "--dataset_name", world / dataset,
        "--output_dir", output_dir,
        "--per_device_train_batch_size", 2,
        "--gradient_accumulation_steps", 2,
        "--total_episodes", 8,
        "--num_ppo_epochs", 1,
        "--response_length", 4,
        "--model_name_or_path", world / "policy",
        "--sft_model_path", world / "policy",
        "--reward_model_path", world / "reward",
        "--missing_eos_penalty", 1.0,
        "--report_to", "none",
    ]  # fmt: skip


@pytest.mark.parametrize("variant", ["ppo", "ppo_peft", "lenvm_ppo"])
def test_trl_ppo_script_runs_with_only_the_import_changed(tmp_path, trl_world, monkeypatch, variant):
    """TRL 1.12's ppo.py: trains, saves the policy, the critic and a model card, prints sample tables (default
    num_sample_generations=10: after every one of the 2 updates) and the final table of the 100-row eval set."""
    script = SCRIPTS / "trl_ppo.py"
    source = script.read_text()
    assert source.count(TRAINER_IMPORT) == 1  # the one line that differs from TRL's file
    argv = ppo_argv(trl_world, tmp_path / "out", "descriptiveness") + ["--dataset_train_split", "descriptiveness"]
    if variant == "ppo_peft":
        argv.append("--use_peft")
    if variant == "lenvm_ppo":
        script = tmp_path / "trl_ppo_lenvm.py"
        script.write_text(source.replace(TRAINER_IMPORT, LENVM_TRAINER_IMPORT))
        argv += ["--lenvm_model_name_or_path", trl_world / "lenvm", "--length_coef", 0.5]

    calls = run_script(script, argv, monkeypatch)

    assert [sampling for sampling, _ in calls] == [True, True, False]
    assert [len(table) for _, table in calls] == [8, 8, 100]
    assert list(calls[-1][1].columns) == ["query", "model response", "score"]
    out = tmp_path / "out"
    weights = "adapter_model.safetensors" if variant == "ppo_peft" else "model.safetensors"
    assert (out / weights).is_file() and (out / "value_model" / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f"`{trl_world / 'policy'}`" in card and "2604.27039" in card and "vonwerra2020trl" in card
    if variant == "lenvm_ppo":
        assert f"| LenVM | `{trl_world / 'lenvm'}` |" in card and "| LenVM gamma | 0.9 |" in card
        assert "| length_mode | advantage |" in card and "| length_coef | 0.5 (constant" in card
    else:
        assert "LenVM gamma" not in card


def test_trl_ppo_tldr_script_runs_with_only_the_import_changed(tmp_path, trl_world, monkeypatch):
    """TRL 1.12's ppo_tldr.py: train/test splits, --eval_strategy steps, --stop_token eos."""
    argv = ppo_argv(trl_world, tmp_path / "out", "tldr") + ["--stop_token", "eos", "--eval_strategy", "steps"]
    calls = run_script(SCRIPTS / "trl_ppo_tldr.py", argv + ["--eval_steps", 100], monkeypatch)
    assert [(sampling, len(table)) for sampling, table in calls] == [(True, 3), (True, 3), (False, 3)]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()


def test_trl_grpo_script_runs_with_the_documented_change(tmp_path, trl_world, monkeypatch):
    """TRL 1.16's grpo.py with its two added imports, a --config YAML with the length fields, and rewards from TRL's
    registry and a dotted path: trains with the LenVM advantage and saves a model with a model card."""
    source = (SCRIPTS / "trl_grpo.py").read_text()
    assert source.count("    from lenvm_rl import LenVMGRPOTrainer as GRPOTrainer\n") == 1
    assert source.count("    from lenvm_rl import LenVMGRPOConfig as GRPOConfig\n") == 1
    policy = tmp_path / "policy"
    model = make_tiny_causal_lm("llama")
    model.generation_config.eos_token_id = [1, *range(10, 50)]  # completions of mixed lengths
    model.save_pretrained(policy)
    make_tiny_tokenizer().save_pretrained(policy)
    lenvm = LengthValueModel.from_backbone(make_tiny_causal_lm("llama", seed=5), gamma=0.9)
    lenvm.save_pretrained(tmp_path / "lenvm", tokenizer=make_tiny_tokenizer())
    rows = [{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(8)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "grpo.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            # Model
            model_name_or_path: {policy}
            # Data
            dataset_name: {tmp_path / "data"}
            reward_funcs: [think_format_reward, lenvm_rl.rewards.gsm8k_format_reward]
            # GRPO
            output_dir: {tmp_path / "out"}
            per_device_train_batch_size: 4
            num_generations: 4
            max_completion_length: 6
            max_steps: 2
            learning_rate: 0.01
            logging_steps: 1
            report_to: none
            use_cpu: true
            bf16: false
            activation_checkpointing: false
            # Length critic
            lenvm_model_name_or_path: {tmp_path / "lenvm"}
            length_coef: 0.5
            """)
    )
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "trl_grpo.py"), "--config", str(config)])
    runpy.run_path(str(SCRIPTS / "trl_grpo.py"), run_name="__main__")

    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and "GRPO" in (out / "README.md").read_text()
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert type(args).__name__ == "LenVMGRPOConfig" and args.length_coef == 0.5
    log = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert log[0]["length/coef"] == 0.5 and "length/predicted_tokens_mean" in log[0]  # the LenVM ran


# ------------------------------------------------------------------------------------------- PPO surface, unit by unit


def make_ppo_trainer(tmp_path, tokenizer, eval_dataset=None, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "ppo"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        response_length=4,
        num_ppo_epochs=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    args = PPOConfig(**{**defaults, **kwargs})
    reward_model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_labels=1,
            pad_token_id=0,
        )
    )
    return PPOTrainer(
        args,
        tokenizer,
        make_tiny_causal_lm("llama"),
        reward_model=reward_model,
        train_dataset=prompt_dataset(8),
        eval_dataset=eval_dataset,
        reward_funcs=[word_count_reward],
    )


def test_ppo_trainer_exposes_trl_1_12_attributes(tmp_path, tokenizer):
    trainer = make_ppo_trainer(tmp_path, tokenizer, total_episodes=12, num_mini_batches=2, num_sample_generations=2)
    args = trainer.args
    assert (args.local_batch_size, args.batch_size, args.micro_batch_size) == (4, 4, 2)
    assert (args.local_mini_batch_size, args.mini_batch_size, args.num_total_batches) == (2, 2, 3)
    assert args.total_episodes == 12 and "batch_size" not in args.to_dict()  # set by the trainer, not a setting
    assert trainer.sample_generations_freq == 1  # max(1, 3 // 2), TRL's spacing
    assert trainer.state.episode == 0
    assert trainer.policy_model is trainer.model.policy and trainer.value_model is trainer.model.value_model
    assert trainer.reward_model is trainer.reward_funcs[0] and not trainer.is_peft_model
    with trainer.null_ref_context():  # no adapter to disable: a no-op
        pass
    trainer.train()
    assert trainer.state.episode == 12 and trainer.state.log_history[-2]["episode"] == 12


def test_sample_tables_follow_num_sample_generations(tmp_path, tokenizer, monkeypatch, capsys):
    """TRL's spacing: with 4 updates and num_sample_generations=2, a table after updates 1 and 3 (0-based 0 and 2),
    each of the first per_device_eval_batch_size eval rows, decoded greedily (so the same every time)."""
    trainer = make_ppo_trainer(
        tmp_path,
        tokenizer,
        eval_dataset=prompt_dataset(5),
        total_episodes=16,
        num_sample_generations=2,
        per_device_eval_batch_size=2,
    )
    steps = []
    original = TRLPPOCompatMixin.generate_completions
    monkeypatch.setattr(
        TRLPPOCompatMixin,
        "generate_completions",
        lambda self, sampling=False: steps.append((self.state.global_step, sampling)) or original(self, sampling),
    )
    trainer.train()
    assert steps == [(1, True), (3, True)]

    monkeypatch.setattr("lenvm_rl.trainers.trl_compat.is_rich_available", lambda: False)
    capsys.readouterr()
    table = trainer.generate_completions()
    assert len(table) == 5 and table.equals(trainer.generate_completions())  # greedy
    assert list(table["query"]) == [f"what is {i} + {i} ?" for i in range(5)]
    printed = capsys.readouterr().out
    assert "model response" in printed and "what is 4 + 4 ?" in printed  # plain-text table without rich
    expected = trainer.score_rollouts(trainer.generate_rollouts([trainer.eval_dataset[0]], table_config(trainer)))
    assert table["score"][0] == pytest.approx(expected["scores"][0].item())
    assert make_ppo_trainer(tmp_path, tokenizer).generate_completions() is None  # no eval set: nothing to sample


def table_config(trainer):
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=trainer.args.response_length,
        do_sample=False,
        eos_token_id=trainer.stop_token_id,
        pad_token_id=trainer.pad_token_id,
    )


def test_model_card_and_push_to_hub(tmp_path, tokenizer, monkeypatch):
    """create_model_card takes TRL's arguments; push_to_hub(dataset_name=...) uploads the saved policy, critic and card
    (huggingface_hub mocked at its network calls)."""
    from huggingface_hub import HfApi, RepoUrl

    trainer = make_ppo_trainer(tmp_path, tokenizer, total_episodes=4)
    trainer.create_model_card(model_name="tiny-ppo", dataset_name="trl-lib/tldr", tags="mine")
    card = (tmp_path / "ppo" / "README.md").read_text()
    assert card.startswith("---\n") and "# Model Card for tiny-ppo" in card
    assert "datasets: trl-lib/tldr" in card and "https://huggingface.co/datasets/trl-lib/tldr" in card
    assert "- mine" in card and "- lenvm-rl" in card and "| rewards | `LlamaForSequenceClassification`, " in card

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append((repo_id, commit_message, files, (Path(folder_path) / "README.md").read_text()))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    trainer.push_to_hub(commit_message="PPO run", dataset_name="trl-lib/tldr", tags=["extra"])
    [(repo_id, message, files, card)] = uploads
    assert (repo_id, message) == ("me/ppo", "PPO run")
    assert {"README.md", "model.safetensors", "value_model/model.safetensors"} <= set(files)
    assert "datasets: trl-lib/tldr" in card and "- extra" in card and 'model="me/ppo"' in card
