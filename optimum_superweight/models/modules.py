"""Module surgery on any ``torch.nn.Module``: a layer's weight as ``[out, in]``, its sizes, swapping a submodule.

Shared by the in-memory pipeline (:mod:`.replace`), its W8A8 variation (:mod:`.w8a8`) and quantize-on-load
(:mod:`.loading`); it imports none of them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv1D", "as_linear", "dense_weight", "features", "set_module"]

try:  # GPT-2 style layers store their weight transposed ([in, out]).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` whatever the module's storage layout."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()


def as_linear(module: nn.Module) -> nn.Linear:
    """The layer as an ``nn.Linear``: itself, or for GPT-2's ``Conv1D`` a Linear presenting its transposed weight
    and its bias (views: nothing is copied)."""
    if isinstance(module, nn.Linear):
        return module
    dense = nn.Linear(*features(module), bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(module.weight.t(), requires_grad=False)
    dense.bias = module.bias
    return dense


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer, stored as ``nn.Linear`` or as GPT-2's ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape
    return in_features, out_features


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
