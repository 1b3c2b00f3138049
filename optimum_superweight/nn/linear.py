"""`SuperWeightLinear`: a low-bit linear layer whose super weights stay exact.

State (all saved, all loaded by name, so a reload is plain assignment and re-saving works): the tensors of
:data:`optimum_superweight.format.TENSORS` (packed ``weight``, ``weight_scale``, asymmetric
``weight_zero_point`` or ``weight_offset``, ``super_weight_indices`` / ``super_weight_values`` when the layer holds super weights,
``bias``), with the names, dtypes and shapes that table gives.

``weight`` is 3-D on purpose: loading such a checkpoint without this package fails with a shape error
instead of silently producing a model with random weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..format import BIAS, SCALE, SCALE_DTYPES, TENSORS, LayerFormat, check_quantizable
from ..kernels import kernel_label, linear_forward
from ..records import SuperWeight
from .autograd import needs_graph, quantized_linear
from ..tensor.quantize import ZERO_POINTS, GroupLayout, QuantizedWeight, dequantize_weight, quantize_weight, restore_exact

__all__ = ["SuperWeightLinear", "ExactSuperWeightLayer", "dense_linear"]


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` ``[out, in]`` (and ``bias``, cast to the weight's dtype): what every
    quantized layer's ``to_linear`` returns.

    >>> dense_linear(torch.eye(3), None).weight.shape
    torch.Size([3, 3])
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(weight.dtype))
    return linear


class ExactSuperWeightLayer:
    """What every quantized layer class shares (``SuperWeightLinear`` and the bitsandbytes NF4 layer, whose bases
    differ): each defines ``dequantize_weight``, ``bias`` and ``super_weight_indices``."""

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (super weights exact)."""
        return dense_linear(self.dequantize_weight(dtype), self.bias)

    @property
    def num_super_weights(self) -> int:
        return 0 if self.super_weight_indices is None else int(self.super_weight_indices.shape[0])

    def _keep_exact(self, weight: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store the exact values at ``indices`` (``[k, 2]``, possibly empty) of the dense ``weight``, and its bias."""
        if indices.numel():
            self.super_weight_indices.data = indices
            self.super_weight_values.data = weight[indices[:, 0].long(), indices[:, 1].long()].to(torch.float32)
        if bias is not None:
            self.bias.data = bias.detach().clone()


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class SuperWeightLinear(ExactSuperWeightLayer, nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding group-quantized codes and exact super weights.

    Build one from a dense layer:

    >>> dense = nn.Linear(256, 64)
    >>> layer = SuperWeightLinear.from_linear(dense, bits=4, group_size=64, super_weights=[(3, 17)])
    >>> layer(torch.randn(2, 256)).shape
    torch.Size([2, 64])
    >>> bool(layer.dequantize_weight()[3, 17] == dense.weight[3, 17])
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        bits: int,
        group_size: int,
        symmetric: bool,
        scale_dtype: str = "float16",
        num_super_weights: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        zero_point: str = "uint8",
    ) -> None:
        super().__init__()
        if zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point={zero_point!r} is invalid: accepted values are {', '.join(map(repr, ZERO_POINTS))}.")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.zero_point = "uint8" if symmetric else zero_point
        self.layout = GroupLayout(out_features, in_features, bits, group_size)
        fmt = LayerFormat(
            out_features, in_features, bits, group_size, symmetric, scale_dtype, num_super_weights, bias, self.zero_point
        )
        specs = {spec.name: spec for spec in fmt.tensors()}
        # Every tensor of the format table is an attribute: a Parameter when this layer stores it, else None.
        for row in TENSORS:
            spec = specs.get(row.name)
            if spec is None:
                setattr(self, row.name, None)
            elif spec.dtype is None:  # the bias: the model's float dtype, trainable like nn.Linear's
                self.bias = nn.Parameter(torch.zeros(spec.shape, dtype=dtype or torch.float32, device=device))
            else:  # scales start at 1 (a layer built directly is a valid zero matrix), the rest at 0
                fill = torch.ones if row.name == SCALE else torch.zeros
                setattr(self, row.name, _frozen(fill(spec.shape, dtype=spec.dtype, device=device)))

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        scale_dtype: str = "float16",
        super_weights: Sequence[tuple[int, int]] | Sequence[SuperWeight] = (),
        quantized: QuantizedWeight | None = None,
        zero_point: str = "uint8",
        name: str = "SuperWeightLinear",
    ) -> "SuperWeightLinear":
        """Quantize a dense ``nn.Linear``; ``super_weights`` are ``(row, col)`` pairs or records kept exact.

        ``quantized`` takes codes computed elsewhere (HQQ, clip search, GPTQ) for the same layout, with the
        super weights held out; by default the weight is quantized here with round-to-nearest (min-max).
        ``zero_point`` (asymmetric only): ``"uint8"`` zero-points or ``"float"`` offsets. A weight the format
        cannot hold (non-finite, or a scale beyond ``scale_dtype``) is refused with ``name`` and the coordinate.
        """
        weight = linear.weight.detach()
        coordinates = [(sw.row, sw.col) if isinstance(sw, SuperWeight) else (int(sw[0]), int(sw[1])) for sw in super_weights]
        out_features, in_features = weight.shape
        for row, col in coordinates:
            if not (0 <= row < out_features and 0 <= col < in_features):
                raise ValueError(
                    f"Super weight ({row}, {col}) lies outside the {out_features}x{in_features} weight: "
                    f"rows must be in [0, {out_features}) and cols in [0, {in_features})."
                )
        check_quantizable(
            name, weight, coordinates, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype
        )
        module = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            scale_dtype=scale_dtype,
            num_super_weights=len(coordinates),
            dtype=weight.dtype,
            device=weight.device,
            zero_point=zero_point,
        )
        indices = torch.tensor(coordinates, dtype=torch.int32, device=weight.device).reshape(-1, 2)
        if quantized is None and module.weight_offset is not None:
            from ..tensor.hqq import hqq_quantize_weight

            quantized = hqq_quantize_weight(
                weight, bits=bits, group_size=group_size, zero_point="float", scale_dtype=SCALE_DTYPES[scale_dtype],
                holdout=indices, iters=0,
            )
        if quantized is None:
            quantized = quantize_weight(
                weight,
                bits=bits,
                group_size=group_size,
                symmetric=symmetric,
                scale_dtype=SCALE_DTYPES[scale_dtype],
                holdout=indices,
            )
        if (
            tuple(quantized.packed.shape) != module.layout.packed_shape
            or quantized.symmetric != symmetric
            or (quantized.offset is None) != (module.weight_offset is None)
        ):
            raise ValueError(
                f"Precomputed codes of shape {tuple(quantized.packed.shape)} do not match this layer's layout "
                f"{module.layout.packed_shape} (bits={bits}, group_size={group_size}, symmetric={symmetric}, "
                f"zero_point={module.zero_point!r})."
            )
        module.weight.data = quantized.packed
        module.weight_scale.data = quantized.scale
        if quantized.zero_point is not None:
            module.weight_zero_point.data = quantized.zero_point
        if quantized.offset is not None:
            module.weight_offset.data = quantized.offset
        module._keep_exact(weight, indices, linear.bias)
        return module

    # -- dtype casts ------------------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "SuperWeightLinear":
        """``model.to(dtype)``, ``.half()``, ``.float()``: the bias and the activations follow the cast; the stored
        state (codes, scales, offsets, exact super weights) keeps the dtypes of the format table and only moves.

        Re-rounding it would change the model (a super weight of 5.87573 becomes 5.875 in bfloat16, float16 scales
        read as bfloat16) and the checkpoint it saves would no longer verify; bitsandbytes and HQQ guard it too.

        >>> layer = SuperWeightLinear.from_linear(nn.Linear(64, 8), bits=4, group_size=32, super_weights=[(1, 2)])
        >>> layer = layer.to(torch.bfloat16)
        >>> layer.weight_scale.dtype, layer.super_weight_values.dtype, layer.bias.dtype
        (torch.float16, torch.float32, torch.bfloat16)
        """
        exact = {id(t) for name, t in self.stored_tensors().items() if name != BIAS}  # the bias is in the model's dtype

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in exact:
                return fn(tensor)
            # What fn does to a tensor of this dtype and device, learnt on an empty one: keep only the move.
            probe = fn(tensor.new_empty(0))
            return fn(tensor) if probe.dtype == tensor.dtype else tensor.to(device=probe.device)

        return super()._apply(keep_dtype, recurse)

    # -- inference --------------------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, with every super weight at its exact value."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        weight = dequantize_weight(
            self.weight, self.weight_scale, self.weight_zero_point, self.layout, symmetric=self.symmetric, dtype=dtype,
            offset=self.weight_offset,
        )
        if self.super_weight_indices is not None:
            restore_exact(weight, self.super_weight_indices, self.super_weight_values)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dispatch to a fast kernel when one fits (see optimum_superweight.kernels); the reference is
        # dequantize_weight() + F.linear. Training (LoRA on top): a backward that keeps no dense weight (nn/autograd.py).
        if needs_graph(self, x):
            return quantized_linear(self, x)
        return linear_forward(self, x)

    @property
    def kernel(self) -> str:
        """Kernel of the latest forward (before any: the one a bfloat16 token would use), e.g. ``'cpu-int4'``."""
        return kernel_label(self)

    @property
    def format(self) -> LayerFormat:
        """This layer's settings as the checkpoint format sees them."""
        return LayerFormat.of_module(self)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this layer writes to a checkpoint, by format name, in the format table's order."""
        return {spec.name: getattr(self, spec.name) for spec in TENSORS if getattr(self, spec.name, None) is not None}

    def storage_bytes(self) -> int:
        """Bytes of the compressed state (codes, scales, zero-points, super weights; bias excluded)."""
        tensors = [t for name, t in self.stored_tensors().items() if name != "bias"]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else f"asymmetric ({self.zero_point} zero)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, {kind}, super_weights={self.num_super_weights}, "
            f"kernel={self.kernel}"
        )
