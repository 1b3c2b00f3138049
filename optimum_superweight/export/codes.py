"""Our quantized layers as the plain affine groups that export writers consume.

Every checkpoint variant reduces to one form per group of ``group_size`` inputs: ``w = d * c + m`` with an
unsigned code ``c`` in ``[0, 2**bits)``, a scale ``d`` and an offset ``m``. The :data:`VARIANTS` table says
how each variant of :class:`~optimum_superweight.SuperWeightLinear` yields ``d`` and ``m``; a new variant
(for instance float offsets) is one entry there plus, in each writer's table, the target formats that hold
it exactly. Writers never re-derive codes from floats: they take :class:`ModuleCodes` as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.embedding import SuperWeightHead
from ..nn.linear import SuperWeightLinear
from ..tensor.packing import unpack_codes
from ..tensor.quantize import QuantizedWeight, restore_exact

__all__ = ["ModuleCodes", "VARIANTS", "module_codes", "quantized_modules", "exactly_representable"]


@dataclass
class ModuleCodes:
    """Codes and group parameters of one quantized layer, padding removed.

    ``codes`` is uint8 ``[out, in]``; ``scale``/``zero_point``/``offset`` are ``[out, groups]`` as stored.
    ``super_indices``/``super_values`` are the exact weights (the codes hold the group's zero there).
    """

    name: str
    variant: str
    bits: int
    group_size: int  # effective: in_features when the checkpoint says -1
    per_row: bool
    out_features: int
    in_features: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    offset: torch.Tensor | None
    super_indices: torch.Tensor | None
    super_values: torch.Tensor | None
    module: SuperWeightLinear
    #: Set when the export re-fitted this layer (:mod:`.refit`): the new codes, which ``codes``/``scale``/... hold.
    refit: QuantizedWeight | None = None

    @property
    def num_super_weights(self) -> int:
        return 0 if self.super_indices is None else int(self.super_indices.shape[0])

    @property
    def center(self) -> int:
        """The code that means 0 in a symmetric layout (``2**(bits-1)``)."""
        return 1 << (self.bits - 1)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(d, m)`` ``[out, groups]`` with ``w = d * c + m``, computed exactly (see :data:`VARIANTS`)."""
        return VARIANTS[self.variant](self)

    def group_index(self, columns: torch.Tensor) -> torch.Tensor:
        """Group of each input column."""
        return torch.div(columns, self.group_size, rounding_mode="floor")

    def dequantize(self) -> torch.Tensor:
        """float32 ``[out, in]``: the layer's own :meth:`SuperWeightLinear.dequantize_weight`, super weights exact.

        Writers compare what they wrote against this, never against their own arithmetic. A re-fitted layer
        (:attr:`refit`) gives its new weight, super weights exact.
        """
        with torch.no_grad():
            if self.refit is None:
                return self.module.dequantize_weight(torch.float32).cpu()
            weight = self.refit.dequantize(torch.float32).cpu()
            if self.super_indices is not None:
                restore_exact(weight, self.super_indices, self.super_values)
            return weight


def _symmetric(codes: ModuleCodes) -> tuple[torch.Tensor, torch.Tensor]:
    d = codes.scale.to(torch.float32)
    # d * center has at most bits-1 more significant bits than d: exact in float32 for fp16/bf16 scales.
    return d, -d * codes.center


def _zero_point(codes: ModuleCodes) -> tuple[torch.Tensor, torch.Tensor]:
    d = codes.scale.to(torch.float32)
    return d, -d * codes.zero_point.to(torch.float32)


def _float_offset(codes: ModuleCodes) -> tuple[torch.Tensor, torch.Tensor]:
    return codes.scale.to(torch.float32), codes.offset.to(torch.float32)


#: How each checkpoint variant gives the affine ``(d, m)`` of ``w = d * c + m``. Add a variant here.
VARIANTS: dict[str, Callable[[ModuleCodes], tuple[torch.Tensor, torch.Tensor]]] = {
    "symmetric": _symmetric,
    "zero_point": _zero_point,
    "float_offset": _float_offset,
}


def _variant(module: SuperWeightLinear) -> str:
    if getattr(module, "weight_offset", None) is not None:
        return "float_offset"
    return "symmetric" if module.symmetric else "zero_point"


@torch.no_grad()
def module_codes(name: str, module: SuperWeightLinear) -> ModuleCodes:
    """Unpack one layer's codes (``[out, in]``, padding dropped) next to its group parameters."""
    layout = module.layout
    group = layout.effective_group_size
    codes = unpack_codes(module.weight.detach().cpu(), layout.bits, group).reshape(layout.out_features, -1)
    codes = codes[:, : layout.in_features].contiguous()
    indices = module.super_weight_indices
    values = module.super_weight_values
    return ModuleCodes(
        name=name,
        variant=_variant(module),
        bits=layout.bits,
        group_size=group,
        per_row=layout.group_size == -1,
        out_features=layout.out_features,
        in_features=layout.in_features,
        codes=codes,
        scale=module.weight_scale.detach().cpu(),
        zero_point=None if module.weight_zero_point is None else module.weight_zero_point.detach().cpu(),
        offset=None if getattr(module, "weight_offset", None) is None else module.weight_offset.detach().cpu(),
        super_indices=None if indices is None else indices.detach().cpu(),
        super_values=None if values is None else values.detach().cpu(),
        module=module,
    )


def quantized_modules(model: nn.Module) -> Iterator[ModuleCodes]:
    """:func:`module_codes` of every :class:`SuperWeightLinear` in ``model``, in module order.

    A packed output head (``embedding_bits=8``) is not among them: its held-out columns are no affine group, so the
    writers take it, like the embeddings, from the dense folder (dequantized; GGUF re-quantizes both to its
    embedding types, Q8_0 by default)."""
    for name, module in model.named_modules():
        if isinstance(module, SuperWeightLinear) and not isinstance(module, SuperWeightHead):
            yield module_codes(name, module)


def exactly_representable(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value survives a round trip through ``dtype`` unchanged (finite values only)."""
    values = values.detach().to(torch.float32)
    cast = values.to(dtype)
    return bool(torch.isfinite(cast).all()) and bool(torch.equal(cast.to(torch.float32), values))
