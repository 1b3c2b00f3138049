"""One in-memory detection run: the model, its prompts as a padded batch, the weights zeroed so far
(restored bit-exactly), and the search pass over it. The confirmation (:mod:`.confirm`) and trace
(:mod:`.trace`) stages work on the same run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..architectures import ProjectionSite, weight_index
from .inputs import DetectionSettings, encode_prompts, layer_output, model_device, pad_batch, vocab_size
from .report import LayerSpikes
from .search import Candidate, SpikeSearch, collect_candidates

__all__ = ["DetectionRun", "search_pass"]


@dataclass
class DetectionRun:
    """The model, its prompts as a padded batch, and the weights zeroed so far (restored bit-exactly)."""

    model: torch.nn.Module
    tokenizer: Any
    sites: list[ProjectionSite]
    decoder_layers: list[torch.nn.Module]
    texts: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    progress: bool
    started: float
    zeroed: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)  # (layer, row, col) -> original
    residual_trace: dict[int, torch.Tensor] = field(default_factory=dict)  # |residual| after each layer, search pass

    def __post_init__(self) -> None:
        self.by_layer = {site.layer: site for site in self.sites}

    @classmethod
    def start(
        cls, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]] | None,
        sites: list[ProjectionSite], progress: bool, started: float,
    ) -> "DetectionRun":
        """Encode and pad the prompts (pad id: the tokenizer's, else the config's, else 0)."""
        texts, encoded = encode_prompts(model, tokenizer, prompts)
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        if not isinstance(pad_id, int) or not 0 <= pad_id < vocab_size(model):
            pad_id = 0
        input_ids, attention_mask = pad_batch(encoded, pad_id, model_device(model))
        decoder_layers = [model.get_submodule(site.layer_name) for site in sites]
        return cls(model, tokenizer, sites, decoder_layers, texts, input_ids, attention_mask, progress, started)

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    def say(self, message: str) -> None:
        if self.progress:
            print(f"[detect {time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def _site(self, layer: int) -> ProjectionSite:
        return self.by_layer[layer]

    def zero(self, layer: int, row: int, col: int) -> None:
        site = self._site(layer)
        index = weight_index(site, row, col)
        self.zeroed.setdefault((layer, row, col), site.module.weight.data[index].clone())
        site.module.weight.data[index] = 0

    def restore(self, keys: Iterable[tuple[int, int, int]]) -> None:
        for key in list(keys):
            layer, row, col = key
            site = self._site(layer)
            site.module.weight.data[weight_index(site, row, col)] = self.zeroed.pop(key)

    def residual_hooks(self, into: dict[int, torch.Tensor]) -> list[Any]:
        """Hooks keeping ``|residual|`` after every decoder layer in ``into`` (by layer index)."""
        return [
            layer_module.register_forward_hook(
                lambda _m, _a, out, i=site.layer: into.__setitem__(i, layer_output(out).detach().float().abs()) and None
            )
            for site, layer_module in zip(self.sites, self.decoder_layers)
        ]


def search_pass(
    run: DetectionRun, search_sites: list[ProjectionSite], settings: DetectionSettings
) -> tuple[int, list[LayerSpikes], list[Candidate]]:
    """Search stage: one pass over the prompts; each layer's zero-and-look-again loop runs in its hook.

    Also keeps the residual stream after every layer (``run.residual_trace``) for the super-activation trace.
    """
    # (Re-running the whole model with every candidate zeroed would surface spikes of a broken
    # model, e.g. SmolLM2 layer 27 [199, 903] once layer 11's super weight is gone, all harmless,
    # and would hide weights whose spike needs an upstream super activation.)
    spy = SpikeSearch(search_sites, run.valid, settings.threshold, settings.min_ratio, settings.max_iterations)
    trace_handles = run.residual_hooks(run.residual_trace)
    try:
        run.model(input_ids=run.input_ids, attention_mask=run.attention_mask, use_cache=False)
    finally:
        spy.remove()
        for handle in trace_handles:
            handle.remove()
    iterations, layer_spikes, found = collect_candidates(spy, search_sites, run.valid, settings.max_super_weights)
    run.say("search: " + (", ".join(f"L{c.site.layer} [{c.row}, {c.col}]" for c in found) or "no spike"))
    return iterations, layer_spikes, found
