"""Quantize while loading (``SuperWeightConfig(low_memory=True)``): the full-precision model never exists.

The low-memory variation of the pipeline (:mod:`.replace`): planned on the meta device before weights load,
then the pipeline's quantize and build steps (:func:`.replace.quantized_layer`) run once per arriving weight.

transformers loads a checkpoint one tensor at a time and, for each parameter the quantizer claims
(``param_needs_quantization``), hands the full-precision tensor to the quantizer's op
(``get_quantize_ops``) before it is assigned. The plan built here, before weights load:

1. super weights: the configured coordinates, or (``detect=True``) streaming detection straight from
   the shards (:mod:`optimum_superweight.detection.streaming`: one decoder layer in memory at a time, raw spikes
   kept without ablation confirmation);
2. the targeted linear layers are swapped for empty :class:`SuperWeightLinear` skeletons, exactly as for
   a compressed checkpoint;
3. each arriving ``<module>.weight`` is quantized by :class:`SuperWeightQuantize` with the very code of
   the in-memory path (:func:`.replace.quantized_layer`), so the result is bit-identical to
   ``quantize_model`` on the loaded model, and only the packed tensors are kept.

Peak memory: the compressed model + one full-precision weight (+ its quantization temporaries) + during
detection one full-precision decoder layer and the prompts' activations. Trade-off: GPTQ is refused
(it needs every layer's calibration activations), and detection is unconfirmed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from ..config import QuantizationResult, SuperWeightConfig
from ..format import BIAS, check_quantizable
from ..prompts import model_tokenizer
from ..records import SuperWeight
from ..tensor.rows import quantize_by_rows
from .modules import Conv1D, features
from .plan import modules_to_convert, resolve_modules_to_not_convert
from .replace import build_quantized_skeleton, quantized_layer

__all__ = ["LowMemoryPlan", "plan_low_memory", "SuperWeightQuantize", "quantize_by_rows"]

logger = logging.getLogger(__name__)


@dataclass
class LowMemoryPlan:
    """What quantize-on-load needs per weight: coordinates, layout, and the records to complete.

    ``config`` is the caller's config with the planned super weights and exclusions recorded: a copy.
    """

    config: SuperWeightConfig
    # "<module>.weight" -> (module name, in_features, out_features, transposed in the checkpoint)
    weights: dict[str, tuple[str, int, int, bool]]
    records: dict[str, list[SuperWeight]]
    check_values: bool
    done: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    def finished_records(self) -> list[SuperWeight]:
        return [sw for module_records in self.records.values() for sw in module_records]

    def result(self) -> QuantizationResult:
        """The super weights with the exact values read while loading, and the resolved exclusions."""
        return QuantizationResult(self.finished_records(), list(self.config.modules_to_not_convert or []))


def _detect(model: nn.Module, config: SuperWeightConfig, checkpoint_files: Any) -> list[SuperWeight]:
    from ..detection import records_to_keep, run_detection

    files = [str(f) for f in (checkpoint_files or [])]
    if not files or not all(f.endswith(".safetensors") for f in files):
        raise ValueError(
            "SuperWeightConfig(low_memory=True) detects super weights from the checkpoint's safetensors shards, but "
            f"this checkpoint is {files or 'unknown'}. Give the coordinates (super_weights=... or "
            "SuperWeightConfig.from_known(...)), or convert the checkpoint to safetensors."
        )
    # As in memory: the model's own tokenizer and the default prompts (not fixed token ids) when it has one.
    tokenizer = model_tokenizer(model)
    report = run_detection(config.detection, config=model.config, files=files, tokenizer=tokenizer)
    logger.info("optimum-superweight streaming detection: %d candidate(s).", len(report.candidates))
    return records_to_keep(report)


def plan_low_memory(model: nn.Module, config: SuperWeightConfig, checkpoint_files: Any = None) -> LowMemoryPlan:
    """Before weights load (model on ``meta``): fix the super weights and swap in low-bit skeletons."""
    if config.activations.enabled:
        raise ValueError(
            f"SuperWeightConfig.low_memory=True is not available with activation_bits={config.activation_bits!r} "
            "(W8A8): quantize with low_memory=False."
        )
    records = config.get_super_weights()
    check_values = bool(records)
    if not records and config.detect:
        records = _detect(model, config, checkpoint_files)
    skip = resolve_modules_to_not_convert(model, config)
    targets = modules_to_convert(model, skip)
    all_modules = dict(model.named_modules())
    by_module: dict[str, list[SuperWeight]] = {}
    for sw in records:
        module = all_modules.get(sw.module)
        if module is None or not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(
                f"Super weight module '{sw.module}' is not a linear layer of this {type(model).__name__}; "
                f"linear modules are named like {list(targets)[:3]}."
            )
        in_features, out_features = features(module)
        if not (0 <= sw.row < out_features and 0 <= sw.col < in_features):
            raise ValueError(
                f"Super weight {sw.module}.weight[{sw.row}, {sw.col}] lies outside the matrix: row must be in "
                f"[0, {out_features}) and col in [0, {in_features}) (paper convention)."
            )
        by_module.setdefault(sw.module, []).append(sw)
    weights = {}
    for name, module in targets.items():
        in_features, out_features = features(module)
        weights[f"{name}.weight"] = (name, in_features, out_features, not isinstance(module, nn.Linear))
    planned = config.with_results(QuantizationResult(records, skip))  # the caller's config is never written to
    build_quantized_skeleton(model, planned)
    return LowMemoryPlan(config=planned, weights=weights, records=by_module, check_values=check_values)


def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` on other C libraries / platforms."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


def _trim_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class SuperWeightQuantize(ConversionOps):
    """transformers conversion op: one full-precision ``<module>.weight`` in, its packed tensors out."""

    def __init__(self, plan: LowMemoryPlan) -> None:
        self.plan = plan

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: Any = None, target_patterns: Any = None, **kwargs: Any):
        # transformers turns an exception raised here into a RuntimeError that only points at its log report. So an
        # error is recorded and nothing returned (the skeleton's tensors stay unloaded); the after-load hook then
        # raises it with the module and coordinate. After a first error the remaining weights are skipped.
        if self.plan.errors:
            return {}
        try:
            return self._convert(input_dict, **kwargs)
        except ValueError as error:
            if str(error) not in self.plan.errors:
                self.plan.errors.append(str(error))
            return {}

    def _convert(self, input_dict: dict[str, Any], **kwargs: Any):
        plan = self.plan
        (key, tensors), = input_dict.items()
        tensor = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
        target = kwargs.get("full_layer_name") or key
        module_name, in_features, out_features, transposed = plan.weights[target]
        weight = tensor.t() if transposed else tensor
        if tuple(weight.shape) != (out_features, in_features):
            message = (
                f"{target}: the checkpoint holds a {tuple(tensor.shape)} weight, the model expects "
                f"{(out_features, in_features)}; the config does not match the checkpoint."
            )
            plan.errors.append(message)
            raise ValueError(message)
        records = plan.records.get(module_name, [])
        completed = []
        for sw in records:
            found = float(weight[sw.row, sw.col].item())
            if plan.check_values and sw.value is not None and not math.isclose(found, sw.value, rel_tol=1e-3, abs_tol=1e-6):
                message = (
                    f"Super weight {module_name}.weight[{sw.row}, {sw.col}] is recorded as {sw.value!r} but the "
                    f"checkpoint holds {found!r}: the coordinates were made for another model or revision."
                )
                plan.errors.append(message)
                raise ValueError(message)
            completed.append(sw.with_updates(value=found))
        plan.records[module_name] = completed
        # The in-memory path's own code on a weight-only stand-in: bit-identical results.
        coordinates = [(sw.row, sw.col) for sw in completed]
        config = plan.config
        dense = nn.Linear(in_features, out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        check_quantizable(module_name, weight)  # non-finite weights: refuse before any work
        quantized = quantize_by_rows(weight, coordinates, config)
        layer = quantized_layer(dense, coordinates, config, quantized=quantized, name=module_name)
        # The bias is a full-precision tensor of the checkpoint, loaded as usual: only the format's own tensors here.
        out = {f"{module_name}.{name}": t.data for name, t in layer.stored_tensors().items() if name != BIAS}
        plan.done.add(target)
        del dense, layer, weight, tensor, tensors, input_dict
        _trim_heap()
        return out

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError("A quantized weight cannot be turned back into the full-precision checkpoint tensor.")
