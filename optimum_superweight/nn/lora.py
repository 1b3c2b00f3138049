"""LoRA on a ``SuperWeightLinear``: PEFT's custom-layer class for our quantized layers.

PEFT dispatches each targeted layer to a LoRA class; quantized layer types it does not know are served through
its extension point ``LoraConfig._register_custom_module({SuperWeightLinear: SuperWeightLoraLinear})``
(:func:`optimum_superweight.peft.prepare_lora_config` does that, and resolves ``"all-linear"``). This class
follows PEFT's conventions for quantized bases (its HQQ and bitsandbytes layers): ``base_layer`` stays the
packed layer, frozen, and the adapters ``lora_A`` / ``lora_B`` add ``scaling * B A x``.

**Super weights stay exact.** The adapter's update is masked at every super-weight coordinate: ``B A`` there is
subtracted in the forward (a sparse correction, one term per super weight) and left out of the merge, so the
merged weight at a super weight is the stored exact value and the merged model computes what the adapted one did.

**Merging is exact, too.** ``merge()`` replaces ``base_layer`` by a dense ``nn.Linear`` (the dequantized weight plus
the masked update) and keeps the packed layer aside; ``unmerge()`` puts the packed layer back unchanged (no
re-quantization, no drift); ``merge_and_unload()`` leaves the dense layer in the model.

>>> import torch
>>> from peft import LoraConfig
>>> from optimum_superweight.nn.linear import SuperWeightLinear
>>> base = SuperWeightLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32, super_weights=[(1, 2)])
>>> layer = SuperWeightLoraLinear(base, "default", config=LoraConfig(r=4, init_lora_weights=False), r=4, lora_alpha=8)
>>> bool(layer.get_delta_weight("default")[1, 2] == 0)
True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..kernels import release_kernel_layouts
from .linear import SuperWeightLinear

__all__ = ["SuperWeightLoraLinear"]


def _super_weight_coordinates(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    indices = getattr(base, "super_weight_indices", None)
    if indices is None or indices.numel() == 0:
        return None
    indices = indices.detach().long()
    return indices[:, 0], indices[:, 1]


class SuperWeightLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen ``SuperWeightLinear``, masked at its super weights (see the module doc)."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1, **kwargs: Any
    ) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        if not isinstance(base, SuperWeightLinear):
            raise TypeError(f"SuperWeightLoraLinear wraps a SuperWeightLinear, got {type(base).__name__}.")
        for field, value in (
            ("lora_bias", config.lora_bias),
            ("use_dora", config.use_dora),
            ("fan_in_fan_out", config.fan_in_fan_out),
            ("velora_config", getattr(config, "velora_config", None)),
            ("kasa_config", getattr(config, "kasa_config", None)),
        ):
            if value:
                raise ValueError(
                    f"LoraConfig.{field}={value!r} is not supported on optimum-superweight layers: plain LoRA only "
                    f"(lora_bias=False, use_dora=False, fan_in_fan_out=False, no LoRA variant)."
                )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._packed: SuperWeightLinear | None = None  # the packed layer while base_layer is the merged dense one
        self._input_dtype: torch.dtype | None = None  # the model's activations (the merged layer's dtype)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # Training runs prefill-sized calls only: the decode layouts built at load would sit unused through a
        # training run. Dropped here, they come back (lazily) at the first call that needs one.
        release_kernel_layouts(base)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        return None  # plain LoRA: variants were refused in __init__

    # -- the update, masked at the super weights -------------------------------------------------------------
    def _packed_layer(self) -> SuperWeightLinear:
        return self._packed if self._packed is not None else self.get_base_layer()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` (``[out, in]``), zero at every super-weight coordinate."""
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        coordinates = _super_weight_coordinates(self._packed_layer())
        if coordinates is not None:
            delta = delta.index_put(coordinates, torch.zeros((), dtype=delta.dtype, device=delta.device))
        return delta

    def _adapter_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B A dropout(x)`` minus the update's terms at the super weights."""
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        scaling = self.scaling[adapter]
        x = self.lora_dropout[adapter](x)
        output = lora_B(lora_A(x)) * scaling
        coordinates = _super_weight_coordinates(self._packed_layer())
        if coordinates is None:
            return output
        rows, cols = coordinates
        # (B A)[row, col] for each super weight, then out[..., row] -= that * x[..., col].
        coefficient = (lora_B.weight[rows] * lora_A.weight[:, cols].T).sum(-1) * scaling
        correction = x[..., cols] * coefficient.to(x.dtype)
        return output.index_add(-1, rows, -correction.to(output.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("SuperWeightLoraLinear does not support mixed-adapter batches (adapter_names).")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        self._input_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            cast = not torch.is_autocast_enabled(x.device.type)
            expected = result.dtype
            lora_input = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype) if cast else x
            output = self._adapter_output(adapter, lora_input)
            result = result + (output.to(expected) if cast else output)
        return result

    # -- merge: a dense base with the masked update; unmerge: the packed layer back, unchanged -----------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters into a dense copy of the base layer (super weights exact)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.lora_A.keys()]
        if not adapter_names:
            return
        packed = self._packed_layer()
        dense = self.base_layer if self._packed is not None else None
        weight = dense.weight.detach().clone() if dense is not None else packed.dequantize_weight(self._merge_dtype(packed))
        for adapter in adapter_names:
            weight = weight + self.get_delta_weight(adapter).detach().to(weight.dtype)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights: the adapter(s) {adapter_names} seem to be broken.")
        if dense is None:
            dense = packed.to_linear(weight.dtype)
            self._packed = packed
            self.base_layer = dense
        with torch.no_grad():
            dense.weight.copy_(weight)
        dense.requires_grad_(False)
        self.merged_adapters.extend(adapter_names)

    def _merge_dtype(self, packed: SuperWeightLinear) -> torch.dtype:
        # The packed layer has no float weight to take a dtype from: the activations seen so far, else the bias.
        if self._input_dtype is not None and self._input_dtype.is_floating_point:
            return self._input_dtype
        return packed.bias.dtype if packed.bias is not None else torch.float32

    def unmerge(self) -> None:
        """Put the packed layer back, exactly as it was before ``merge()``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.base_layer = self._packed
        self._packed = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
