"""`SuperWeightW8A8Linear`: 8-bit weights x 8-bit activations, super activation held out, super weights exact.

On disk it is exactly a :class:`~optimum_superweight.nn.linear.SuperWeightLinear` with ``bits=8``,
``group_size=-1`` (one scale per output row), symmetric: ``weight`` uint8 ``[out, 1, in]`` (codes + 128),
``weight_scale`` ``[out, 1]``, optional ``super_weight_indices`` / ``super_weight_values`` and ``bias``. What
differs is the forward: activations are quantized to int8 per call (dynamic ``"per_tensor"`` or
``"per_token"`` absmax scales) with the held-out input channels — the super activation — excluded from the
scale and added back exactly; see :mod:`optimum_superweight.kernels.w8a8`. The held-out channels are derived
from ``config.json`` (``super_activation_channels``, super weights) and kept as a plain attribute, so the
checkpoint stays the plain weight-only safetensors layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..kernels.w8a8 import ACTIVATION_SCALES, select_w8a8_kernel
from ..records import SuperWeight
from .linear import SuperWeightLinear

__all__ = ["SuperWeightW8A8Linear"]


class SuperWeightW8A8Linear(SuperWeightLinear):
    """W8A8 drop-in replacement for ``nn.Linear`` (int8 matmul via ``torch._int_mm``).

    A held-out channel keeps one massive activation from setting the int8 scale of every other token:

    >>> _ = torch.manual_seed(0)
    >>> dense = nn.Linear(64, 32)
    >>> layer = SuperWeightW8A8Linear.from_linear(dense, activation_scale="per_tensor", holdout_channels=[5])
    >>> plain = SuperWeightW8A8Linear.from_linear(dense, activation_scale="per_tensor")
    >>> x = torch.randn(4, 64); x[0, 5] = 1000.0
    >>> with torch.no_grad():
    ...     held, crushed = ((m(x) - dense(x))[1:].abs().max().item() for m in (layer, plain))
    >>> held < 0.05 < 0.5 < crushed
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        activation_scale: str = "per_token",
        holdout_channels: Sequence[int] = (),
        scale_dtype: str = "float16",
        num_super_weights: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, bias=bias, bits=8, group_size=-1, symmetric=True, scale_dtype=scale_dtype,
            num_super_weights=num_super_weights, dtype=dtype, device=device,
        )
        if activation_scale not in ACTIVATION_SCALES:
            raise ValueError(
                f"activation_scale={activation_scale!r} is invalid: accepted values are {ACTIVATION_SCALES}."
            )
        channels = sorted({int(c) for c in holdout_channels})
        if any(not 0 <= c < in_features for c in channels):
            raise ValueError(f"holdout_channels={channels} is invalid: channels must lie in [0, {in_features}).")
        self.activation_bits = 8
        self.activation_scale = activation_scale
        # A plain attribute, not a buffer: the channels live in config.json (the checkpoint keeps the weight-only
        # layout), and a buffer created on the meta device before loading would never be materialised.
        self.holdout_channels: list[int] = channels

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        activation_scale: str = "per_token",
        holdout_channels: Sequence[int] = (),
        scale_dtype: str = "float16",
        super_weights: Sequence[tuple[int, int]] | Sequence[SuperWeight] = (),
        name: str = "SuperWeightW8A8Linear",
        **ignored,
    ) -> "SuperWeightW8A8Linear":
        """Quantize a dense layer to 8-bit symmetric per-row weights (super weights exact); ``name`` for errors."""
        base = SuperWeightLinear.from_linear(
            linear, bits=8, group_size=-1, symmetric=True, scale_dtype=scale_dtype, super_weights=super_weights,
            name=name,
        )
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, activation_scale=activation_scale,
            holdout_channels=holdout_channels, scale_dtype=scale_dtype, num_super_weights=base.num_super_weights,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
        module.load_state_dict(base.state_dict())
        return module

    def select_own_kernel(self, dtype, device, tokens, requires_grad, reference_only):
        """Kernel choice hook read by :func:`optimum_superweight.kernels.select_kernel`."""
        return select_w8a8_kernel(self, dtype, device, tokens, requires_grad, reference_only)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W8A8 ({self.activation_scale} activations), holdout_channels={self.holdout_channels}, "
            f"super_weights={self.num_super_weights}, kernel={self.kernel}"
        )
