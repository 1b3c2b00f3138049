"""Kept for imports written before detection became a package: see :mod:`optimum_superweight.detection.streaming`."""

from .detection.streaming import ShardReader, checkpoint_files, detect_super_weights_streaming, meta_model

__all__ = ["detect_super_weights_streaming", "checkpoint_files", "ShardReader", "meta_model"]
