"""PEFT (LoRA) on a model quantized by optimum-superweight.

PEFT finds and wraps layers by type: ``target_modules="all-linear"`` collects ``nn.Linear`` layers only, and the
LoRA class for a layer type it does not know comes from the config's extension point,
``LoraConfig._register_custom_module``, which is not saved with the adapter. :func:`prepare_lora_config` does
both for our layers on the config you would give PEFT; everything else is PEFT's own API (``get_peft_model``,
``save_pretrained``, ``PeftModel.from_pretrained``, ``merge_and_unload``) and the transformers ``Trainer``:

>>> import torch
>>> from peft import LoraConfig, get_peft_model
>>> from optimum_superweight import SuperWeightConfig, quantize_model
>>> from optimum_superweight.testing import build_tiny_model
>>> model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
>>> sw = [{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}]
>>> _ = quantize_model(model, SuperWeightConfig(bits=4, group_size=32, super_weights=sw, importance="none"))
>>> peft_model = get_peft_model(model, prepare_lora_config(LoraConfig(r=4, target_modules="all-linear"), model))
>>> sorted({type(m).__name__ for m in peft_model.modules() if hasattr(m, "lora_A")})
['SuperWeightLoraLinear']

Reload an adapter saved with ``peft_model.save_pretrained(path)`` on top of a reloaded quantized model with
``PeftModel.from_pretrained(model, path, config=prepare_lora_config(LoraConfig.from_pretrained(path), model))``,
or :func:`load_adapter` (the same call). ``peft_model.merge_and_unload()`` returns a dense model whose super
weights hold their exact values (see :mod:`optimum_superweight.nn.lora`); ``.dequantize()`` on it then drops
the quantization config, so it saves and reloads as a plain full-precision model (and can be quantized again).

**Why a prepare call, and not the plain ``LoraConfig``** (checked against PEFT 0.21.2's source; PEFT reads nothing
from the model or from transformers' quantizer that could carry the mapping):

- ``"all-linear"`` keeps ``(torch.nn.Linear, Conv1D)`` instances and tuner layers named "Linear"
  (``peft/tuners/tuners_utils.py`` ``_maybe_include_all_linear_layers``, ``linear_classes`` at line 2445).
- The LoRA class comes from a fixed list of dispatchers (``peft/tuners/lora/model.py`` ``_create_new_module``,
  lines 499-548): the config's ``_custom_modules`` first, then checks for third-party types (bitsandbytes, EETQ,
  AQLM, GPTQModel, HQQ, INC, torchao, Megatron, Transformer Engine), then ``dispatch_default``
  (``peft/tuners/lora/layer.py`` line 2750), which gives any ``nn.Linear`` subclass PEFT's dense ``lora.Linear``.
- That class merges by writing into ``base_layer.weight.data`` (``layer.py`` lines 1001 and 1008): here the packed
  codes, so an ``nn.Linear`` subclass could train but never merge exactly, and its adapter would not be masked at
  the super weights (what makes the merged model equal the adapted one with the stored exact values).
- ``_custom_modules`` is an attribute set in ``LoraConfig.__post_init__`` (``peft/tuners/lora/config.py`` line
  1115), not a dataclass field, so ``adapter_config.json`` never carries it and ``PeftModel.from_pretrained``
  needs the mapping again (:func:`load_adapter`).

The plain calls fail loudly rather than train the wrong layers: ``"all-linear"`` finds no target, a name list
raises PEFT's "Target module ... is not supported". The bitsandbytes NF4 form (``weight_format="bnb-nf4"``) needs
none of this: its layer is bitsandbytes' ``Linear4bit``, so the plain calls use PEFT's QLoRA layer (see
:mod:`optimum_superweight.nn.nf4` for merging it).
"""

from __future__ import annotations

import copy
from typing import Any

from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .nn.linear import SuperWeightLinear
from .nn.lora import SuperWeightLoraLinear

__all__ = ["prepare_lora_config", "load_adapter", "SuperWeightLoraLinear"]

_ALL_LINEAR = "all-linear"


def _all_linear(model: nn.Module) -> set[str]:
    """What ``"all-linear"`` means to PEFT (every linear layer but the output head and layers inside adapters),
    with our quantized layers counted as linear layers."""
    names = {name for name, module in model.named_modules() if isinstance(module, (nn.Linear, SuperWeightLinear))}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for prefix, module in model.named_modules():
        if head is not None and module is head:
            names.discard(prefix)
        if isinstance(module, BaseTunerLayer):
            names -= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    return names


def prepare_lora_config(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of ``config`` that PEFT applies to ``model``'s quantized layers: ``SuperWeightLoraLinear`` registered
    for ``SuperWeightLinear`` and ``target_modules="all-linear"`` resolved with them included (PEFT's own
    resolution sees ``nn.Linear`` only). Other target lists (``["q_proj", "v_proj"]``, a regex) pass unchanged.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    config = copy.deepcopy(config)
    config._register_custom_module({SuperWeightLinear: SuperWeightLoraLinear})
    target = config.target_modules
    if isinstance(target, str) and target.lower() == _ALL_LINEAR:
        names = _all_linear(model)
        if not names:
            raise ValueError("target_modules='all-linear' matched no linear or optimum-superweight layer in the model.")
        config.target_modules = names
    return config


def load_adapter(model: nn.Module, adapter_path: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_path, config=prepare_lora_config(...), **kwargs)``: a saved LoRA
    adapter on a (reloaded) quantized model; ``is_trainable=True`` to train it further."""
    config = LoraConfig.from_pretrained(adapter_path, **{k: kwargs.pop(k) for k in ("revision", "subfolder") if k in kwargs})
    return PeftModel.from_pretrained(model, adapter_path, config=prepare_lora_config(config, model), **kwargs)
