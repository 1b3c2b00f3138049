"""embedding_bits=8: input embeddings and output head in 8 bits per row, the super-activation channel exact.

Round trips (tied and untied heads, Gemma's scaled embeddings, bfloat16), refusal of tampered checkpoints, closeness
to the dense-embedding model, dequantize.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig
from optimum_superweight.format import CheckpointFormatError
from optimum_superweight.nn.embedding import SuperWeightEmbedding, SuperWeightHead
from optimum_superweight.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
INPUT = torch.arange(2, 34).reshape(2, 16)


def _config(**kwargs):
    kwargs.setdefault("super_weights", [{"module": MODULE, "row": ROW, "col": COL}])
    kwargs.setdefault("method", "rtn")
    kwargs.setdefault("embedding_bits", 8)
    return SuperWeightConfig(bits=4, group_size=32, **kwargs)


def _logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def _quantized(tmp_path, model_type="llama", tied=False, **config):
    dense = build_tiny_model(model_type, tie_word_embeddings=tied)
    dense.save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_config(**config))
    return model, dense


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path):
    model, dense = _quantized(tmp_path, tied=request.param)
    model.save_pretrained(tmp_path / "q")
    return tmp_path / "q", model, dense, request.param


@pytest.mark.parametrize("value", [4, 16, True, 8.0, "8", 0])
def test_embedding_bits_validated_naming_field_value_and_accepted(value):
    with pytest.raises(ValueError, match=r"SuperWeightConfig\.embedding_bits=.* is invalid: accepted values are None, 8"):
        SuperWeightConfig(embedding_bits=value)


def test_embedding_bits_default_none_and_old_configs_load_unchanged():
    assert SuperWeightConfig().embedding_bits is None
    assert SuperWeightConfig.from_dict({"quant_method": "superweight", "bits": 4}).embedding_bits is None
    assert SuperWeightConfig.from_dict(SuperWeightConfig(embedding_bits=8).to_dict()).embedding_bits == 8
    with pytest.raises(ValueError, match="embedding_bits=4"):
        SuperWeightConfig.from_dict({"quant_method": "superweight", "embedding_bits": 4})


def test_round_trip_identical_logits_and_tie_kept(saved):
    folder, model, _, tied = saved
    stored = load_file(folder / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.uint8 and stored["model.embed_tokens.weight"].dim() == 3
    assert stored["model.embed_tokens.held_out_columns"].tolist() == [ROW]
    assert any(k.startswith("lm_head.") for k in stored) is not tied  # a tied head is stored once, under the embeddings
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["embedding_bits"] == 8 and config["super_activation_channels"] == [ROW]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.model.embed_tokens, SuperWeightEmbedding) and isinstance(reloaded.lm_head, SuperWeightHead)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied
    assert torch.equal(_logits(reloaded), _logits(model))
    reloaded.save_pretrained(folder.parent / "again")  # a reloaded model saves again and reloads the same
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder.parent / "again")), _logits(model))


def test_super_activation_channel_exact_and_logits_close_to_dense_embeddings(saved, tmp_path):
    folder, model, dense, tied = saved
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=_config(embedding_bits=None))
    with torch.no_grad():
        packed_rows, dense_rows = model.model.embed_tokens(INPUT), dense.model.embed_tokens(INPUT)
        assert torch.equal(packed_rows[..., ROW], dense_rows[..., ROW])
        assert torch.equal(model.lm_head.dequantize_weight(torch.float32)[:, ROW], dense.lm_head.weight[:, ROW])
        step = dense.model.embed_tokens.weight.abs().amax(1, keepdim=True) / 127  # a row's largest value sets its step
        assert bool(((packed_rows - dense_rows).abs() <= step[INPUT] / 2 + 1e-6).all())
    ours, theirs = _logits(model), _logits(reference)
    assert not torch.equal(ours, theirs)  # the option does something ...
    assert (ours - theirs).abs().max() < 0.05 * theirs.std()  # ... and 8 bits per row keep the logits close


def test_head_kernel_path_matches_dense_weight(saved):
    _, model, _, _ = saved
    x = torch.randn(3, 64, dtype=torch.float32) * 10
    x[:, ROW] = 1000.0  # a super activation: its channel must not go through the codes
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.double(), model.lm_head.dequantize_weight(torch.float64)).float()
        assert torch.allclose(model.lm_head(x), expected, rtol=1e-5, atol=1e-3)


def _rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt", "optimum_superweight_digests": "crc32"})


@pytest.mark.parametrize(("change", "message"), [
    (lambda t: t["model.embed_tokens.held_out_values"].mul_(1.5), "does not match the content digest"),
    (lambda t: t["model.embed_tokens.weight_scale"].mul_(2), "does not match the content digest"),
    (lambda t: t.pop("model.embed_tokens.weight_scale"), "weight_scale is missing"),
    (lambda t: t["model.embed_tokens.weight"].__setitem__((3, 0, ROW), 7), "held-out column"),
    (lambda t: t["model.embed_tokens.held_out_columns"].fill_(2), "held-out column 2"),  # its codes are not 128
    (lambda t: t.__setitem__("model.embed_tokens.held_out_values", t["model.embed_tokens.held_out_values"].double()), None),
])
def test_tampered_tensor_is_refused(saved, change, message):
    folder = saved[0]
    _rewrite(folder, change)
    if message is None:  # a float dtype other than written: the digest reads it as stored, and it differs
        message = "does not match the content digest"
    with pytest.raises(CheckpointFormatError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_without_embedding_bits_refuses_packed_tensors(saved):
    folder = saved[0]
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["embedding_bits"] = None
    (folder / "config.json").write_text(json.dumps(config))
    # What an older version (which ignores the key with a warning) says too: the codes are 3-D on purpose.
    with pytest.raises(CheckpointFormatError, match=r"\.weight is stored as \[260, 1, 64\]"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_dequantize_gives_dense_tied_model_with_the_same_logits(saved, tmp_path):
    folder, model, _, tied = saved
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = _logits(reloaded)
    reloaded.dequantize()
    assert type(reloaded.model.embed_tokens) is torch.nn.Embedding and type(reloaded.lm_head) is torch.nn.Linear
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tied
    assert torch.allclose(_logits(reloaded), expected, atol=1e-4)
    reloaded.save_pretrained(tmp_path / "dense")
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), expected, atol=1e-4)


def test_gemma_scaled_embeddings_round_trip(tmp_path):
    model, dense = _quantized(tmp_path, "gemma3_text", tied=True, super_weights=[], detect=False)
    embedding = model.get_input_embeddings()
    assert embedding.embed_scale == dense.get_input_embeddings().scalar_embed_scale
    with torch.no_grad():
        step = dense.get_input_embeddings().weight.abs().amax(1, keepdim=True)[INPUT] / 254 * embedding.embed_scale
        assert bool(((embedding(INPUT) - dense.get_input_embeddings()(INPUT)).abs() <= step + 1e-5).all())
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(_logits(reloaded), _logits(model))
    assert type(reloaded.dequantize().get_input_embeddings()) is type(dense.get_input_embeddings())


def test_bfloat16_model_keeps_its_dtype_and_reloads_in_another(saved):
    folder, model, _, _ = saved
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.model.embed_tokens.weight_scale.dtype == torch.float32
    assert _logits(half).dtype == torch.bfloat16
    assert torch.allclose(_logits(half).float(), _logits(model), atol=0.1 * _logits(model).std().item())


def test_head_quantized_by_the_main_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="add 'lm_head' to modules_to_not_convert"):
        _quantized(tmp_path, modules_to_not_convert=[])


def test_low_memory_load_packs_too(tmp_path):
    model, _ = _quantized(tmp_path, tied=True, low_memory=True)
    assert isinstance(model.get_input_embeddings(), SuperWeightEmbedding)
    assert model.config.quantization_config.super_activation_channels == [ROW]
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), _logits(model))
