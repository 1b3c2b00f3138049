"""Which way of choosing codes a config asks for: the one place that decides.

Every way of choosing codes is a file of :mod:`optimum_superweight.tensor` exposing a function with the common
signature ``(weight, settings, holdout, hessian=None) -> QuantizedWeight`` (:data:`~.settings.CodeChooser`):

========  ======================  ==============================================================
name      function                what chooses the codes
========  ======================  ==============================================================
``hqq``   :func:`.hqq.hqq_codes`    half-quadratic grid optimisation, refined by activations (the default)
``rtn``   :func:`.rtn.rtn_codes`    round-to-nearest on the group's min-max (absmax) grid
``clip``  :func:`.clip.clip_codes`  round-to-nearest after a per-group clip search
``gptq``  :func:`.gptq.gptq_codes`  error feedback under the inputs' second moment (calibration)
========  ======================  ==============================================================

:func:`code_method` maps a :class:`~optimum_superweight.config.SuperWeightConfig` (``method``, ``clip_search``)
to one of them and :func:`code_settings` its fields to a :class:`~.settings.CodeSettings`; both quantize paths
(:func:`.rows.quantize_by_rows`, :func:`optimum_superweight.models.replace.quantize_model`) go through them.

>>> from optimum_superweight.config import SuperWeightConfig
>>> code_method(SuperWeightConfig(bits=4, method="rtn", clip_search=True)).name
'clip'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .clip import DEFAULT_CLIP_GRID, clip_codes
from .gptq import gptq_codes, gptq_codes_shared
from .hqq import hqq_codes
from .rtn import rtn_codes
from .settings import CodeChooser, CodeSettings, SharedCodeChooser

if TYPE_CHECKING:
    from ..config import SuperWeightConfig

__all__ = ["CodeMethod", "CODE_METHODS", "code_method", "code_chooser", "code_settings"]


@dataclass(frozen=True)
class CodeMethod:
    """One way of choosing codes.

    Attributes:
        name: Its key in :data:`CODE_METHODS`.
        choose: The :data:`~.settings.CodeChooser` of one weight.
        choose_shared: Weights that read one input (one Hessian: q/k/v, gate/up) in a single call, when that
            is cheaper than one call each (GPTQ: one column sweep); ``None`` otherwise. Its rows are then quantized
            together, not in row blocks.
    """

    name: str
    choose: CodeChooser
    choose_shared: SharedCodeChooser | None = None


#: Every way of choosing codes, by name.
CODE_METHODS: dict[str, CodeMethod] = {
    "hqq": CodeMethod("hqq", hqq_codes),
    "rtn": CodeMethod("rtn", rtn_codes),
    "clip": CodeMethod("clip", clip_codes),
    "gptq": CodeMethod("gptq", gptq_codes, choose_shared=gptq_codes_shared),
}


def code_method(config: SuperWeightConfig) -> CodeMethod:
    """The way of choosing codes that ``config`` asks for: its ``method``, with ``clip_search`` turning
    round-to-nearest into the clip search (GPTQ reads ``clip_search`` through :func:`code_settings`).

    >>> from optimum_superweight.config import SuperWeightConfig
    >>> code_method(SuperWeightConfig(bits=4)).name, code_method(SuperWeightConfig(bits=4, method="gptq")).name
    ('hqq', 'gptq')
    """
    algorithm = config.algorithm
    if algorithm.method == "rtn" and algorithm.clip_search:
        return CODE_METHODS["clip"]
    if algorithm.method not in CODE_METHODS:
        raise ValueError(f"SuperWeightConfig.method={algorithm.method!r} is invalid: accepted values are 'hqq', 'rtn', 'gptq'.")
    return CODE_METHODS[algorithm.method]


def code_chooser(config: SuperWeightConfig) -> CodeChooser:
    """:func:`code_method`'s function for one weight.

    >>> from optimum_superweight.config import SuperWeightConfig
    >>> code_chooser(SuperWeightConfig(bits=4, method="rtn")).__name__
    'rtn_codes'
    """
    return code_method(config).choose


def code_settings(config: SuperWeightConfig) -> CodeSettings:
    """The format fields and ``config.algorithm`` as the :class:`~.settings.CodeSettings` every method reads.

    ``clip_objective`` ``"weight"`` / ``"output"`` (the config's words) become ``"diagonal"`` / ``"hessian"``
    (what the search computes); ``clip_search`` becomes :data:`~.clip.DEFAULT_CLIP_GRID` or no grid.

    >>> from optimum_superweight.config import SuperWeightConfig
    >>> code_settings(SuperWeightConfig(bits=4, method="rtn", clip_search=True)).clip_grid[:3]
    (1.0, 0.95, 0.9)
    """
    algorithm = config.algorithm
    return CodeSettings(
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.symmetric,
        scale_dtype=getattr(torch, config.scale_dtype),
        zero_point=config.zero_point,
        clip_grid=DEFAULT_CLIP_GRID if algorithm.clip_search else None,
        clip_objective="hessian" if algorithm.clip_objective == "output" else "diagonal",
        damp=algorithm.damp,
        act_order=algorithm.act_order,
        importance=algorithm.importance,
    )
