"""Model-level W8A8 (``SuperWeightConfig(activation_bits=8)``): which channels each layer holds out, and the
module swaps used by :func:`.replace.quantize_model` and :func:`.replace.build_quantized_skeleton`.

A layer holds out of its activation quantization:

* the super-activation channels (``config.super_activation_channels``; default the super weights' rows) when
  its input is the hidden size (q/k/v/o, gate/up: the residual stream after a norm carries the super
  activation, from the super weight's layer on; earlier layers lose nothing by holding the channel out);
* the input columns of its own super weights (the down_proj input spike that creates the super activation);
* with ``config.massive_activation_ratio`` (default 20): the input channels whose largest magnitude over the
  calibration text is at least that multiple of the layer's median channel — the other massive activations
  (on SmolLM2, down_proj inputs of layers 11, 28 and 29 spike on the first token as well; with per-tensor scales
  each of them alone sets the scale of its layer). At most ``config.max_holdout_channels`` per layer.

The lists are returned as the result's ``activation_holdout`` and recorded in the model's ``config.json`` (never in
the caller's config), so loading rebuilds
the same modules and the checkpoint needs no extra tensor.

The alternative the paper compares against, SmoothQuant's migration (``config.smoothquant_alpha``,
:func:`smooth_activations`), rescales the full-precision model before quantizing: the migrated norm weights are
ordinary parameters of the saved checkpoint, so reloading needs nothing either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import QuantizationResult, SuperWeightConfig
from ..nn.w8a8 import SuperWeightW8A8Linear
from ..records import SuperWeight
from .modules import as_linear, features, set_module
from .plan import coordinates_by_module

__all__ = [
    "super_activation_channels",
    "holdout_channels_for",
    "massive_channels",
    "plan_activation_holdout",
    "quantize_model_w8a8",
    "build_w8a8_skeleton",
    "smoothing_groups",
    "smooth_activations",
]


#: Calibration tokens scanned for massive activations (at most; ``config.calibration_tokens`` if smaller).
MASSIVE_SCAN_TOKENS = 2048


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
    activations = config.activations
    if not activations.hold_out_super_activation:
        return []
    channels = {col for _, col in coordinates}
    if in_features == hidden_size:
        channels.update(c for c in activations.super_activation_channels or () if c < in_features)
    return sorted(channels)


def massive_channels(peaks: torch.Tensor, ratio: float, limit: int) -> list[int]:
    """Channels whose peak ``|x|`` is at least ``ratio`` x the median channel's, largest first, at most ``limit``.

    >>> massive_channels(torch.tensor([1.0, 1.0, 500.0, 1.0, 30.0]), 20.0, 8)
    [2, 4]
    """
    median = peaks.median()
    if limit <= 0 or not median > 0:
        return []
    order = torch.argsort(peaks, descending=True)[:limit]
    return [int(c) for c in order if peaks[c] >= ratio * median]


def plan_activation_holdout(
    model: nn.Module,
    config: SuperWeightConfig,
    targets: dict[str, nn.Module],
    coordinates: dict[str, list[tuple[int, int]]],
    *,
    tokenizer: Any = None,
) -> dict[str, list[int]]:
    """Held-out input channels per layer (only layers holding some out): the super activation and the layer's
    own super-weight columns, plus its massive activations measured on the calibration text when
    ``config.massive_activation_ratio`` is set. ``model`` must still be in full precision.
    """
    activations = config.activations
    if not activations.hold_out_super_activation:
        return {}
    hidden = _hidden_size(model, config.get_super_weights())
    plan = {
        name: holdout_channels_for(features(module)[0], coordinates.get(name, []), config, hidden)
        for name, module in targets.items()
    }
    ratio, limit = activations.massive_activation_ratio, activations.max_holdout_channels
    if ratio is not None and limit > 0 and targets:
        from .calibration import collect_input_absmax, model_calibration_ids

        # Peaks need far fewer tokens than GPTQ's second moments: massive activations sit on the first token
        # of every window and on frequent delimiters.
        ids, bos = model_calibration_ids(model, tokenizer, min(config.algorithm.calibration_tokens, MASSIVE_SCAN_TOKENS))
        window = min(512, len(ids))
        peaks = collect_input_absmax(model, list(targets), ids, window=window, bos_id=bos)
        for name, channels in plan.items():
            room = max(limit - len(channels), 0)
            extra = [c for c in massive_channels(peaks[name], ratio, room + len(channels))
                     if c not in channels]
            plan[name] = sorted(channels + extra[:room])
    return {name: channels for name, channels in plan.items() if channels}


#: Llama-style decoder layers: what produces an input (a norm, or the gated MLP's up projection, whose output
#: the down projection reads multiplied by act(gate)) and the projections that read it.
_SMOOTHING_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def smoothing_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(producer, [projections reading its output])`` of every Llama-style decoder layer of ``model``: the two
    norms, and the up projection for the down projection.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> groups = dict(smoothing_groups(build_tiny_model("llama")))
    >>> [name.rsplit(".", 1)[1] for name in groups["model.layers.0.input_layernorm"]]
    ['q_proj', 'k_proj', 'v_proj']
    >>> groups["model.layers.0.mlp.up_proj"]
    ['model.layers.0.mlp.down_proj']
    """
    modules = dict(model.named_modules())
    groups = []
    for name in modules:
        for producer, consumers in _SMOOTHING_GROUPS:
            if not name.endswith("." + producer):
                continue
            prefix = name[: -len(producer)]
            names = [prefix + c for c in consumers]
            if producer == "mlp.up_proj" and not isinstance(modules.get(prefix + "mlp.gate_proj"), nn.Linear):
                continue  # an ungated MLP applies its activation to up's output: no exact migration
            if all(isinstance(modules.get(n), nn.Linear) for n in names):
                groups.append((name, names))
    return groups


@torch.no_grad()
def smooth_activations(
    model: nn.Module, alpha: float, *, tokenizer: Any = None, calibration_tokens: int = MASSIVE_SCAN_TOKENS
) -> dict[str, torch.Tensor]:
    """SmoothQuant's migration (Xiao et al., 2023), in place on a full-precision Llama-style model: per group of
    :func:`smoothing_groups`, ``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)`` from the input peaks on
    calibration text (one pass: each migration leaves every projection's input elsewhere unchanged), the
    producer's output channel j (a norm's weight and bias, up_proj's row) divided by ``s_j``, each projection's
    weight column j multiplied by it. The model computes the same function (up to rounding); its activations
    lose their outlier channels.
    Returns the factors by norm name.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> factors = smooth_activations(build_tiny_model("llama"), 0.5)
    >>> factors["model.layers.0.input_layernorm"].shape, factors["model.layers.0.mlp.up_proj"].shape
    (torch.Size([64]), torch.Size([128]))
    """
    groups = smoothing_groups(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if not groups or str(model_type).startswith("gemma"):
        raise ValueError(
            f"SuperWeightConfig.smoothquant_alpha={alpha} is not supported for model_type={model_type!r}: the "
            "migration needs Llama-style decoder layers (input_layernorm -> self_attn.q/k/v_proj, "
            "post_attention_layernorm -> mlp.gate/up_proj, gated mlp.up_proj -> mlp.down_proj) whose norm "
            "multiplies by its weight. Use "
            "smoothquant_alpha=None (the super-activation hold-out needs no migration)."
        )
    from .calibration import collect_input_absmax, model_calibration_ids

    ids, bos = model_calibration_ids(model, tokenizer, calibration_tokens)
    peaks = collect_input_absmax(model, [names[0] for _, names in groups], ids, window=min(512, len(ids)), bos_id=bos)
    modules = dict(model.named_modules())
    factors = {}
    for norm_name, names in groups:
        weights = [modules[n].weight for n in names]
        weight_peak = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
        activation_peak = peaks[names[0]].float().clamp(min=1e-5)
        scale = (activation_peak.pow(alpha) / weight_peak.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
        producer = modules[norm_name]  # a norm's weight is [features]; up_proj's is [features, in]: its rows
        divisor = scale if producer.weight.dim() == 1 else scale[:, None]
        producer.weight.copy_((producer.weight.float() / divisor).to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.copy_((producer.bias.float() / scale).to(producer.bias.dtype))
        for weight in weights:
            weight.copy_((weight.float() * scale[None, :]).to(weight.dtype))
        factors[norm_name] = scale
    return factors


def quantize_model_w8a8(
    model: nn.Module,
    config: SuperWeightConfig,
    targets: dict[str, nn.Module],
    result: QuantizationResult,
    coordinates: dict[str, list[tuple[int, int]]],
    *,
    tokenizer: Any = None,
) -> QuantizationResult:
    """Swap every target for a :class:`SuperWeightW8A8Linear`; returns ``result`` with the held-out channels."""
    config = config.with_results(result)  # a working copy: the caller's config is never written to
    if config.super_activation_channels is None:
        config.super_activation_channels = super_activation_channels(result.super_weights)
    if config.activation_holdout is None:
        config.activation_holdout = plan_activation_holdout(model, config, targets, coordinates, tokenizer=tokenizer)
    _check_holdout_names(config, targets)
    for name, module in targets.items():
        dense = as_linear(module)
        own = coordinates.get(name, [])
        layer = SuperWeightW8A8Linear.from_linear(
            dense,
            activation_scale=config.activation_scale,
            holdout_channels=_holdout_of(name, dense.in_features, config),
            scale_dtype=config.scale_dtype,
            super_weights=own,
            name=name,
        )
        set_module(model, name, layer)
    return dataclasses.replace(
        result, super_activation_channels=config.super_activation_channels, activation_holdout=config.activation_holdout
    )


def _check_holdout_names(config: SuperWeightConfig, targets: dict[str, nn.Module]) -> None:
    unknown = sorted(set(config.activation_holdout or {}) - set(targets))
    if unknown:
        raise ValueError(
            f"SuperWeightConfig.activation_holdout names modules that are not quantized layers of this model: "
            f"{unknown[:3]}. Accepted: names of quantized linear layers (e.g. {next(iter(targets), '-')!r}); "
            "leave activation_holdout=None to compute it."
        )


def _holdout_of(name: str, in_features: int, config: SuperWeightConfig) -> list[int]:
    channels = (config.activation_holdout or {}).get(name, [])
    bad = [c for c in channels if c >= in_features]
    if bad:
        raise ValueError(
            f"SuperWeightConfig.activation_holdout[{name!r}]={channels} is invalid: channels must lie in "
            f"[0, {in_features}) for this layer; the checkpoint's config.json does not match its weights."
        )
    return channels


def build_w8a8_skeleton(
    model: nn.Module, config: SuperWeightConfig, targets: dict[str, nn.Module], counts: dict[str, int]
) -> nn.Module:
    """Empty :class:`SuperWeightW8A8Linear` modules shaped like a saved checkpoint (meta device, before loading)."""
    records = config.get_super_weights()
    if config.activation_holdout is None:  # a checkpoint written before the channels were recorded
        hidden = _hidden_size(model, records)
        by_module = coordinates_by_module(records)
        config.activation_holdout = {
            name: channels
            for name, module in targets.items()
            if (channels := holdout_channels_for(features(module)[0], by_module.get(name, []), config, hidden))
        }
    _check_holdout_names(config, targets)
    for name, module in targets.items():
        in_features, out_features = features(module)
        bias = module.bias
        skeleton = SuperWeightW8A8Linear(
            in_features,
            out_features,
            bias=bias is not None,
            activation_scale=config.activation_scale,
            holdout_channels=_holdout_of(name, in_features, config),
            scale_dtype=config.scale_dtype,
            num_super_weights=counts.get(name, 0),
            dtype=bias.dtype if bias is not None else None,
            device=module.weight.device,
        )
        set_module(model, name, skeleton)
    return model
