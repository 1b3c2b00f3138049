"""The in-memory pipeline: plan, calibrate, quantize, build modules; W8A8 as a variation of it.

:func:`quantize_model` reads top to bottom as its steps:

1. **plan** (:mod:`.plan`): the layers to convert and the exclusions; the super weights checked against the
   model, with their exact values;
2. **calibrate** (:func:`calibrate`): the layers' input second moments (GPTQ, the clip search's output
   objective) or only their diagonals (the default: HQQ grids weighted by activations), when the way of
   choosing codes reads them;
3. **quantize** (:func:`choose_codes`): each layer's codes, chosen by
   :func:`optimum_superweight.tensor.methods.code_method` (the one place that decides how);
4. **build** (:func:`build_modules`): the low-bit modules swapped in, the results recorded on a copy of the
   config (:func:`record_results`).

A :class:`Variation` says what steps 2 to 4 are: weight-only low-bit layers (:data:`WEIGHT_ONLY`), or
:data:`W8A8` (int8 weights and activations, :mod:`.w8a8`: its own calibration scan and module class, and a
SmoothQuant migration before the super weights' values are read). Quantize-on-load (:mod:`.loading`) is the
third: it plans on the meta device and runs steps 3 and 4 per arriving weight with :func:`quantized_layer`.

These functions work on any ``torch.nn.Module`` and need none of transformers' loading machinery; the
quantizer in :mod:`.quantizer` only wires them into ``from_pretrained``. Imports run one way: quantizer ->
loading -> here -> :mod:`.w8a8` (the W8A8 variation) and :mod:`.plan` -> :mod:`.modules` (module surgery);
nothing below imports this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import QuantizationResult, SuperWeightConfig
from ..nn.layers import is_quantized_layer
from ..nn.linear import SuperWeightLinear
from ..progress import forward_progress, progress_bar
from ..records import SuperWeight
from ..tensor.methods import code_method, code_settings
from ..tensor.quantize import QuantizedWeight
from ..tensor.rows import (
    LayerWeight,
    allowed_intra_op_threads,
    quantize_by_rows,
    quantize_layers,
    single_intra_op_thread,
)
from . import allocation
from .calibration import collect_hessians, collect_input_energy, model_calibration_ids
from .embeddings import build_embedding_skeleton, dequantize_embeddings, pack_embeddings
from .modules import as_linear, features, set_module
from .nf4 import build_nf4_skeleton, quantize_model_nf4
from .plan import (
    QuantizationPlan,
    check_finite_weights,
    check_super_weights,
    fit_to_model,
    modules_to_convert,
    plan_quantization,
    plan_targets,
    resolve_modules_to_not_convert,
)
from .w8a8 import MASSIVE_SCAN_TOKENS, build_w8a8_skeleton, quantize_model_w8a8, smooth_activations

__all__ = [
    "quantize_model",
    "Variation",
    "WEIGHT_ONLY",
    "W8A8",
    "NF4",
    "variation_for",
    "calibrate",
    "choose_widths",
    "choose_codes",
    "build_modules",
    "record_results",
    "pack_embeddings_step",
    "quantized_layer",
    "build_quantized_skeleton",
    "dequantize_model",
    "resolve_dtype",
    "compressed_size_bytes",
    # planning lives in .plan; importable from here as before
    "resolve_modules_to_not_convert",
    "modules_to_convert",
    "check_super_weights",
    "check_finite_weights",
]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: SuperWeightConfig,
    super_weights: Iterable[SuperWeight] | None = None,
    *,
    tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replace every targeted linear layer of ``model`` in place by its low-bit module.

    ``super_weights`` default to ``config.get_super_weights()``; they are validated and their exact values
    recorded, with the resolved exclusions (and W8A8's hold-out), on a copy of ``config`` set as
    ``model.config.quantization_config`` (:func:`record_results`), so the checkpoint's ``config.json`` describes
    the model completely. ``config`` itself is never written to: one config can quantize many models.

    With ``config.method == "gptq"`` (or the clip search's output objective) the layers' input statistics are
    first collected on built-in calibration text (:mod:`.calibration`; ``tokenizer`` encodes it, fixed token ids
    are used without one), unless precomputed ``hessians`` (module name -> ``E[x xᵀ]``) are given.

    >>> config = SuperWeightConfig(bits=4, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    >>> quantize_model(model, config)  # doctest: +SKIP
    """
    config = fit_to_model(model, config)  # every path through here: a group wider than every row is one per row
    variation = variation_for(config)
    # One intra-op thread (small operations collapse on a busy machine); the fitting pool uses the allowed cores.
    with single_intra_op_thread():
        skip, targets = plan_targets(model, config)
        variation.prepare(model, config, tokenizer)  # before the super weights' exact values are read
        records = config.get_super_weights() if super_weights is None else super_weights
        plan = plan_quantization(model, skip, targets, records)
        result = variation.quantize(model, config, plan, tokenizer=tokenizer, hessians=hessians)
        result = pack_embeddings_step(model, config, result)
    return record_results(model, config, result)


def pack_embeddings_step(model: nn.Module, config: SuperWeightConfig, result: QuantizationResult) -> QuantizationResult:
    """With ``config.embedding_bits``: the input embeddings and the head packed (:mod:`.embeddings`), the held-out
    super-activation channels added to ``result`` (recorded as ``super_activation_channels``); else ``result``."""
    if config.embedding_bits is None:
        return result
    channels = pack_embeddings(model, config, result.super_weights)
    return dataclasses.replace(result, super_activation_channels=channels)


@dataclass(frozen=True)
class Variation:
    """What the pipeline does after planning.

    Attributes:
        name: ``"weight-only"`` or ``"w8a8"``.
        prepare: ``(model, config, tokenizer) -> None``, run before the super weights' exact values are read
            (W8A8's SmoothQuant migration rescales weight columns).
        quantize: ``(model, config, plan, *, tokenizer, hessians) -> QuantizationResult``: calibrate, choose the
            codes, swap the modules in.
    """

    name: str
    prepare: Callable[[nn.Module, SuperWeightConfig, Any], None]
    quantize: Callable[..., QuantizationResult]


def _quantize_weight_only(
    model: nn.Module, config: SuperWeightConfig, plan: QuantizationPlan, *, tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> QuantizationResult:
    hessians = calibrate(model, config, plan.targets, tokenizer=tokenizer, hessians=hessians)
    linears = {name: as_linear(module) for name, module in plan.targets.items()}
    widths = choose_widths(config, linears, plan.coordinates, hessians, model=model, tokenizer=tokenizer)
    codes = choose_codes(config, linears, plan.coordinates, hessians, widths)
    build_modules(model, config, linears, plan.coordinates, codes, widths)
    return plan.result() if widths is None else replace(plan.result(), module_widths=widths)


def choose_widths(
    config: SuperWeightConfig,
    linears: dict[str, nn.Linear],
    coordinates: dict[str, list[tuple[int, int]]],
    hessians: dict[str, torch.Tensor] | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, dict[str, int]] | None:
    """Each layer's ``{"bits", "group_size"}``: ``config.module_widths`` as given (every name must be a layer to
    convert), else allocated within ``config.target_bits_per_weight`` (:mod:`.allocation`), else ``None`` (every
    layer at the config's ``bits`` and ``group_size``). With ``allocation.SENSITIVITY == "loss"`` the ``model``'s
    loss gradients on the calibration text (``tokenizer`` encodes it) weigh each layer's error."""
    if config.module_widths is not None:
        unknown = sorted(set(config.module_widths) - set(linears))
        if unknown:
            raise ValueError(f"SuperWeightConfig.module_widths names module '{unknown[0]}', which is not a layer this "
                             f"model converts ({len(linears)} layers, e.g. '{next(iter(linears), '')}').")
        return {name: {"bits": b, "group_size": g} for name in linears for b, g in [config.width_of(name)]}
    if config.target_bits_per_weight is None:
        return None
    gradients = None
    if allocation.SENSITIVITY == "loss" and model is not None:
        ids, bos = model_calibration_ids(model, tokenizer, config.algorithm.calibration_tokens)
        gradients = allocation.collect_output_gradients(model, list(linears), ids, bos_id=bos)
    return allocation.allocate_widths(config, linears, coordinates, hessians, gradients)


def _smooth_for_w8a8(model: nn.Module, config: SuperWeightConfig, tokenizer: Any) -> None:
    alpha = config.activations.smoothquant_alpha
    if alpha is not None:
        smooth_activations(model, alpha, tokenizer=tokenizer,
                           calibration_tokens=min(config.algorithm.calibration_tokens, MASSIVE_SCAN_TOKENS))


def _quantize_w8a8(
    model: nn.Module, config: SuperWeightConfig, plan: QuantizationPlan, *, tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> QuantizationResult:
    # W8A8 weights are round-to-nearest per row: no Hessians; its calibration is the activation scan in .w8a8.
    return quantize_model_w8a8(model, config, plan.targets, plan.result(), plan.coordinates, tokenizer=tokenizer)


#: Weight-only low-bit layers (:class:`SuperWeightLinear`), codes chosen as the config asks.
WEIGHT_ONLY = Variation("weight-only", prepare=lambda model, config, tokenizer: None, quantize=_quantize_weight_only)
#: int8 weights and activations (:class:`~optimum_superweight.nn.w8a8.SuperWeightW8A8Linear`), see :mod:`.w8a8`.
W8A8 = Variation("w8a8", prepare=_smooth_for_w8a8, quantize=_quantize_w8a8)


def _quantize_nf4(
    model: nn.Module, config: SuperWeightConfig, plan: QuantizationPlan, *, tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> QuantizationResult:
    energies = calibrate(model, config, plan.targets, tokenizer=tokenizer, hessians=hessians)
    quantize_model_nf4(model, config, plan.targets, plan.coordinates, energies)
    return plan.result()


#: bitsandbytes' NF4 layer with exact super weights (``weight_format="bnb-nf4"``), see :mod:`.nf4`.
NF4 = Variation("bnb-nf4", prepare=lambda model, config, tokenizer: None, quantize=_quantize_nf4)


def variation_for(config: SuperWeightConfig) -> Variation:
    """:data:`W8A8` when ``config.activation_bits`` is set, :data:`NF4` for ``weight_format="bnb-nf4"``, else
    :data:`WEIGHT_ONLY`.

    >>> variation_for(SuperWeightConfig(bits=4)).name
    'weight-only'
    """
    if config.activations.enabled:
        return W8A8
    return NF4 if config.weight_format == "bnb-nf4" else WEIGHT_ONLY


def calibrate(
    model: nn.Module, config: SuperWeightConfig, targets: dict[str, nn.Module], *, tokenizer: Any = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor] | None:
    """Every target's input second moment ``E[x xᵀ]`` on calibration text when the way of choosing codes needs
    it (``config.algorithm.needs_hessians``: GPTQ, the output clip objective), or only its diagonal ``E[x²]``
    (``needs_input_energy``: HQQ grids weighted by activations), unless ``hessians`` are given; else
    ``hessians`` as given (``None`` for the data-free methods)."""
    algorithm = config.algorithm
    if hessians is not None or not (algorithm.needs_hessians or algorithm.needs_input_energy):
        return hessians
    ids, bos = model_calibration_ids(model, tokenizer, algorithm.calibration_tokens)
    collect = collect_hessians if algorithm.needs_hessians else collect_input_energy
    with forward_progress(targets.values(), desc="calibration", unit="layer"):
        return collect(model, list(targets), ids, bos_id=bos)


def choose_codes(
    config: SuperWeightConfig,
    linears: dict[str, nn.Linear],
    coordinates: dict[str, list[tuple[int, int]]],
    hessians: dict[str, torch.Tensor] | None = None,
    widths: dict[str, dict[str, int]] | None = None,
) -> dict[str, QuantizedWeight]:
    """Each layer's codes, chosen as ``config`` asks (:func:`~optimum_superweight.tensor.methods.code_method`), at
    its own width in ``widths`` (module name -> ``{"bits", "group_size"}``, from :func:`choose_widths`) if given.

    Layers in row blocks, several blocks at once on one intra-op thread each
    (:func:`~optimum_superweight.tensor.rows.quantize_layers`: robust to a busy machine), or, for a
    method that quantizes layers reading one input together (GPTQ: one column sweep for q/k/v, gate/up), those
    layers in one call.
    """
    if widths is not None:  # the layers of one width together, at that width
        by_width: dict[tuple[int, int], list[str]] = {}
        for name in linears:
            by_width.setdefault((widths[name]["bits"], widths[name]["group_size"]), []).append(name)
        codes = {}
        for (bits, group_size), names in by_width.items():
            codes.update(choose_codes(config.with_width(bits, group_size), {n: linears[n] for n in names}, coordinates,
                                      hessians))
        return {name: codes[name] for name in linears}
    method = code_method(config)
    if method.choose_shared is None:
        layers = {name: LayerWeight(linear.weight.detach(), coordinates.get(name, []),
                                    hessians.get(name) if hessians else None)
                  for name, linear in linears.items()}
        with progress_bar(total=len(layers), desc="choosing codes", unit="layer") as bar:
            return quantize_layers(layers, config, on_layer=lambda name: bar.update())
    shared: dict[int, list[str]] = {}
    for name in linears:
        if hessians is None or hessians.get(name) is None:
            raise ValueError(f"No calibration statistics (hessian) for module '{name}'.")
        shared.setdefault(id(hessians[name]), []).append(name)
    settings, codes = code_settings(config), {}
    # A few large linear-algebra operations per group (Cholesky, column sweeps): the caller's threads pay there.
    with progress_bar(total=len(linears), desc="choosing codes", unit="layer") as bar, allowed_intra_op_threads():
        for names in shared.values():
            weights = [linears[n].weight.detach() for n in names]
            holdouts = [torch.tensor(coordinates.get(n, []), dtype=torch.long).reshape(-1, 2) for n in names]
            codes.update(zip(names, method.choose_shared(weights, settings, holdouts, hessians[names[0]])))
            bar.update(len(names))
    return codes


def build_modules(
    model: nn.Module,
    config: SuperWeightConfig,
    linears: dict[str, nn.Linear],
    coordinates: dict[str, list[tuple[int, int]]],
    codes: dict[str, QuantizedWeight],
    widths: dict[str, dict[str, int]] | None = None,
) -> None:
    """Swap each layer of ``linears`` in ``model`` for its :class:`SuperWeightLinear` holding ``codes[name]`` (at its
    width in ``widths`` when given)."""
    at_width: dict[tuple[int, int], SuperWeightConfig] = {}
    for name, linear in linears.items():
        layer_config = config
        if widths is not None:
            width = (widths[name]["bits"], widths[name]["group_size"])
            layer_config = at_width.setdefault(width, config.with_width(*width))
        set_module(model, name, quantized_layer(linear, coordinates.get(name, []), layer_config, codes[name], name=name))


def record_results(model: nn.Module, config: SuperWeightConfig, result: QuantizationResult) -> nn.Module:
    """Record ``result`` on the model: ``model.config.quantization_config`` becomes ``config.with_results(result)``,
    a copy (what ``save_pretrained`` writes); the caller's ``config`` is left as it was."""
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config.with_results(result)
    return model


def quantized_layer(
    dense: nn.Linear,
    coordinates: list[tuple[int, int]],
    config: SuperWeightConfig,
    quantized: Any = None,
    hessian: torch.Tensor | None = None,
    name: str = "SuperWeightLinear",
) -> SuperWeightLinear:
    """One low-bit layer: the given ``quantized`` codes, or those ``config`` asks for (computed here in row
    blocks, as while loading: identical codes, bounded temporaries); one on-disk format."""
    if quantized is None:
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


def build_quantized_skeleton(model: nn.Module, config: SuperWeightConfig, *, embeddings: bool = False) -> nn.Module:
    """Swap targeted layers for empty :class:`SuperWeightLinear` modules shaped like a saved checkpoint, and with
    ``embeddings`` (a compressed checkpoint's reload, not quantize-on-load) the packed embeddings of
    ``embedding_bits=8``.

    Called on the meta-device model before weights load, so loading is plain assignment by name.
    """
    if embeddings:
        build_embedding_skeleton(model, config)  # before the targets: the packed head is no target
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
    if config.activations.enabled:  # W8A8: its own module class (see .w8a8)
        return build_w8a8_skeleton(model, config, targets, counts)
    if config.weight_format == "bnb-nf4":
        return build_nf4_skeleton(model, config, targets, counts)
    unknown = sorted(set(config.module_widths or {}) - set(targets))
    if unknown:
        raise ValueError(
            f"config.json's field 'module_widths' names module '{unknown[0]}', which is not a quantized module of this "
            "model (it is absent or in 'modules_to_not_convert'); the checkpoint's config.json was edited."
        )
    for name, module in targets.items():
        in_features, out_features = features(module)
        bits, group_size = config.width_of(name)
        bias = module.bias
        skeleton = SuperWeightLinear(
            in_features,
            out_features,
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
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
    """Replace every quantized layer (:class:`SuperWeightLinear`, the NF4 layer) by a dense ``nn.Linear`` (super weights
    exact), and packed embeddings (``embedding_bits=8``) by a dense embedding and head."""
    dtype = resolve_dtype(dtype)
    dequantize_embeddings(model, dtype)  # embedding_bits=8: dense embeddings, a tied head tied again
    for name, module in list(model.named_modules()):
        if is_quantized_layer(module):
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
