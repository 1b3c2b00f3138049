"""Export a quantized model to the formats servers load: AWQ and compressed-tensors (vLLM), GGUF (llama.cpp).

>>> from optimum_superweight.export import export
>>> export("out", "out-awq", format="awq")                           # doctest: +SKIP
>>> export("out", "out-vllm", format="compressed-tensors")          # doctest: +SKIP
>>> export(model, "model.gguf", format="gguf", tokenizer=tokenizer)  # doctest: +SKIP

The writers take our codes and scales as they are. Where a format cannot hold a layer exactly they raise
:class:`NotExpressibleError` naming the layer and what is missing; ``allow_requantize=True`` re-fits such
layers instead (:mod:`.refit`; the result says which and what it cost). Super weights always stay exact.
Every exported folder also carries the keys transformers 4.x readers need (:mod:`.compat`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.saving import SET_ASIDE, remove_stale_staging, staging_prefix
from ..nn.linear import SuperWeightLinear
from .codes import VARIANTS, ModuleCodes, quantized_modules
from .errors import NotExpressibleError
from .compat import add_transformers4_keys
from .source import load_source, super_weight_records, tokenizer_of, write_dense_folder

__all__ = ["export", "FORMATS", "NotExpressibleError", "ModuleCodes", "VARIANTS"]

#: Accepted values of ``format``.
FORMATS = ("awq", "compressed-tensors", "gguf")


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
        format: ``"awq"``, ``"compressed-tensors"`` or ``"gguf"``.
        tokenizer: Shipped with the export; by default the one saved next to the checkpoint.
        allow_requantize: Re-fit layers the format cannot hold exactly (from their dequantized weights, weighted
            by activations on the calibration text when a tokenizer is available) instead of raising.
        **options: Format options. AWQ: ``dtype`` of dense tensors (``"auto"``: float16 unless it would round a
            super weight). compressed-tensors: ``dtype``
            (``"auto"`` = the model's), ``zero_point`` (the form re-fitted layers take: ``"uint8"`` or
            ``"symmetric"``). GGUF: see
            :func:`optimum_superweight.export.gguf.export_gguf` (``super_weight_type``, ``dense_type``,
            ``llama_quantize``, ``converter``, ``pre_tokenizer``).

    Returns:
        A summary: the path, which layers were written from our codes, which stayed dense, which were
        re-fitted (``requantized``) or regrouped, the measured effect of a re-fit (``refit``), the keys added for
        transformers 4.x (``transformers4``).

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
    with tempfile.TemporaryDirectory(prefix="superweight-export-") as scratch, _staged(out) as staging:
        dense = write_dense_folder(model, Path(scratch) / "dense", tokenizer)
        if format in ("awq", "compressed-tensors"):
            if format == "awq":
                from .awq import export_awq

                linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SuperWeightLinear))]
                result = export_awq(all_codes, dense, staging, records=records, linear_names=linears, model=model,
                                    tokenizer=tokenizer, allow_requantize=allow_requantize, source=folder, **options)
            else:
                from .compressed_tensors import export_compressed_tensors

                result = export_compressed_tensors(
                    all_codes, dense, staging, records=records, model_dtype=_model_dtype(model),
                    allow_requantize=allow_requantize, source=folder, model=model, tokenizer=tokenizer, **options,
                )
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            result["transformers4"] = add_transformers4_keys(staging)
        else:
            from .gguf import export_gguf

            result = export_gguf(all_codes, dense, staging, records=records, allow_requantize=allow_requantize, **options)
    result["path"] = str(out)
    return result


@contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """Write an export beside ``out`` and move it into place only once complete, so that a kill, a full disk or an
    error leaves either the previous ``out`` or nothing: never a half-written export that a server would load.

    A ``.gguf`` file is replaced in one atomic rename. A folder takes two (the old one aside, the new one in); a kill
    between them leaves no ``out`` (the previous export is then the hidden ``.NAME.previous-*`` sibling, removed once a
later export is in place). Staging left by a killed export is removed by the next export to ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)  # a killed export's leftovers
    token = secrets.token_hex(4)
    staging = out.parent / f"{staging_prefix(out, 'writing')}{token}"
    try:
        yield staging
        if out.is_dir() and staging.is_dir():
            previous = out.parent / f"{staging_prefix(out, 'previous')}{token}"
            os.replace(out, previous)
            os.replace(staging, out)
            _remove(previous)
        else:
            os.replace(staging, out)
        remove_stale_staging(out, SET_ASIDE)  # a killed export's previous output: a new one is in place
    finally:
        _remove(staging)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
