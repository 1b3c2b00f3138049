"""`SuperWeightConfig`: what to quantize, how, and which super weights to keep exact."""

from __future__ import annotations

import copy
import difflib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import DIGEST_ALGORITHMS, FORMAT_VERSION, READABLE_VERSIONS, SCALE_DTYPES as _SCALE_DTYPE_MAP
from .detection.inputs import DetectionSettings
from .kernels.w8a8 import ACTIVATION_SCALES
from .prompts import PAPER_PROMPT
from .records import SuperWeight

__all__ = [
    "SuperWeightConfig",
    "QuantizationResult",
    "AlgorithmSettings",
    "ActivationSettings",
    "DetectionSettings",
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "SUPPORTED_BITS",
    "SCALE_DTYPES",
]

logger = logging.getLogger(__name__)

QUANT_METHOD = "superweight"
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = tuple(_SCALE_DTYPE_MAP)
#: Largest ``group_size`` accepted (besides -1): larger groups are per-row scales in all but name, and a typo
#: such as ``10**12`` would otherwise try to allocate the padded group.
MAX_GROUP_SIZE = 2**20
#: How codes and scales are chosen: data-free half-quadratic grid optimisation
#: (:mod:`optimum_superweight.tensor.hqq`), round-to-nearest, or GPTQ error feedback on built-in calibration text
#: (see :mod:`optimum_superweight.tensor.gptq`).
METHODS = ("hqq", "rtn", "gptq")
#: Asymmetric zero storage: integer zero-points ``w = s*(q - z)`` or float offsets ``w = s*q + m`` (format 2).
ZERO_POINTS = ("uint8", "float")
#: ``clip_search`` objectives: the weight error (data-free with "rtn") or the layer's output error on calibration text.
CLIP_OBJECTIVES = ("weight", "output")
#: What weighs each weight's error when ``method="hqq"`` fits its group's grid: its input channel's mean squared
#: activation on calibration text, or nothing (data-free). See :mod:`optimum_superweight.tensor.hqq`.
IMPORTANCES = ("activations", "none")
#: Calibration tokens by default: enough for the weighting's per-channel means (more changes nothing measurable),
#: and more for the methods that estimate whole second-moment matrices (GPTQ, the output clip objective).
DEFAULT_IMPORTANCE_TOKENS = 2048
DEFAULT_HESSIAN_TOKENS = 8192
#: How a layer's weights are stored: this package's affine groups (codes, scale, zero-point/offset per group) or
#: bitsandbytes' own NF4 layer and state (blocks of 64, float32 absmax; :mod:`optimum_superweight.nn.nf4`).
WEIGHT_FORMATS = ("affine", "bnb-nf4")
#: Activation quantization (W8A8): widths and scale modes (see :mod:`optimum_superweight.kernels.w8a8`).
ACTIVATION_BITS = (None, 8)
#: Storage of the input embeddings and the output head: the model's dtype (``None``) or 8-bit codes per row
#: (see :mod:`optimum_superweight.nn.embedding`).
EMBEDDING_BITS = (None, 8)
#: Prompt the paper's authors used to find super weights (defined once, in prompts.py).
DEFAULT_DETECTION_PROMPT = PAPER_PROMPT


def _invalid(field: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"SuperWeightConfig.{field}={value!r} is invalid: accepted values are {accepted}.")


# -- field validators: each returns the normalised value or raises naming the field ---------------------------
# A validator is ``(check, accepted)``: ``check(value)`` is True for a valid value; ``accepted`` says what is.
Validator = tuple[Callable[[Any], bool], str]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _choice(options: Sequence[Any]) -> Validator:
    # Type-exact: 4.0 == 4 and True == 1 in Python, but neither is a bit width.
    return (
        lambda v: any(type(v) is type(o) and v == o for o in options),
        ", ".join(repr(o) for o in options),
    )


def _int_range(low: int, high: int, *also: int) -> Validator:
    extra = "".join(f", or {a}" for a in also)
    return (lambda v: _is_int(v) and (low <= v <= high or v in also), f"an integer from {low} to {high}{extra}")


def _number(low: float, high: float = math.inf, *, open_low: bool = True, open_high: bool = True) -> Validator:
    def check(v: Any) -> bool:
        return _is_number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    if high == math.inf:
        return check, f"a finite number {'>' if open_low else '>='} {low}"
    return check, f"a finite number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


BOOL: Validator = (lambda v: isinstance(v, bool), "True or False")


def _optional(validator: Validator, note: str = "") -> Validator:
    check, accepted = validator
    return (lambda v: v is None or check(v), f"{accepted}, or None{note}")


def _list_of(item: Callable[[Any], bool], accepted: str, *, non_empty: bool = False) -> Validator:
    # A str is iterable but never a list of names: "lm_head" must not become ["l", "m", ...].
    def check(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and (not non_empty or len(v) > 0) and all(item(x) for x in v)

    return check, f"a {'non-empty ' if non_empty else ''}list of {accepted}"


def _mapping_of(key: Callable[[Any], bool], value: Callable[[Any], bool], accepted: str) -> Validator:
    return (lambda v: isinstance(v, dict) and all(key(k) and value(x) for k, x in v.items()), f"a mapping of {accepted}")


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and v.strip() == v


def _index(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 2**31


_INDICES = _list_of(_index, "indices from 0 to 2**31 - 1")
#: ``target_bits_per_weight``: the storage budget of an allocation, in the units of ``bits_per_weight`` (codes,
#: scales, zero-points or offsets, exact super weights and their indices, over the quantized matrices' weights).
MIN_TARGET_BITS, MAX_TARGET_BITS = 2.0, 9.0
#: The keys of one ``module_widths`` entry: the module's own code width and group size.
WIDTH_KEYS = ("bits", "group_size")


def _width(v: Any) -> bool:
    """One ``module_widths`` value: ``{"bits": <a supported width>, "group_size": <a group size or -1>}``."""
    return (isinstance(v, dict) and tuple(sorted(v)) == WIDTH_KEYS and FIELDS["bits"][0](v["bits"])
            and FIELDS["group_size"][0](v["group_size"]))
#: No model has anywhere near this many decoder layers; the model's own count is checked when it is known
#: (:func:`optimum_superweight.models.plan.fit_to_model`).
MAX_LAYERS = 4096
_LAYERS = _list_of(lambda v: _is_int(v) and 0 <= v < MAX_LAYERS, f"layer indices from 0 to {MAX_LAYERS - 1}")

#: Every field of ``config.json["quantization_config"]`` (in its key order) and what it accepts. Adding a
#: field: one line here, a parameter of ``__init__`` and its docstring. Cross-field rules are in ``post_init``.
FIELDS: dict[str, Validator] = {
    "quant_method": _choice((QUANT_METHOD,)),
    "format_version": _choice(READABLE_VERSIONS),
    "bits": _choice(SUPPORTED_BITS),
    "group_size": _int_range(8, MAX_GROUP_SIZE, -1),
    "symmetric": BOOL,
    "zero_point": _choice(ZERO_POINTS),
    "scale_dtype": _choice(SCALE_DTYPES),
    "weight_format": _choice(WEIGHT_FORMATS),
    "modules_to_not_convert": _optional(_list_of(_name, "module names (strings)")),
    "super_weights": _list_of(lambda v: isinstance(v, (dict, SuperWeight)), "mappings with 'module', 'row', 'col' (or SuperWeight records)"),
    "detect": BOOL,
    "detection_prompts": _optional(_list_of(lambda v: isinstance(v, str) and bool(v.strip()), "non-empty strings", non_empty=True)),
    "detection_threshold": _number(0),
    "detection_min_ratio": _number(0),
    "detection_layers": _optional(_LAYERS),
    "max_super_weights": _int_range(0, 4096),
    "method": _choice(METHODS),
    "importance": _choice(IMPORTANCES),
    "clip_search": BOOL,
    "clip_objective": _choice(CLIP_OBJECTIVES),
    "calibration_tokens": _int_range(64, 32768),
    "damp": _number(0, 1),
    "act_order": BOOL,
    "low_memory": BOOL,
    "activation_bits": _choice(ACTIVATION_BITS),
    "activation_scale": _choice(ACTIVATION_SCALES),
    "hold_out_super_activation": BOOL,
    "super_activation_channels": _optional(_INDICES),
    "massive_activation_ratio": _optional(_number(1), " (typically 20)"),
    "max_holdout_channels": _int_range(0, 256),
    "activation_holdout": _optional(_mapping_of(_name, _INDICES[0], "module names to lists of channel indices >= 0")),
    "smoothquant_alpha": _optional(_number(0, 1), " (typically 0.5)"),
    "embedding_bits": _choice(EMBEDDING_BITS),
    "target_bits_per_weight": _optional(_number(MIN_TARGET_BITS, MAX_TARGET_BITS, open_low=False, open_high=False),
                                        " (e.g. 4.5, 4.0, 3.5: widths allocated per module, models/allocation.py)"),
    "module_widths": _optional(_mapping_of(
        _name, lambda v: _width(v),
        f"module names to {{'bits': one of {', '.join(map(str, SUPPORTED_BITS))}, 'group_size': 8 to {MAX_GROUP_SIZE} or -1}}"
        " (written by an allocation, read at load)",
    )),
    "digests": _optional(_mapping_of(
        _name, lambda v: isinstance(v, str) and v.partition(":")[0] in DIGEST_ALGORITHMS and len(v) < 1024,
        f"module names to '<algorithm>:<hex>' digests ({', '.join(DIGEST_ALGORITHMS)}; written by save_pretrained)",
    )),
}
#: Fields whose keyword default ``None`` means "follow the method" (resolved in ``__init__``): every checkpoint
#: records the resolved value, so ``null`` in config.json is refused rather than re-resolved.
_RESOLVED_FIELDS = ("method", "symmetric", "zero_point", "importance", "calibration_tokens")
#: quantization_config key of a config.json written while save_pretrained replaced a checkpoint's files
#: (:mod:`optimum_superweight.models.saving`); such a checkpoint is refused with :data:`INCOMPLETE_MESSAGE`.
INCOMPLETE_KEY = "save_incomplete"
INCOMPLETE_MESSAGE = (
    "config.json says that save_pretrained was interrupted while it replaced this checkpoint's files "
    f"(quantization_config field '{INCOMPLETE_KEY}'): the weight files may mix two saves. Save the model again into "
    "this folder (or restore the folder from a copy)."
)
#: Keys of a quantization_config that transformers itself may add; read and ignored.
_TRANSFORMERS_KEYS = frozenset({"dequantize"})


def _normalise(value: Any) -> Any:
    """A private JSON-shaped copy: tuples become lists, records stay records until post_init converts them."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return copy.copy(value)


@dataclass(frozen=True)
class QuantizationResult:
    """What quantizing one model found and resolved: returned by the pipeline, recorded on a copy of the config.

    The caller's :class:`SuperWeightConfig` is a request and is never written to; the model's own
    ``config.quantization_config`` (what ``save_pretrained`` writes) is ``config.with_results(result)``.
    ``None`` for an activation field means "not a W8A8 model: keep the config's value".

    >>> QuantizationResult([SuperWeight("model.layers.1.mlp.down_proj", 5, 7, value=2.5)], ["lm_head"]).modules_to_not_convert
    ['lm_head']
    """

    super_weights: Sequence[SuperWeight]
    modules_to_not_convert: Sequence[str]
    super_activation_channels: Sequence[int] | None = None
    activation_holdout: dict[str, list[int]] | None = None
    #: Each module's ``{"bits", "group_size"}`` where an allocation chose them (``None``: the config's widths).
    module_widths: dict[str, dict[str, int]] | None = None


def _reads_hessians(method: str, clip_search: bool, clip_objective: str) -> bool:
    """Whether choosing codes reads whole input second-moment matrices (GPTQ, the clip search's output objective)."""
    return method == "gptq" or (clip_search and clip_objective == "output")


# -- typed option groups: read-only views of the flat fields (validated in FIELDS; flat keys on disk) -------------
@dataclass(frozen=True)
class AlgorithmSettings:
    """How codes are chosen: ``config.algorithm``, a read-only view of the config's flat fields.

    Attributes:
        method: ``"hqq"``, ``"rtn"`` or ``"gptq"`` (resolved: never ``None``).
        importance: ``"activations"`` (``"hqq"`` grids weighted by the inputs' mean squares) or ``"none"``.
        clip_search, clip_objective: The per-group clip search and what it minimises (``"weight"``, ``"output"``).
        calibration_tokens: Tokens of calibration text (GPTQ, the output objective, W8A8's scans).
        damp, act_order: GPTQ's dampening and column order.

    >>> SuperWeightConfig(bits=4, method="gptq").algorithm.needs_hessians
    True
    """

    method: str
    importance: str
    clip_search: bool
    clip_objective: str
    calibration_tokens: int
    damp: float
    act_order: bool

    @property
    def needs_hessians(self) -> bool:
        """Whether choosing codes reads the layers' input second moments (GPTQ, the clip search's output objective)."""
        return _reads_hessians(self.method, self.clip_search, self.clip_objective)

    @property
    def needs_input_energy(self) -> bool:
        """Whether choosing codes reads only the diagonal of those moments (``method="hqq"`` weighted by activations).

        >>> SuperWeightConfig().algorithm.needs_input_energy, SuperWeightConfig(importance="none").algorithm.needs_input_energy
        (True, False)
        """
        return self.importance == "activations"  # post_init admits it only where it is read (hqq, bnb-nf4)


@dataclass(frozen=True)
class ActivationSettings:
    """W8A8 activation quantization: ``config.activations``, a read-only view of the ``activation_*`` fields.

    Attributes:
        bits: ``8`` for W8A8, ``None`` for weight-only (then the other fields are unused).
        scale: ``"per_token"`` or ``"per_tensor"`` dynamic activation scale (``activation_scale``).
        hold_out_super_activation, super_activation_channels, massive_activation_ratio, max_holdout_channels:
            Which input channels stay out of the activation scale (see :class:`SuperWeightConfig`).
        holdout: The recorded held-out channels per module (``activation_holdout``), or ``None`` until quantized.
        smoothquant_alpha: SmoothQuant migration strength, or ``None``.

    >>> SuperWeightConfig(bits=8, group_size=-1, activation_bits=8).activations.enabled
    True
    """

    bits: int | None
    scale: str
    hold_out_super_activation: bool
    super_activation_channels: tuple[int, ...] | None
    massive_activation_ratio: float | None
    max_holdout_channels: int
    holdout: Mapping[str, tuple[int, ...]] | None
    smoothquant_alpha: float | None

    @property
    def enabled(self) -> bool:
        """W8A8 (``bits == 8``) rather than weight-only."""
        return self.bits is not None


def _tuple_or_none(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(values)


class SuperWeightConfig(QuantizationConfigMixin):
    """Low-bit weight quantization that keeps a model's super weights bit-exact.

    Pass it to ``from_pretrained`` to detect the super weights of a full-precision checkpoint and rebuild
    every targeted ``nn.Linear`` in low bit, or give ``super_weights`` to skip detection:

    >>> import optimum_superweight
    >>> from transformers import AutoModelForCausalLM
    >>> config = optimum_superweight.SuperWeightConfig(bits=4, group_size=64)
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)  # doctest: +SKIP
    >>> model.config.quantization_config.super_weights  # doctest: +SKIP
    [{'module': 'model.layers.11.mlp.down_proj', 'row': 507, 'col': 1229, 'value': 5.87..., ...}]

    Args:
        bits: Width of the weight codes: 2, 3, 4 or 8.
        group_size: Number of consecutive input features sharing one scale, or ``-1`` for one scale per
            output row. It need not divide ``in_features``: the last group of a row is simply shorter.
        symmetric: ``True`` for ``w = s * q`` with signed codes, ``False`` for an asymmetric grid per group
            (see ``zero_point``). Default (``None``): ``False`` with ``method="hqq"``, ``True`` otherwise.
        zero_point: Asymmetric grids only: ``"float"`` stores a float offset per group, ``w = s * q + m``
            (tensor ``weight_offset``, ``scale_dtype``; what GGUF Q4_1 stores), ``"uint8"`` an integer
            zero-point, ``w = s * (q - z)`` (``weight_zero_point``). Default (``None``): ``"float"`` with
            ``method="hqq"``, ``"uint8"`` otherwise. ``"float"`` needs ``method="hqq"`` or ``"rtn"``.
        scale_dtype: Storage dtype of scales: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        weight_format: ``"affine"`` (default: this package's groups of codes, scale and offset) or ``"bnb-nf4"``:
            each layer is a ``bitsandbytes.nn.Linear4bit`` (NF4, blocks of 64, float32 absmax; 4.5 bits/weight)
            that bitsandbytes' CPU and CUDA kernels run and PEFT's QLoRA code wraps, with the super weights held
            out of their block's absmax and added back exactly, and each block's absmax searched (``clip_search``,
            on by default) for the error weighted by ``importance`` (default ``"activations"``). It needs ``bits=4``,
            ``group_size=64``, ``symmetric=True``, ``scale_dtype="float32"`` and ``method="rtn"`` (the defaults it
            resolves to), no ``low_memory``, no W8A8. The search needs the weighting: with ``importance="none"`` it
            does worse than plain NF4 (``benchmarks/RESULTS.md``). See :mod:`optimum_superweight.nn.nf4`.
        modules_to_not_convert: Module names (or name suffixes) kept in full precision. Default: the output
            embedding (``lm_head``) and anything tied to it; embeddings are never converted.
        super_weights: Coordinates to keep exact, as dicts (``module``, ``row``, ``col``, optional ``value``)
            or :class:`SuperWeight` records. When given, detection is skipped.
        detect: Run detection at load time when ``super_weights`` is empty.
        detection_prompts: Calibration prompts for detection (default: ``prompts.DEFAULT_PROMPTS``, the paper's first).
        detection_threshold: Minimum absolute activation of a spike, in the paper's sense (authors: 50).
        detection_min_ratio: Minimum ratio of a spike to the median |activation| of the same layer.
        detection_layers: Decoder-layer indices to search (default: all).
        max_super_weights: Upper bound on the number of super weights kept.
        method: ``"hqq"`` (default: each group's scale and offset optimised half-quadratically for the weight's
            reconstruction, then refined for the layer's output as ``importance`` says,
            :mod:`optimum_superweight.tensor.hqq`), ``"rtn"`` (round-to-nearest on the group's range) or ``"gptq"``
            (error feedback using the layers' input statistics on built-in calibration text, disjoint from the
            evaluation text). Same file format. Default (``None``): ``"hqq"``, or ``"rtn"`` with
            ``activation_bits=8`` or ``clip_search=True``.
        importance: ``method="hqq"``: what weighs each weight's error when its group's grid is fitted.
            ``"activations"`` (the default with ``"hqq"``): its input channel's mean squared activation over
            ``calibration_tokens`` of built-in text (one forward pass of the full-precision model at load, no
            Hessian), so the grid serves the channels that carry signal; ``"none"``: data-free, every weight alike
            (the default with ``low_memory=True``, which never holds the full-precision model, and with the other
            methods). Measured on text of other domains: ``benchmarks/RESULTS.md``.
        clip_search: Per group, search the scale (range x 1.0 ... 0.5) that minimises the reconstruction error
            (weighted by input energy with ``"gptq"``), super weights held out.
        clip_objective: What ``clip_search`` minimises: ``"weight"`` (default; the weight error, data-free with
            ``"rtn"``) or ``"output"`` (activation-aware: each group's output error ``(w - q)ᵀ H (w - q)`` under the
            inputs' second moment on calibration text, as GPTQ collects it; ``"rtn"`` then calibrates too). It is
            what makes coarse scales usable (per-channel int4: measured in ``benchmarks/RESULTS.md``).
        calibration_tokens: Tokens of calibration text for ``importance="activations"``, ``"gptq"`` and the output
            clip objective (and, up to 2048, for the W8A8 scan for massive activations). Default (``None``): 8192
            for ``"gptq"`` and the output objective (whole second-moment matrices), 2048 otherwise.
        damp: ``"gptq"`` dampening, a fraction of the mean Hessian diagonal added to it.
        act_order: ``"gptq"`` quantizes input columns by decreasing activation energy.
        low_memory: Quantize while loading: each full-precision weight is quantized as it arrives, so the
            whole full-precision model is never in memory; missing coordinates are found by streaming
            detection layer by layer from the shards (:mod:`optimum_superweight.detection.streaming`, unconfirmed
            spikes). Not with ``"gptq"``, the output clip objective or ``importance="activations"``: they read every
            layer's calibration activations (``importance`` then defaults to ``"none"``).
        activation_bits: ``None`` (default: weight-only) or ``8`` for W8A8: int8 activations x int8 weights on
            ``torch._int_mm``; then ``bits=8``, ``group_size=-1`` and ``symmetric=True`` are required (8-bit
            symmetric weights, one scale per output row) with ``method="rtn"``, no clip search, no low_memory.
        activation_scale: W8A8 dynamic activation scale: ``"per_tensor"`` or ``"per_token"``.
        hold_out_super_activation: W8A8: keep the super-activation channels out of the activation scale and
            add their contribution back exactly (the paper's section 4.1); ``False`` is naive W8A8.
        super_activation_channels: Hidden channels held out (default: the rows of the super weights, recorded
            at quantization). The super weights' own input columns are held out in their layer as well.
        massive_activation_ratio: W8A8 with the hold-out: also hold out, per layer, the input channels whose
            largest magnitude on the calibration text (``calibration_tokens``) reaches this multiple of the
            median channel's — the massive activations that travel with the super activation (Sun et al.,
            2024). ``None``: only the super activation. Measured: ``benchmarks/RESULTS.md``.
        max_holdout_channels: W8A8: at most this many held-out input channels per layer (the largest first).
        activation_holdout: W8A8: the held-out input channels of each layer (module name -> channels), recorded
            at quantization so a saved checkpoint reloads with the same ones. Leave ``None`` to compute them.
        smoothquant_alpha: W8A8: before quantizing, migrate activation outliers into the weights the
            SmoothQuant way (Xiao et al., 2023) with this migration strength in (0, 1), typically 0.5: each
            input channel j of q/k/v, gate/up and down is divided by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
            (folded into the preceding norm's weight, or up_proj's row for down_proj) and its weight column
            multiplied by it, which leaves the full-precision model's function unchanged. Llama-style decoder
            layers only. ``None``: no migration.
        embedding_bits: ``None`` (default: the input embeddings and the output head stay in the model's dtype) or
            ``8``: both stored as 8-bit codes with one float32 scale per vocabulary row, dequantized row by row as
            tokens are looked up; the super-activation channels (``super_activation_channels``, default the super
            weights' rows, recorded at quantization) are held out of every row's scale and stored exactly. A tied
            head stays tied and is stored once. The head must be excluded from the low-bit layers
            (``modules_to_not_convert``, the default). See :mod:`optimum_superweight.nn.embedding`; measured in
            ``benchmarks/RESULTS.md`` ("8-bit embeddings and head").
        target_bits_per_weight: A storage budget in bits per weight (e.g. ``4.5``, ``4.0``, ``3.5``), counted as
            :attr:`bits_per_weight` counts a layer (codes, scales, zero-points or offsets, exact super weights and
            their indices) over all quantized matrices. Each module then gets its own code width and group size
            from :data:`optimum_superweight.models.allocation.CANDIDATES`, chosen from a measured sensitivity (its
            output error at each width weighted by the calibration activations and by the loss gradients of its
            outputs: one more forward and backward pass on the calibration text) so that the total stays within the budget (:mod:`optimum_superweight.models.allocation`); the choice is
            recorded in ``module_widths``. Needs ``importance="activations"`` (the calibration pass) and the
            ``"affine"`` format, weight-only, without ``low_memory``. ``None`` (default): every module at ``bits``
            and ``group_size``.
        module_widths: Module name -> ``{"bits": ..., "group_size": ...}``: that module's own width, instead of
            ``bits`` and ``group_size`` (which still apply to modules not listed). Written by an allocation
            (``target_bits_per_weight``) so that a saved checkpoint reloads with each module's layout; given by
            hand, it is used as it is (no allocation). Same restrictions as ``target_bits_per_weight``.
        digests: Written by ``save_pretrained``, checked at load: one content digest per quantized module
            (:func:`optimum_superweight.format.layer_digest`). Leave ``None``.
        format_version: The checkpoint's tensor layout (:data:`optimum_superweight.format.FORMAT_VERSION`).

    Every field is validated (type and range, table :data:`FIELDS`) here and when read from config.json; an
    unknown keyword is a ``TypeError``, an unknown key of config.json a warning (see :meth:`from_dict`).
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        symmetric: bool | None = None,
        scale_dtype: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        super_weights: Sequence[dict[str, Any] | SuperWeight] | None = None,
        detect: bool = True,
        detection_prompts: list[str] | None = None,
        detection_threshold: float = 50.0,
        detection_min_ratio: float = 100.0,
        detection_layers: list[int] | None = None,
        max_super_weights: int = 16,
        method: str | None = None,
        importance: str | None = None,
        clip_search: bool | None = None,
        clip_objective: str = "weight",
        calibration_tokens: int | None = None,
        damp: float = 0.01,
        act_order: bool = True,
        low_memory: bool = False,
        activation_bits: int | None = None,
        activation_scale: str = "per_token",
        hold_out_super_activation: bool = True,
        super_activation_channels: list[int] | None = None,
        massive_activation_ratio: float | None = 20.0,
        max_holdout_channels: int = 8,
        activation_holdout: dict[str, list[int]] | None = None,
        smoothquant_alpha: float | None = None,
        embedding_bits: int | None = None,
        target_bits_per_weight: float | None = None,
        module_widths: dict[str, dict[str, int]] | None = None,
        digests: dict[str, str] | None = None,
        zero_point: str | None = None,
        weight_format: str = "affine",
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            unknown = sorted(set(kwargs) - _TRANSFORMERS_KEYS)
            if unknown:
                hints = [difflib.get_close_matches(k, list(FIELDS), n=1) for k in unknown]
                hint = "".join(f" ('{k}': did you mean '{h[0]}'?)" for k, h in zip(unknown, hints) if h)
                raise TypeError(
                    f"SuperWeightConfig got unknown field(s) {', '.join(map(repr, unknown))}{hint}; accepted fields are "
                    f"{', '.join(FIELDS)}."
                )
        if weight_format == "bnb-nf4":  # its own grid: symmetric absmax blocks, float32 absmax, the absmax search on
            symmetric = True if symmetric is None else symmetric
            method = "rtn" if method is None else method
            clip_search = True if clip_search is None else clip_search
            scale_dtype = "float32" if scale_dtype is None else scale_dtype
        scale_dtype = "float16" if scale_dtype is None else scale_dtype
        clip_search = False if clip_search is None else clip_search
        # Unset choices follow the method: checkpoints always record all three, so a checkpoint written before
        # "hqq" and float offsets existed (rtn/gptq, no zero_point key) resolves to what it was written with.
        if method is None:  # the clip search and W8A8 are round-to-nearest options
            method = "rtn" if activation_bits is not None or clip_search else "hqq"
        if symmetric is None:
            symmetric = method != "hqq"
        if zero_point is None:
            zero_point = "float" if method == "hqq" and symmetric is False else "uint8"
        if importance is None:  # the weighting needs the full-precision model's activations: not while streaming
            importance = "activations" if (method == "hqq" or weight_format == "bnb-nf4") and not low_memory else "none"
        if calibration_tokens is None:
            reads_hessians = _reads_hessians(method, clip_search, clip_objective)
            calibration_tokens = DEFAULT_HESSIAN_TOKENS if reads_hessians else DEFAULT_IMPORTANCE_TOKENS
        values = dict(locals())
        if super_weights is None:
            values["super_weights"] = []
        for name in FIELDS:
            setattr(self, name, _normalise(values[name]))
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config stored in ``config.json["quantization_config"]``, validated like the constructor's arguments.

        Keys this version does not know are ignored with a warning: they come from a newer optimum-superweight
        whose checkpoint layout is the same (a layout change raises ``format_version``, which is refused).

        >>> SuperWeightConfig.from_dict({"quant_method": "superweight", "bits": 8}).bits
        8
        """
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"quantization_config={config_dict!r} is invalid: accepted is a mapping of SuperWeightConfig fields."
            )
        if config_dict.get(INCOMPLETE_KEY):
            raise ValueError(INCOMPLETE_MESSAGE)
        for key in _RESOLVED_FIELDS:
            if key in config_dict and config_dict[key] is None:
                # The constructor reads None as "the method's default"; a checkpoint records what it was written with.
                raise _invalid(key, None, f"{FIELDS[key][1]} (a checkpoint records the value it was written with; null "
                               "would silently become today's default)")
        unknown = sorted(set(config_dict) - set(FIELDS) - _TRANSFORMERS_KEYS)
        if unknown:
            logger.warning("SuperWeightConfig ignores unknown keys %s.", ", ".join(unknown))
        config = cls(**{k: v for k, v in config_dict.items() if k in FIELDS})
        unused = {}
        for key, value in kwargs.items():
            if key in FIELDS:
                setattr(config, key, _normalise(value))
            else:
                unused[key] = value
        if len(unused) != len(kwargs):
            config.post_init()
        return (config, unused) if return_unused_kwargs else config

    def post_init(self) -> None:
        """Validate every field (table :data:`FIELDS`), then the rules between fields; raise naming the field.

        Raises ``ValueError`` with the field, the value and what is accepted.
        """
        if isinstance(getattr(self, "format_version", None), int) and not isinstance(self.format_version, bool) and (
            self.format_version > FORMAT_VERSION
        ):
            raise ValueError(
                f"SuperWeightConfig.format_version={self.format_version!r}: this checkpoint uses optimum-superweight "
                f"format {self.format_version}, newer than this installed "
                f"version understands ({FORMAT_VERSION}). Upgrade: pip install -U optimum-superweight."
            )
        for name, (check, accepted) in FIELDS.items():
            value = getattr(self, name, None)
            if not check(value):
                raise _invalid(name, value, accepted)
        self.super_weights = [sw.to_dict() if isinstance(sw, SuperWeight) else dict(sw) for sw in self.super_weights]
        for name in ("modules_to_not_convert", "detection_prompts", "detection_layers", "super_activation_channels"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        self._validate_weight_format()
        self._validate_method_fields()
        if self.low_memory and self.clip_search and self.clip_objective == "output":
            raise ValueError(
                "SuperWeightConfig.low_memory=True is invalid with clip_search=True and clip_objective='output': the "
                "output objective needs every layer's calibration activations. Use clip_objective='weight' or low_memory=False."
            )
        if self.importance == "activations" and (self.method != "hqq" and self.weight_format != "bnb-nf4" or self.low_memory):
            reason = (
                "low_memory=True never holds the full-precision model, whose activations the weighting reads. Use "
                "importance='none' (data-free grids) or low_memory=False"
                if self.method == "hqq" else f"it weighs method='hqq' grids; method={self.method!r} does not read it. "
                "Use method='hqq' or importance='none'"
            )
            raise _invalid("importance", self.importance, f"'none' here: {reason}")
        if self.low_memory and self.method == "gptq":
            raise ValueError(
                "SuperWeightConfig.low_memory=True is invalid with method='gptq': GPTQ needs every layer's "
                "calibration activations while quantizing, so the full-precision model must be in memory. Use "
                "method='rtn' (optionally clip_search=True) to quantize while loading, or low_memory=False."
            )
        self._validate_activation_fields()
        self._validate_widths()
        records = self.get_super_weights()  # validates every entry
        seen: set[tuple[str, int, int]] = set()
        for sw in records:
            key = (sw.module, sw.row, sw.col)
            if key in seen:
                raise _invalid("super_weights", sw.to_dict(), "distinct (module, row, col) entries; this one is repeated")
            seen.add(key)

    def _validate_activation_fields(self) -> None:
        alpha = self.smoothquant_alpha
        if self.activation_bits is None:
            if alpha is not None:
                raise _invalid(
                    "smoothquant_alpha", alpha, "None without activation_bits=8 (it migrates activation outliers for W8A8)"
                )
            return
        # W8A8 weights: 8-bit symmetric, one scale per output row (what the int8 x int8 kernel multiplies).
        required = {"bits": 8, "group_size": -1, "symmetric": True, "method": "rtn", "clip_search": False, "low_memory": False}
        for name, value in required.items():
            if getattr(self, name, value) != value:
                raise _invalid(
                    name, getattr(self, name),
                    f"{value!r} with activation_bits=8 (W8A8 uses 8-bit symmetric per-row round-to-nearest weights)",
                )

    # -- typed option groups (read-only views; the flat fields stay the constructor keywords and config.json keys) --
    @property
    def detection(self) -> DetectionSettings:
        """The detection fields (``detection_*``, ``max_super_weights``) as the settings every detection path checks.

        >>> SuperWeightConfig(detection_threshold=40.0).detection.threshold
        40.0
        """
        return DetectionSettings.from_config(self)

    @property
    def algorithm(self) -> AlgorithmSettings:
        """How codes are chosen (``method``, ``clip_search``, ``clip_objective``, ``calibration_tokens``, ``damp``,
        ``act_order``).

        >>> SuperWeightConfig(bits=4).algorithm.method
        'hqq'
        """
        return AlgorithmSettings(
            method=self.method, importance=self.importance, clip_search=self.clip_search, clip_objective=self.clip_objective,
            calibration_tokens=self.calibration_tokens, damp=self.damp, act_order=self.act_order,
        )

    @property
    def activations(self) -> ActivationSettings:
        """W8A8 activation quantization (``activation_bits``, ``activation_scale``, the hold-out fields,
        ``smoothquant_alpha``).

        >>> SuperWeightConfig(bits=4).activations.enabled
        False
        """
        holdout = self.activation_holdout
        return ActivationSettings(
            bits=self.activation_bits,
            scale=self.activation_scale,
            hold_out_super_activation=self.hold_out_super_activation,
            super_activation_channels=_tuple_or_none(self.super_activation_channels),
            massive_activation_ratio=self.massive_activation_ratio,
            max_holdout_channels=self.max_holdout_channels,
            holdout=None if holdout is None else {name: tuple(channels) for name, channels in holdout.items()},
            smoothquant_alpha=self.smoothquant_alpha,
        )

    # -- super weights --------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs the layers' input statistics on calibration text (GPTQ, the output clip
        objective, W8A8's massive-activation scan when no hold-out is recorded yet, SmoothQuant migration)."""
        if self.activation_bits is not None:
            scan = self.hold_out_super_activation and self.massive_activation_ratio is not None
            return self.smoothquant_alpha is not None or (scan and self.activation_holdout is None)
        return self.algorithm.needs_hessians or self.algorithm.needs_input_energy

    def get_super_weights(self) -> list[SuperWeight]:
        """The configured super weights as typed records.

        >>> SuperWeightConfig(super_weights=[{"module": "model.layers.2.mlp.down_proj", "row": 3968, "col": 7003}]).get_super_weights()[0].layer
        2
        """
        records = []
        for index, entry in enumerate(self.super_weights):
            try:
                records.append(SuperWeight.from_dict(entry))
            except ValueError as error:
                raise ValueError(f"SuperWeightConfig.super_weights[{index}] is invalid: {error}") from None
        return records

    def set_super_weights(self, records: Iterable[SuperWeight]) -> None:
        """Replace the configured super weights (stored as JSON-ready dicts)."""
        self.super_weights = [sw.to_dict() for sw in records]

    def with_results(self, result: QuantizationResult) -> "SuperWeightConfig":
        """A copy of this config that records ``result`` (this config is left as it was), validated like any config.

        >>> request = SuperWeightConfig()
        >>> recorded = request.with_results(QuantizationResult([SuperWeight("model.layers.1.mlp.down_proj", 5, 7)], ["lm_head"]))
        >>> len(recorded.super_weights), request.super_weights
        (1, [])
        """
        recorded = copy.deepcopy(self)
        recorded.set_super_weights(result.super_weights)
        recorded.modules_to_not_convert = list(result.modules_to_not_convert)
        if result.super_activation_channels is not None:
            recorded.super_activation_channels = list(result.super_activation_channels)
        if result.activation_holdout is not None:
            recorded.activation_holdout = {name: list(channels) for name, channels in result.activation_holdout.items()}
        if result.module_widths is not None:
            recorded.module_widths = {name: dict(width) for name, width in result.module_widths.items()}
        recorded.post_init()
        return recorded

    @classmethod
    def from_model_card(cls, source: Any, **kwargs: Any) -> "SuperWeightConfig":
        """A config whose super weights come from a model card, so detection is skipped.

        ``source`` is whatever :func:`optimum_superweight.read_super_weights` accepts: a Hub repo id, a local
        model folder, a README path or a ``ModelCard``. ``kwargs`` set the other fields (``bits=4``, ...).

        >>> from optimum_superweight.hub.index import model_cards_dir
        >>> config = SuperWeightConfig.from_model_card(model_cards_dir() / "huggyllama--llama-7b.md", bits=4)
        >>> config.super_weights[0]["row"], config.super_weights[0]["col"]
        (3968, 7003)
        """
        # Imported here: the hub package builds cards from configs, so it imports this module when it loads.
        from .hub.reading import read_super_weights

        return cls._with_super_weights(read_super_weights(source), "card", kwargs)

    @classmethod
    def from_known(cls, model_id: str, **kwargs: Any) -> "SuperWeightConfig":
        """A config with the super weights of a model in the shipped index (``model_cards/``), so detection is skipped.

        >>> SuperWeightConfig.from_known("huggyllama/llama-7b", bits=4).get_super_weights()[0].paper_notation()
        'layers[2].mlp.down_proj.weight[3968, 7003]'
        """
        from .hub.index import known_super_weights  # see from_model_card

        return cls._with_super_weights(known_super_weights(model_id), "index", kwargs)

    @classmethod
    def _with_super_weights(cls, records: list[SuperWeight], source: str, kwargs: dict[str, Any]) -> "SuperWeightConfig":
        if "super_weights" in kwargs:
            raise ValueError(
                f"super_weights=... cannot be combined with coordinates from the {source}: pass one or the other."
            )
        return cls(super_weights=[sw.with_updates(source=source) for sw in records], **kwargs)

    def _validate_weight_format(self) -> None:
        """``weight_format="bnb-nf4"``: bitsandbytes' NF4 layer (4 bits, blocks of 64, float32 absmax, symmetric), its
        codes round-to-nearest after the per-block absmax search (``clip_search``), weighted by ``importance``."""
        if self.weight_format != "bnb-nf4":
            return
        required = {"bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float32", "method": "rtn",
                    "clip_objective": "weight", "low_memory": False, "activation_bits": None}
        for name, value in required.items():
            if getattr(self, name) != value:
                raise _invalid(name, getattr(self, name), f"{value!r} with weight_format='bnb-nf4' (bitsandbytes' NF4 "
                               "layer: 4-bit blocks of 64 with a float32 absmax, chosen by its own absmax search)")

    def _validate_widths(self) -> None:
        """``target_bits_per_weight`` and ``module_widths``: affine weight-only layers quantized in memory; an
        allocation also needs the calibration pass (``importance="activations"``) its sensitivity reads."""
        for name in ("target_bits_per_weight", "module_widths"):
            value = getattr(self, name)
            if value is None:
                continue
            blocking = {"weight_format": "affine", "activation_bits": None, "low_memory": False}
            for other, wanted in blocking.items():
                if getattr(self, other) != wanted:
                    raise _invalid(name, value, f"None with {other}={getattr(self, other)!r} (per-module widths are "
                                   f"this package's affine weight-only layers, quantized in memory: {other}={wanted!r})")
        if self.target_bits_per_weight is not None and self.module_widths is None and self.importance != "activations":
            raise _invalid("target_bits_per_weight", self.target_bits_per_weight,
                           f"None with importance={self.importance!r}: the allocation's sensitivity weighs each layer's "
                           "error by its calibration activations (importance='activations', method='hqq')")

    def width_of(self, module: str) -> tuple[int, int]:
        """``(bits, group_size)`` of ``module``: its ``module_widths`` entry, else the config's ``bits`` and ``group_size``.

        >>> SuperWeightConfig(module_widths={"a": {"bits": 3, "group_size": 32}}).width_of("a")
        (3, 32)
        """
        width = (self.module_widths or {}).get(module)
        return (self.bits, self.group_size) if width is None else (width["bits"], width["group_size"])

    def with_width(self, bits: int, group_size: int) -> "SuperWeightConfig":
        """A copy at one uniform width (``bits``, ``group_size``), without ``module_widths`` or a target: what one
        module's codes are chosen with.

        >>> SuperWeightConfig(target_bits_per_weight=4.0).with_width(3, 64).bits_per_weight
        3.5
        """
        copied = copy.deepcopy(self)
        copied.bits, copied.group_size = bits, group_size
        copied.target_bits_per_weight = copied.module_widths = None
        copied.post_init()
        return copied

    def _validate_method_fields(self) -> None:
        if self.method == "hqq" and self.clip_search:
            raise _invalid(
                "clip_search", self.clip_search, "False with method='hqq' (its optimiser already chooses each group's range)"
            )
        if self.zero_point == "float" and self.symmetric:
            raise _invalid("zero_point", self.zero_point, "'uint8' (or unset) with symmetric=True: symmetric grids have no zero")
        if self.zero_point == "float" and (self.method == "gptq" or self.clip_search):
            raise _invalid(
                "zero_point", self.zero_point,
                "'uint8' with method='gptq' or clip_search=True (float offsets need method='hqq', or 'rtn' without clip search)",
            )

    def super_weights_by_module(self) -> dict[str, list[SuperWeight]]:
        """The super weights grouped by module name, in configured order."""
        grouped: dict[str, list[SuperWeight]] = {}
        for sw in self.get_super_weights():
            grouped.setdefault(sw.module, []).append(sw)
        return grouped

    # -- serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict written into ``config.json["quantization_config"]``."""
        data = {name: _normalise(getattr(self, name)) for name in FIELDS}
        data["quant_method"] = QUANT_METHOD
        data["format_version"] = self.required_format_version
        if self.symmetric:
            data["zero_point"] = "uint8"  # symmetric grids have none
        return data

    @property
    def required_format_version(self) -> int:
        """The oldest on-disk format that holds this setting (written to ``config.json``): 2 for ``"hqq"`` and
        float offsets, 1 otherwise, so checkpoints an older version can read still say so."""
        return 2 if self.method == "hqq" or (not self.symmetric and self.zero_point == "float") else 1

    def __iter__(self):
        yield from self.to_dict().items()

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight of a row of ``group_size`` inputs: codes + scale (+ zero-point or offset), at the
        config's ``bits`` and ``group_size`` (a module listed in ``module_widths`` costs what its own width does:
        :func:`optimum_superweight.models.allocation.layer_cost_bits`)."""
        if self.group_size == -1:
            return float(self.bits)
        scale_bits = 32 if self.scale_dtype == "float32" else 16
        zero_bits = 0 if self.symmetric else (scale_bits if self.zero_point == "float" else 8)
        return self.bits + (scale_bits + zero_bits) / self.group_size
