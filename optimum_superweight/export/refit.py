"""Layers in the form a target format holds: exactly where possible, re-fitted on request (``allow_requantize``).

A format with integer zero-points and one group size (AWQ, compressed-tensors) holds a layer of ours exactly when
its codes are ``bits`` wide, its zero is an integer (symmetric codes are zero-point codes with ``z = 2**(bits-1)``),
its scales survive the format's scale dtype and the format's group size divides both the layer's group size and
its input size (a group then splits into whole groups that repeat its scale and zero: :func:`regroup`).

Anything else must change form: float offsets (``w = s·q + m``, the default ``zero_point="float"``) have no
integer zero, other widths have no packing. :func:`refit_layer` fits such a layer again from its dequantized
weight with the package's weighted optimizer (:func:`~optimum_superweight.tensor.hqq.hqq_quantize_weight` in the
target form: HQQ grids refined for the output error weighted by each input channel's mean squared activation),
super weights held out and exact. The importance is measured by running the checkpoint on the package's
calibration text (:func:`input_importance`); without a tokenizer it is uniform, with a warning. Given a layer's
whole input second moment (:func:`input_hessians`), :func:`refit_layer` also chooses the codes on that grid by
GPTQ's error feedback (:func:`~optimum_superweight.tensor.gptq.gptq_on_grid`); the export does not: on held-out
text it did not beat the nearest codes (benchmarks/RESULTS.md, "Export with `--requantize`").
:func:`measure_effect` scores the checkpoint and the exported weights on held-out text (the start of the built-in
text; calibration reads its end), so the export says what the re-fit cost.

>>> target = TargetForm(bits=4, group_size=64, variants=("zero_point", "symmetric"), refit_form="uint8")
>>> target.describe()
'int4, group 64, integer zero-points'
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import DEFAULT_IMPORTANCE_TOKENS
from ..progress import forward_progress, progress_bar
from ..tensor.gptq import gptq_on_grid
from ..tensor.hqq import hqq_quantize_weight
from ..tensor.packing import unpack_codes
from .codes import ModuleCodes, exactly_representable

__all__ = ["TargetForm", "RefitReport", "target_group", "express", "regroup", "refit_layer", "input_importance",
           "input_hessians", "measure_effect", "resolve_layers", "REFIT_METHOD"]

logger = logging.getLogger(__name__)

#: Tokens of held-out text (the start of the built-in text) the re-fit's effect is measured on.
EFFECT_TOKENS = 1024
#: Calibration tokens (the end of the built-in text) the re-fit's importance is measured on: the quantizer's own.
IMPORTANCE_TOKENS = DEFAULT_IMPORTANCE_TOKENS
#: GPTQ's damping of the error feedback (a fraction of the mean of ``diag(H)``) when :func:`refit_layer` is given ``H``.
REFIT_DAMP = 0.01
#: How the export's re-fit chooses codes (its README says it).
REFIT_METHOD = "grids by the weighted HQQ fit, each weight's nearest code on its grid"


@dataclass(frozen=True)
class TargetForm:
    """What a format holds: code width, one group size (``-1``: per row), the variants it takes as they are, the
    form a re-fit produces (``"uint8"``: integer zero-points, or ``"symmetric"``) and the scale dtype."""

    bits: int
    group_size: int
    variants: tuple[str, ...]
    refit_form: str
    scale_dtype: torch.dtype = torch.float16

    def describe(self) -> str:
        group = "per row" if self.group_size == -1 else f"group {self.group_size}"
        kind = "symmetric" if self.variants == ("symmetric",) else "integer zero-points"
        return f"int{self.bits}, {group}, {kind}"


@dataclass
class RefitReport:
    """What changed: ``refitted`` layers (new codes; ``reasons`` says why), ``regrouped`` layers (same values,
    smaller groups), the statistics used (``importance``), how the codes were chosen (``method``), and the measured
    effect (``None`` when nothing was re-fitted)."""

    refitted: list[str] = field(default_factory=list)
    regrouped: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    importance: str | None = None
    method: str | None = None
    effect: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"refitted": list(self.refitted), "regrouped": list(self.regrouped), "reasons": dict(self.reasons),
                "importance": self.importance, "method": self.method, "effect": self.effect}


def _group(codes: ModuleCodes) -> int:
    return -1 if codes.per_row else codes.group_size


def target_group(all_codes: list[ModuleCodes], *, allow_regroup: bool) -> int:
    """The one group size of the export: the layers' most common one; with ``allow_regroup``, shrunk to the
    greatest common divisor of it and every input size when some layer's input size is not a multiple of it."""
    groups = Counter(_group(c) for c in all_codes)
    group = groups.most_common(1)[0][0]
    if group == -1 and len(groups) == 1:
        return -1
    if group == -1:
        group = max(g for g in groups if g != -1)
    if allow_regroup:
        for codes in all_codes:
            group = math.gcd(group, codes.in_features)
            if not codes.per_row:
                group = math.gcd(group, codes.group_size)
    return group


def regroup(codes: ModuleCodes, group_size: int) -> ModuleCodes:
    """The same layer with groups of ``group_size`` (a divisor of its group and input sizes): exact."""
    if _group(codes) == group_size:
        return codes
    own = codes.in_features if codes.per_row else codes.group_size
    if group_size == -1 or own % group_size or codes.in_features % group_size:
        raise ValueError(f"{codes.name}: group {own} cannot be split into groups of {group_size}.")
    source = torch.arange(0, codes.in_features, group_size) // own  # old group of each new group's first input
    new = replace(codes, group_size=group_size, per_row=False, scale=codes.scale[:, source].contiguous())
    if codes.zero_point is not None:
        new.zero_point = codes.zero_point[:, source].contiguous()
    if codes.offset is not None:
        new.offset = codes.offset[:, source].contiguous()
    return new


def express(codes: ModuleCodes, target: TargetForm) -> tuple[ModuleCodes | None, str]:
    """``codes`` in ``target``'s form without changing a value, or ``(None, why not)``."""
    if codes.bits != target.bits:
        return None, f"{codes.bits}-bit codes (the format holds {target.bits})"
    if codes.variant not in target.variants:
        if codes.variant == "symmetric" and "zero_point" in target.variants:
            zero = torch.full_like(codes.scale, codes.center, dtype=torch.uint8)
            codes = replace(codes, variant="zero_point", zero_point=zero)
        elif codes.variant == "zero_point" and "symmetric" in target.variants and bool((codes.zero_point == codes.center).all()):
            codes = replace(codes, variant="symmetric", zero_point=None)
        else:
            what = "float offsets (w = s*q + m: no integer zero-point)" if codes.variant == "float_offset" else codes.variant
            return None, f"{what}; the format holds {target.describe()}"
    if not exactly_representable(codes.scale, target.scale_dtype):
        return None, f"{codes.scale.dtype} scales that {str(target.scale_dtype).removeprefix('torch.')} would round"
    own = codes.in_features if codes.per_row else codes.group_size
    if target.group_size == -1:
        if not codes.per_row:
            return None, f"group {own} (the export is per row)"
        return codes, ""
    if codes.in_features % target.group_size:
        return None, f"in_features {codes.in_features} is not a multiple of group_size {target.group_size} (no remainder group)"
    if own % target.group_size:
        return None, f"group {own} is not a multiple of the export's group_size {target.group_size}"
    return regroup(codes, target.group_size), ""


@torch.no_grad()
def refit_layer(
    codes: ModuleCodes, target: TargetForm, importance: torch.Tensor | None = None, *, hessian: torch.Tensor | None = None,
) -> ModuleCodes:
    """``codes`` fitted again in ``target``'s form from its dequantized weight, super weights held out and exact.

    ``importance`` (``[in_features]``, each input channel's mean squared activation) weighs the grid fit; ``None``
    weighs every channel alike, or by ``diag(hessian)``. ``hessian`` (``[in, in]``, ``E[x xᵀ]`` of the layer's inputs)
    also has GPTQ's error feedback choose the codes on that grid for the layer's output (not what the export does:
    see the module doc); without it each weight takes its nearest code.
    """
    dense = codes.dequantize()
    if importance is None and hessian is not None:
        importance = torch.diagonal(hessian)
    weights = torch.ones(codes.in_features) if importance is None else importance.detach().to("cpu", torch.float32).clone()
    fitted = hqq_quantize_weight(
        dense, bits=target.bits, group_size=target.group_size, symmetric=target.refit_form == "symmetric",
        zero_point="uint8", scale_dtype=target.scale_dtype, holdout=codes.super_indices, importance=weights,
    )
    if hessian is not None:
        fitted = gptq_on_grid(dense, hessian.detach().to("cpu"), fitted, holdout=codes.super_indices, damp=REFIT_DAMP)
    layout = fitted.layout
    unpacked = unpack_codes(fitted.packed, layout.bits, layout.effective_group_size).reshape(layout.out_features, -1)
    symmetric = target.refit_form == "symmetric"
    return replace(
        codes, variant="symmetric" if symmetric else "zero_point", bits=target.bits,
        group_size=layout.effective_group_size, per_row=target.group_size == -1,
        codes=unpacked[:, : codes.in_features].contiguous(), scale=fitted.scale, zero_point=fitted.zero_point,
        offset=None, refit=fitted,
    )


def input_importance(model: nn.Module, tokenizer: Any, names: list[str], n_tokens: int = IMPORTANCE_TOKENS) -> tuple[dict[str, torch.Tensor], str]:
    """Each named layer's per-input-channel mean squared activation, measured by running ``model`` (the
    checkpoint as quantized) on the package's calibration text; ``({}, "uniform")`` without a tokenizer."""
    return _input_statistics(model, tokenizer, names, n_tokens, whole=False)


def input_hessians(model: nn.Module, tokenizer: Any, names: list[str], n_tokens: int = IMPORTANCE_TOKENS) -> tuple[dict[str, torch.Tensor], str]:
    """Each named layer's input second moment ``E[x xᵀ]`` (float32 ``[in, in]``; layers reading one input share one),
    measured like :func:`input_importance` (whose values are its diagonal); ``({}, "uniform")`` without a tokenizer."""
    return _input_statistics(model, tokenizer, names, n_tokens, whole=True)


def _input_statistics(model: nn.Module, tokenizer: Any, names: list[str], n_tokens: int, *, whole: bool) -> tuple[dict[str, torch.Tensor], str]:
    if not names:
        return {}, "none"
    if tokenizer is None:
        logger.warning("optimum-superweight export: no tokenizer, so the re-fit weighs every input channel alike "
                       "(pass tokenizer= or save one next to the checkpoint to weigh them by their activations).")
        return {}, "uniform"
    from ..models.calibration import collect_hessians, collect_input_energy, model_calibration_ids

    ids, bos = model_calibration_ids(model, tokenizer, n_tokens)
    window = min(512, max(len(ids) // 2, 16))
    modules = dict(model.named_modules())
    collect = collect_hessians if whole else collect_input_energy
    with forward_progress([modules[name] for name in names], desc="export: calibration", unit="layer"):
        statistics = collect(model, names, ids, window=window, bos_id=bos)
    return statistics, f"activations ({len(ids)} calibration tokens)"


def resolve_layers(
    all_codes: list[ModuleCodes], dense: set[str], target: TargetForm, *, allow_requantize: bool,
    model: nn.Module | None = None, tokenizer: Any = None,
) -> tuple[dict[str, ModuleCodes], RefitReport]:
    """Every layer not in ``dense`` in ``target``'s form: as it is, regrouped (exact) or, only with
    ``allow_requantize``, re-fitted. Raises :class:`~.errors.NotExpressibleError` naming the first layer that
    would need a re-fit when it is not allowed."""
    from .errors import NotExpressibleError

    report = RefitReport()
    chosen: dict[str, ModuleCodes] = {}
    pending: dict[str, ModuleCodes] = {}
    for codes in all_codes:
        if codes.name in dense:
            continue
        exact, why = express(codes, target)
        if exact is None:
            if not allow_requantize:
                raise NotExpressibleError(codes.name, why)
            pending[codes.name] = codes
            report.reasons[codes.name] = why
            continue
        if _group(exact) != _group(codes):
            report.regrouped.append(codes.name)
        chosen[codes.name] = exact
    if pending:
        importance, report.importance = input_importance(model, tokenizer, list(pending)) if model is not None else ({}, "uniform")
        report.method = REFIT_METHOD
        refits = progress_bar(pending.items(), total=len(pending), desc="export: re-fitting layers", unit="layer")
        for name, codes in refits:
            chosen[name] = refit_layer(codes, target, importance.get(name))
            report.refitted.append(name)
    ordered = {c.name: chosen[c.name] for c in all_codes if c.name in chosen}
    return ordered, report


@torch.no_grad()
def measure_effect(
    model: nn.Module, tokenizer: Any, layers: dict[str, ModuleCodes], *, max_tokens: int = EFFECT_TOKENS
) -> dict[str, Any] | None:
    """Perplexity of the checkpoint and of the exported weights (``layers`` re-fitted in place of the checkpoint's)
    on the first ``max_tokens`` tokens of the built-in text (the calibration text is its end).

    Runs a float32 dense copy of ``model``; returns ``None`` without a tokenizer or a re-fitted layer.
    """
    refitted = {name: codes for name, codes in layers.items() if codes.refit is not None}
    if tokenizer is None or not refitted:
        return None
    import copy

    from ..evaluation import perplexity
    from ..models.replace import dequantize_model

    dense = dequantize_model(copy.deepcopy(model), torch.float32)
    before = perplexity(dense, tokenizer, max_tokens=max_tokens)
    modules = dict(dense.named_modules())
    for name, codes in refitted.items():
        modules[name].weight.copy_(codes.dequantize())
    after = perplexity(dense, tokenizer, max_tokens=max_tokens)
    return {
        "text": f"built-in text, first {before.n_tokens} tokens (not the calibration text)",
        "checkpoint_perplexity": round(before.ppl, 4),
        "export_perplexity": round(after.ppl, 4),
        "ratio": round(after.ppl / before.ppl, 4),
    }
