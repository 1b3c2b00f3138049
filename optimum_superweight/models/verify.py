"""A compressed checkpoint loads completely and exactly as written, or raises: the checks of a pre-quantized load.

Three moments of ``from_pretrained`` on a compressed checkpoint:

1. before weights load (:func:`check_checkpoint_layout`): the safetensors headers (JSON only, no data) are
   checked against the skeleton that config.json describes: each quantized module's tensors, dtypes and
   shapes (:func:`optimum_superweight.format.check_layer_stored`), quantized tensors under modules the config
   keeps dense, and tensors no module explains. transformers would otherwise cast a float-stored code tensor
   to uint8, drop a tensor the skeleton has no slot for, or re-initialise a mis-shaped one at random;
2. after weights load (:func:`verify_quantized_model`): every parameter and buffer of the model was loaded
   from the checkpoint (tied weights excepted; transformers initialises missing ones at random and only
   logs it), value ranges (:func:`optimum_superweight.format.check_layer_values`), config.json's super
   weights equal to the stored ones, and each quantized module's content digest equal to config.json's;
3. at save (:func:`layer_digests`): the digests are recorded in config.json.

Every error names the module, the tensor and the config field.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import SuperWeightConfig
from ..format import (
    BIAS,
    DIGEST_ALGORITHM,
    HELD_OUT_VALUES,
    DIGESTS_METADATA_KEY,
    QUANTIZED_ONLY,
    WEIGHT,
    CheckpointFormatError,
    StoredTensor,
    check_held_out_codes,
    check_layer_stored,
    check_layer_values,
    digest_mismatch,
    layer_digest,
    read_safetensors_index,
    safetensors_dtype_name,
)
from ..nn.layers import is_quantized_layer
from ..nn.linear import SuperWeightLinear
from .embeddings import is_tied_head, verify_embeddings

__all__ = ["read_checkpoint_index", "check_checkpoint_layout", "verify_quantized_model", "layer_digests"]

logger = logging.getLogger(__name__)


def read_checkpoint_index(checkpoint_files: Iterable[Any] | None) -> dict[str, StoredTensor] | None:
    """The header index of a compressed checkpoint's files; ``None`` when loaded from an in-memory state dict.

    Only safetensors is accepted: a compressed checkpoint is never read from a pickle.
    """
    files = [str(f) for f in (checkpoint_files or [])]
    if not files:
        return None
    pickled = [f for f in files if not f.endswith(".safetensors")]
    if pickled:
        raise CheckpointFormatError(
            f"This optimum-superweight checkpoint stores its weights in {pickled[0]}; compressed checkpoints are read "
            "from safetensors only (never from pickles). Re-save it with save_pretrained (safetensors)."
        )
    return read_safetensors_index(files)


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _stored_by_module(index: Mapping[str, StoredTensor]) -> dict[str, dict[str, StoredTensor]]:
    grouped: dict[str, dict[str, StoredTensor]] = {}
    for key, entry in index.items():
        module, leaf = _split(key)
        grouped.setdefault(module, {})[leaf] = entry
    return grouped


def check_checkpoint_layout(model: nn.Module, index: Mapping[str, StoredTensor]) -> None:
    """Before weights load: the headers agree with the skeleton built from config.json (see the module doc)."""
    modules = dict(model.named_modules())
    by_module = _stored_by_module(index)
    for name, module in modules.items():
        if not is_quantized_layer(module) or is_tied_head(module):
            continue  # a tied packed head's tensors are stored (and checked) under the embeddings
        stored = by_module.get(name, {})
        weight = stored.get(WEIGHT)
        if not QUANTIZED_ONLY & set(stored) and (weight is None or len(weight.shape) == 2):
            how = "stores no tensor of it (tied or absent)" if weight is None else (
                f"stores it in full precision ({weight.dtype} {list(weight.shape)})"
            )
            raise CheckpointFormatError(
                f"{name}.weight: the checkpoint {how}, but config.json's field 'modules_to_not_convert' does not list "
                f"'{name}', so it is expected quantized; the checkpoint's config.json and tensors disagree."
            )
        check_layer_stored(name, module.format, stored)
    # Full-precision tensors: transformers would re-initialise a mis-shaped one at random (or stop with a report
    # that names nothing); the shapes come from the model's own config.json fields.
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, entry in index.items():
        module_name, _ = _split(key)
        shape = expected_shapes.get(key)
        if shape is not None and not is_quantized_layer(modules.get(module_name)) and shape != entry.shape:
            raise CheckpointFormatError(
                f"{key} is stored as {list(entry.shape)}, but the model that config.json describes expects "
                f"{list(shape)} (its size fields, e.g. hidden_size or vocab_size, were edited, or the weights belong to "
                "another model); the checkpoint's config.json and tensors disagree."
            )
    for module_name, stored in by_module.items():
        owner = modules.get(module_name)
        quantized = sorted(QUANTIZED_ONLY & set(stored))
        if quantized and not is_quantized_layer(owner):
            what = "is not a module of this model" if owner is None else "is kept in full precision by config.json"
            raise CheckpointFormatError(
                f"{module_name}.{quantized[0]} is in the checkpoint (a quantized layer), but '{module_name}' {what} "
                "(field 'modules_to_not_convert'); the checkpoint's config.json and tensors disagree."
            )


def _unexpected_keys(model: nn.Module, index: Mapping[str, StoredTensor]) -> list[str]:
    """Stored tensors that no parameter or buffer of the model takes (transformers would drop them silently)."""
    expected = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    ignore = re.compile("|".join(f"(?:{p})" for p in patterns))
    unexpected = []
    for key in index:
        candidates = {key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")} if prefix else {key}
        if not candidates & expected and not ignore.search(key):
            unexpected.append(key)
    return sorted(unexpected)


def _missing_keys(model: nn.Module) -> list[str]:
    """Parameters and persistent buffers not loaded from the checkpoint (transformers' loaded flag absent)."""
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    patterns = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    ignore = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    missing = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in tied or (ignore is not None and ignore.search(key)):
            continue  # tied to its source (checked itself), or declared optional by the model class
        if tensor.is_meta or not getattr(tensor, "_is_hf_initialized", False):
            missing.append(key)
    return missing


def _verify_tied_weights(model: nn.Module, index: Mapping[str, StoredTensor]) -> None:
    """A weight the model's config ties to another must not be stored with other values: it would be ignored.

    (save_pretrained does not store a tied weight; one that is stored means the config's tying was edited.)
    """
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        entry = index.get(target)
        if entry is None or not source:
            continue
        try:
            current = model.get_parameter(source)
            if model.get_parameter(target) is not current:
                continue  # transformers kept the stored tensor (it does not tie when both are stored)
        except AttributeError:
            continue
        from safetensors import safe_open

        with safe_open(entry.file, framework="pt") as handle:
            stored = handle.get_tensor(target)
        if stored.shape != current.shape or not torch.equal(stored.to(current.dtype), current.detach().cpu()):
            raise CheckpointFormatError(
                f"{target} is stored in the checkpoint with its own values, but the model's config ties it to {source} "
                "(tie_word_embeddings or the like), so the stored tensor would be ignored; the checkpoint's config.json "
                "and tensors disagree."
            )


def verify_quantized_model(
    model: nn.Module,
    config: SuperWeightConfig,
    *,
    loaded_by_transformers: bool = False,
    pre_quantized: bool = False,
    index: Mapping[str, StoredTensor] | None = None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Check a loaded compressed model against its config; raise ``ValueError`` naming module, tensor and field.

    With ``loaded_by_transformers`` every quantized tensor must carry transformers' loaded flag; with
    ``pre_quantized`` (a compressed checkpoint) every parameter and buffer must, and the digests of config.json
    must match; ``index`` (the checkpoint's header index) adds the unexpected-tensor check when the checkpoint's
    names are the model's own (no weight conversion was applied while loading); ``metadata`` (each file's safetensors
    header metadata) tells whether the checkpoint was written with digests.
    """
    missing = _missing_keys(model) if pre_quantized else []
    if not pre_quantized and loaded_by_transformers:
        missing = [
            f"{name}.{t}" for name, module in model.named_modules() if is_quantized_layer(module)
            for t, tensor in module.named_parameters(recurse=False) if not getattr(tensor, "_is_hf_initialized", False)
        ]
    if missing:
        raise CheckpointFormatError(
            f"{missing[0]} is missing from the checkpoint ({len(missing)} tensor(s) missing: {missing[:5]}): transformers "
            "would initialise it at random. A compressed checkpoint loads completely or not at all: re-save it with "
            "save_pretrained, or re-quantize the full-precision model."
        )
    if pre_quantized and index is not None:
        _verify_tied_weights(model, index)
    if pre_quantized and index is not None and not getattr(model, "_weight_conversions", None):
        unexpected = _unexpected_keys(model, index)
        if unexpected:
            raise CheckpointFormatError(
                f"{unexpected[0]} is in the checkpoint but is no parameter of this model ({len(unexpected)} unexpected "
                f"tensor(s): {unexpected[:5]}); no field of config.json explains it: the checkpoint was altered."
            )
    expected = config.super_weights_by_module()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if is_quantized_layer(module):
            _verify_layer(name, module, expected.get(name, []))
    for name, records in expected.items():
        module = modules.get(name)
        if module is None:
            raise CheckpointFormatError(
                f"config.json's field 'super_weights' names module '{name}', which this model does not have."
            )
        if not is_quantized_layer(module):
            _verify_dense_super_weights(name, module, records)
    verify_embeddings(model, config)
    if pre_quantized:
        _verify_digests(model, config, index, metadata)


def _verify_layer(name: str, module: SuperWeightLinear, records: list) -> None:
    for tensor_name, tensor in module.stored_tensors().items():
        if tensor.is_meta:
            raise CheckpointFormatError(
                f"{name}.{tensor_name} was not loaded (it is still on the meta device): the checkpoint lacks it, or the "
                "module was offloaded. Load the checkpoint without disk/CPU offload."
            )
    fmt = module.format
    check_layer_values(name, fmt, module.stored_tensors(), held_out_codes=False)
    if module.num_super_weights != len(records):
        raise CheckpointFormatError(
            f"{name}: the module holds {module.num_super_weights} super weights (super_weight_indices), but "
            f"config.json's field 'super_weights' lists {len(records)} for it; the checkpoint is corrupt."
        )
    for i, sw in enumerate(records):
        row, col = (int(v) for v in module.super_weight_indices[i].tolist())
        if (row, col) != (sw.row, sw.col):
            raise CheckpointFormatError(
                f"{name}.super_weight_indices: super weight #{i} is stored at ({row}, {col}) but config.json's field "
                f"'super_weights' says ({sw.row}, {sw.col}); the checkpoint is corrupt or was edited by hand."
            )
        stored = float(module.super_weight_values[i].item())
        if sw.value is None:
            raise CheckpointFormatError(
                f"{name}: config.json's field 'super_weights' lists ({row}, {col}) without its exact 'value' (the "
                f"checkpoint's super_weight_values holds {stored!r}); the checkpoint's config.json was edited."
            )
        recorded = float(torch.tensor(sw.value, dtype=torch.float32))
        if stored != recorded:
            raise CheckpointFormatError(
                f"{name}.super_weight_values: super weight ({row}, {col}) holds {stored!r} in the checkpoint but "
                f"config.json's field 'super_weights' records {sw.value!r}; the checkpoint is corrupt."
            )
    check_held_out_codes(name, fmt, module.stored_tensors())


def _verify_dense_super_weights(name: str, module: nn.Module, records: list) -> None:
    """A super weight of a module kept in full precision lives in its dense weight: it must hold the recorded value."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CheckpointFormatError(
            f"config.json's field 'super_weights' names module '{name}', which is not a linear layer."
        )
    dense = weight if isinstance(module, nn.Linear) else weight.t()  # Conv1D stores [in, out]
    for sw in records:
        if not (0 <= sw.row < dense.shape[0] and 0 <= sw.col < dense.shape[1]):
            raise CheckpointFormatError(
                f"config.json's field 'super_weights' lists {name}.weight[{sw.row}, {sw.col}], outside its "
                f"{dense.shape[0]}x{dense.shape[1]} matrix."
            )
        found = dense[sw.row, sw.col]
        if sw.value is not None and not bool(torch.tensor(sw.value, dtype=torch.float32).to(found.dtype) == found):
            raise CheckpointFormatError(
                f"{name}.weight[{sw.row}, {sw.col}] holds {found.item()!r}, but config.json's field 'super_weights' "
                f"records {sw.value!r}; the checkpoint is corrupt."
            )


# -- digests -------------------------------------------------------------------------------------------------
def _layer_tensors_as_stored(name: str, module: SuperWeightLinear, index: Mapping[str, StoredTensor] | None):
    tensors = module.stored_tensors()
    for leaf in (BIAS, HELD_OUT_VALUES):  # the tensors stored in the model's dtype
        tensor = tensors.get(leaf)
        entry = None if index is None else index.get(f"{name}.{leaf}")
        if tensor is not None and entry is not None and safetensors_dtype_name(tensor.dtype) != entry.dtype:
            # Loaded in another dtype than written (dtype=...): digest the tensor as stored.
            from safetensors import safe_open

            with safe_open(entry.file, framework="pt") as handle:
                tensors[leaf] = handle.get_tensor(f"{name}.{leaf}")
    return tensors


def layer_digests(model: nn.Module) -> dict[str, str]:
    """The content digest of every quantized module of ``model`` (what save_pretrained records in config.json)."""
    layers = [(n, m) for n, m in model.named_modules() if is_quantized_layer(m) and not is_tied_head(m)]
    return dict(_parallel_digests([(n, m.stored_tensors()) for n, m in layers]))


def _parallel_digests(
    items: list[tuple[str, Mapping[str, torch.Tensor]]], algorithms: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    # hashlib and zlib release the GIL on large buffers: layers hash in parallel.
    from concurrent.futures import ThreadPoolExecutor

    def digest(item):
        name, tensors = item
        return layer_digest(tensors, (algorithms or {}).get(name, DIGEST_ALGORITHM))

    workers = max(1, min(4, torch.get_num_threads()))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(zip([n for n, _ in items], pool.map(digest, items)))


def _verify_digests(
    model: nn.Module,
    config: SuperWeightConfig,
    index: Mapping[str, StoredTensor] | None,
    metadata: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    digests = config.digests
    if digests is None:
        declared = sorted(f for f, meta in (metadata or {}).items() if DIGESTS_METADATA_KEY in meta)
        if declared:
            raise CheckpointFormatError(
                f"The checkpoint's weight file {declared[0]} was written with per-module digests, but config.json's "
                "field 'digests' is missing; the checkpoint's config.json was edited."
            )
        return  # written before digests existed: every other check applied
    # A tied packed head is its embeddings' tensors: digested once, under the embeddings.
    layers = {n: m for n, m in model.named_modules() if is_quantized_layer(m) and not is_tied_head(m)}
    extra = sorted(set(digests) - set(layers))
    if extra:
        raise CheckpointFormatError(
            f"config.json's field 'digests' names module '{extra[0]}', which is not a quantized module of this model; "
            "the checkpoint's config.json and tensors disagree."
        )
    for name in layers:
        if name not in digests:
            raise CheckpointFormatError(
                f"config.json's field 'digests' has no digest for the quantized module '{name}'; the checkpoint's "
                "config.json was edited."
            )
    # Each digest is checked with the algorithm it names (the writer's choice may change between versions).
    items = [(name, _layer_tensors_as_stored(name, module, index)) for name, module in layers.items()]
    algorithms = {name: digests[name].partition(":")[0] for name, _ in items}
    for (name, found), (_, tensors) in zip(_parallel_digests(items, algorithms), items):
        if found != digests[name]:
            changed = digest_mismatch(tensors, digests[name]) or sorted(tensors)
            raise CheckpointFormatError(
                f"{name}.{changed[0]} does not match the content digest that config.json's field 'digests' records for "
                f"'{name}' (changed: {', '.join(changed)}): the tensors are valid but not the ones written (swapped "
                "between layers, rescaled or edited). Re-download the checkpoint or re-quantize."
            )
