"""What a detection run starts from: its checked settings and the prompts as a padded batch.

One rule for every detection path (in memory, streaming, the quantizer, the CLI): the settings are checked by
:meth:`DetectionSettings.checked`, the prompts encoded by :func:`encode_prompts` (see :mod:`optimum_superweight.prompts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..prompts import detection_inputs

__all__ = [
    "DetectionSettings",
    "DEFAULT_CONFIRM_TOKENS",
    "check_number",
    "check_count",
    "vocab_size",
    "encode_prompts",
    "pad_batch",
    "model_device",
    "layer_output",
    "context_length",
]

#: Tokens of built-in text each candidate's ablation is scored on.
DEFAULT_CONFIRM_TOKENS = 256


def check_number(name: str, value: Any, minimum: float) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a finite number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= {minimum:g}.")
    return float(value)


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value``, or a ValueError naming ``name`` unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}.")
    return value


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding."""
    return int(model.get_input_embeddings().weight.shape[0])


def encode_prompts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]] | None
) -> tuple[list[str], list[list[int]]]:
    """The detection prompts as (texts, token ids): one rule for every detection path."""
    # One rule for every detection path (text, default prompts, fixed ids without a tokenizer): see prompts.py.
    return detection_inputs(tokenizer, prompts, vocab_size(model))


def pad_batch(encoded: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of the prompts, right-padded with ``pad_id``."""
    # Right padding: causal attention keeps real tokens independent of the pads, which hooks then mask out.
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), mask.to(device)



def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (else its first parameter's, else the CPU)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


#: Config fields that bound how many positions one forward pass may hold (GPT-2's learned position table is
#: ``n_positions`` long; a longer window indexes past it). A sliding window bounds what one token attends to.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length", "sliding_window")


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens one forward pass of ``model`` can take (the smallest of its config's position limits), or
    ``None`` when its config names none; calibration, confirmation and ablation texts are cut to fit it.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> context_length(build_tiny_model("gpt2", super_weights=None, n_positions=128))
    128
    """
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    limits = [getattr(config, field, None) for field in _CONTEXT_FIELDS]
    limits = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(limits) if limits else None


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states of a module's output (the first element of a tuple output)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass(frozen=True)
class DetectionSettings:
    """What a detection run searches with: one set of defaults and one check for every detection path.

    ``layers`` and ``prompts`` are checked against the model (its decoder layers, its vocabulary) when the run
    starts; the numbers here by :meth:`checked`. Streaming detection never confirms (``confirm`` is ignored).

    >>> DetectionSettings(threshold=50, min_ratio=100).checked().threshold
    50.0
    """

    prompts: Sequence[str | Sequence[int]] | None = None
    threshold: float = 50.0
    min_ratio: float = 100.0
    layers: Sequence[int] | None = None
    max_super_weights: int = 16
    max_iterations: int = 8
    confirm: bool = True
    confirm_tokens: int = DEFAULT_CONFIRM_TOKENS
    projection: str | None = None

    def checked(self) -> "DetectionSettings":
        """These settings with numbers as floats; fails on the first invalid one, naming it, its value and what
        is accepted. (``min_ratio`` >= 0: what a config accepts is what detection accepts, in memory or streaming.)"""
        if not isinstance(self.confirm, bool):
            raise ValueError(f"confirm={self.confirm!r} is invalid: expected True or False.")
        return replace(
            self,
            threshold=check_number("threshold", self.threshold, 0.0),
            min_ratio=check_number("min_ratio", self.min_ratio, 0.0),
            max_super_weights=check_count("max_super_weights", self.max_super_weights, 0),
            max_iterations=check_count("max_iterations", self.max_iterations, 1),
            confirm_tokens=check_count("confirm_tokens", self.confirm_tokens, 8),
            layers=None if self.layers is None else list(self.layers),
        )

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> "DetectionSettings":
        """The detection fields of a :class:`~optimum_superweight.SuperWeightConfig` (``detection_*``,
        ``max_super_weights``), plus ``overrides``."""
        fields = dict(
            prompts=config.detection_prompts,
            threshold=config.detection_threshold,
            min_ratio=config.detection_min_ratio,
            layers=config.detection_layers,
            max_super_weights=config.max_super_weights,
        )
        return cls(**{**fields, **overrides})
