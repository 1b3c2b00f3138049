"""The quantized layers' forward as one ``torch.library`` custom op, so that ``torch.compile`` sees one opaque op
per layer (bitsandbytes-style) instead of tracing the kernel registry.

``optimum_superweight::packed_linear(x, tensors, layer, out_features)`` runs the registry's choice of kernel
(:func:`optimum_superweight.kernels.linear_forward`: selection, speed check, kernel state cache, native code)
*inside* the op, where Python attributes, ``data_ptr()`` keys and pybind calls are fine. Its fake (meta)
implementation only states the output's shape and dtype. ``tensors`` are the layer's stored tensors in the
order of :data:`optimum_superweight.format.TENSORS` (``None`` where the layer has none), so the compiled graph
knows what the op reads; ``layer`` is a handle to the module for what is not a tensor (bits, group layout,
W8A8 hold-out channels, its kernel caches), taken at trace time and registered here (a weak reference).

The op is a function of its tensor arguments: when they are not the module's own tensors (``opcheck`` passes
copies), it runs on a copy of the module holding them, with its own kernel states.

Eager code does not go through the op: :func:`optimum_superweight.kernels.linear_forward` calls it only while
``torch.compiler.is_compiling()``, so eager calls pay no dispatcher cost and keep their results bit for bit.

>>> from optimum_superweight.nn.linear import SuperWeightLinear
>>> layer = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
>>> x = torch.randn(2, 64, dtype=torch.bfloat16)
>>> y = torch.ops.optimum_superweight.packed_linear(x, layer_tensors(layer), layer_handle(layer), 32)
>>> bool(torch.equal(y, layer(x)))
True
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..format import TENSORS

__all__ = ["OP", "TENSOR_NAMES", "layer_tensors", "layer_handle", "compiled_forward", "set_eager_forward"]

#: The stored tensors the op receives, in this order.
TENSOR_NAMES: tuple[str, ...] = tuple(spec.name for spec in TENSORS)
# Per-module caches that a copy of the module (other tensors) must not share.
_CACHES = ("_kernel_states", "_kernel_selections", "_last_kernel")

_layers: "weakref.WeakValueDictionary[int, nn.Module]" = weakref.WeakValueDictionary()
_eager: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}


def set_eager_forward(forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
    """What the op runs: the kernel registry's eager forward (set by :mod:`optimum_superweight.kernels`, which
    imports this module, so that this module need not import it back)."""
    _eager["forward"] = forward


def layer_tensors(module: nn.Module) -> list[Optional[torch.Tensor]]:
    """The op's ``tensors`` argument for ``module``."""
    return [getattr(module, name, None) for name in TENSOR_NAMES]


@torch._dynamo.assume_constant_result
def layer_handle(module: nn.Module) -> int:
    """Register ``module`` and return its handle (run at trace time: a constant of the compiled graph)."""
    handle = id(module)
    _layers[handle] = module
    return handle


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
        and a.dtype == b.dtype and a.device == b.device
    )


def _module_for(layer: int, tensors: list[Optional[torch.Tensor]]) -> nn.Module:
    """The registered module, or a copy of it holding ``tensors`` when they are not its own."""
    module = _layers.get(layer)
    if module is None:
        raise RuntimeError(
            f"optimum_superweight::packed_linear: layer handle {layer} names no live quantized layer (handles are "
            "registered when torch.compile traces a layer's forward)."
        )
    if len(tensors) != len(TENSOR_NAMES):
        raise ValueError(
            f"optimum_superweight::packed_linear: {len(tensors)} tensors; accepted are {len(TENSOR_NAMES)} {TENSOR_NAMES}."
        )
    own = layer_tensors(module)
    if all(a is b for a, b in zip(own, tensors)) or all(_same(a, b) for a, b in zip(own, tensors)):
        return module
    for name, mine, given in zip(TENSOR_NAMES, own, tensors):
        expected = None if mine is None else (tuple(mine.shape), mine.dtype)
        found = None if given is None else (tuple(given.shape), given.dtype)
        if found != expected:
            raise ValueError(
                f"optimum_superweight::packed_linear: tensor {name!r} is {found}; the layer "
                f"{type(module).__name__}({module.out_features}x{module.in_features}) accepts {expected}."
            )
    return _rebound(module, tensors)


def _rebound(module: nn.Module, tensors: list[Optional[torch.Tensor]]) -> nn.Module:
    clone = copy.copy(module)
    clone.__dict__ = {key: value for key, value in module.__dict__.items() if key not in _CACHES}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    for name, tensor in zip(TENSOR_NAMES, tensors):
        if tensor is None:
            continue
        (clone._parameters if name in clone._parameters else clone._buffers)[name] = tensor
    return clone


@torch.library.custom_op("optimum_superweight::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, tensors: list[Optional[torch.Tensor]], layer: int, out_features: int
) -> torch.Tensor:
    """``y = x @ W^T + b`` for the quantized layer ``layer`` whose stored tensors are ``tensors``."""
    module = _module_for(layer, tensors)
    if module.out_features != out_features:
        raise ValueError(
            f"optimum_superweight::packed_linear: out_features={out_features}; the layer has {module.out_features}."
        )
    with torch.no_grad():
        y = _eager["forward"](module, x)
    # A custom op's output may not alias its inputs (a kernel could return a view or the bias itself).
    storage = y.untyped_storage().data_ptr()
    aliased = any(t is not None and t.untyped_storage().data_ptr() == storage for t in (x, *tensors))
    return y.clone() if aliased else y


@packed_linear.register_fake
def _packed_linear_fake(
    x: torch.Tensor, tensors: list[Optional[torch.Tensor]], layer: int, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


#: The op as ``torch.ops`` sees it.
OP = torch.ops.optimum_superweight.packed_linear.default


def compiled_forward(module: nn.Module, x: torch.Tensor) -> Any:
    """The layer's forward as one op call (what ``torch.compile`` traces)."""
    op = torch.ops.optimum_superweight.packed_linear
    return op(x, layer_tensors(module), layer_handle(module), module.out_features)
