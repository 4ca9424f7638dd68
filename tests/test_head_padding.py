"""lenvm_rl.head_padding: a padded model computes and trains as the original."""

import pytest
import torch
from conftest import make_tiny_causal_lm

from lenvm_rl.head_padding import main, pad_head_dim


def padded_rows(model, head_dim, old):
    """The padded query rows of every layer (they must stay zero)."""
    half_old, half_new = old // 2, head_dim // 2
    pad = [d for d in range(head_dim) if not (d < half_old or half_new <= d < half_new + half_old)]
    weights = [
        layer.self_attn.q_proj.weight.view(-1, head_dim, layer.self_attn.q_proj.weight.shape[1])
        for layer in model.model.layers
    ]
    return torch.stack([w[:, pad] for w in weights])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # Qwen2 has query / key / value biases
def test_padded_model_gives_the_same_logits(arch):
    model = make_tiny_causal_lm(arch, seed=3)  # hidden 32, 4 heads of 8, 2 key/value heads
    with torch.no_grad():  # non-zero biases, so the test sees where they go
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_()
    padded = pad_head_dim(model, 32)
    assert padded.config.head_dim == 32 and getattr(model.config, "head_dim", 8) == 8  # the input is not changed
    ids = torch.randint(2, model.config.vocab_size, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: positions come from the mask
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = padded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # The rope base is what keeps long positions exact: the original base would rotate the pairs at other speeds.
    wrong = pad_head_dim(model, 32)
    wrong.config.rope_parameters = dict(model.config.rope_parameters)
    wrong = type(wrong)(wrong.config).eval()
    wrong.load_state_dict(padded.state_dict())
    with torch.no_grad():
        assert not torch.allclose(wrong(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-3)


def train(model, ids, query_lr_scale=1.0, steps=3, lr=0.05):
    """A few SGD steps on the LM loss, the query projections at `query_lr_scale` times the learning rate."""
    query = [p for n, p in model.named_parameters() if "q_proj" in n]
    rest = [p for n, p in model.named_parameters() if "q_proj" not in n]
    optimizer = torch.optim.SGD([{"params": rest}, {"params": query, "lr": lr * query_lr_scale}], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_padded_model_trains_as_the_original_with_the_query_rate_rescaled():
    original = make_tiny_causal_lm("llama", seed=4).train()
    ids = torch.randint(2, original.config.vocab_size, (2, 24))
    original = train(original, ids)
    # Queries stored x c = sqrt(16 / 8): their SGD steps move the original query weights by 1/c^2 unless the rate is
    # multiplied by c^2 = 2.
    exact = train(pad_head_dim(make_tiny_causal_lm("llama", seed=4).train(), 16), ids, query_lr_scale=2.0)
    plain = train(pad_head_dim(make_tiny_causal_lm("llama", seed=4).train(), 16), ids)
    assert padded_rows(exact, 16, 8).abs().max() == 0 and padded_rows(plain, 16, 8).abs().max() == 0
    with torch.no_grad():
        expected = original(input_ids=ids).logits
        torch.testing.assert_close(exact(input_ids=ids).logits, expected, atol=5e-5, rtol=1e-4)
    # Unpadded and divided by c, the queries of `exact` are the original's; those of `plain` moved less.
    keep = torch.cat([torch.arange(4), 8 + torch.arange(4)])
    for name, before in make_tiny_causal_lm("llama", seed=4).named_parameters():
        if "q_proj" in name:
            after = dict(original.named_parameters())[name]
            for model, close in ((exact, True), (plain, False)):
                stored = dict(model.named_parameters())[name].view(4, 16, -1)[:, keep].reshape(after.shape) / 2**0.5
                assert torch.allclose(stored, after, atol=1e-6) == close
                assert (stored - before).norm() < (after - before).norm() or close


def test_padded_model_saves_and_loads(tmp_path):
    model = make_tiny_causal_lm("llama", seed=5)
    pad_head_dim(model, 32).save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.head_dim == 32
    assert loaded.config.rope_parameters["rope_theta"] == pytest.approx(
        model.config.rope_parameters["rope_theta"] ** 4
    )
    ids = torch.randint(2, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-5, rtol=1e-4)


def test_what_cannot_be_padded_exactly_is_refused():
    model = make_tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="larger even one"):
        pad_head_dim(model, 4)
    with pytest.raises(ValueError, match="larger even one"):
        pad_head_dim(model, 15)
    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="plain rotary embedding"):
        pad_head_dim(model, 16)


def test_command_line_writes_a_new_checkpoint_and_never_over_one(tmp_path, tiny_tokenizer):
    model = make_tiny_causal_lm("llama", seed=6)
    model.save_pretrained(tmp_path / "policy")
    tiny_tokenizer.save_pretrained(tmp_path / "policy")
    out = main([str(tmp_path / "policy"), str(tmp_path / "padded"), "--head_dim", "16"])
    assert type(model).from_pretrained(out).config.head_dim == 16 and (out / "tokenizer_config.json").is_file()
    with pytest.raises(FileExistsError, match="nothing is written over"):
        main([str(tmp_path / "policy"), str(tmp_path / "padded")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padded", "policy"]  # no staging directory left behind
