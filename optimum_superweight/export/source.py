"""What an export starts from: a loaded quantized model or a saved checkpoint folder, and its dense twin.

Both writers need the model's own (unquantized) tensors under transformers' names, a ``config.json`` without
our quantization method, and the tokenizer files: :func:`write_dense_folder` writes exactly that, with every
quantized layer replaced by its dequantized weight (super weights exact). The user's model is not modified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.embeddings import is_tied_head
from ..nn.embedding import SuperWeightEmbedding
from ..nn.linear import SuperWeightLinear
from ..nn.w8a8 import SuperWeightW8A8Linear
from ..progress import progress_bar
from ..records import SuperWeight
from .compat import add_transformers4_keys

__all__ = ["load_source", "super_weight_records", "write_dense_folder", "tokenizer_of"]

# Tensors of a SuperWeightLinear (or a packed embedding or head, embedding_bits=8) that only our format knows.
_OWN_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_offset", "super_weight_indices", "super_weight_values",
                 "held_out_columns", "held_out_values")


def load_source(model_or_folder: Any) -> tuple[nn.Module, str | None]:
    """The quantized model and the folder it came from (``None`` for a model passed in memory). Skipped as a
    doctest: it needs a folder written by ``save_pretrained``.

    >>> model, folder = load_source("out")  # doctest: +SKIP
    """
    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
        folder = getattr(getattr(model, "config", None), "name_or_path", None) or None
    elif isinstance(model_or_folder, (str, os.PathLike)):
        folder = os.fspath(model_or_folder)
        config_file = Path(folder) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"model_or_folder={folder!r} has no config.json: expected a checkpoint saved by this package.")
        method = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("quant_method")
        if method != "superweight":
            raise ValueError(
                f"{config_file}: quantization_config.quant_method is {method!r}; export takes checkpoints of this package "
                "(quant_method 'superweight'). Quantize the model first (`optimum-superweight quantize`)."
            )
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        raise TypeError(
            f"model_or_folder={model_or_folder!r} is invalid: expected a model quantized by this package or the folder "
            "of a saved checkpoint."
        )
    if not any(isinstance(m, SuperWeightLinear) for m in model.modules()):
        raise ValueError("The model holds no SuperWeightLinear layer: there is nothing quantized to export.")
    if any(isinstance(m, SuperWeightW8A8Linear) for m in model.modules()):
        raise ValueError("W8A8 models (activation_bits=8) cannot be exported: neither format holds their activation hold-out.")
    return model, folder


def super_weight_records(model: nn.Module) -> list[SuperWeight]:
    """The model's super weights as recorded in its quantization config."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not hasattr(config, "get_super_weights"):
        return []
    return config.get_super_weights()


def tokenizer_of(folder: str | None, tokenizer: Any = None) -> Any:
    """The tokenizer to ship: the one given, else the one saved next to the checkpoint (``None`` if absent)."""
    if tokenizer is not None:
        return tokenizer
    if folder is None or not Path(folder).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def _dense_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Packed embeddings and head (embedding_bits=8) are written dequantized, like every other quantized layer; a tied
    # packed head is its embeddings' tensors: left out, transformers re-ties it on load.
    quantized = {name: module for name, module in model.named_modules()
                 if isinstance(module, (SuperWeightLinear, SuperWeightEmbedding))}
    tied_heads = {name for name, module in quantized.items() if is_tied_head(module)}
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with progress_bar(total=len(quantized) - len(tied_heads), desc="export: dequantizing layers", unit="layer") as bar:
        for key, tensor in model.state_dict().items():
            prefix, _, leaf = key.rpartition(".")
            if prefix in tied_heads:
                continue
            if prefix in quantized:
                if leaf in _OWN_SUFFIXES:
                    continue
                if leaf == "weight":
                    # A fresh tensor (never tied): kept out of the tie check, whose addresses a freed temporary
                    # could reuse.
                    state[key] = quantized[prefix].dequantize_weight(torch.float32).to(dtype).contiguous()
                    bar.update()
                    continue
            if tensor.data_ptr() in seen and tensor.numel():
                continue  # a tied weight: transformers re-ties it on load
            seen.add(tensor.data_ptr())
            state[key] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
    return state


def write_dense_folder(model: nn.Module, folder: str | os.PathLike[str], tokenizer: Any = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``model`` with every quantized layer dequantized (super weights exact) as a plain transformers folder.

    float32 holds every dequantized value exactly; ``config.json`` carries no quantization method, and the
    transformers 4.x keys (:func:`.compat.add_transformers4_keys`) next to the 5.x ones.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_dense_state_dict(model, dtype), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    add_transformers4_keys(folder)
    return folder
