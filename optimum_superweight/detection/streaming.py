"""Stream super-weight detection layer by layer straight from a model's safetensors shards.

A 70B model in float32 does not fit most machines, yet detection only needs one decoder layer at a
time: the model is built on the ``meta`` device (no memory), the prompt's embedding rows are read from
the shards, and then each decoder layer is loaded (``safetensors.safe_open``, only that layer's
tensors), run on the carried hidden states, searched with the same per-layer spike statistics and
zero-and-look-again loop as :func:`optimum_superweight.detection.detect_super_weights` (:mod:`.search`), and released.
Peak memory is one decoder layer in float32 plus the activations of the prompts, flat in the number
of layers.

Trade-off: streaming detection reports the raw spikes (the paper's unconfirmed rule, as
``detect_super_weights(..., confirm=False)``): confirming each candidate by ablation needs a full
forward pass with the language-model head per candidate, i.e. another streaming pass each. Candidates
come back with ``classification=None``; the quantizer keeps them all exact (a few scalars cost nothing).

Example:
    >>> report = detect_super_weights_streaming("./Llama-2-7b-hf")  # doctest: +SKIP
    >>> [sw.paper_notation() for sw in report.super_weights]  # doctest: +SKIP
    ['layers[1].mlp.down_proj.weight[2533, 7890]']
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..architectures import ProjectionSite, projection_sites
from ..progress import forward_progress
from ..prompts import load_tokenizer
from ..records import SuperWeight
from .inputs import DetectionSettings, encode_prompts, pad_batch
from .report import DetectionReport
from .search import Candidate, SpikeSearch, candidate_record, collect_candidates, select_sites

__all__ = ["detect_super_weights_streaming", "checkpoint_files", "ShardReader", "meta_model"]


def checkpoint_files(folder: str | os.PathLike[str]) -> list[str]:
    """The safetensors files of a local model folder (sharded via its index, or a single file).

    >>> checkpoint_files("./SmolLM2-135M-Instruct")  # doctest: +SKIP
    ['./SmolLM2-135M-Instruct/model.safetensors']
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist or is not a directory.")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({str(root / name) for name in weight_map.values()})
    single = root / "model.safetensors"
    if single.is_file():
        return [str(single)]
    found = sorted(str(p) for p in root.glob("*.safetensors"))
    if not found:
        raise ValueError(
            f"{str(folder)!r} holds no safetensors checkpoint (model.safetensors or an index); streaming needs one."
        )
    return found


class ShardReader:
    """Reads single tensors (or rows of them) from safetensors shards without loading whole files.

    Checkpoint names may lack the base-model prefix (``model.``) of the causal-LM names, or carry one the
    model lacks; both are resolved.
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], base_model_prefix: str = "model") -> None:
        from safetensors import safe_open

        if not files:
            raise ValueError("files=[] is invalid: expected at least one .safetensors file.")
        self._safe_open = safe_open
        self.location: dict[str, str] = {}
        for file in files:
            file = str(file)
            if not file.endswith(".safetensors"):
                raise ValueError(f"checkpoint file {file!r} is not a .safetensors file; streaming reads safetensors only.")
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    self.location[key] = file
        self.prefix = base_model_prefix + "." if base_model_prefix else ""

    def key(self, name: str) -> str:
        """The checkpoint key holding the model parameter ``name``."""
        if name in self.location:
            return name
        if self.prefix and name.startswith(self.prefix) and name[len(self.prefix) :] in self.location:
            return name[len(self.prefix) :]
        if self.prefix and self.prefix + name in self.location:
            return self.prefix + name
        raise KeyError(
            f"The checkpoint has no tensor for parameter '{name}' (it holds e.g. {list(self.location)[:3]}); "
            "streaming needs checkpoints whose names match the model's (no weight conversion)."
        )

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = self.key(name)
        with self._safe_open(self.location[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)

    def rows(self, name: str, indices: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor[indices]`` reading only those rows (an embedding's prompt tokens)."""
        key = self.key(name)
        with self._safe_open(self.location[key], framework="pt") as handle:
            sliced = handle.get_slice(key)
            tensor = torch.stack([sliced[int(i) : int(i) + 1][0] for i in indices])
        return tensor if dtype is None else tensor.to(dtype)


def meta_model(config: Any) -> torch.nn.Module:
    """A causal LM built from ``config`` with parameters on ``meta`` and (small) buffers real.

    Buffers such as rotary frequencies are computed at construction and not stored in checkpoints, so
    they must be real; parameters cost nothing until loaded.
    """
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        # A skeleton for reading the full-precision checkpoint: no quantizer involved.
        delattr(config, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


class _StopForward(Exception):
    """Raised after the last decoder layer: detection needs neither the final norm nor the LM head."""


def _release(module: torch.nn.Module) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))
    for child in module.children():
        _release(child)


def _materialize(module: torch.nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype) -> None:
    for name, param in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        tensor = reader.get(f"{prefix}.{name}" if prefix else name, dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"Checkpoint tensor for '{prefix}.{name}' has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(param.shape)}: the config does not match the checkpoint."
            )
        setattr(owner, leaf, torch.nn.Parameter(tensor, requires_grad=False))


@torch.no_grad()
def detect_super_weights_streaming(
    source: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
    *,
    config: Any = None,
    files: Sequence[str | os.PathLike[str]] | None = None,
    prompts: Sequence[str | Sequence[int]] | None = None,
    threshold: float = 50.0,
    min_ratio: float = 100.0,
    layers: Iterable[int] | None = None,
    max_super_weights: int = 16,
    max_iterations: int = 8,
    projection: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> DetectionReport:
    """Find super-weight candidates of a checkpoint one decoder layer at a time (see the module doc).

    Args:
        source: A local model folder (``config.json`` + safetensors). Or give ``config`` and ``files``.
        tokenizer: Encodes the prompts; default: the tokenizer saved in ``source`` (the rule of
            :mod:`optimum_superweight.prompts`: without any, fixed token ids stand in, with a log line).
        config: A transformers config, instead of reading ``source/config.json``.
        files: Safetensors files, instead of those of ``source``.
        prompts, threshold, min_ratio, layers, max_super_weights, max_iterations, projection: As in
            :func:`~optimum_superweight.detection.detect_super_weights`.
        dtype: Compute dtype of the layers (the checkpoint's tensors are cast one layer at a time).
        progress: Print one line per layer to stderr.

    Returns:
        A :class:`DetectionReport` with candidates (``classification=None``, source ``"detected"``) and
        per-layer spike statistics; ``confirmation`` is ``None`` (no ablation, see the module doc).

    >>> report = detect_super_weights_streaming("./tiny-llama", layers=[0, 1])  # doctest: +SKIP
    """
    # transformers builds models under a default ``meta`` device (the quantizer calls this from there):
    # the activations computed here must be real.
    with torch.device("cpu"):
        return _detect_streaming(
            source, tokenizer, config=config, files=files, prompts=prompts, threshold=threshold,
            min_ratio=min_ratio, layers=layers, max_super_weights=max_super_weights,
            max_iterations=max_iterations, projection=projection, dtype=dtype, progress=progress,
        )


def _detect_streaming(
    source, tokenizer, *, config, files, prompts, threshold, min_ratio, layers, max_super_weights,
    max_iterations, projection, dtype, progress,
) -> DetectionReport:
    """The body of :func:`detect_super_weights_streaming`: check, build on meta, search layer by layer, report."""
    started = time.perf_counter()
    settings = DetectionSettings(
        prompts=prompts, threshold=threshold, min_ratio=min_ratio, layers=layers, max_super_weights=max_super_weights,
        max_iterations=max_iterations, confirm=False, projection=projection,
    ).checked()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid: expected a floating torch.dtype such as torch.float32.")
    config, files, tokenizer = _resolve_source(source, tokenizer, config, files)

    model = meta_model(config)
    reader = ShardReader(files, getattr(model, "base_model_prefix", "model"))
    sites = projection_sites(model, projection)
    projection_name = projection or sites[0].name.removeprefix(sites[0].layer_name + ".")
    search_sites = select_sites(sites, settings.layers)

    def say(message: str) -> None:
        if progress:
            print(f"[stream {time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    texts, encoded = encode_prompts(model, tokenizer, prompts)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if not isinstance(pad_id, int) or not 0 <= pad_id < model.get_input_embeddings().weight.shape[0]:
        pad_id = 0
    input_ids, attention_mask = pad_batch(encoded, pad_id, torch.device("cpu"))
    valid = attention_mask.bool()
    inputs_embeds = _load_outside_layers(model, reader, input_ids, [site.layer_name for site in sites], dtype)

    report = DetectionReport(
        model_type=getattr(config, "model_type", None),
        projection=projection_name,
        prompts=texts,
        threshold=settings.threshold,
        min_ratio=settings.min_ratio,
        iterations=0,
    )
    if settings.max_super_weights == 0:
        report.timings["total"] = time.perf_counter() - started
        return report

    spy = SpikeSearch(search_sites, valid, settings.threshold, settings.min_ratio, settings.max_iterations)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    last = max(site.layer for site in search_sites)
    streamed = [model.get_submodule(site.layer_name) for site in sites if site.layer <= last]
    try:
        with forward_progress(streamed, desc="super-weight detection (streaming)", unit="layer", total=len(streamed)):
            _stream_layers(model, sites, last, reader, dtype, say, kwargs)
    finally:
        spy.remove()
    report.iterations, report.layer_spikes, found = collect_candidates(spy, search_sites, valid, settings.max_super_weights)
    report.candidates = [_streaming_record(c) for c in found]
    report.timings["search"] = report.timings["total"] = time.perf_counter() - started
    say(f"done: {len(report.candidates)} candidate(s)")
    return report


def _resolve_source(source: Any, tokenizer: Any, config: Any, files: Any) -> tuple[Any, Any, Any]:
    """``(config, files, tokenizer)``: those given, else read from the model folder ``source``."""
    if source is not None and not Path(source).is_dir():
        raise ValueError(f"model folder {str(source)!r} does not exist or is not a directory (streaming reads local shards).")
    if config is None:
        if source is None:
            raise ValueError("Give a model folder (source=...) or both config=... and files=....")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    if files is None:
        if source is None:
            raise ValueError("files=None needs source=<model folder> to find the safetensors shards.")
        files = checkpoint_files(source)
    if tokenizer is None and source is not None:
        # The same rule as in memory (prompts.py): the model's own tokenizer and the default prompts when the
        # folder has one; fixed token ids, with a log line, only when it has none.
        tokenizer = load_tokenizer(source)
    return config, files, tokenizer


def _load_outside_layers(
    model: torch.nn.Module, reader: ShardReader, input_ids: torch.Tensor, layer_names: list[str], dtype: torch.dtype
) -> torch.Tensor | None:
    """Load everything outside the decoder layers and the LM head; returns the prompts' embeddings when
    the token embedding is plain (only the prompts' rows are read), else ``None`` (then it is loaded whole)."""
    # Everything outside the decoder layers and the LM head (final norm, position embeddings, ...) is
    # small and loaded once; the token embedding is read only for the prompts' rows when it is plain.
    embedding = model.get_input_embeddings()
    output_embedding = model.get_output_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    skip_names = {n for n, m in model.named_modules() if m is output_embedding}
    inputs_embeds = None
    if type(embedding) is torch.nn.Embedding:
        unique = sorted(set(input_ids.reshape(-1).tolist()))
        table = reader.rows(f"{embedding_name}.weight", unique, dtype)
        lookup = torch.full((int(embedding.weight.shape[0]),), -1, dtype=torch.long)
        lookup[torch.tensor(unique)] = torch.arange(len(unique))
        inputs_embeds = table[lookup[input_ids]]
        skip_names.add(embedding_name)
    for name, module in model.named_modules():
        if name in skip_names or any(name == ln or name.startswith(ln + ".") for ln in layer_names):
            continue
        if any(name.startswith(s + ".") for s in skip_names if s):
            continue
        for leaf, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                full = f"{name}.{leaf}" if name else leaf
                module.register_parameter(leaf, torch.nn.Parameter(reader.get(full, dtype), requires_grad=False))
    return inputs_embeds


def _stream_layers(
    model: torch.nn.Module, sites: list[ProjectionSite], last_needed: int, reader: ShardReader, dtype: torch.dtype,
    say: Callable[[str], None], kwargs: dict[str, Any],
) -> None:
    """One forward pass that loads each decoder layer just before it runs and releases it after, stopping
    after layer ``last_needed``; every parameter is back on ``meta`` afterwards."""
    handles = []
    for site in sites:
        layer_module = model.get_submodule(site.layer_name)

        def load(_module, _args, _kwargs=None, site=site, layer_module=layer_module):
            _materialize(layer_module, site.layer_name, reader, dtype)

        def release(_module, _args, output, site=site, layer_module=layer_module):
            _release(layer_module)
            say(f"layer {site.layer} done")
            if site.layer >= last_needed:
                raise _StopForward
            return None

        handles.append(layer_module.register_forward_pre_hook(load))
        handles.append(layer_module.register_forward_hook(release))
    try:
        try:
            model(**kwargs)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
        _release(model)


def _streaming_record(c: Candidate) -> SuperWeight:
    """The unclassified :class:`SuperWeight` of a streaming candidate (marked ``extra["streaming"]``)."""
    extra = {**c.search_extra(), "prompt_index": c.prompt_index, "token_index": c.token_index, "streaming": True}
    return candidate_record(c, extra=extra)
