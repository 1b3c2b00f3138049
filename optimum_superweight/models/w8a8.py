"""Model-level W8A8 (``SuperWeightConfig(activation_bits=8)``): which channels each layer holds out, and the
module swaps used by :func:`.replace.quantize_model` and :func:`.replace.build_quantized_skeleton`.

A layer holds out of its activation quantization:

* the super-activation channels (``config.super_activation_channels``; default the super weights' rows) when
  its input is the hidden size (q/k/v/o, gate/up: the residual stream after a norm carries the super
  activation, from the super weight's layer on; earlier layers lose nothing by holding the channel out);
* the input columns of its own super weights (the down_proj input spike that creates the super activation).

Both quantizing and loading derive the same lists from ``config.json``, so the checkpoint needs no extra tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..config import SuperWeightConfig
from ..nn.w8a8 import SuperWeightW8A8Linear
from ..records import SuperWeight

__all__ = ["super_activation_channels", "holdout_channels_for", "quantize_model_w8a8", "build_w8a8_skeleton"]


def super_activation_channels(source: Any) -> list[int]:
    """Hidden channels of the super activations, from a ``DetectionReport`` (its ``super_activations``, or its
    super weights' rows when it has none) or from super-weight records (their rows).

    >>> super_activation_channels([SuperWeight("model.layers.11.mlp.down_proj", 507, 1229)])
    [507]
    """
    activations = getattr(source, "super_activations", None)
    if activations:
        return sorted({int(a.channel) for a in activations})
    records = source.super_weights() if callable(getattr(source, "super_weights", None)) else source
    return sorted({int(sw.row) for sw in records})


def _hidden_size(model: nn.Module, records: Iterable[SuperWeight]) -> int | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    modules = dict(model.named_modules())
    for sw in records:  # a super weight's row is a hidden channel: its module outputs the hidden size
        module = modules.get(sw.module)
        if module is not None:
            return getattr(module, "out_features", None) or module.weight.shape[-1]
    return None


def holdout_channels_for(
    in_features: int, coordinates: Iterable[tuple[int, int]], config: SuperWeightConfig, hidden_size: int | None
) -> list[int]:
    """Input channels a layer with ``in_features`` inputs and its own super weights ``coordinates`` holds out."""
    if not config.hold_out_super_activation:
        return []
    channels = {col for _, col in coordinates}
    if in_features == hidden_size:
        channels.update(c for c in config.super_activation_channels or [] if c < in_features)
    return sorted(channels)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _dense(module: nn.Module) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    # transformers Conv1D stores [in, out]: present it as a Linear.
    in_features, out_features = module.weight.shape
    dense = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    dense.weight = nn.Parameter(module.weight.t(), requires_grad=False)
    dense.bias = module.bias
    return dense


def quantize_model_w8a8(
    model: nn.Module,
    config: SuperWeightConfig,
    targets: dict[str, nn.Module],
    records: list[SuperWeight],
    coordinates: dict[str, list[tuple[int, int]]],
) -> nn.Module:
    """Swap every target for a :class:`SuperWeightW8A8Linear`; records the channels in ``config``."""
    if config.super_activation_channels is None:
        config.super_activation_channels = super_activation_channels(records)
    hidden = _hidden_size(model, records)
    for name, module in targets.items():
        dense = _dense(module)
        own = coordinates.get(name, [])
        layer = SuperWeightW8A8Linear.from_linear(
            dense,
            activation_scale=config.activation_scale,
            holdout_channels=holdout_channels_for(dense.in_features, own, config, hidden),
            scale_dtype=config.scale_dtype,
            super_weights=own,
        )
        _set_module(model, name, layer)
    return model


def build_w8a8_skeleton(
    model: nn.Module, config: SuperWeightConfig, targets: dict[str, nn.Module], counts: dict[str, int]
) -> nn.Module:
    """Empty :class:`SuperWeightW8A8Linear` modules shaped like a saved checkpoint (meta device, before loading)."""
    records = config.get_super_weights()
    hidden = _hidden_size(model, records)
    by_module: dict[str, list[tuple[int, int]]] = {}
    for sw in records:
        by_module.setdefault(sw.module, []).append((sw.row, sw.col))
    for name, module in targets.items():
        if isinstance(module, nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        else:
            in_features, out_features = module.weight.shape
        bias = module.bias
        skeleton = SuperWeightW8A8Linear(
            in_features,
            out_features,
            bias=bias is not None,
            activation_scale=config.activation_scale,
            holdout_channels=holdout_channels_for(in_features, by_module.get(name, []), config, hidden),
            scale_dtype=config.scale_dtype,
            num_super_weights=counts.get(name, 0),
            dtype=bias.dtype if bias is not None else None,
            device=module.weight.device,
        )
        _set_module(model, name, skeleton)
    return model
