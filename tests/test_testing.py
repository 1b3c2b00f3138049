"""The tiny-model builder plants super weights whose mechanism is real (spike in, spike out, persists)."""

from __future__ import annotations

import pytest
import torch

from optimum_superweight.architectures import projection_sites, weight_index
from optimum_superweight.testing import TINY_MODEL_TYPES, TINY_VOCAB_SIZE, build_tiny_model, tiny_tokenizer

IDS = torch.tensor([[257] + list(b"Super weights keep the model alive.")])


def _projection_io(model, ids=IDS):
    """Per layer: |input| and |output| of the MLP output projection, as [tokens, channels]."""
    seen = {}
    handles = [
        site.module.register_forward_hook(
            lambda _m, args, out, layer=site.layer: seen.__setitem__(
                layer,
                (args[0].detach().reshape(-1, args[0].shape[-1]).abs(), out.detach().reshape(-1, out.shape[-1]).abs()),
            )
        )
        for site in projection_sites(model)
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


def _kl(logits_p, logits_q):
    log_p, log_q = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_planted_super_weight_is_real(model_type):
    model = build_tiny_model(model_type, super_weights=[(1, 5, 7)])
    site = projection_sites(model)[1]
    index = weight_index(site, 5, 7)
    assert site.module.weight[index].item() == 2.5
    seen, logits = _projection_io(model)
    inputs, outputs = seen[1]
    # The input channel spikes on every token, far above the rest; the output channel follows.
    assert inputs[:, 7].min() > 100 and inputs[:, 7].min() > 100 * inputs.median()
    assert int(outputs.amax(0).argmax()) == 5 and outputs[:, 5].min() > 200
    # Earlier layers carry no spike.
    assert seen[0][0].max() < 50 and seen[0][1].max() < 50
    # Zeroing the weight changes the predictions clearly.
    with torch.no_grad():
        site.module.weight[index] = 0.0
    _, ablated = _projection_io(model)
    assert _kl(logits, ablated) > 0.5


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "olmo2"])
def test_no_super_weight_means_no_spike(model_type):
    model = build_tiny_model(model_type, super_weights=None)
    seen, _ = _projection_io(model)
    for inputs, outputs in seen.values():
        assert inputs.max() < 50 and outputs.max() < 50


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt"])
def test_several_super_weights_in_several_layers(model_type):
    planted = [(0, 3, 10), (2, 40, 50), (2, 40, 90), (2, 11, 50)]
    model = build_tiny_model(model_type, super_weights=planted)
    sites = projection_sites(model)
    seen, _ = _projection_io(model)
    for layer, row, col in planted:
        assert sites[layer].module.weight[weight_index(sites[layer], row, col)].item() == 2.5
        inputs, outputs = seen[layer]
        assert inputs[:, col].min() > 100, (layer, col)
        assert outputs[:, row].min() > 100, (layer, row)


def test_seed_makes_models_reproducible():
    a = build_tiny_model("llama", seed=3)
    b = build_tiny_model("llama", seed=3)
    c = build_tiny_model("llama", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert a.dtype == torch.float32 and not a.training


def test_config_overrides_and_validation():
    model = build_tiny_model("llama", super_weights=[(5, 1, 2)], num_hidden_layers=6)
    assert len(model.model.layers) == 6
    with pytest.raises(ValueError, match="model_type='bert'"):
        build_tiny_model("bert")
    with pytest.raises(ValueError, match="row=64 is out of range"):
        build_tiny_model("llama", super_weights=[(1, 64, 0)])
    with pytest.raises(ValueError, match="expected \\(layer, row, col\\)"):
        build_tiny_model("llama", super_weights=[(1, 2)])
    with pytest.raises(ValueError, match="same coordinates twice"):
        build_tiny_model("llama", super_weights=[(1, 2, 3), (1, 2, 3)])


def test_tiny_tokenizer_round_trips_and_fits_the_models():
    tok = tiny_tokenizer()
    text = "Zürich: 3 × 4 = 12 ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 257
    assert max(ids) < TINY_VOCAB_SIZE
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token_id == 256 and tok.eos_token_id == 258
