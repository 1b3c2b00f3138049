"""Step 1 of the pipeline, planning: which linear layers become low-bit, which stay, which weights stay exact.

Works on any ``torch.nn.Module`` (the in-memory pipeline of :mod:`.replace` and, on the meta device, quantize-on-load
in :mod:`.loading`). It reads weights and checks them; it changes nothing.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..config import QuantizationResult, SuperWeightConfig
from ..format import check_quantizable
from ..nn.linear import SuperWeightLinear
from ..records import SuperWeight
from .modules import Conv1D, dense_weight, features

__all__ = [
    "QuantizationPlan",
    "plan_quantization",
    "plan_targets",
    "resolve_modules_to_not_convert",
    "modules_to_convert",
    "check_finite_weights",
    "check_super_weights",
    "coordinates_by_module",
    "fit_to_model",
]

logger = logging.getLogger(__name__)


def _layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for field in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def fit_to_model(model: nn.Module, config: SuperWeightConfig) -> SuperWeightConfig:
    """``config`` checked against the model it quantizes (a copy when something is resolved; ``config`` is kept).

    ``detection_layers`` must name layers the model has; a ``group_size`` wider than every layer to quantize would
    pad each row to the group (a 64-wide layer stored as 100000 codes per row): such groups are one group per row,
    recorded as ``group_size=-1`` (one scale per row), which is what they compute.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> fit_to_model(build_tiny_model("llama", super_weights=None), SuperWeightConfig(group_size=100000)).group_size
    -1
    """
    layers = _layer_count(model)
    wanted = config.detection_layers or []
    if layers is not None and any(layer >= layers for layer in wanted):
        raise ValueError(
            f"SuperWeightConfig.detection_layers={wanted!r} is invalid for this model: accepted are layer indices from 0 "
            f"to {layers - 1} ({type(model).__name__} has {layers} decoder layers)."
        )
    widest = max((features(m)[0] for m in modules_to_convert(model, resolve_modules_to_not_convert(model, config)).values()), default=0)
    if config.group_size != -1 and widest and config.group_size > widest:
        logger.info(
            "optimum-superweight: group_size=%d spans every layer's whole row (widest: %d inputs); recorded as "
            "group_size=-1 (one scale per row), the same grid without padding each row to the group.",
            config.group_size, widest,
        )
        config = copy.deepcopy(config)
        config.group_size = -1
        config.post_init()
    return config


@dataclass(frozen=True)
class QuantizationPlan:
    """What the pipeline will quantize: the targets by name, the exclusions, the super weights with exact values.

    ``coordinates`` are the records' ``(row, col)`` per targeted module (records in excluded modules stay in
    ``records``: their module is kept whole anyway).
    """

    targets: dict[str, nn.Module]
    modules_to_not_convert: list[str]
    records: list[SuperWeight]
    coordinates: dict[str, list[tuple[int, int]]]

    def result(self) -> QuantizationResult:
        """What a weight-only run returns: the checked records and the resolved exclusions."""
        return QuantizationResult(super_weights=self.records, modules_to_not_convert=self.modules_to_not_convert)


def plan_targets(model: nn.Module, config: SuperWeightConfig) -> tuple[list[str], dict[str, nn.Module]]:
    """The exclusions (configured, or the output embedding and what is tied to it) and the layers to convert,
    whose weights are checked finite (before calibration or GPTQ turn a NaN into an obscure failure)."""
    skip = resolve_modules_to_not_convert(model, config)
    targets = modules_to_convert(model, skip)
    check_finite_weights(targets)
    return skip, targets


def plan_quantization(
    model: nn.Module, skip: list[str], targets: dict[str, nn.Module], records: Iterable[SuperWeight]
) -> QuantizationPlan:
    """The plan for ``targets``: ``records`` checked against the model, with their exact values read from it."""
    checked = check_super_weights(model, records, targets)
    coordinates = coordinates_by_module(r for r in checked if r.module in targets)
    return QuantizationPlan(targets=targets, modules_to_not_convert=skip, records=checked, coordinates=coordinates)


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


def coordinates_by_module(records: Iterable[SuperWeight]) -> dict[str, list[tuple[int, int]]]:
    """``(row, col)`` of the records, grouped by module name in their order."""
    grouped: dict[str, list[tuple[int, int]]] = {}
    for sw in records:
        grouped.setdefault(sw.module, []).append((sw.row, sw.col))
    return grouped
