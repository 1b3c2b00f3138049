"""``embedding_bits=8``: the input embeddings and the output head packed, built for reload, checked, dequantized.

The modules are :mod:`optimum_superweight.nn.embedding`'s; this module finds them in a model
(``get_input_embeddings`` / ``get_output_embeddings``), keeps a tied head tied (one set of tensors, stored once,
tied again by transformers at reload through ``all_tied_weights_keys``), and checks a reloaded model against
``config.json`` (``embedding_bits``, ``super_activation_channels``).

>>> from optimum_superweight.testing import build_tiny_model
>>> model = build_tiny_model("llama")
>>> pack_embeddings(model, SuperWeightConfig(embedding_bits=8), [SuperWeight("model.layers.1.mlp.down_proj", 5, 7)])
[5]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SuperWeightConfig
from ..format import CheckpointFormatError
from ..nn.embedding import PACKED_TENSORS, SuperWeightEmbedding, SuperWeightHead
from ..nn.linear import SuperWeightLinear
from ..records import SuperWeight
from .modules import set_module
from .w8a8 import super_activation_channels

__all__ = [
    "EmbeddingPair",
    "embedding_pair",
    "pack_embeddings",
    "build_embedding_skeleton",
    "verify_embeddings",
    "dequantize_embeddings",
]


@dataclass(frozen=True)
class EmbeddingPair:
    """Where a model keeps its input embeddings and output head, and whether they are tied."""

    input_name: str
    input: nn.Module
    output_name: str | None
    output: nn.Module | None
    tied: bool


def _name_of(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def embedding_pair(model: nn.Module) -> EmbeddingPair:
    """The model's input embeddings and output head (``get_input_embeddings`` / ``get_output_embeddings``)."""
    get_input = getattr(model, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    input_name = _name_of(model, embeddings)
    if input_name is None:
        raise ValueError(
            f"SuperWeightConfig.embedding_bits=8 is invalid for this {type(model).__name__}: it has no input embeddings "
            "(get_input_embeddings). Leave embedding_bits=None."
        )
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    output_name = _name_of(model, head)
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}
    tied = head is not None and (
        getattr(head, "weight", None) is getattr(embeddings, "weight", None)
        or tied_keys.get(f"{output_name}.weight") == f"{input_name}.weight"
    )
    return EmbeddingPair(input_name, embeddings, output_name, head, bool(tied))


def _declare_tied(model: nn.Module, pair: EmbeddingPair, tied: bool = True) -> None:
    """Add (or remove) the packed tensors' tie to the model's ``all_tied_weights_keys``: transformers then ties them at
    reload (they are stored once, under the embeddings) instead of reporting them missing."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(keys, dict):
        return
    for name in PACKED_TENSORS[1:]:  # "weight" is the model's own tie
        target = f"{pair.output_name}.{name}"
        if tied:
            keys[target] = f"{pair.input_name}.{name}"
        else:
            keys.pop(target, None)


def _channels(config: SuperWeightConfig, records: Iterable[SuperWeight], hidden: int) -> list[int]:
    channels = config.super_activation_channels
    if channels is None:
        channels = super_activation_channels(list(records))
    outside = [c for c in channels if c >= hidden]
    if outside:
        raise ValueError(
            f"SuperWeightConfig.super_activation_channels={list(channels)!r} is invalid for embedding_bits=8: channels "
            f"{outside} are outside the {hidden} hidden channels of the embeddings."
        )
    return sorted(set(channels))


@torch.no_grad()
def pack_embeddings(model: nn.Module, config: SuperWeightConfig, records: Iterable[SuperWeight]) -> list[int]:
    """Replace the input embeddings and the output head by their 8-bit modules; returns the held-out channels
    (``config.super_activation_channels``, default the super weights' rows), which the caller records."""
    pair = embedding_pair(model)
    if isinstance(pair.output, SuperWeightLinear):
        raise ValueError(
            f"SuperWeightConfig.embedding_bits=8 packs the output head '{pair.output_name}', which is already quantized "
            f"with bits={config.bits} (modules_to_not_convert={config.modules_to_not_convert!r} does not exclude it): add "
            f"'{pair.output_name}' to modules_to_not_convert, or leave embedding_bits=None."
        )
    channels = _channels(config, records, pair.input.weight.shape[1])
    embedding = _loaded_as(pair.input, SuperWeightEmbedding.from_embedding(pair.input, channels, pair.input_name))
    set_module(model, pair.input_name, embedding)
    if pair.output is not None:
        if pair.tied:
            head = SuperWeightHead.skeleton_of(pair.output, len(channels)).tie_to(embedding)
            if pair.output.bias is not None:
                head.bias.data = pair.output.bias.detach().clone()
            _declare_tied(model, pair)
        else:
            head = SuperWeightHead.from_linear(pair.output, channels, pair.output_name)
        set_module(model, pair.output_name, _loaded_as(pair.output, head))
    return channels


def _loaded_as(source: nn.Module, packed: nn.Module) -> nn.Module:
    """The packed tensors carry transformers' loaded flag of the weight they were packed from (quantize-on-load checks
    that every quantized tensor was loaded)."""
    if getattr(source.weight, "_is_hf_initialized", False):
        for tensor in packed.parameters():
            tensor._is_hf_initialized = True
    return packed


def build_embedding_skeleton(model: nn.Module, config: SuperWeightConfig) -> None:
    """Before a checkpoint with ``embedding_bits=8`` loads: empty packed modules with its names and shapes."""
    if config.embedding_bits is None:
        return
    pair = embedding_pair(model)
    count = len(config.super_activation_channels or [])
    problem = SuperWeightEmbedding.supports(pair.input)
    if problem:
        raise ValueError(f"config.json's field 'embedding_bits' packs '{pair.input_name}', which is {problem}.")
    embedding = SuperWeightEmbedding.skeleton_of(pair.input, count)
    set_module(model, pair.input_name, embedding)
    if pair.output is not None:
        head = SuperWeightHead.skeleton_of(pair.output, count)
        if pair.tied:
            head.tie_to(embedding)
            _declare_tied(model, pair)
        set_module(model, pair.output_name, head)


def is_tied_head(module: nn.Module) -> bool:
    """Whether ``module`` is a packed head sharing the packed embedding's tensors (stored under the embedding)."""
    return isinstance(module, SuperWeightHead) and "_tied_weights_keys" in module.__dict__


def _check_columns(name: str, module: nn.Module, expected: Sequence[int]) -> None:
    stored = [int(c) for c in module.held_out_columns.tolist()]
    if stored != list(expected):
        raise CheckpointFormatError(
            f"{name}.held_out_columns holds {stored}, but config.json's field 'super_activation_channels' says "
            f"{list(expected)}; the checkpoint's config.json and tensors disagree."
        )


def verify_embeddings(model: nn.Module, config: SuperWeightConfig) -> None:
    """A loaded model's packed embeddings and head agree with ``config.json`` (and a tied head shares the tensors)."""
    packed = [n for n, m in model.named_modules() if isinstance(m, (SuperWeightEmbedding, SuperWeightHead))]
    if config.embedding_bits is None:
        if packed:
            raise CheckpointFormatError(
                f"{packed[0]} is a packed 8-bit module, but config.json's field 'embedding_bits' is null."
            )
        return
    pair = embedding_pair(model)
    expected = list(config.super_activation_channels or [])
    if not isinstance(pair.input, SuperWeightEmbedding):
        raise CheckpointFormatError(
            f"{pair.input_name} is not packed, but config.json's field 'embedding_bits' is {config.embedding_bits}."
        )
    _check_columns(pair.input_name, pair.input, expected)
    if pair.output is None:
        return
    if not isinstance(pair.output, SuperWeightHead):
        raise CheckpointFormatError(
            f"{pair.output_name} is not packed, but config.json's field 'embedding_bits' is {config.embedding_bits}."
        )
    _check_columns(pair.output_name, pair.output, expected)
    if is_tied_head(pair.output):
        shared = [n for n in PACKED_TENSORS if getattr(pair.output, n) is not getattr(pair.input, n)]
        if shared:
            raise CheckpointFormatError(
                f"{pair.output_name}.{shared[0]} is not the tied embeddings' tensor ({pair.input_name}.{shared[0]}): the "
                "model's config ties them (tie_word_embeddings), but the head was loaded apart."
            )


@torch.no_grad()
def dequantize_embeddings(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Replace the packed embeddings and head by dense ones (held-out columns exact), a tied head tied again."""
    pair = embedding_pair(model)
    if not isinstance(pair.input, SuperWeightEmbedding):
        return
    dense = pair.input.to_dense(dtype)
    set_module(model, pair.input_name, dense)
    if isinstance(pair.output, SuperWeightHead):
        head = pair.output.to_linear(dtype or dense.weight.dtype)
        if pair.tied:
            head.weight = dense.weight
            _declare_tied(model, pair, tied=False)
        set_module(model, pair.output_name, head)
