"""The one record type for a super weight, shared by detection, config, checkpoint, card and reader.

Coordinates follow the paper's convention whatever the storage layout of the module:
``row`` is the hidden (output) channel, ``col`` the intermediate (input) channel, so the weight is
``W[row, col]`` of a ``torch.nn.Linear`` whose ``weight`` has shape ``[out_features, in_features]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["SuperWeight", "CLASSIFICATIONS", "layer_index_from_module_name"]

#: How zeroing a candidate affects the model: catastrophic, measurable, or nothing.
CLASSIFICATIONS = ("super", "weak", "no_effect")

_LAYER_PATTERN = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index_from_module_name(module: str) -> int | None:
    """Return the decoder-layer index embedded in a module path, e.g. 11 for ``model.layers.11.mlp.down_proj``."""
    match = _LAYER_PATTERN.search(f".{module}.")
    return int(match.group(1)) if match else None


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SuperWeight.{name}={value!r} is invalid: expected an integer >= {minimum}.")
    return value


def _check_optional_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"SuperWeight.{name}={value!r} is invalid: expected a finite number or None.")
    return float(value)


@dataclass(frozen=True)
class SuperWeight:
    """One super weight: a scalar ``W[row, col]`` of a linear module whose removal breaks the model.

    Example:
        >>> sw = SuperWeight(module="model.layers.11.mlp.down_proj", row=507, col=1229, value=5.876)
        >>> sw.layer, sw.paper_notation()
        (11, 'layers[11].mlp.down_proj.weight[507, 1229]')
        >>> SuperWeight.from_dict(sw.to_dict()) == sw
        True

    Attributes:
        module: Fully qualified module name inside the model (``model.named_modules()`` key).
        row: Output (hidden) channel, the channel of the super activation.
        col: Input (intermediate) channel.
        value: The exact weight value (as stored in the checkpoint), when known.
        layer: Decoder-layer index; derived from ``module`` when not given.
        input_spike: Largest ``|input|`` of the module at ``col`` seen during detection.
        output_spike: Largest ``|output|`` of the module at ``row`` seen during detection.
        classification: ``"super"``, ``"weak"`` or ``"no_effect"`` once confirmed by ablation.
        impact: Perplexity ratio (ablated / original) on the confirmation text when the weight is zeroed.
        source: Where the coordinates came from (``"detected"``, ``"user"``, ``"card"``, ``"index"``, ...).
    """

    module: str
    row: int
    col: int
    value: float | None = None
    layer: int | None = None
    input_spike: float | None = None
    output_spike: float | None = None
    classification: str | None = None
    impact: float | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.module, str) or not self.module or self.module.strip() != self.module:
            raise ValueError(
                f"SuperWeight.module={self.module!r} is invalid: expected a module name such as "
                "'model.layers.2.mlp.down_proj'."
            )
        _check_int("row", self.row)
        _check_int("col", self.col)
        for name in ("value", "input_spike", "output_spike", "impact"):
            object.__setattr__(self, name, _check_optional_float(name, getattr(self, name)))
        if self.layer is None:
            object.__setattr__(self, "layer", layer_index_from_module_name(self.module))
        else:
            _check_int("layer", self.layer)
        if self.classification is not None and self.classification not in CLASSIFICATIONS:
            raise ValueError(
                f"SuperWeight.classification={self.classification!r} is invalid: expected one of "
                f"{', '.join(CLASSIFICATIONS)} or None."
            )

    @property
    def coordinates(self) -> tuple[int, int]:
        """``(row, col)``."""
        return (self.row, self.col)

    def paper_notation(self) -> str:
        """The coordinates as the paper writes them: ``layers[2].mlp.down_proj.weight[3968, 7003]``."""
        path = self.module
        path = re.sub(r"^(?:model\.|transformer\.|gpt_neox\.|model\.decoder\.)+", "", path)
        path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
        return f"{path}.weight[{self.row}, {self.col}]"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict without empty fields (stable key order)."""
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        if self.extra:
            data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SuperWeight":
        """Build a record from a dict such as ``config.super_weights[i]``; unknown keys are kept in ``extra``."""
        if not isinstance(data, dict):
            raise ValueError(
                f"A super weight entry must be a mapping with at least 'module', 'row' and 'col'; got {data!r}."
            )
        missing = [k for k in ("module", "row", "col") if k not in data]
        if missing:
            raise ValueError(f"Super weight entry {data!r} lacks {', '.join(missing)}: 'module', 'row', 'col' are required.")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def with_updates(self, **changes: Any) -> "SuperWeight":
        """A copy with some fields changed (records are immutable)."""
        return replace(self, **changes)
