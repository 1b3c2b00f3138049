"""`SuperWeightConfig`: what to quantize, how, and which super weights to keep exact."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .records import SuperWeight

__all__ = ["SuperWeightConfig", "QUANT_METHOD", "FORMAT_VERSION", "SUPPORTED_BITS", "SCALE_DTYPES"]

logger = logging.getLogger(__name__)

QUANT_METHOD = "superweight"
#: Version of the on-disk layout; a checkpoint written by a newer layout is refused with an upgrade hint.
FORMAT_VERSION = 2
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
#: How codes and scales are chosen (the on-disk format is the same for all): data-free half-quadratic grid
#: optimisation (:mod:`optimum_superweight.tensor.hqq`), round-to-nearest, or GPTQ error feedback on built-in
#: calibration text (see :mod:`optimum_superweight.tensor.gptq`).
METHODS = ("hqq", "rtn", "gptq")
#: Asymmetric zero storage: integer zero-points ``w = s*(q - z)`` or float offsets ``w = s*q + m`` (format 2).
ZERO_POINTS = ("uint8", "float")
#: ``clip_search`` objectives: the weight error (data-free with "rtn") or the layer's output error on calibration text.
CLIP_OBJECTIVES = ("weight", "output")
#: Activation quantization (W8A8): widths and scale modes (see :mod:`optimum_superweight.kernels.w8a8`).
ACTIVATION_BITS = (None, 8)
ACTIVATION_SCALES = ("per_tensor", "per_token")
#: Prompt the paper's authors used to find super weights.
DEFAULT_DETECTION_PROMPT = "Apple Inc. is a worldwide tech company."


def _invalid(field: str, value: Any, accepted: str) -> ValueError:
    return ValueError(f"SuperWeightConfig.{field}={value!r} is invalid: accepted values are {accepted}.")


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
        modules_to_not_convert: Module names (or name suffixes) kept in full precision. Default: the output
            embedding (``lm_head``) and anything tied to it; embeddings are never converted.
        super_weights: Coordinates to keep exact, as dicts (``module``, ``row``, ``col``, optional ``value``)
            or :class:`SuperWeight` records. When given, detection is skipped.
        detect: Run detection at load time when ``super_weights`` is empty.
        detection_prompts: Calibration prompts for detection (default: the paper's prompt).
        detection_threshold: Minimum absolute activation of a spike, in the paper's sense (authors: 50).
        detection_min_ratio: Minimum ratio of a spike to the median |activation| of the same layer.
        detection_layers: Decoder-layer indices to search (default: all).
        max_super_weights: Upper bound on the number of super weights kept.
        method: ``"hqq"`` (default: data-free; each group's scale and offset optimised for the weight's
            reconstruction, :mod:`optimum_superweight.tensor.hqq`), ``"rtn"`` (round-to-nearest on the group's
            range) or ``"gptq"`` (error feedback using the layers' input statistics on built-in calibration
            text, disjoint from the evaluation text). Same file format. Default (``None``): ``"hqq"``, or
            ``"rtn"`` with ``activation_bits=8`` or ``clip_search=True``.
        clip_search: Per group, search the scale (range x 1.0 ... 0.5) that minimises the reconstruction error
            (weighted by input energy with ``"gptq"``), super weights held out.
        clip_objective: What ``clip_search`` minimises: ``"weight"`` (default; the weight error, data-free with
            ``"rtn"``) or ``"output"`` (activation-aware: each group's output error ``(w - q)ᵀ H (w - q)`` under the
            inputs' second moment on calibration text, as GPTQ collects it; ``"rtn"`` then calibrates too). It is
            what makes coarse scales usable: int4 per-channel RTN on SmolLM2 goes from x2.05 to x1.32 perplexity.
        calibration_tokens: Tokens of calibration text for ``"gptq"`` (and, up to 2048, for the W8A8 scan for
            massive activations).
        damp: ``"gptq"`` dampening, a fraction of the mean Hessian diagonal added to it.
        act_order: ``"gptq"`` quantizes input columns by decreasing activation energy.
        low_memory: Quantize while loading: each full-precision weight is quantized as it arrives, so the
            whole full-precision model is never in memory; missing coordinates are found by streaming
            detection layer by layer from the shards (:mod:`optimum_superweight.streaming`, unconfirmed
            spikes). ``method="rtn"`` only: GPTQ needs every layer's calibration activations.
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
            2024). ``None``: only the super activation. Measured on SmolLM2 per-tensor: see the README.
        max_holdout_channels: W8A8: at most this many held-out input channels per layer (the largest first).
        activation_holdout: W8A8: the held-out input channels of each layer (module name -> channels), recorded
            at quantization so a saved checkpoint reloads with the same ones. Leave ``None`` to compute them.
        smoothquant_alpha: W8A8: before quantizing, migrate activation outliers into the weights the
            SmoothQuant way (Xiao et al., 2023) with this migration strength in (0, 1), typically 0.5: each
            input channel j of q/k/v, gate/up and down is divided by ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``
            (folded into the preceding norm's weight, or up_proj's row for down_proj) and its weight column
            multiplied by it, which leaves the full-precision model's function unchanged. Llama-style decoder
            layers only. ``None``: no migration.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        symmetric: bool | None = None,
        scale_dtype: str = "float16",
        modules_to_not_convert: list[str] | None = None,
        super_weights: Sequence[dict[str, Any] | SuperWeight] | None = None,
        detect: bool = True,
        detection_prompts: list[str] | None = None,
        detection_threshold: float = 50.0,
        detection_min_ratio: float = 100.0,
        detection_layers: list[int] | None = None,
        max_super_weights: int = 16,
        method: str | None = None,
        clip_search: bool = False,
        clip_objective: str = "weight",
        calibration_tokens: int = 8192,
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
        zero_point: str | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        # Unset choices follow the method: checkpoints always record all three, so a checkpoint written before
        # "hqq" and float offsets existed (rtn/gptq, no zero_point key) resolves to what it was written with.
        if method is None:  # the clip search and W8A8 are round-to-nearest options
            method = "rtn" if activation_bits is not None or clip_search else "hqq"
        if symmetric is None:
            symmetric = method != "hqq"
        if zero_point is None:
            zero_point = "float" if method == "hqq" and symmetric is False else "uint8"
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.zero_point = zero_point
        self.scale_dtype = scale_dtype
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.super_weights = [
            sw.to_dict() if isinstance(sw, SuperWeight) else dict(sw) for sw in (super_weights or [])
        ]
        self.detect = detect
        self.detection_prompts = None if detection_prompts is None else list(detection_prompts)
        self.detection_threshold = detection_threshold
        self.detection_min_ratio = detection_min_ratio
        self.detection_layers = None if detection_layers is None else list(detection_layers)
        self.max_super_weights = max_super_weights
        self.method = method
        self.clip_search = clip_search
        self.clip_objective = clip_objective
        self.calibration_tokens = calibration_tokens
        self.damp = damp
        self.act_order = act_order
        self.low_memory = low_memory
        self.activation_bits = activation_bits
        self.activation_scale = activation_scale
        self.hold_out_super_activation = hold_out_super_activation
        self.super_activation_channels = None if super_activation_channels is None else list(super_activation_channels)
        self.massive_activation_ratio = massive_activation_ratio
        self.max_holdout_channels = max_holdout_channels
        self.activation_holdout = activation_holdout
        if isinstance(activation_holdout, dict):  # a copy; tuples become lists (what config.json holds)
            self.activation_holdout = {k: list(v) if isinstance(v, tuple) else v for k, v in activation_holdout.items()}
        self.smoothquant_alpha = smoothquant_alpha
        self.format_version = format_version
        if quant_method != QUANT_METHOD:
            raise _invalid("quant_method", quant_method, repr(QUANT_METHOD))
        # Keys that `to_dict` never writes and transformers' own loading attributes are harmless.
        ignorable = {"dequantize"}
        unknown = sorted(set(kwargs) - ignorable)
        if unknown:
            logger.warning("SuperWeightConfig ignores unknown keys %s.", ", ".join(unknown))
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise `ValueError` naming the field, the value and what is accepted."""
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise _invalid("bits", self.bits, ", ".join(map(str, SUPPORTED_BITS)))
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or not (
            self.group_size == -1 or self.group_size >= 8
        ):
            raise _invalid("group_size", self.group_size, "an integer >= 8, or -1 for one group per output row")
        if not isinstance(self.symmetric, bool):
            raise _invalid("symmetric", self.symmetric, "True or False")
        if self.scale_dtype not in SCALE_DTYPES:
            raise _invalid("scale_dtype", self.scale_dtype, ", ".join(repr(d) for d in SCALE_DTYPES))
        if self.modules_to_not_convert is not None and not all(
            isinstance(m, str) and m for m in self.modules_to_not_convert
        ):
            raise _invalid("modules_to_not_convert", self.modules_to_not_convert, "a list of module names")
        if not isinstance(self.detect, bool):
            raise _invalid("detect", self.detect, "True or False")
        if self.detection_prompts is not None and (
            not self.detection_prompts or not all(isinstance(p, str) and p.strip() for p in self.detection_prompts)
        ):
            raise _invalid("detection_prompts", self.detection_prompts, "a non-empty list of non-empty strings, or None")
        for name in ("detection_threshold", "detection_min_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise _invalid(name, value, "a finite number > 0")
        if self.detection_layers is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.detection_layers
        ):
            raise _invalid("detection_layers", self.detection_layers, "a list of layer indices >= 0, or None")
        if isinstance(self.max_super_weights, bool) or not isinstance(self.max_super_weights, int) or self.max_super_weights < 0:
            raise _invalid("max_super_weights", self.max_super_weights, "an integer >= 0")
        if self.method not in METHODS:
            raise _invalid("method", self.method, ", ".join(repr(m) for m in METHODS))
        if self.method == "hqq" and self.clip_search:
            raise _invalid(
                "clip_search", self.clip_search, "False with method='hqq' (its optimiser already chooses each group's range)"
            )
        if self.zero_point not in ZERO_POINTS:
            raise _invalid("zero_point", self.zero_point, ", ".join(repr(z) for z in ZERO_POINTS))
        if self.zero_point == "float" and self.symmetric:
            raise _invalid("zero_point", self.zero_point, "'uint8' (or unset) with symmetric=True: symmetric grids have no zero")
        if self.zero_point == "float" and (self.method == "gptq" or self.clip_search):
            raise _invalid(
                "zero_point", self.zero_point,
                "'uint8' with method='gptq' or clip_search=True (float offsets need method='hqq', or 'rtn' without clip search)",
            )
        for name in ("clip_search", "act_order", "low_memory"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "True or False")
        if self.clip_objective not in CLIP_OBJECTIVES:
            raise _invalid("clip_objective", self.clip_objective, ", ".join(repr(o) for o in CLIP_OBJECTIVES))
        if self.low_memory and self.clip_search and self.clip_objective == "output":
            raise ValueError(
                "SuperWeightConfig.low_memory=True is invalid with clip_search=True and clip_objective='output': the "
                "output objective needs every layer's calibration activations. Use clip_objective='weight' or low_memory=False."
            )
        if self.low_memory and self.method == "gptq":
            raise ValueError(
                "SuperWeightConfig.low_memory=True is invalid with method='gptq': GPTQ needs every layer's "
                "calibration activations while quantizing, so the full-precision model must be in memory. Use "
                "method='rtn' (optionally clip_search=True) to quantize while loading, or low_memory=False."
            )
        if isinstance(self.calibration_tokens, bool) or not isinstance(self.calibration_tokens, int) or not (
            64 <= self.calibration_tokens <= 32768
        ):
            raise _invalid("calibration_tokens", self.calibration_tokens, "an integer from 64 to 32768")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not (0 < self.damp < 1):
            raise _invalid("damp", self.damp, "a number in (0, 1), typically 0.01")
        self._validate_activation_fields()
        if not isinstance(self.format_version, int) or self.format_version < 1:
            raise _invalid("format_version", self.format_version, f"an integer between 1 and {FORMAT_VERSION}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses optimum-superweight format {self.format_version}, newer than this installed "
                f"version understands ({FORMAT_VERSION}). Upgrade: pip install -U optimum-superweight."
            )
        records = self.get_super_weights()  # validates every entry
        seen: set[tuple[str, int, int]] = set()
        for sw in records:
            key = (sw.module, sw.row, sw.col)
            if key in seen:
                raise _invalid("super_weights", sw.to_dict(), "distinct (module, row, col) entries; this one is repeated")
            seen.add(key)

    def _validate_activation_fields(self) -> None:
        if self.activation_bits not in ACTIVATION_BITS or isinstance(self.activation_bits, bool):
            raise _invalid("activation_bits", self.activation_bits, "None (weight-only) or 8 (W8A8)")
        if self.activation_scale not in ACTIVATION_SCALES:
            raise _invalid("activation_scale", self.activation_scale, ", ".join(repr(m) for m in ACTIVATION_SCALES))
        if not isinstance(self.hold_out_super_activation, bool):
            raise _invalid("hold_out_super_activation", self.hold_out_super_activation, "True or False")
        if self.super_activation_channels is not None and not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.super_activation_channels
        ):
            raise _invalid("super_activation_channels", self.super_activation_channels, "a list of channel indices >= 0, or None")
        ratio = self.massive_activation_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1):
            raise _invalid("massive_activation_ratio", ratio, "a number > 1 (typically 20), or None")
        limit = self.max_holdout_channels
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 256:
            raise _invalid("max_holdout_channels", limit, "an integer from 0 to 256")
        holdout = self.activation_holdout
        if holdout is not None and not (
            isinstance(holdout, dict)
            and all(
                isinstance(name, str) and isinstance(channels, list)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)
                for name, channels in holdout.items()
            )
        ):
            raise _invalid("activation_holdout", holdout, "a mapping of module names to lists of channel indices >= 0, or None")
        alpha = self.smoothquant_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1):
            raise _invalid("smoothquant_alpha", alpha, "a number in (0, 1) (typically 0.5), or None")
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

    # -- super weights --------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs the layers' input statistics on calibration text (GPTQ, the output clip
        objective, W8A8's massive-activation scan when no hold-out is recorded yet, SmoothQuant migration)."""
        if self.activation_bits is not None:
            scan = self.hold_out_super_activation and self.massive_activation_ratio is not None
            return self.smoothquant_alpha is not None or (scan and self.activation_holdout is None)
        return self.method == "gptq" or (self.clip_search and self.clip_objective == "output")

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

    @classmethod
    def from_model_card(cls, source: Any, **kwargs: Any) -> "SuperWeightConfig":
        """A config whose super weights come from a model card, so detection is skipped.

        ``source`` is whatever :func:`optimum_superweight.read_super_weights` accepts: a Hub repo id, a local
        model folder, a README path or a ``ModelCard``. ``kwargs`` set the other fields (``bits=4``, ...).

        >>> config = SuperWeightConfig.from_model_card("model_cards/huggyllama--llama-7b.md", bits=4)  # doctest: +SKIP
        """
        from .cards import read_super_weights  # lazy: cards imports huggingface_hub

        return cls._with_super_weights(read_super_weights(source), "card", kwargs)

    @classmethod
    def from_known(cls, model_id: str, **kwargs: Any) -> "SuperWeightConfig":
        """A config with the super weights of a model in the shipped index (``model_cards/``), so detection is skipped.

        >>> SuperWeightConfig.from_known("huggyllama/llama-7b", bits=4).get_super_weights()[0].paper_notation()
        'layers[2].mlp.down_proj.weight[3968, 7003]'
        """
        from .known import known_super_weights

        return cls._with_super_weights(known_super_weights(model_id), "index", kwargs)

    @classmethod
    def _with_super_weights(cls, records: list[SuperWeight], source: str, kwargs: dict[str, Any]) -> "SuperWeightConfig":
        if "super_weights" in kwargs:
            raise ValueError(
                f"super_weights=... cannot be combined with coordinates from the {source}: pass one or the other."
            )
        return cls(super_weights=[sw.with_updates(source=source) for sw in records], **kwargs)

    def super_weights_by_module(self) -> dict[str, list[SuperWeight]]:
        """The super weights grouped by module name, in configured order."""
        grouped: dict[str, list[SuperWeight]] = {}
        for sw in self.get_super_weights():
            grouped.setdefault(sw.module, []).append(sw)
        return grouped

    # -- serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict written into ``config.json["quantization_config"]``."""
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.required_format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
            "modules_to_not_convert": None if self.modules_to_not_convert is None else list(self.modules_to_not_convert),
            "super_weights": [dict(sw) for sw in self.super_weights],
            "detect": self.detect,
            "detection_prompts": None if self.detection_prompts is None else list(self.detection_prompts),
            "detection_threshold": self.detection_threshold,
            "detection_min_ratio": self.detection_min_ratio,
            "detection_layers": None if self.detection_layers is None else list(self.detection_layers),
            "max_super_weights": self.max_super_weights,
            "method": self.method,
            "clip_search": self.clip_search,
            "clip_objective": self.clip_objective,
            "calibration_tokens": self.calibration_tokens,
            "damp": self.damp,
            "act_order": self.act_order,
            "low_memory": self.low_memory,
            "activation_bits": self.activation_bits,
            "activation_scale": self.activation_scale,
            "hold_out_super_activation": self.hold_out_super_activation,
            "super_activation_channels": None if self.super_activation_channels is None else list(self.super_activation_channels),
            "massive_activation_ratio": self.massive_activation_ratio,
            "max_holdout_channels": self.max_holdout_channels,
            "activation_holdout": None
            if self.activation_holdout is None
            else {name: list(channels) for name, channels in self.activation_holdout.items()},
            "smoothquant_alpha": self.smoothquant_alpha,
            "zero_point": "uint8" if self.symmetric else self.zero_point,  # symmetric grids have none
        }

    def __iter__(self):
        yield from self.to_dict().items()

    @property
    def required_format_version(self) -> int:
        """The oldest on-disk format that holds this setting (written to ``config.json``): 2 for ``"hqq"`` and
        float offsets, 1 otherwise, so checkpoints an older version can read still say so."""
        return 2 if self.method == "hqq" or (not self.symmetric and self.zero_point == "float") else 1

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight of a row of ``group_size`` inputs: codes + scale (+ zero-point or offset)."""
        if self.group_size == -1:
            return float(self.bits)
        scale_bits = 32 if self.scale_dtype == "float32" else 16
        zero_bits = 0 if self.symmetric else (scale_bits if self.zero_point == "float" else 8)
        return self.bits + (scale_bits + zero_bits) / self.group_size
