"""`SuperWeightNF4Linear`: bitsandbytes' own NF4 layer, with the super weights held out and added back exactly.

A subclass of ``bitsandbytes.nn.Linear4bit`` (``quant_type="nf4"``, blocks of 64, float32 absmax, no double
quantization: 4.5 bits/weight), so bitsandbytes' CPU and CUDA kernels run it and PEFT's QLoRA code path, which
dispatches on ``isinstance(layer, bnb.nn.Linear4bit)``, wraps it unchanged. The forward is bitsandbytes' own plus a
sparse correction ``y[..., rows] += x[..., cols] * values`` for the super weights, which hold code 7 (level 0) in
the packed matrix (:mod:`optimum_superweight.tensor.nf4` chooses the codes).

State, saved and loaded by name like every layer of this package (the format table of
:mod:`optimum_superweight.format`): ``weight`` (bitsandbytes' packed codes, uint8 ``[ceil(out*in/2), 1]``, a
``Params4bit``), ``weight_absmax`` (float32 ``[blocks]``), ``super_weight_indices`` / ``super_weight_values``,
``bias``. bitsandbytes' ``QuantState`` is rebuilt from them whenever one is assigned (so transformers' loading, plain
assignment, gives a working layer) and none of bitsandbytes' own serialization is written. bitsandbytes repacks a
layer for its CPU kernel at the first inference call; saving (and :meth:`stored_tensors`) undoes that first, which
is exact because every absmax is a bfloat16 value.

>>> from torch import nn
>>> dense = nn.Linear(128, 64)
>>> layer = SuperWeightNF4Linear.from_linear(dense, super_weights=[(3, 17)])
>>> layer(torch.randn(2, 128)).shape
torch.Size([2, 64])
>>> bool(layer.dequantize_weight()[3, 17] == dense.weight[3, 17])
True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..format import ABSMAX, TENSORS, LayerFormat, check_quantizable
from ..records import SuperWeight
from .linear import ExactSuperWeightLayer
from ..tensor.nf4 import DEFAULT_ABSMAX_GRID, NF4_BLOCKSIZE, NF4_LEVELS, nf4_blocks, nf4_codes, nf4_dequantize, nf4_packed_shape

# bitsandbytes' CPU backend asks the Hub for an optional kernel at import and logs a warning when offline; its
# fallback is its own bundled kernel, so the line says nothing to a user of this layer.
_bnb_cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
_level = _bnb_cpu_logger.level
_bnb_cpu_logger.setLevel(logging.ERROR)
try:
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse
finally:
    _bnb_cpu_logger.setLevel(_level)

__all__ = ["SuperWeightNF4Linear"]

_STORED = {"weight", ABSMAX, "super_weight_indices", "super_weight_values"}


class SuperWeightNF4Linear(ExactSuperWeightLayer, bnb.nn.Linear4bit):
    """bitsandbytes NF4 ``Linear4bit`` whose super weights stay exact (see the module docstring).

    >>> layer = SuperWeightNF4Linear(128, 64, bias=False, num_super_weights=1)
    >>> layer.weight.shape, layer.weight_absmax.shape, layer.weight.quant_state.quant_type
    (torch.Size([4096, 1]), torch.Size([128]), 'nf4')
    """

    weight_format = "bnb-nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        num_super_weights: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        # The dense weight Linear4bit would allocate is replaced at once: build it on the meta device.
        super().__init__(in_features, out_features, bias=False, compress_statistics=False, quant_type="nf4",
                         quant_storage=torch.uint8, device="meta")
        self._ready = False
        self.state_dtype = dtype or torch.float32
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.weight_absmax = frozen(torch.ones(nf4_blocks(out_features * in_features), dtype=torch.float32, device=device))
        self.super_weight_indices = self.super_weight_values = None
        if num_super_weights:
            self.super_weight_indices = frozen(torch.zeros(num_super_weights, 2, dtype=torch.int32, device=device))
            self.super_weight_values = frozen(torch.zeros(num_super_weights, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.state_dtype, device=device)) if bias else None
        self._ready = True
        # Code 7 everywhere: a layer built directly is a valid zero matrix.
        self.weight = torch.full(nf4_packed_shape(out_features, in_features), 0x77, dtype=torch.uint8, device=device)
        # bitsandbytes' CPU repacking needs whole blocks per row and rows in multiples of 32.
        self.support_avx512bf16_for_cpu = bool(
            self.support_avx512bf16_for_cpu and in_features % NF4_BLOCKSIZE == 0 and out_features % 32 == 0
        )

    # -- state: bitsandbytes' QuantState follows the stored tensors -------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "weight" and getattr(self, "_ready", False) and isinstance(value, bnb.nn.Params4bit):
            self._refuse_requantized(value)
        if name == "weight" and getattr(self, "_ready", False) and isinstance(value, torch.Tensor) and not (
            isinstance(value, bnb.nn.Params4bit) and value.quant_state is not None
        ):
            loaded = getattr(value, "_is_hf_initialized", False)
            value = bnb.nn.Params4bit(value.data, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
                                      quant_type="nf4", quant_storage=torch.uint8, module=self, bnb_quantized=True)
            if loaded:
                value._is_hf_initialized = True
        elif name in _STORED and isinstance(value, nn.Parameter) and value.requires_grad:
            value.requires_grad_(False)  # transformers loads float tensors as trainable parameters
        super().__setattr__(name, value)
        if name in ("weight", ABSMAX) and getattr(self, "_ready", False) and "weight" in self._parameters:
            self._sync_quant_state()

    def _refuse_requantized(self, value: "bnb.nn.Params4bit") -> None:
        """Refuse codes that bitsandbytes quantized itself (their own absmax in their ``QuantState``).

        PEFT's merge of a LoRA adapter into a bitsandbytes 4-bit layer (``merge_adapter``, ``merge_and_unload``)
        dequantizes the codes, adds the update and assigns a freshly quantized ``Params4bit``. Taken as is, the
        layer's stored absmax would describe codes it no longer holds (wrong outputs, silently); adopted, the
        super weights' coordinates would hold a rounded update and the checkpoint would no longer verify.
        """
        state = value.quant_state
        if state is None or "weight" not in self._parameters:
            return
        own = self.weight_absmax.data
        absmax = state.absmax
        if getattr(state, "nested", False) or absmax.shape != own.shape or not torch.equal(absmax.to(own), own):
            raise ValueError(
                "SuperWeightNF4Linear: a weight re-quantized by bitsandbytes was assigned (PEFT's merge of a LoRA "
                "adapter into a 4-bit layer does this). Its codes would carry the update rounded to NF4 and no longer "
                "match the layer's stored absmax and exact super weights; the layer is left unchanged. To merge, "
                "make the model dense first: model.dequantize() (super weights exact), then "
                "PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()."
            )

    def _sync_quant_state(self) -> None:
        state = QuantState(
            absmax=self.weight_absmax.data, shape=torch.Size([self.out_features, self.in_features]),
            code=NF4_LEVELS.to(self.weight_absmax.device), blocksize=NF4_BLOCKSIZE, quant_type="nf4",
            dtype=self.state_dtype,
        )
        self.weight.quant_state = state
        self.quant_state = state

    def _unpack_for_storage(self) -> None:
        """Undo bitsandbytes' CPU repacking (done at the first inference call) so the stored layout is on the layer."""
        state = getattr(self.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            self.weight.data, _ = _convert_weight_packed_for_cpu_inverse(self.weight.data, state)
            self._sync_quant_state()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._unpack_for_storage()
        # nn.Module's own: the format's tensors only, none of bitsandbytes' serialized QuantState entries.
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        self._unpack_for_storage()  # bitsandbytes moves its CPU layout only one way
        # model.to(dtype) casts every float tensor: absmax and the exact values move, but keep float32.
        exact = {n: getattr(self, n) for n in (ABSMAX, "super_weight_values") if getattr(self, n) is not None}
        exact = {n: t.data for n, t in exact.items()}
        result = super()._apply(fn, recurse)
        for name, before in exact.items():
            tensor = getattr(self, name)
            if tensor.dtype != before.dtype:
                tensor.data = before.to(tensor.device)
        self._sync_quant_state()
        return result

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        super_weights: Sequence[tuple[int, int]] | Sequence[SuperWeight] = (),
        importance: torch.Tensor | None = None,
        grid: tuple[float, ...] | None = DEFAULT_ABSMAX_GRID,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
        name: str = "SuperWeightNF4Linear",
    ) -> "SuperWeightNF4Linear":
        """Quantize a dense ``nn.Linear``: ``super_weights`` (``(row, col)`` pairs or records) kept exact, each block's
        absmax searched over ``grid`` weighted by ``importance`` (``[in]``), or the given ``codes`` (packed, absmax)
        of :func:`~optimum_superweight.tensor.nf4.nf4_codes`."""
        weight = linear.weight.detach()
        out_features, in_features = weight.shape
        coordinates = [(sw.row, sw.col) if isinstance(sw, SuperWeight) else (int(sw[0]), int(sw[1])) for sw in super_weights]
        for row, col in coordinates:
            if not (0 <= row < out_features and 0 <= col < in_features):
                raise ValueError(
                    f"Super weight ({row}, {col}) lies outside the {out_features}x{in_features} weight of {name}."
                )
        check_quantizable(name, weight, coordinates)
        indices = torch.tensor(coordinates, dtype=torch.int32, device=weight.device).reshape(-1, 2)
        if codes is None:
            codes = nf4_codes(weight, indices, importance, grid)
        packed, absmax = codes
        if tuple(packed.shape) != nf4_packed_shape(out_features, in_features) or absmax.shape != (
            nf4_blocks(out_features * in_features),
        ):
            raise ValueError(f"Precomputed NF4 codes {tuple(packed.shape)}, absmax {tuple(absmax.shape)} do not fit {name}.")
        module = cls(in_features, out_features, bias=linear.bias is not None, num_super_weights=len(coordinates),
                     dtype=weight.dtype, device=weight.device)
        module.weight_absmax = nn.Parameter(absmax.to(torch.float32), requires_grad=False)
        module.weight = packed
        module._keep_exact(weight, indices, linear.bias)
        return module

    # -- inference ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() and x.requires_grad:
            # bitsandbytes' CPU inference layout has no backward (it would run it anyway): back to the stored one.
            self._unpack_for_storage()
        out = super().forward(x)  # bitsandbytes' kernels: the matrix is 0 at every super weight
        if self.super_weight_indices is None:
            return out
        rows = self.super_weight_indices[:, 0].long()
        cols = self.super_weight_indices[:, 1].long()
        return out.index_add(-1, rows, x[..., cols].to(out.dtype) * self.super_weight_values.to(out.dtype))

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight bitsandbytes runs, with every super weight at its exact value."""
        self._unpack_for_storage()
        weight = nf4_dequantize(self.weight.data, self.weight_absmax, (self.out_features, self.in_features))
        if self.super_weight_indices is not None:
            idx = self.super_weight_indices.long()
            weight[idx[:, 0], idx[:, 1]] = self.super_weight_values
        return weight.to(dtype or (self.bias.dtype if self.bias is not None else self.state_dtype))

    # -- the checkpoint format's view (what models/verify.py and the digests read) -------------------------------
    @property
    def format(self) -> LayerFormat:
        """This layer's settings as the checkpoint format sees them."""
        return LayerFormat(self.out_features, self.in_features, bits=4, group_size=NF4_BLOCKSIZE, symmetric=True,
                           scale_dtype="float32", num_super_weights=self.num_super_weights, bias=self.bias is not None,
                           weight_format=self.weight_format)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this layer writes to a checkpoint, by format name, in the format table's order."""
        self._unpack_for_storage()
        tensors = {spec.name: getattr(self, spec.name, None) for spec in TENSORS}
        if tensors["weight"] is not None:
            tensors["weight"] = tensors["weight"].data  # the codes, not bitsandbytes' Parameter subclass
        return {name: tensor for name, tensor in tensors.items() if tensor is not None}

    def storage_bytes(self) -> int:
        """Bytes of the compressed state (codes, absmax, super weights; bias excluded)."""
        return sum(t.numel() * t.element_size() for n, t in self.stored_tensors().items() if n != "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bnb nf4 blocksize={NF4_BLOCKSIZE}, super_weights={self.num_super_weights}")
