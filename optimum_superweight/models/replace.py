"""The in-memory pipeline: pick the linear layers to convert, check super weights, quantize and swap modules.

These functions work on any ``torch.nn.Module`` and need none of transformers' loading machinery; the
quantizer in :mod:`.quantizer` only wires them into ``from_pretrained``. Imports run one way: quantizer ->
loading -> here -> w8a8 (the W8A8 variation) -> :mod:`.modules` (module surgery); nothing below imports this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import QuantizationResult, SuperWeightConfig
from ..format import check_quantizable
from ..nn.linear import SuperWeightLinear
from ..records import SuperWeight
from ..tensor.methods import code_method, code_settings
from ..tensor.rows import quantize_by_rows
from .calibration import collect_hessians, model_calibration_ids
from .modules import Conv1D, dense_weight, features, set_module
from .w8a8 import MASSIVE_SCAN_TOKENS, build_w8a8_skeleton, quantize_model_w8a8, smooth_activations

__all__ = [
    "resolve_modules_to_not_convert",
    "modules_to_convert",
    "check_super_weights",
    "quantize_model",
    "record_results",
    "build_quantized_skeleton",
    "dequantize_model",
    "resolve_dtype",
    "check_finite_weights",
    "compressed_size_bytes",
    "quantized_layer",
]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


def resolve_modules_to_not_convert(model: nn.Module, config: SuperWeightConfig) -> list[str]:
    """The configured exclusions, or by default the output embedding and what is tied to it."""
    if config.modules_to_not_convert is not None:
        return list(config.modules_to_not_convert)
    skipped: set[str] = set()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if output_embeddings is not None and module is output_embeddings:
            skipped.add(name)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key in list(tied.keys()) + list(tied.values()):
        skipped.add(key.removesuffix(".weight"))
    if not skipped:
        skipped.add("lm_head")
    return sorted(skipped)


def modules_to_convert(model: nn.Module, skip: Iterable[str]) -> dict[str, nn.Module]:
    """``nn.Linear`` (and transformers ``Conv1D``) modules that will be quantized, by name."""
    skip = list(skip)
    selected = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, SuperWeightLinear) and not _matches(name, skip):
            selected[name] = module
    return selected


def check_finite_weights(targets: dict[str, nn.Module]) -> None:
    """Refuse NaN/inf in a weight to quantize, naming the module and the coordinate (paper convention)."""
    for name, module in targets.items():
        check_quantizable(name, dense_weight(module))


def check_super_weights(
    model: nn.Module, records: Iterable[SuperWeight], targets: dict[str, nn.Module]
) -> list[SuperWeight]:
    """Validate coordinates against the model and return the records with their exact ``value`` filled in.

    Raises ``ValueError`` when a module does not exist, is not a linear layer, a coordinate lies outside
    the matrix, or a recorded value does not match the weight in the checkpoint.
    """
    all_modules = dict(model.named_modules())
    checked = []
    for sw in records:
        module = all_modules.get(sw.module)
        if module is None:
            examples = [n for n in targets][:3]
            raise ValueError(
                f"Super weight module '{sw.module}' does not exist in this {type(model).__name__}; "
                f"linear modules are named like {examples}."
            )
        if not isinstance(module, (nn.Linear, Conv1D, SuperWeightLinear)):
            raise ValueError(
                f"Super weight module '{sw.module}' is a {type(module).__name__}, not a linear layer; "
                "super weights live in linear layers such as 'model.layers.2.mlp.down_proj'."
            )
        if isinstance(module, SuperWeightLinear):
            raise ValueError(f"Module '{sw.module}' is already quantized; load the full-precision checkpoint instead.")
        in_features, out_features = features(module)
        if not (0 <= sw.row < out_features and 0 <= sw.col < in_features):
            raise ValueError(
                f"Super weight {sw.module}.weight[{sw.row}, {sw.col}] lies outside the matrix: "
                f"row must be in [0, {out_features}) and col in [0, {in_features}) (paper convention: "
                "row = output channel, col = input channel)."
            )
        found = float(dense_weight(module)[sw.row, sw.col].item())
        if sw.value is not None and not math.isclose(found, sw.value, rel_tol=1e-3, abs_tol=1e-6):
            raise ValueError(
                f"Super weight {sw.module}.weight[{sw.row}, {sw.col}] is recorded as {sw.value!r} but the checkpoint "
                f"holds {found!r}: the coordinates were made for another model or revision."
            )
        checked.append(sw.with_updates(value=found))
    return checked


def _coordinates_by_module(records: Iterable[SuperWeight]) -> dict[str, list[tuple[int, int]]]:
    grouped: dict[str, list[tuple[int, int]]] = {}
    for sw in records:
        grouped.setdefault(sw.module, []).append((sw.row, sw.col))
    return grouped


def quantized_layer(
    dense: nn.Linear,
    coordinates: list[tuple[int, int]],
    config: SuperWeightConfig,
    quantized: Any = None,
    hessian: torch.Tensor | None = None,
    name: str = "SuperWeightLinear",
) -> SuperWeightLinear:
    """One low-bit layer: the codes ``config`` asks for (:func:`~optimum_superweight.tensor.methods.code_method`,
    in row blocks), or the given ``quantized`` codes (GPTQ's batches); one on-disk format."""
    if quantized is None:
        # Row blocks, as when quantizing while loading: identical codes, bounded temporaries.
        quantized = quantize_by_rows(dense.weight.detach(), coordinates, config, hessian=hessian)
    return SuperWeightLinear.from_linear(
        dense,
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        scale_dtype=config.scale_dtype,
        super_weights=coordinates,
        quantized=quantized,
        name=name,
        zero_point=config.zero_point,
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SuperWeightConfig,
    super_weights: Iterable[SuperWeight] | None = None,
    *,
    tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every targeted linear layer of ``model`` in place by a :class:`SuperWeightLinear`.

    ``super_weights`` default to ``config.get_super_weights()``; they are validated and their exact values
    recorded, with the resolved exclusions (and W8A8's hold-out), on a copy of ``config`` set as
    ``model.config.quantization_config`` (:func:`record_results`), so the checkpoint's ``config.json`` describes
    the model completely. ``config`` itself is never written to: one config can quantize many models.

    With ``config.method == "gptq"`` the layers' input statistics are first collected on built-in
    calibration text (:mod:`.calibration`; ``tokenizer`` encodes it, fixed token ids are used without one),
    unless precomputed ``hessians`` (module name -> ``E[x xᵀ]``) are given.

    >>> config = SuperWeightConfig(bits=4, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    >>> quantize_model(model, config)  # doctest: +SKIP
    """
    skip = resolve_modules_to_not_convert(model, config)
    targets = modules_to_convert(model, skip)
    check_finite_weights(targets)  # before calibration or GPTQ turn a NaN into an obscure failure
    if config.activation_bits is not None and config.smoothquant_alpha is not None:
        # Before the super weights' exact values are read: the migration rescales weight columns.
        smooth_activations(model, config.smoothquant_alpha, tokenizer=tokenizer,
                           calibration_tokens=min(config.calibration_tokens, MASSIVE_SCAN_TOKENS))
    records = check_super_weights(model, config.get_super_weights() if super_weights is None else super_weights, targets)
    result = QuantizationResult(super_weights=records, modules_to_not_convert=skip)
    coordinates = _coordinates_by_module(r for r in records if r.module in targets)
    if config.activation_bits is not None:  # W8A8: its own module class (see .w8a8)
        result = quantize_model_w8a8(model, config, targets, result, coordinates, tokenizer=tokenizer)
        return record_results(model, config, result)
    # GPTQ and the output clip objective need every layer's input second moment.
    if config.needs_calibration and hessians is None:
        ids, bos = model_calibration_ids(model, tokenizer, config.calibration_tokens)
        hessians = collect_hessians(model, list(targets), ids, bos_id=bos)
    denses = {}
    for name, module in targets.items():
        if isinstance(module, nn.Linear):
            denses[name] = module
        else:  # Conv1D: present the transposed weight as a Linear
            dense = nn.Linear(*features(module), bias=module.bias is not None, device="meta")
            dense.weight = nn.Parameter(module.weight.t(), requires_grad=False)
            dense.bias = module.bias
            denses[name] = dense
    method, settings = code_method(config), code_settings(config)
    for names, quantized in _shared_codes(method, settings, targets, denses, coordinates, hessians):
        for name, codes in zip(names, quantized):
            hessian = hessians.get(name) if hessians else None
            layer = quantized_layer(denses[name], coordinates.get(name, []), config, codes, hessian, name=name)
            set_module(model, name, layer)
    return record_results(model, config, result)


def record_results(model: nn.Module, config: SuperWeightConfig, result: QuantizationResult) -> nn.Module:
    """Record ``result`` on the model: ``model.config.quantization_config`` becomes ``config.with_results(result)``,
    a copy (what ``save_pretrained`` writes); the caller's ``config`` is left as it was."""
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config.with_results(result)
    return model


def _shared_codes(method, settings, targets, denses, coordinates, hessians):
    """``(names, codes)`` per batch of layers: with a method that quantizes layers reading one input together
    (GPTQ: one sweep for q/k/v, gate/up), their codes; otherwise one layer each and ``None`` (row blocks later)."""
    if method.choose_shared is None:
        return [([name], [None]) for name in targets]
    shared: dict[int, list[str]] = {}
    for name in targets:
        if hessians is None or hessians.get(name) is None:
            raise ValueError(f"No calibration statistics (hessian) for module '{name}'.")
        shared.setdefault(id(hessians[name]), []).append(name)
    batches = []
    for names in shared.values():
        weights = [denses[n].weight.detach() for n in names]
        holdouts = [torch.tensor(coordinates.get(n, []), dtype=torch.long).reshape(-1, 2) for n in names]
        batches.append((names, method.choose_shared(weights, settings, holdouts, hessians[names[0]])))
    return batches


def build_quantized_skeleton(model: nn.Module, config: SuperWeightConfig) -> nn.Module:
    """Swap targeted layers for empty :class:`SuperWeightLinear` modules shaped like a saved checkpoint.

    Called on the meta-device model before weights load, so loading is plain assignment by name.
    """
    if config.modules_to_not_convert is None:
        raise ValueError(
            "This superweight checkpoint's config lacks 'modules_to_not_convert'; it was not written by "
            "optimum-superweight's save_pretrained. Re-quantize the full-precision model."
        )
    targets = modules_to_convert(model, config.modules_to_not_convert)
    counts: dict[str, int] = {}
    for sw in config.get_super_weights():
        if sw.module in targets:
            counts[sw.module] = counts.get(sw.module, 0) + 1
        elif sw.module not in dict(model.named_modules()):
            raise ValueError(
                f"config.json's field 'super_weights' names module '{sw.module}', which this model does not have."
            )
    if config.activation_bits is not None:  # W8A8: its own module class (see .w8a8)
        return build_w8a8_skeleton(model, config, targets, counts)
    for name, module in targets.items():
        in_features, out_features = features(module)
        bias = module.bias
        skeleton = SuperWeightLinear(
            in_features,
            out_features,
            bias=bias is not None,
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            scale_dtype=config.scale_dtype,
            num_super_weights=counts.get(name, 0),
            dtype=bias.dtype if bias is not None else None,
            device=module.weight.device,
            zero_point=config.zero_point,
        )
        set_module(model, name, skeleton)
    return model


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or its name (``"float32"``, ``"torch.bfloat16"``); ``None`` stays ``None``.

    transformers hands ``model.config.dtype`` to ``dequantize``, a string once the config was saved or reloaded.

    >>> resolve_dtype("bfloat16"), resolve_dtype(torch.float16), resolve_dtype(None)
    (torch.bfloat16, torch.float16, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
            return resolved
    raise ValueError(f"dtype={dtype!r} is invalid: accepted are a torch floating dtype or its name, e.g. 'float32'.")


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every :class:`SuperWeightLinear` by a dense ``nn.Linear`` (super weights exact)."""
    dtype = resolve_dtype(dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, SuperWeightLinear):
            set_module(model, name, module.to_linear(dtype))
    return model


def compressed_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (codes count as packed bytes)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total
