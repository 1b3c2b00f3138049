"""Confirmation stage: zero each candidate (alone, then each group sharing a layer and row) and measure what
it does to the model's own next-token predictions on built-in text.

An ablation re-runs only the layers from the candidate's on (:class:`_LayerSkip`); the weights are restored
bit-exactly after each. The measurements are classified by :mod:`.classify`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..architectures import ProjectionSite
from .inputs import context_length, model_device, vocab_size
from .run import DetectionRun
from .search import Candidate

__all__ = ["Effect", "Confirmation", "confirm_candidates", "confirmation_ids", "layers_are_contiguous"]


def confirmation_ids(model: torch.nn.Module, tokenizer: Any, n_tokens: int) -> tuple[list[int], str]:
    """A few hundred tokens of ``pydoc_data.topics`` (ships with CPython), from the END of the sorted
    topics so they never overlap the package's perplexity protocol (its first 4096 tokens)."""
    from pydoc_data.topics import topics

    pieces: list[str] = []
    for key in sorted(topics, reverse=True):
        pieces.append(topics[key])
        if sum(map(len, pieces)) > 8 * n_tokens:
            break
    text = "\n\n".join(pieces)
    limit = context_length(model)
    n_tokens = n_tokens if limit is None else min(n_tokens, limit)  # one forward pass holds at most that many
    if tokenizer is not None:
        ids = list(tokenizer(text)["input_ids"])[:n_tokens]
    else:
        vocab = vocab_size(model)
        ids = [b % vocab for b in text.encode("utf-8")[:n_tokens]]
    return ids, "pydoc_data.topics"


class _LayerSkip:
    """Run a forward pass from decoder layer ``start`` on: earlier layers return cached outputs.

    A candidate in layer L cannot change anything before L, so its ablation re-runs only the layers
    from L on; skipping is exact because the cached hidden states are what those layers computed."""

    def __init__(self, layers: list[torch.nn.Module], cache: dict[int, Any], start: int):
        self.layers, self.cache, self.start = layers, cache, start
        self.saved: list[tuple[torch.nn.Module, Any]] = []

    def __enter__(self):
        if self.start > 0:
            cached = self.cache[self.start - 1]
            for layer in self.layers[: self.start]:
                # Keep an instance-level forward (accelerate's device hooks put one there) to put back.
                self.saved.append((layer, layer.__dict__.get("forward", _MISSING)))
                # A clone: a later layer may update its input in place.
                layer.forward = lambda *args, _c=cached, **kwargs: _clone_output(_c)
        return self

    def __exit__(self, *exc):
        for layer, forward in self.saved:
            if forward is _MISSING:
                del layer.forward
            else:
                layer.forward = forward
        self.saved.clear()
        return False


_MISSING = object()


def _clone_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_clone_output(o) for o in output)
    return output


def _nll_and_logprobs(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, input_ids[0, 1:, None].to(log_probs.device)).mean()
    return float(nll), log_probs


def _sum_p_log_q(p: torch.Tensor, log_q: torch.Tensor) -> float:
    """``sum(p * log q)`` over ``[positions, vocab]``, the same to the last bit whatever torch's thread count:
    ``torch.dot`` splits a long vector among the threads (the KL recorded in config.json then differed between
    a 1- and a 2-thread process). One intra-op thread, a row at a time in float64, rows summed exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [value for start in range(0, p.shape[0], 32)
                for value in (p[start : start + 32].double() * log_q[start : start + 32].double()).sum(-1).tolist()]
    finally:
        torch.set_num_threads(before)
    return math.fsum(rows)


class Effect(NamedTuple):
    """What zeroing some weights does to the confirmation text: its NLL, KL from the original, perplexity ratio."""

    nll: float
    kl: float
    ppl_ratio: float


@dataclass
class Confirmation:
    """Ablation results: per candidate (by position in ``found``), per multi-weight (layer, row) group."""

    alone: dict[int, Effect]
    groups: dict[tuple[int, int], Effect]
    group_members: dict[tuple[int, int], list[int]]
    text: str  # the confirmation text's name
    tokens: int  # its length in tokens
    base_loss: float  # the original model's mean NLL on it


def confirm_candidates(run: DetectionRun, found: list[Candidate], confirm_tokens: int, skippable: bool) -> Confirmation:
    """Confirmation stage: zero each candidate alone, then each group sharing a layer and row, and measure."""
    ids, text_name = confirmation_ids(run.model, run.tokenizer, confirm_tokens)
    ablator = _Ablator(run, torch.tensor([ids], device=model_device(run.model)), found, skippable)
    alone: dict[int, Effect] = {}
    for i, c in enumerate(found):
        run.say(f"confirming {i + 1}/{len(found)}: L{c.site.layer} [{c.row}, {c.col}]")
        alone[i] = ablator.ablate([c.key])
    # Weights that build one activation together (same layer and row) may each be harmless
    # alone, since the other still drives the row: ablate such a group at once too.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(found):
        groups.setdefault((c.site.layer, c.row), []).append(i)
    group_result: dict[tuple[int, int], Effect] = {}
    group_members: dict[tuple[int, int], list[int]] = {}
    for (layer, row), members in groups.items():
        if len(members) < 2:
            continue
        group_members[(layer, row)] = members
        run.say(f"confirming group L{layer} row {row} ({len(members)} weights)")
        group_result[(layer, row)] = ablator.ablate([found[i].key for i in members])
    return Confirmation(alone, group_result, group_members, text_name, len(ids), ablator.base_nll)


class _Ablator:
    """Scores the confirmation text with some weights zeroed, against the original model's predictions.

    The original pass caches the hidden states after the layer preceding each candidate's layer (keyed by
    position in the decoder-layer list), so that each ablation starts at the candidate's layer."""

    def __init__(self, run: DetectionRun, text_ids: torch.Tensor, found: list[Candidate], skippable: bool):
        self.run, self.text_ids, self.skippable = run, text_ids, skippable
        self.cache: dict[int, Any] = {}
        self.position = {site.layer: i for i, site in enumerate(run.sites)}
        needed = {self.position[c.site.layer] - 1 for c in found if skippable and self.position[c.site.layer] > 0}
        cache_handles = [
            run.decoder_layers[i].register_forward_hook(
                lambda _m, _a, out, i=i: self.cache.__setitem__(i, _clone_output(out)) and None
            )
            for i in sorted(needed)
        ]
        try:
            self.base_nll, base_logp = _nll_and_logprobs(run.model, text_ids)
        finally:
            for handle in cache_handles:
                handle.remove()
        self.base_p = base_logp.exp()
        # KL(p || q) summed over positions = sum p log p - sum p log q: the first term once, the
        # second once per ablation (temporaries of 32 positions, not [tokens, vocab]).
        self.base_plogp = _sum_p_log_q(self.base_p, base_logp)
        self.n_positions = base_logp.shape[0]

    def ablate(self, keys: list[tuple[int, int, int]]) -> Effect:
        """The effect of zeroing the weights ``keys`` (layer, row, col) together; they are restored after."""
        start = min(self.position[k[0]] for k in keys) if self.skippable else 0
        for key in keys:
            self.run.zero(*key)
        try:
            with _LayerSkip(self.run.decoder_layers, self.cache, start):
                nll, logp = _nll_and_logprobs(self.run.model, self.text_ids)
        finally:
            self.run.restore(keys)
        kl = (self.base_plogp - _sum_p_log_q(self.base_p, logp)) / self.n_positions
        return Effect(nll, max(kl, 0.0), math.exp(nll - self.base_nll))


def layers_are_contiguous(model: torch.nn.Module, sites: list[ProjectionSite]) -> bool:
    """Whether the sites' decoder layers are exactly one ``ModuleList``, in order: only then can an
    ablation skip the layers before the candidate's (no other layer runs in between)."""
    parents = {site.layer_name.rsplit(".", 1)[0] if "." in site.layer_name else "" for site in sites}
    if len(parents) != 1:
        return False
    container = model.get_submodule(parents.pop())
    return (
        isinstance(container, torch.nn.ModuleList)
        and len(container) == len(sites)
        and [site.layer for site in sites] == list(range(len(sites)))
    )
