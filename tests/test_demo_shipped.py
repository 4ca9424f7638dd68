"""The demo policy shipped with the package: its files match their manifest, a corrupted or missing file is refused,
the world made from it loads, generates and solves problems, and measurements are checked against its ranges."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lenvm_rl.demo import DemoWorldConfig, build_demo_world, demo_prompt, measure_demo_policy
from lenvm_rl.demo import shipped as demo_shipped
from lenvm_rl.demo import world as demo_world
from lenvm_rl.demo.shipped import (
    DEMO_ASSETS_DIR,
    _expected_ranges,
    check_demo_measurement,
    copy_shipped_policy,
    file_sha256,
    format_demo_check,
    load_shipped_manifest,
)
from lenvm_rl.generation import generate_completions
from lenvm_rl.rewards import extract_gsm8k_answer


@pytest.fixture(scope="module")
def manifest():
    return load_shipped_manifest()


@pytest.fixture(scope="module")
def shipped_world(tmp_path_factory):
    return build_demo_world(tmp_path_factory.mktemp("worlds") / "shipped")


@pytest.fixture
def broken_assets(tmp_path):
    """A copy of the shipped assets to damage."""
    return shutil.copytree(DEMO_ASSETS_DIR, tmp_path / "assets")


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------------------------------
# The shipped files


def test_shipped_files_match_the_manifest(manifest):
    on_disk = sorted(f"policy/{path.name}" for path in (DEMO_ASSETS_DIR / "policy").iterdir())
    assert sorted(manifest["files"]) == on_disk  # every shipped file is listed, and every listed file is shipped
    for name, sha256 in manifest["files"].items():
        assert file_sha256(DEMO_ASSETS_DIR / name) == sha256, name
    weights = load_file(DEMO_ASSETS_DIR / "policy" / "model.safetensors")  # float32: same weights on every machine
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert sum(tensor.numel() for tensor in weights.values()) == manifest["build"]["num_parameters"]
    # The generator still writes the problems the policy was trained on (a sample of them enters the fingerprint).
    assert demo_world._fingerprint(manifest["seed"], DemoWorldConfig(rebuild=True)) == manifest["fingerprint"]


def test_corrupted_file_is_refused_before_anything_is_copied(broken_assets, tmp_path):
    flip_last_byte(broken_assets / "policy" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupted .*reinstall lenvm-rl.*--rebuild"):
        copy_shipped_policy(tmp_path / "world", assets_dir=broken_assets)
    assert not (tmp_path / "world").exists()


def test_missing_file_is_refused(broken_assets, tmp_path):
    (broken_assets / "policy" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing.*--rebuild"):
        copy_shipped_policy(tmp_path / "world", assets_dir=broken_assets)


def test_build_from_a_corrupted_install_fails_and_leaves_nothing(broken_assets, tmp_path, monkeypatch):
    flip_last_byte(broken_assets / "policy" / "config.json")
    monkeypatch.setattr(demo_shipped, "DEMO_ASSETS_DIR", broken_assets)
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"config\.json is corrupted"):
        build_demo_world(tmp_path / "out" / "world")
    assert list((tmp_path / "out").iterdir()) == []


def test_other_arguments_need_rebuild(tmp_path):
    with pytest.raises(ValueError, match="not for seed=1: pass --rebuild"):
        build_demo_world(tmp_path / "world", seed=1)
    with pytest.raises(ValueError, match="not for max_steps=10: pass --rebuild"):
        build_demo_world(tmp_path / "world", config=DemoWorldConfig(max_steps=10))
    assert not (tmp_path / "world").exists()


def test_fingerprint_covers_the_policy_source_and_the_shipped_files(manifest):
    config = DemoWorldConfig()
    shipped = demo_world._shipped_fingerprint(0, config, manifest)
    assert shipped != demo_world._fingerprint(0, config)  # a copied policy is another world than a trained one
    other_weights = {**manifest["files"], "policy/model.safetensors": "0" * 64}
    assert demo_world._shipped_fingerprint(0, config, {**manifest, "files": other_weights}) != shipped
    # The thread count changes how SFT runs, not which policy is copied.
    assert demo_world._shipped_fingerprint(0, DemoWorldConfig(num_threads=2), manifest) == shipped


# ---------------------------------------------------------------------------------------------------------------------
# The world made from them


def test_shipped_world_loads_and_solves_problems(shipped_world, manifest):
    info = json.loads((shipped_world / "build_info.json").read_text())
    assert info["policy"]["source"] == "shipped" and info["policy"]["files"] == manifest["files"]
    assert info["config"]["rebuild"] is False
    for name, sha256 in {**manifest["files"], **manifest["data"]}.items():
        assert file_sha256(shipped_world / name) == sha256, name
    model = AutoModelForCausalLM.from_pretrained(shipped_world / "policy").eval()
    tokenizer = AutoTokenizer.from_pretrained(shipped_world / "policy")
    assert (model.num_parameters(), len(tokenizer)) == (info["num_parameters"], info["vocab_size"])

    # Greedy decoding solves 99% of held-out problems (manifest); 7 of the first 8 leaves room for other float paths.
    rows = [json.loads(line) for line in (shipped_world / "data" / "test.jsonl").read_text().splitlines()[:8]]
    prompts = [demo_prompt(row["question"]) for row in rows]
    completions = generate_completions(model, tokenizer, prompts, 1, 128, 0.0, 1.0, 0, 8, 0)
    correct = [
        extract_gsm8k_answer(c.text) == extract_gsm8k_answer(rows[c.prompt_index]["answer"]) for c in completions
    ]
    assert sum(correct) >= 7


def test_shipped_world_is_reused_and_not_taken_for_a_trained_one(shipped_world, monkeypatch):
    def no_copy(*args, **kwargs):
        raise AssertionError("a cached world must not be copied again")

    monkeypatch.setattr(demo_world, "copy_shipped_policy", no_copy)
    assert build_demo_world(shipped_world) == shipped_world
    with pytest.raises(ValueError, match="other arguments.*shipped policy"):
        build_demo_world(shipped_world, config=DemoWorldConfig(rebuild=True))


# ---------------------------------------------------------------------------------------------------------------------
# Expected ranges


def reference_stats(manifest, accuracy, mean_length):
    return {
        "policy_sha256": manifest["files"]["policy/model.safetensors"],
        "num_problems": 200,
        "num_samples": 4,
        "sampling": {"max_new_tokens": 384},
        "accuracy": {"overall": accuracy},
        "greedy_accuracy": {"overall": 0.99},
        "lengths": {"mean": mean_length},
        "mean_length_standard_error": 1.0,
    }


def test_expected_ranges_by_hand():
    # One reference: 3 standard errors of the difference to a new run, 3 * se * sqrt(1 + 1 / 1).
    stats = {
        "num_problems": 200,
        "num_samples": 4,
        "accuracy": {"overall": 0.9},  # se = sqrt(0.9 * 0.1 / 800), 3 * se * sqrt(2) = 3 * sqrt(0.000225) = 0.045
        "greedy_accuracy": {"overall": 0.98},  # se = sqrt(0.98 * 0.02 / 200), 3 * se * sqrt(2) = 0.042
        "lengths": {"mean": 40.0},
        "mean_length_standard_error": 1.5,  # 3 * 1.5 * sqrt(2) = 6.3640
    }
    ranges = _expected_ranges([stats])
    assert ranges["accuracy"] == pytest.approx([0.9 - 0.045, 0.9 + 0.045], abs=1e-3)
    assert ranges["greedy_accuracy"] == pytest.approx([0.98 - 0.042, 1.0], abs=1e-3)  # clipped at 1
    assert ranges["mean_length"] == pytest.approx([40 - 4.5 * 2**0.5, 40 + 4.5 * 2**0.5], abs=1e-3)
    # Two references further apart than sampling explains (mean lengths 40 and 50, standard errors 1.5): their
    # standard deviation, sqrt(2 * 5^2), sets the width, 3 * sqrt(50) * sqrt(1 + 1 / 2) = 25.98.
    ranges = _expected_ranges([stats, {**stats, "lengths": {"mean": 50.0}}])
    assert ranges["mean_length"] == pytest.approx([45 - 3 * 50**0.5 * 1.5**0.5, 45 + 3 * 50**0.5 * 1.5**0.5], abs=1e-3)


def test_check_flags_figures_out_of_range(manifest):
    low, high = manifest["expected"]["accuracy"]
    length_low, length_high = manifest["expected"]["mean_length"]
    check = check_demo_measurement(reference_stats(manifest, (low + high) / 2, (length_low + length_high) / 2))
    assert check["ok"] and set(check["figures"]) == {"accuracy", "greedy_accuracy", "mean_length"}
    assert format_demo_check(check)[0] == f"accuracy T=1 {(low + high) / 2:.3f}, expected {low:.3f}-{high:.3f}: ok"

    check = check_demo_measurement(reference_stats(manifest, 0.733, (length_low + length_high) / 2))  # another build
    assert not check["ok"] and not check["figures"]["accuracy"]["ok"] and check["figures"]["mean_length"]["ok"]
    assert format_demo_check(check)[0].endswith(": OUT OF RANGE")


def test_check_applies_to_the_shipped_policy_with_the_reference_settings_only(manifest):
    stats = reference_stats(manifest, 0.9, 44.0)
    assert "skipped" in check_demo_measurement({**stats, "policy_sha256": "0" * 64})
    assert "skipped" in check_demo_measurement({**stats, "num_samples": 2})
    assert "skipped" in check_demo_measurement({**stats, "sampling": {"max_new_tokens": 64}})


def test_measure_records_the_check(shipped_world, tmp_path, manifest):
    stats = measure_demo_policy(
        shipped_world, tmp_path, num_problems=3, num_samples=2, max_new_tokens=48, num_threads=1
    )
    assert stats["policy_sha256"] == manifest["files"]["policy/model.safetensors"]
    assert stats["check"] == {
        "skipped": "the expected ranges hold for 200 problems x 4 samples with max_new_tokens 384"
    }
    assert json.loads((tmp_path / "demo_policy_stats.json").read_text())["check"] == stats["check"]


@pytest.mark.slow
def test_shipped_policy_lands_in_its_expected_ranges(shipped_world, tmp_path):
    """The reference measurement (200 held-out problems x 4 samples at T = 1, plus greedy), about 30 s."""
    stats = measure_demo_policy(shipped_world, tmp_path, num_threads=1)
    assert stats["check"]["ok"], format_demo_check(stats["check"])
    assert stats["lengths"]["p99"] >= 3 * stats["lengths"]["median"]
    assert stats["mean_within_prompt_std"] > 0
    assert stats["fraction_truncated"] < 0.01
