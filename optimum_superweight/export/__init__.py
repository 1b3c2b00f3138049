"""Export a quantized model to the formats servers load: compressed-tensors (vLLM) and GGUF (llama.cpp).

>>> from optimum_superweight.export import export
>>> export("out", "out-vllm", format="compressed-tensors")          # doctest: +SKIP
>>> export(model, "model.gguf", format="gguf", tokenizer=tokenizer)  # doctest: +SKIP

Both writers take our codes and scales as they are. Where a format cannot hold a layer exactly they raise
:class:`NotExpressibleError` naming the layer and what is missing; ``allow_requantize=True`` re-quantizes
such layers instead (and the result says which). Super weights always stay exact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .codes import VARIANTS, ModuleCodes, quantized_modules
from .errors import NotExpressibleError
from .source import load_source, super_weight_records, tokenizer_of, write_dense_folder

__all__ = ["export", "FORMATS", "NotExpressibleError", "ModuleCodes", "VARIANTS"]

#: Accepted values of ``format``.
FORMATS = ("compressed-tensors", "gguf")


def _model_dtype(model: nn.Module) -> torch.dtype:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and embeddings.weight.is_floating_point():
        return embeddings.weight.dtype
    return torch.float32


def export(
    model_or_folder: nn.Module | str | os.PathLike[str],
    out: str | os.PathLike[str],
    format: str = "compressed-tensors",
    *,
    tokenizer: Any = None,
    allow_requantize: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Write ``model_or_folder`` (a model quantized by this package, or its saved folder) to ``out``.

    Args:
        model_or_folder: The quantized model, or the folder ``save_pretrained`` wrote.
        out: Output folder (compressed-tensors) or ``.gguf`` file (GGUF).
        format: ``"compressed-tensors"`` or ``"gguf"``.
        tokenizer: Shipped with the export; by default the one saved next to the checkpoint.
        allow_requantize: Re-quantize layers the format cannot hold exactly instead of raising.
        **options: Format options. compressed-tensors: ``dtype`` (``"auto"`` = the model's). GGUF: see
            :func:`optimum_superweight.export.gguf.export_gguf` (``super_weight_type``, ``dense_type``,
            ``llama_quantize``, ``converter``, ``pre_tokenizer``).

    Returns:
        A summary: the path, which layers were written from our codes, which stayed dense, which were
        re-quantized.

    >>> export("out", "smollm2-vllm")  # doctest: +SKIP
    {'format': 'compressed-tensors', 'path': 'smollm2-vllm', 'quantized': 210, 'dense': ['model.layers.11.mlp.down_proj'], ...}
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is invalid: expected one of {', '.join(FORMATS)}.")
    model, folder = load_source(model_or_folder)
    tokenizer = tokenizer_of(folder, tokenizer)
    all_codes = list(quantized_modules(model))
    records = super_weight_records(model)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="superweight-export-") as scratch:
        dense = write_dense_folder(model, Path(scratch) / "dense", tokenizer)
        if format == "compressed-tensors":
            from .compressed_tensors import export_compressed_tensors

            result = export_compressed_tensors(
                all_codes,
                dense,
                out,
                records=records,
                model_dtype=_model_dtype(model),
                allow_requantize=allow_requantize,
                source=folder,
                **options,
            )
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
            return result
        from .gguf import export_gguf

        return export_gguf(all_codes, dense, out, records=records, allow_requantize=allow_requantize, **options)
