"""Export to compressed-tensors ``pack-quantized``: the format vLLM serves and plain transformers loads.

Our codes and scales are written as they are, through compressed-tensors' own API (its quantization config,
then its model compressor), in ONE quantized config group: transformers 5.24 decodes a second group with the
first group's arguments. compressed-tensors has no sparse outliers, so a layer holding a super weight, and the
layers vLLM fuses with it (q/k/v, gate/up), go to ``ignore`` and stay dense with exact values. After
compression every packed tensor is unpacked again and compared with our codes, and the written folder is decoded
by compressed-tensors' own decompressor and compared with our dequantized weights: a mismatch is an error.

Symmetric codes are written symmetric; integer zero-points as compressed-tensors' asymmetric scheme (vLLM on GPU
reads it through Marlin; transformers 5.x's loader decodes it wrongly, so the output's README says which readers
decode it). What compressed-tensors cannot express exactly (a remainder group, float offsets, scales that the
serving dtype would round) is refused, or re-fitted only with ``allow_requantize=True`` (:mod:`.refit`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..progress import progress_bar, routed_tqdm
from .codes import ModuleCodes, exactly_representable
from .errors import require
from .readme import refit_section, super_weight_section
from .refit import RefitReport, TargetForm, measure_effect, resolve_layers, target_group

__all__ = ["export_compressed_tensors", "fused_siblings", "kernel_notes", "CompressedTensorsPlan", "decompress_check"]

logger = logging.getLogger(__name__)

#: Projections vLLM fuses into one layer; they must share one scheme (quantized together or ignored together).
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)

#: Re-fit forms accepted by the ``zero_point`` option (the form layers that must change take).
REFIT_FORMS = ("auto", "uint8", "symmetric")

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
    """Which layers are quantized (in their export form) and which stay dense, and why."""

    bits: int
    group_size: int  # -1: per output channel
    symmetric: bool
    quantized: dict[str, ModuleCodes] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    report: RefitReport = field(default_factory=RefitReport)

    @property
    def requantized(self) -> list[str]:
        return list(self.report.refitted)


def _dense_layers(all_codes: list[ModuleCodes], serving: torch.dtype) -> dict[str, str]:
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
    return dense


def _target(candidates: list[ModuleCodes], serving: torch.dtype, zero_point: str, allow_requantize: bool) -> TargetForm:
    """One config group: the layers' bits and group size; symmetric when every layer that is exact as it is is
    symmetric (or on request), else integer zero-points; re-fitted layers take that form."""
    if zero_point not in REFIT_FORMS:
        raise ValueError(f"zero_point={zero_point!r} is invalid: expected one of {', '.join(REFIT_FORMS)}.")
    bits = Counter(c.bits for c in candidates).most_common(1)[0][0]
    integer = {c.variant for c in candidates if c.variant != "float_offset"}
    symmetric = zero_point == "symmetric" or (zero_point == "auto" and integer == {"symmetric"})
    return TargetForm(
        bits=bits,
        group_size=target_group(candidates, allow_regroup=allow_requantize),
        variants=("symmetric",) if symmetric else ("zero_point",),
        refit_form="symmetric" if symmetric else "uint8",
        scale_dtype=torch.float16 if serving == torch.float32 else serving,
    )


def plan_compressed_tensors(
    all_codes: list[ModuleCodes], serving: torch.dtype, *, allow_requantize: bool = False, zero_point: str = "auto",
    model: torch.nn.Module | None = None, tokenizer: Any = None,
) -> CompressedTensorsPlan:
    """Decide, layer by layer, quantized (exact, regrouped, or re-fitted on request) or dense in ``ignore``."""
    if not all_codes:
        raise ValueError("No quantized layer to export.")
    dense = _dense_layers(all_codes, serving)
    candidates = [c for c in all_codes if c.name not in dense]
    if not candidates:
        raise ValueError("Every quantized layer holds a super weight or is fused with one: nothing to pack.")
    target = _target(candidates, serving, zero_point, allow_requantize)
    require(1 <= target.bits <= 8, candidates[0].name, f"{target.bits}-bit codes (pack-quantized packs 1 to 8 bits)")
    quantized, report = resolve_layers(all_codes, set(dense), target, allow_requantize=allow_requantize, model=model,
                                       tokenizer=tokenizer)
    plan = CompressedTensorsPlan(bits=target.bits, group_size=target.group_size, symmetric=target.variants == ("symmetric",))
    plan.quantized = quantized
    plan.ignore = sorted(dense)
    plan.reasons = dense
    plan.report = report
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
    layers = progress_bar(plan.quantized.items(), total=len(plan.quantized),
                          desc="compressed-tensors export: setting layers", unit="layer")
    for name, codes in layers:
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
    layers = progress_bar(plan.quantized.items(), total=len(plan.quantized),
                          desc="compressed-tensors export: checking codes", unit="layer")
    for name, codes in layers:
        module = modules[name]
        unpacked = unpack_from_int32(module.weight_packed.data, plan.bits, torch.Size([codes.out_features, codes.in_features]))
        expected = codes.codes.to(torch.int16) - codes.center
        if not torch.equal(unpacked.to(torch.int16).cpu(), expected):
            raise RuntimeError(f"{name}: compressed-tensors packed different codes than ours; nothing was written.")


def decompress_check(out: Path, plan: CompressedTensorsPlan, serving: torch.dtype) -> None:
    """Decode every packed layer of the written ``out`` with compressed-tensors' own decompressor (the code vLLM's
    loader mirrors) and require our dequantized weight, bit for bit (rounded once to ``serving``, as it computes)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    config = QuantizationConfig.model_validate(json.loads((Path(out) / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    files = sorted(Path(out).glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    layers = progress_bar(plan.quantized.items(), total=len(plan.quantized),
                          desc="compressed-tensors export: decoding layers", unit="layer")
    for name, codes in layers:
        local = {leaf: where[f"{name}.{leaf}"].get_tensor(f"{name}.{leaf}")
                 for leaf in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                 if f"{name}.{leaf}" in where}
        decoded = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        expected = codes.dequantize().to(decoded.dtype)
        if not torch.equal(decoded, expected):
            raise RuntimeError(f"{name}: compressed-tensors' decompressor decodes the written layer differently from our "
                               "weight; the export is invalid.")


def _readers(plan: CompressedTensorsPlan) -> list[str]:
    if plan.symmetric:
        return [
            "- compressed-tensors' decompressor: checked bit-exact at export.",
            "- vLLM on GPU (Marlin / Machete WNA16, shapes permitting).",
            "- vLLM 0.16 on CPU: no (its `CPUWNA16LinearKernel` reads GPTQ parameter names and fails on every "
            "compressed-tensors int4 checkpoint): export `--format awq` for vLLM on CPU.",
            "- plain transformers 5.x (`pip install compressed-tensors`): bit-equal to the checkpoint's dequantized weights.",
        ]
    return [
        "- compressed-tensors' decompressor: checked bit-exact at export.",
        "- vLLM on GPU: compressed-tensors WNA16 with zero-points maps to Marlin (`WNA16_ZP_SUPPORTED_TYPES_MAP`; "
        "group size and shapes permitting).",
        "- vLLM 0.16 on CPU: no (its `CPUWNA16LinearKernel` takes symmetric int4 only and reads GPTQ parameter names): "
        "export `--format awq` for vLLM on CPU.",
        "- plain transformers 5.x: **no**. Observed with transformers 5.25.0 and compressed-tensors 0.20.1: loading "
        "stops with a size-mismatch error on the packed `weight_zero_point` (transformers 5.24 loaded such files "
        "and decoded the zero-points wrongly, without an error). Use the symmetric export, the AWQ export, or the "
        "optimum-superweight checkpoint itself in transformers.",
    ]


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
        f"made from the optimum-superweight checkpoint{f' `{source}`' if source else ''}.",
        "",
        refit_section(plan.report),
        "",
        "## Readers known to decode it",
        "",
        *_readers(plan),
        "",
        "## Serve",
        "",
        "```bash",
        "vllm serve THIS_FOLDER",
        "```",
        "",
    ]
    if plan.symmetric:
        lines += [
            "or load it in plain transformers (needs `pip install compressed-tensors`, not optimum-superweight):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "model = AutoModelForCausalLM.from_pretrained('THIS_FOLDER')",
            "```",
            "",
        ]
    lines += [super_weight_section(records, plan.reasons, "ignore")]
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
    zero_point: str = "auto",
    allow_requantize: bool = False,
    source: str | None = None,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Write ``out`` from the dense folder (see :func:`..source.write_dense_folder`) and our codes.

    ``zero_point``: the form of the export's one config group: ``"auto"`` (symmetric when every layer that is
    exact as it is is symmetric, else integer zero-points), ``"uint8"`` or ``"symmetric"``; layers that cannot be
    held in it are re-fitted into it with ``allow_requantize`` (``model``/``tokenizer``: the importance and the
    measured effect of the re-fit).
    """
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import apply_quantization_config
    except ImportError as error:
        raise ImportError(
            "compressed-tensors export needs the `compressed-tensors` package: pip install 'optimum-superweight[vllm]'"
        ) from error
    serving = _serving_dtype(dtype, model_dtype)
    plan = plan_compressed_tensors(all_codes, serving, allow_requantize=allow_requantize, zero_point=zero_point,
                                   model=model, tokenizer=tokenizer)
    dense_model = _load_dense(dense_folder, serving)
    skip = sorted(n for n, m in dense_model.named_modules() if isinstance(m, torch.nn.Linear) and n not in plan.quantized)
    config = _quantization_config(plan, skip)
    apply_quantization_config(dense_model, config, show_progress=False)
    _set_parameters(dense_model, plan, serving)
    compressor = ModelCompressor.from_pretrained_model(dense_model, quantization_format="pack-quantized")
    with routed_tqdm(sys.modules[type(compressor).__module__]):  # its "Compressing model" bar, under our switches
        compressor.compress_model(dense_model)
    _verify_packed(dense_model, plan)
    dense_model.save_pretrained(out)
    compressor.update_config(str(out))
    decompress_check(Path(out), plan, serving)
    if model is not None:
        plan.report.effect = measure_effect(model, tokenizer, plan.quantized)
    shapes = {n: (c.out_features, c.in_features) for n, c in plan.quantized.items()}
    for note in kernel_notes(shapes):
        if "not met" in note:
            logger.warning(note)
    (Path(out) / "README.md").write_text(_card(plan, records, serving, source))
    return {
        "format": "compressed-tensors",
        "path": str(out),
        "symmetric": plan.symmetric,
        "group_size": plan.group_size,
        "quantized": len(plan.quantized),
        "dense": plan.ignore,
        "requantized": plan.requantized,
        "regrouped": list(plan.report.regrouped),
        "refit": plan.report.to_dict(),
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

