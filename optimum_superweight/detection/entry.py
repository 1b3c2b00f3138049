"""The one way in for the quantizer and the CLI: detection settings in, a report out, in memory or streaming.

Both the quantizer (in memory, and quantize-while-loading) and ``optimum-superweight detect`` call
:func:`run_detection` with a :class:`~.inputs.DetectionSettings` (``DetectionSettings.from_config(config)`` for a
:class:`~optimum_superweight.SuperWeightConfig`), so the defaults, checks and prompts cannot drift between them;
:func:`records_to_keep` is the quantizer's rule for which records it holds exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..records import SuperWeight
from .in_memory import detect_super_weights
from .inputs import DetectionSettings
from .report import DetectionReport
from .streaming import detect_super_weights_streaming

__all__ = ["run_detection", "records_to_keep"]


def run_detection(
    settings: DetectionSettings,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
    folder: str | os.PathLike[str] | None = None,
    config: Any = None,
    files: Sequence[str | os.PathLike[str]] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> DetectionReport:
    """Detect with ``settings``: in memory on a loaded ``model`` (confirmed by ablation unless
    ``settings.confirm`` is False), or, without one, streaming from safetensors shards (a model ``folder``, or a
    transformers ``config`` and the shard ``files``; unconfirmed spikes, computed in ``dtype``).

    >>> from optimum_superweight.testing import build_tiny_model
    >>> report = run_detection(DetectionSettings(), model=build_tiny_model("llama", super_weights=[(1, 5, 7)]))
    >>> [(sw.row, sw.col) for sw in records_to_keep(report)]
    [(5, 7)]
    """
    settings = settings.checked()
    if model is not None:
        return detect_super_weights(
            model, tokenizer, prompts=settings.prompts, threshold=settings.threshold, min_ratio=settings.min_ratio,
            layers=settings.layers, max_super_weights=settings.max_super_weights,
            max_iterations=settings.max_iterations, confirm=settings.confirm, confirm_tokens=settings.confirm_tokens,
            projection=settings.projection, progress=progress,
        )
    return detect_super_weights_streaming(
        folder, tokenizer, config=config, files=files, prompts=settings.prompts, threshold=settings.threshold,
        min_ratio=settings.min_ratio, layers=settings.layers, max_super_weights=settings.max_super_weights,
        max_iterations=settings.max_iterations, projection=settings.projection, dtype=dtype, progress=progress,
    )


def records_to_keep(report: DetectionReport) -> list[SuperWeight]:
    """The records a quantizer keeps exact: confirmed ``super`` and ``weak`` ones (a few exact scalars cost
    nothing), or every candidate when the report is unconfirmed (streaming, ``confirm=False``)."""
    if report.confirmation is None:
        return list(report.candidates)
    return [c for c in report.candidates if c.classification in ("super", "weak")]
