"""Export to AutoAWQ's "GEMM" layout (``quant_method: "awq"``): what vLLM serves on CPU (``cpu_awq``) and GPU
(``awq``, ``awq_marlin``) and what transformers reads through its AWQ integration.

Per quantized layer (``w = s * (q - z)``, 4-bit codes, one group size for the whole model, groups along the input):

- ``qweight`` int32 ``[in, out / 8]``: the codes of the transposed weight, eight output channels per int32;
- ``qzeros`` int32 ``[in / group, out / 8]``: the integer zero-points, packed the same way;
- ``scales`` float16 ``[in / group, out]``.

Within each int32, 4-bit field ``i`` (bits ``4i .. 4i+3``) holds output channel ``8k + AWQ_ORDER[i]``: AutoAWQ packs
the channels of each eight in the order 0, 2, 4, 6, 1, 3, 5, 7 (vLLM undoes it with the inverse 0, 4, 1, 5, 2, 6, 3, 7).

Our integer zero-point layers (and symmetric ones, ``z = 8``) export exactly, regrouped when the export's group
size divides theirs. AWQ has no sparse outliers: a layer holding a super weight, and the layers vLLM fuses with it
(q/k/v, gate/up), stay dense and exact, listed in ``modules_to_not_convert``. Float offsets have no integer zero:
refused (:class:`~.errors.NotExpressibleError`), or re-fitted with ``allow_requantize=True`` (:mod:`.refit`). After
writing, every packed tensor is read back and decoded; a difference from our dequantized weight is an error.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..progress import progress_bar
from .codes import ModuleCodes, exactly_representable
from .compressed_tensors import fused_siblings
from .errors import require
from .readme import awq_card
from .refit import RefitReport, TargetForm, measure_effect, resolve_layers, target_group

__all__ = ["export_awq", "pack_awq", "unpack_awq", "AWQ_ORDER", "awq_kernel_notes"]

#: Output channel (of each eight) held by 4-bit field ``i`` of an int32.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PACK = 8
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """int32 ``[rows, cols / 8]`` from 4-bit values ``[rows, cols]`` in AWQ's field order.

    >>> pack_awq(torch.arange(8).reshape(1, 8)).item() == sum(c << (4 * i) for i, c in enumerate(AWQ_ORDER))
    True
    """
    rows, cols = values.shape
    blocks = values.to(torch.int64).reshape(rows, cols // _PACK, _PACK)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (blocks << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq` (uint8 ``[rows, cols]``)."""
    fields = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int64)) & 0xF
    out = torch.empty_like(fields)
    out[..., list(AWQ_ORDER)] = fields
    return out.reshape(packed.shape[0], -1).to(torch.uint8)


def awq_kernel_notes(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    """Which of vLLM's AWQ kernels the quantized ``(out, in)`` shapes and the group size allow (from vLLM's source:
    ``cpu_wna16.py``, ``awq.py``, ``awq_marlin.py``)."""
    notes = []
    bad_cpu = sorted({f"{o}x{i}" for o, i in shapes.values() if o % 16})
    notes.append("vLLM CPU (`cpu_awq`, chosen automatically for `quant_method: awq` on CPU): 4-bit with zero-points; "
                 "repacks 16 output channels per block: " + (f"out_features % 16 != 0 for {', '.join(bad_cpu)}" if bad_cpu else "every shape fits") + ".")
    notes.append("vLLM GPU `awq` (float16 activations only): in % group_size == 0 and out % 8 == 0: every shape fits.")
    marlin_group = group_size in (-1, 32, 64, 128)
    bad_marlin = sorted({f"{o}x{i}" for o, i in shapes.values() if i % 128 or o % 64})
    if marlin_group and not bad_marlin:
        notes.append("vLLM GPU `awq_marlin`: group size and every shape fit (in % 128, out % 64).")
    else:
        why = [] if marlin_group else [f"group_size {group_size} (Marlin takes -1, 32, 64, 128)"]
        why += [f"in % 128 or out % 64 not met by out x in = {', '.join(bad_marlin)}"] if bad_marlin else []
        notes.append(f"vLLM GPU `awq_marlin` does not fit ({'; '.join(why)}): vLLM falls back to `awq` for the model.")
    return notes


@dataclass
class AwqPlan:
    """Layers written as AWQ (in their export form) and dense ones with the reason."""

    group_size: int
    quantized: dict[str, ModuleCodes] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    report: RefitReport = field(default_factory=RefitReport)


def _dense_layers(all_codes: list[ModuleCodes], dtype: torch.dtype) -> dict[str, str]:
    dense: dict[str, str] = {}
    for codes in all_codes:
        if codes.num_super_weights:
            require(
                exactly_representable(codes.super_values, dtype), codes.name,
                f"super weight values {codes.super_values.tolist()} that {dtype} would round (export with dtype='float32' "
                "or the model's dtype)",
            )
            for sibling in fused_siblings(codes.name):
                dense[sibling] = f"holds a super weight ({codes.name})" if sibling == codes.name else f"fused with {codes.name}"
    for codes in all_codes:
        if codes.name not in dense and codes.out_features % _PACK:
            for sibling in fused_siblings(codes.name):
                dense.setdefault(sibling, f"out_features of {codes.name} is not a multiple of 8 (AWQ packs 8 per int32)")
    return dense


def plan_awq(
    all_codes: list[ModuleCodes], dtype: torch.dtype, *, allow_requantize: bool = False, model: nn.Module | None = None,
    tokenizer: Any = None,
) -> AwqPlan:
    """Decide dense or AWQ for every layer; exact where possible, re-fitted only with ``allow_requantize``."""
    if not all_codes:
        raise ValueError("No quantized layer to export.")
    dense = _dense_layers(all_codes, dtype)
    candidates = [c for c in all_codes if c.name not in dense]
    group = target_group(candidates, allow_regroup=allow_requantize) if candidates else -1
    target = TargetForm(bits=4, group_size=group, variants=("zero_point",), refit_form="uint8", scale_dtype=torch.float16)
    quantized, report = resolve_layers(all_codes, set(dense), target, allow_requantize=allow_requantize, model=model,
                                       tokenizer=tokenizer)
    return AwqPlan(group_size=group, quantized=quantized, dense=dense, report=report)


def _layer_tensors(codes: ModuleCodes) -> dict[str, torch.Tensor]:
    return {
        "qweight": pack_awq(codes.codes.T.contiguous()),
        "qzeros": pack_awq(codes.zero_point.T.contiguous()),
        "scales": codes.scale.T.to(torch.float16).contiguous(),
    }


def _state(dense_folder: Path, plan: AwqPlan, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The AWQ state dict and, per dense layer, how many of its values ``dtype`` rounds."""
    from safetensors.torch import load_file

    state = load_file(str(dense_folder / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    rounded: dict[str, int] = {}
    for key, tensor in progress_bar(state.items(), total=len(state), desc="AWQ export: packing tensors", unit="tensor"):
        prefix, _, leaf = key.rpartition(".")
        if prefix in plan.quantized and leaf == "weight":
            for suffix, packed in _layer_tensors(plan.quantized[prefix]).items():
                out[f"{prefix}.{suffix}"] = packed
            continue
        if tensor.is_floating_point():
            cast = tensor.to(dtype)
            if prefix in plan.dense and leaf == "weight":
                rounded[prefix] = int((cast.to(torch.float32) != tensor.to(torch.float32)).sum())
            tensor = cast
        out[key] = tensor.contiguous()
    return out, rounded


def _verify(out: Path, plan: AwqPlan) -> None:
    """Read the written file back and decode every AWQ layer; it must equal our dequantized weight bit for bit."""
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    layers = progress_bar(plan.quantized.items(), total=len(plan.quantized), desc="AWQ export: checking layers",
                          unit="layer")
    for name, codes in layers:
        q = unpack_awq(state[f"{name}.qweight"]).to(torch.float32)  # [in, out]
        z = unpack_awq(state[f"{name}.qzeros"]).to(torch.float32)  # [groups, out]
        s = state[f"{name}.scales"].to(torch.float32)
        group = codes.in_features // s.shape[0]
        weight = ((q - z.repeat_interleave(group, 0)) * s.repeat_interleave(group, 0)).T
        if not torch.equal(weight, codes.dequantize()):
            raise RuntimeError(f"{name}: the written AWQ tensors do not decode to our weight; the export is invalid.")


def _config(dense_folder: Path, plan: AwqPlan, dtype: torch.dtype, not_converted: list[str]) -> dict[str, Any]:
    config = json.loads((dense_folder / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": plan.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": not_converted,
    }
    return config


def export_awq(
    all_codes: list[ModuleCodes],
    dense_folder: Path,
    out: Path,
    *,
    records: list,
    linear_names: list[str],
    model: nn.Module | None = None,
    tokenizer: Any = None,
    dtype: str = "auto",
    allow_requantize: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``out`` (a transformers-style folder in AWQ GEMM layout) from our codes and the dense folder.

    ``linear_names``: every ``nn.Linear``-like layer of the model (those not written as AWQ go to
    ``modules_to_not_convert``). ``dtype``: of the dense tensors and the config; ``"auto"``: float16 (AWQ's own)
    unless it would round a super weight, then float32.
    """
    if dtype == "auto":
        # float16 (AWQ's own) unless it would round a super weight: then float32, which holds every value.
        exact = all(exactly_representable(c.super_values, torch.float16) for c in all_codes if c.num_super_weights)
        dtype = "float16" if exact else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected 'auto' or one of {sorted(_DTYPES)}.")
    serving = _DTYPES[dtype]
    plan = plan_awq(all_codes, serving, allow_requantize=allow_requantize, model=model, tokenizer=tokenizer)
    not_converted = sorted(n for n in linear_names if n not in plan.quantized)
    state, rounded = _state(dense_folder, plan, serving)
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_config(dense_folder, plan, serving, not_converted), indent=2, sort_keys=True))
    if (dense_folder / "generation_config.json").is_file():
        shutil.copy(dense_folder / "generation_config.json", out / "generation_config.json")
    _verify(out, plan)
    if model is not None:
        plan.report.effect = measure_effect(model, tokenizer, plan.quantized)
    shapes = {n: (c.out_features, c.in_features) for n, c in plan.quantized.items()}
    notes = awq_kernel_notes(shapes, plan.group_size)
    (out / "README.md").write_text(awq_card(plan, records, dtype, source, notes, rounded))
    return {
        "format": "awq",
        "path": str(out),
        "group_size": plan.group_size,
        "quantized": len(plan.quantized),
        "dense": sorted(plan.dense),
        "requantized": list(plan.report.refitted),
        "regrouped": list(plan.report.regrouped),
        "refit": plan.report.to_dict(),
        "dense_values_rounded": rounded,
        "dtype": dtype,
        "kernels": notes,
    }
