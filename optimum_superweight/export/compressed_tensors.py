"""Export to compressed-tensors ``pack-quantized``: the format vLLM serves and plain transformers loads.

Our codes and scales are written as they are, through compressed-tensors' own API (its quantization config,
then its model compressor), in ONE quantized config group: transformers 5.24 decodes a second group with the
first group's arguments. compressed-tensors has no sparse outliers, so a layer holding a super weight, and the
layers vLLM fuses with it (q/k/v, gate/up), go to ``ignore`` and stay dense with exact values. After
compression every packed tensor is unpacked again and compared with our codes: a mismatch is an error.

What compressed-tensors cannot express exactly (a remainder group, float offsets, scales that the serving
dtype would round) is refused, or re-quantized only with ``allow_requantize=True``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..tensor.packing import unpack_codes
from ..tensor.quantize import quantize_weight
from .codes import ModuleCodes, exactly_representable
from .errors import NotExpressibleError, require

__all__ = ["export_compressed_tensors", "fused_siblings", "kernel_notes", "CompressedTensorsPlan"]

logger = logging.getLogger(__name__)

#: Projections vLLM fuses into one layer; they must share one scheme (quantized together or ignored together).
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)

#: Variants written, and the ``symmetric`` flag of the scheme that holds them. Integer zero-points
#: (``"zero_point": False``) pack exactly and compressed-tensors' own decompress reads them back exactly, but
#: transformers 5.24's loader decodes them wrongly (logits off, no error): refused until a loader gets them right.
CT_VARIANTS: dict[str, bool] = {"symmetric": True}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fused_siblings(name: str) -> list[str]:
    """``name`` and the modules fused with it in vLLM: ``...self_attn.k_proj`` -> q/k/v of that layer."""
    prefix, _, leaf = name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return [f"{prefix}.{member}" if prefix else member for member in group]
    return [name]


def kernel_notes(shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Which vLLM weight-only kernels the quantized ``(out, in)`` shapes allow (Marlin / Machete rules)."""
    notes = []
    for kernel, in_multiple, out_multiple in (("Marlin", 128, 64), ("Machete", 64, 128)):
        bad = sorted({f"{o}x{i}" for o, i in shapes.values() if i % in_multiple or o % out_multiple})
        if bad:
            notes.append(
                f"{kernel} needs in_features % {in_multiple} == 0 and out_features % {out_multiple} == 0; "
                f"not met by out x in = {', '.join(bad)}: vLLM will pick another kernel or refuse those layers."
            )
        else:
            notes.append(f"{kernel}: every quantized layer's shape fits (in % {in_multiple}, out % {out_multiple}).")
    return notes


@dataclass
class CompressedTensorsPlan:
    """Which layers are quantized (with which codes) and which stay dense, and why."""

    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    quantized: dict[str, ModuleCodes] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    requantized: list[str] = field(default_factory=list)


def _check_module(codes: ModuleCodes, serving: torch.dtype) -> None:
    require(
        codes.variant in CT_VARIANTS,
        codes.name,
        f"variant {codes.variant!r}: only {sorted(CT_VARIANTS)} is exported (zero-points pack exactly, but transformers "
        "5.24 decodes pack-quantized zero-points wrongly; float offsets have no compressed-tensors form)",
    )
    require(1 <= codes.bits <= 8, codes.name, f"{codes.bits}-bit codes (pack-quantized packs 1 to 8 bits)")
    require(
        codes.per_row or codes.in_features % codes.group_size == 0,
        codes.name,
        f"in_features {codes.in_features} is not a multiple of group_size {codes.group_size} (compressed-tensors has no "
        "remainder group)",
    )
    require(
        exactly_representable(codes.scale, serving),
        codes.name,
        f"{codes.scale.dtype} scales that {serving} would round (export with dtype= the scale dtype or float32)",
    )


def _requantized(codes: ModuleCodes) -> ModuleCodes:
    """Codes recomputed (RTN, symmetric, super weights held out) at a group size compressed-tensors can hold."""
    group = math.gcd(codes.in_features, codes.group_size)
    dense = codes.dequantize()
    quantized = quantize_weight(
        dense,
        bits=codes.bits,
        group_size=group,
        symmetric=True,
        scale_dtype=codes.scale.dtype,
        holdout=codes.super_indices,
    )
    new = ModuleCodes(**{**codes.__dict__})
    new.variant = "symmetric" if quantized.symmetric else "zero_point"
    new.group_size = group
    new.codes = unpack_codes(quantized.packed, codes.bits, group).reshape(codes.out_features, -1)[:, : codes.in_features]
    new.scale = quantized.scale
    new.zero_point = quantized.zero_point
    new.offset = None
    return new


def plan_compressed_tensors(
    all_codes: list[ModuleCodes], serving: torch.dtype, *, allow_requantize: bool = False
) -> CompressedTensorsPlan:
    """Decide, layer by layer, quantized (exact or re-quantized on request) or dense in ``ignore``."""
    if not all_codes:
        raise ValueError("No quantized layer to export.")
    dense: dict[str, str] = {}
    for codes in all_codes:
        if codes.num_super_weights:
            require(
                exactly_representable(codes.super_values, serving),
                codes.name,
                f"super weight values {codes.super_values.tolist()} that {serving} would round (export in float32 or the "
                "model's dtype)",
            )
            for sibling in fused_siblings(codes.name):
                dense[sibling] = f"holds a super weight ({codes.name})" if sibling == codes.name else f"fused with {codes.name}"
    chosen: dict[str, ModuleCodes] = {}
    requantized = []
    for codes in all_codes:
        if codes.name in dense:
            continue
        try:
            _check_module(codes, serving)
        except NotExpressibleError:
            if not allow_requantize:
                raise
            codes = _requantized(codes)
            _check_module(codes, serving)
            requantized.append(codes.name)
        chosen[codes.name] = codes
    kinds = {(c.bits, -1 if c.per_row else c.group_size, c.variant) for c in chosen.values()}
    if len(kinds) > 1:
        raise NotExpressibleError(
            "compressed-tensors export",
            f"layers with different settings {sorted(kinds)}: one config group is required (transformers 5.24 "
            "decodes a second group with the first group's arguments)",
        )
    (bits, group, variant), = kinds if kinds else {(all_codes[0].bits, all_codes[0].group_size, all_codes[0].variant)}
    plan = CompressedTensorsPlan(bits=bits, group_size=group, symmetric=CT_VARIANTS.get(variant, True))
    plan.quantized = chosen
    plan.ignore = sorted(dense)
    plan.reasons = dense
    plan.requantized = requantized
    return plan


def _quantization_config(plan: CompressedTensorsPlan, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    strategy = "channel" if plan.group_size == -1 else "group"
    args = QuantizationArgs(
        num_bits=plan.bits,
        type="int",
        symmetric=plan.symmetric,
        strategy=strategy,
        group_size=None if plan.group_size == -1 else plan.group_size,
    )
    # Every Linear that is not ours (lm_head, dense super-weight layers and their fused siblings) is in ignore.
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized", quantization_status="frozen"
    )


def _load_dense(dense_folder: Path, serving: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dense_folder, dtype=serving)


@torch.no_grad()
def _set_parameters(model: torch.nn.Module, plan: CompressedTensorsPlan, serving: torch.dtype) -> None:
    modules = dict(model.named_modules())
    for name, codes in plan.quantized.items():
        module = modules[name]
        # The dense weight holds d * (c - center) exactly; compressed-tensors' quantize() divides it by our scale
        # and recovers our codes (checked after compression).
        module.weight.copy_(codes.dequantize().to(serving))
        module.weight_scale.data = codes.scale.to(serving).reshape(module.weight_scale.shape).clone()
        if not plan.symmetric:
            zero = codes.zero_point.to(torch.int16) - codes.center
            module.weight_zero_point.data = zero.to(torch.int8).reshape(module.weight_zero_point.shape).clone()


def _verify_packed(model: torch.nn.Module, plan: CompressedTensorsPlan) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    modules = dict(model.named_modules())
    for name, codes in plan.quantized.items():
        module = modules[name]
        unpacked = unpack_from_int32(module.weight_packed.data, plan.bits, torch.Size([codes.out_features, codes.in_features]))
        expected = codes.codes.to(torch.int16) - codes.center
        if not torch.equal(unpacked.to(torch.int16).cpu(), expected):
            raise RuntimeError(f"{name}: compressed-tensors packed different codes than ours; nothing was written.")


def _card(plan: CompressedTensorsPlan, records: list, serving: torch.dtype, source: str | None) -> str:
    shapes = {n: (c.out_features, c.in_features) for n, c in plan.quantized.items()}
    kind = "symmetric" if plan.symmetric else "asymmetric (integer zero-points)"
    group = "per output channel" if plan.group_size == -1 else f"group {plan.group_size}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [compressed-tensors, superweight, int4]" if plan.bits == 4 else "tags: [compressed-tensors, superweight]",
        "base_model_relation: quantized",
        "---",
        "",
        "# compressed-tensors export of an optimum-superweight checkpoint",
        "",
        f"Weights: int{plan.bits} {kind}, {group}, `pack-quantized`, scales in {str(serving).removeprefix('torch.')}; "
        f"the codes and scales of the optimum-superweight checkpoint{f' `{source}`' if source else ''}, unchanged.",
        "",
        "## Serve",
        "",
        "```bash",
        "vllm serve THIS_FOLDER",
        "```",
        "",
        "or load it in plain transformers (needs `pip install compressed-tensors`, not optimum-superweight):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
        "```",
        "",
        "## Super weights (kept exact: their layers are dense, listed in `ignore`)",
        "",
    ]
    lines += [f"- `{sw.paper_notation()}` = {sw.value!r}" for sw in records] or ["- none recorded"]
    lines += ["", "Dense layers and why:", ""]
    lines += [f"- `{name}`: {why}" for name, why in sorted(plan.reasons.items())]
    if plan.requantized:
        lines += ["", f"Re-quantized on request (`allow_requantize=True`), not our codes: {', '.join(plan.requantized)}"]
    lines += ["", "## vLLM kernels for these shapes", ""] + [f"- {note}" for note in kernel_notes(shapes)]
    if serving == torch.float32:
        lines.append(
            "- float32 export: exact for transformers; vLLM's weight-only GPU kernels run float16/bfloat16. For vLLM, "
            "export with `dtype=float16` (or bfloat16) a checkpoint whose scales and super weights that dtype holds "
            "exactly (e.g. quantized from a float16 model); otherwise the export refuses rather than round them."
        )
    if plan.bits not in (4, 8):
        lines.append(f"- vLLM's weight-only kernels take 4 or 8 bits; this export has {plan.bits}-bit codes.")
    return "\n".join(lines) + "\n"


def export_compressed_tensors(
    all_codes: list[ModuleCodes],
    dense_folder: Path,
    out: Path,
    *,
    records: list,
    model_dtype: torch.dtype = torch.float32,
    dtype: str | torch.dtype = "auto",
    allow_requantize: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``out`` from the dense folder (see :func:`..source.write_dense_folder`) and our codes."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config
    except ImportError as error:
        raise ImportError(
            "compressed-tensors export needs the `compressed-tensors` package: pip install 'optimum-superweight[vllm]'"
        ) from error
    serving = _serving_dtype(dtype, model_dtype)
    plan = plan_compressed_tensors(all_codes, serving, allow_requantize=allow_requantize)
    model = _load_dense(dense_folder, serving)
    skip = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in plan.quantized)
    config = _quantization_config(plan, skip)
    apply_quantization_config(model, config, show_progress=False)
    _set_parameters(model, plan, serving)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    _verify_packed(model, plan)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    shapes = {n: (c.out_features, c.in_features) for n, c in plan.quantized.items()}
    for note in kernel_notes(shapes):
        if "not met" in note:
            logger.warning(note)
    (Path(out) / "README.md").write_text(_card(plan, records, serving, source))
    return {
        "format": "compressed-tensors",
        "path": str(out),
        "quantized": len(plan.quantized),
        "dense": plan.ignore,
        "requantized": plan.requantized,
        "dtype": str(serving).removeprefix("torch."),
        "kernels": kernel_notes(shapes),
    }


def _serving_dtype(dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """``"auto"``: the model's own dtype (that of its embeddings)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is invalid: expected one of {sorted(_DTYPES)} or 'auto'.")
        return dtype
    if dtype == "auto":
        return model_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {sorted(_DTYPES)} or 'auto'.")
    return _DTYPES[dtype]

