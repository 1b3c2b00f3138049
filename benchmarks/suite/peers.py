"""Peer quantizers run by their own libraries, one weight matrix at a time: quantize, then dequantize.

Each function takes a float32 ``[out, in]`` weight and returns ``(dense float32 weight, stored bytes)``, where
the bytes count what the library keeps for that matrix (codes, scales, zero-points) as it stores them.

- ``hqq``: the hqq library's ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size)`` and its default
  half-quadratic optimizer; scale and zero in float16 (``compute_dtype``), as its transformers path stores them.
  (transformers 5.24's ``HqqConfig`` raises NotImplementedError, so the library is called directly.)
- ``torchao``: ``quantize_`` with ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g),
  mapping_type=ASYMMETRIC)`` on a bfloat16 copy of the layer, the int4 weight-only config that runs on CPU in
  torchao 0.18 (``Int4WeightOnlyConfig`` needs CUDA or the ``mslk`` package there: :func:`torchao_int4_cpu_error`
  records why). Stored as torchao's nominal int4: 4-bit codes, bfloat16 scale and 4-bit zero-point per group.
- bitsandbytes NF4 is :func:`suite.quality.bnb_4bit`.

Optional packages: ``pip install hqq`` (check ``pip install --dry-run`` pulls no other torch) and ``torchao``;
``TORCHAO_PATH`` may name a folder holding torchao when it is kept out of site-packages.
"""

from __future__ import annotations

import math
import os
import sys

import torch

__all__ = ["hqq_quantize", "torchao_int4", "torchao_int4_cpu_error", "library_versions"]


def _import_torchao():
    extra = os.environ.get("TORCHAO_PATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    import torchao

    return torchao


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name, importer in (("hqq", lambda: __import__("hqq")), ("torchao", _import_torchao),
                           ("bitsandbytes", lambda: __import__("bitsandbytes"))):
        try:
            module = importer()
            versions[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as error:  # noqa: BLE001 - reported, not raised
            versions[name] = f"unavailable: {type(error).__name__}: {error}"
    from suite.llama_cpp_peer import llama_cpp_version  # llama-cpp-python, kept apart from benchmarks/llama_cpp.py

    versions["llama-cpp-python"] = llama_cpp_version()
    return versions


def _dist_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def hqq_quantize(weight: torch.Tensor, bits: int, group_size: int = 64) -> tuple[torch.Tensor, int]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = weight.detach().to(torch.float32).clone()
    layer = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=torch.float16,
                      device="cpu", initialize=True)
    dense = layer.dequantize().to(torch.float32).reshape(out_features, in_features)
    stored = _nbytes(layer.W_q, layer.meta.get("scale"), layer.meta.get("zero"))
    return dense, stored


def torchao_int4(weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, int]:
    _import_torchao()
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    out_features, in_features = weight.shape
    holder = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)).to(torch.bfloat16)
    holder[0].weight.data = weight.detach().to(torch.bfloat16).clone()
    quantize_(holder, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                           mapping_type=MappingType.ASYMMETRIC))
    dense = holder[0].weight.dequantize().to(torch.float32)
    groups = out_features * math.ceil(in_features / group_size)
    stored = math.ceil(out_features * in_features * 4 / 8) + groups * 2 + math.ceil(groups * 4 / 8)
    return dense, stored


def torchao_int4_cpu_error() -> str | None:
    """What torchao's own int4 weight-only config (``Int4WeightOnlyConfig``) says on a bfloat16 CPU layer, or None."""
    try:
        _import_torchao()
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        holder = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False)).to(torch.bfloat16)
        quantize_(holder, Int4WeightOnlyConfig(group_size=64))
        holder(torch.randn(2, 128, dtype=torch.bfloat16))
        return None
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
