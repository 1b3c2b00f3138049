"""What every way of choosing codes is given: :class:`CodeSettings` and the one signature they share.

A way of choosing codes (round-to-nearest, clip search, HQQ, GPTQ; one file each in :mod:`optimum_superweight.tensor`)
is a function ``(weight, settings, holdout, hessian=None) -> QuantizedWeight`` (:data:`CodeChooser`): ``weight``
``[out, in]``, ``holdout`` the ``int`` ``[k, 2]`` ``(row, col)`` coordinates kept exact (or ``None``), ``hessian``
the layer inputs' ``E[x xᵀ]`` ``[in, in]`` (or, for HQQ's weighting, only its diagonal ``[in]``) for the methods
that read it (ignored by the others). Which one runs
is decided in one place, :func:`optimum_superweight.tensor.methods.code_method`.

>>> settings = CodeSettings(bits=4, group_size=32)
>>> settings.symmetric, settings.clip_grid is None
(True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import torch

from .quantize import QuantizedWeight

__all__ = ["CodeSettings", "CodeChooser", "SharedCodeChooser"]


@dataclass(frozen=True)
class CodeSettings:
    """The stored format of the codes and the options of the method that chooses them.

    Attributes:
        bits, group_size, symmetric, scale_dtype, zero_point: The format (see
            :func:`~.quantize.quantize_weight`); ``zero_point`` matters for asymmetric grids only.
        clip_grid: Clip ratios searched per group (clip search, GPTQ's static groups); ``None`` = plain range.
        clip_objective: What the clip search minimises, in :data:`~.clip.CLIP_OBJECTIVES`: ``"diagonal"``
            (weight error, weighted by the Hessian diagonal where there is one) or ``"hessian"`` (the group's
            output error, needs ``hessian``).
        damp, act_order: GPTQ's dampening and column order.
        importance: HQQ: ``"activations"`` refines the grids weighted by ``hessian``'s diagonal (when one is
            given), ``"none"`` keeps them data-free.
    """

    bits: int
    group_size: int
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16
    zero_point: str = "uint8"
    clip_grid: tuple[float, ...] | None = None
    clip_objective: str = "diagonal"
    damp: float = 0.01
    act_order: bool = True
    importance: str = "none"

    def format_options(self) -> dict:
        """The keyword arguments every ``*_quantize_weight`` function takes: bits, group size, symmetry, scale dtype.

        >>> sorted(CodeSettings(bits=4, group_size=32).format_options())
        ['bits', 'group_size', 'scale_dtype', 'symmetric']
        """
        return dict(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, scale_dtype=self.scale_dtype)


#: One way of choosing codes: ``(weight, settings, holdout, hessian=None) -> QuantizedWeight``.
CodeChooser = Callable[..., QuantizedWeight]
#: Several weights reading one input, one ``hessian``: ``(weights, settings, holdouts, hessian) -> [QuantizedWeight]``.
SharedCodeChooser = Callable[[Sequence[torch.Tensor], CodeSettings, Sequence["torch.Tensor | None"], torch.Tensor], list[QuantizedWeight]]
