"""torch.compile: the quantized layers are one torch.library op each (kernels/ops.py), so a decode step of a
planted model traces without a graph break, the op passes torch.library.opcheck, and generate() compiles."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig

from optimum_superweight import SuperWeightConfig, kernels
from optimum_superweight.kernels import ops
from optimum_superweight.models.replace import quantize_model
from optimum_superweight.nn.linear import SuperWeightLinear
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear
from optimum_superweight.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE, ROW, COL = "model.layers.1.mlp.down_proj", 5, 7
RECORD = {"module": MODULE, "row": ROW, "col": COL}


def _planted(dtype: torch.dtype, **fields) -> torch.nn.Module:
    model = build_tiny_model("llama", super_weights=[(1, ROW, COL)], num_hidden_layers=2)
    config = SuperWeightConfig(super_weights=[RECORD], **fields)
    quantize_model(model, config, config.get_super_weights())
    return model.to(dtype)


def _layers():
    torch.manual_seed(0)
    return [
        SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=4, group_size=32, super_weights=[(3, 5)]),
        SuperWeightLinear.from_linear(torch.nn.Linear(128, 64, bias=False), bits=4, group_size=64, symmetric=False, zero_point="float"),
        SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=3, group_size=32, symmetric=False),
        SuperWeightW8A8Linear.from_linear(torch.nn.Linear(128, 64), super_weights=[(3, 5)]),
    ]


@pytest.mark.parametrize("fields", [dict(bits=4, group_size=32), dict(bits=8, group_size=-1, activation_bits=8)], ids=["weight-only", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_no_graph_break_at_1_and_64_tokens(fields, dtype):
    model = _planted(dtype, **fields)
    assert kernels.kernel_summary(model, dtype, 1)  # quantized layers are there
    for tokens in (1, 64):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(torch.arange(2, 2 + tokens).unsqueeze(0))
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        ops_in_graph = [n for g in explained.graphs for n in g.graph.nodes if n.target is torch.ops.optimum_superweight.packed_linear]
        assert len(ops_in_graph) == 2 * 7  # every projection of both decoder layers is one op call
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_opcheck(dtype, tokens):
    for layer in _layers():
        x = torch.randn(tokens, 128, dtype=dtype)
        args = (x, ops.layer_tensors(layer), ops.layer_handle(layer), layer.out_features)
        torch.library.opcheck(ops.OP, args)
        # The op runs the eager path: the same bits as the layer's own forward, and the same kernel.
        assert torch.equal(ops.OP(*args), layer(x))


def test_op_computes_from_the_tensors_it_is_given():
    layer = _layers()[0]
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    tensors = ops.layer_tensors(layer)
    copies = [None if t is None else t.clone() for t in tensors]
    assert torch.equal(ops.OP(x, copies, ops.layer_handle(layer), 64), layer(x))
    scaled = list(copies)
    scaled[ops.TENSOR_NAMES.index("weight_scale")] = copies[ops.TENSOR_NAMES.index("weight_scale")] * 2
    other = SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=4, group_size=32, super_weights=[(3, 5)])
    other.load_state_dict(layer.state_dict())
    other.weight_scale.data = scaled[ops.TENSOR_NAMES.index("weight_scale")]
    assert torch.equal(ops.OP(x, scaled, ops.layer_handle(layer), 64), other(x))
    assert not torch.equal(ops.OP(x, scaled, ops.layer_handle(layer), 64), layer(x))
    wrong = list(copies)
    wrong[0] = copies[0][:1]
    with pytest.raises(ValueError, match="tensor 'weight' is"):
        ops.OP(x, wrong, ops.layer_handle(layer), 64)
    with pytest.raises(ValueError, match="out_features=63"):
        ops.OP(x, tensors, ops.layer_handle(layer), 63)


def test_op_refuses_a_handle_of_no_live_layer():
    layer = _layers()[0]
    handle, tensors = ops.layer_handle(layer), ops.layer_tensors(layer)
    del layer
    gc.collect()
    with pytest.raises(RuntimeError, match="names no live quantized layer"):
        ops.OP(torch.randn(1, 128), tensors, handle, 64)


def test_compiled_layers_keep_their_own_weights():
    """Two layers of one class compiled apart: each compiled call runs its own weights, bit for bit."""
    first, second = _layers()[0], SuperWeightLinear.from_linear(torch.nn.Linear(128, 64), bits=4, group_size=32, super_weights=[(3, 5)])
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        for layer in (first, second):
            assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
    torch._dynamo.reset()


def test_generate_compiles_with_a_static_cache(tiny_llama_dir):
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[RECORD])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, dtype=torch.bfloat16)
    assert model.hf_quantizer.is_compileable
    ids = torch.arange(2, 10).unsqueeze(0)
    eager = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager", mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked
    torch._dynamo.reset()
    compiled = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static", compile_config=compile_config)
    assert getattr(model, "_compiled_call", None) is not None  # generate() did compile
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


def test_nf4_layers_are_not_declared_compileable():
    from optimum_superweight.models.quantizer import SuperWeightQuantizer

    assert SuperWeightQuantizer(SuperWeightConfig(bits=4, group_size=32)).is_compileable
    assert not SuperWeightQuantizer(SuperWeightConfig(weight_format="bnb-nf4")).is_compileable
