"""The bitsandbytes NF4 variation of the pipeline (``SuperWeightConfig(weight_format="bnb-nf4")``).

After the plan and the calibration pass (each input channel's mean squared activation, as the default method reads
it), every target becomes a :class:`~optimum_superweight.nn.nf4.SuperWeightNF4Linear`: NF4 codes in bitsandbytes'
layout, super weights held out and exact, each block's absmax searched for the activation-weighted error
(:func:`optimum_superweight.tensor.nf4.nf4_codes`). On reload, :func:`build_nf4_skeleton` builds the same layers with
the checkpoint's names and shapes, so loading is plain assignment. Either way the model says
``is_loaded_in_4bit = True``, as bitsandbytes' own quantizer does: PEFT reads it to pick its QLoRA layer.

bitsandbytes is imported when a layer is built, never by importing this module (:mod:`.replace` imports it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import SuperWeightConfig
from .modules import as_linear, features, set_module

__all__ = ["quantize_model_nf4", "build_nf4_skeleton", "absmax_grid"]


def absmax_grid(config: SuperWeightConfig) -> tuple[float, ...] | None:
    """The absmax factors searched per block: the default grid with ``clip_search``, else ``None`` (plain absmax)."""
    from ..tensor.nf4 import DEFAULT_ABSMAX_GRID

    return DEFAULT_ABSMAX_GRID if config.algorithm.clip_search else None


@torch.no_grad()
def quantize_model_nf4(
    model: nn.Module,
    config: SuperWeightConfig,
    targets: dict[str, nn.Module],
    coordinates: dict[str, list[tuple[int, int]]],
    energies: dict[str, torch.Tensor] | None,
) -> None:
    """Swap every target of ``model`` for its NF4 layer; ``energies`` (module name -> ``E[x²]`` ``[in]``) weigh the
    absmax search (``None``: the plain squared error)."""
    from ..nn.nf4 import SuperWeightNF4Linear

    grid = absmax_grid(config)
    for name, module in targets.items():
        importance = energies.get(name) if energies else None
        layer = SuperWeightNF4Linear.from_linear(
            as_linear(module), super_weights=coordinates.get(name, []), importance=importance, grid=grid, name=name
        )
        layer.train(module.training)  # bitsandbytes picks its inference kernel in eval mode only
        set_module(model, name, layer)
    model.is_loaded_in_4bit = True


def build_nf4_skeleton(
    model: nn.Module, config: SuperWeightConfig, targets: dict[str, nn.Module], counts: dict[str, int]
) -> nn.Module:
    """Swap targets for empty NF4 layers shaped like a saved checkpoint (``counts``: super weights per module)."""
    from ..nn.nf4 import SuperWeightNF4Linear

    for name, module in targets.items():
        in_features, out_features = features(module)
        bias = module.bias
        skeleton = SuperWeightNF4Linear(
            in_features, out_features, bias=bias is not None, num_super_weights=counts.get(name, 0),
            dtype=bias.dtype if bias is not None else module.weight.dtype, device=module.weight.device,
        )
        set_module(model, name, skeleton)
    model.is_loaded_in_4bit = True
    return model
