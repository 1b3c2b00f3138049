"""Search stage: spike statistics and the zero-and-look-again loop of the paper, as forward hooks.

:class:`SpikeSearch` hooks every MLP output projection searched; each layer's loop runs in its hook on the
recorded activations. It is shared by the in-memory run (:mod:`.run`) and streaming detection (:mod:`.streaming`):
both produce :class:`Candidate` objects, turned into records by :func:`candidate_record`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..architectures import ProjectionSite, weight_index
from ..records import SuperWeight
from .inputs import layer_output
from .report import LayerSpikes

__all__ = [
    "FOLLOW_UP_FRACTION",
    "Candidate",
    "SpikeSearch",
    "select_sites",
    "token_position",
    "candidate_record",
    "collect_candidates",
]

#: The zero-and-look-again loop stops in a layer once its largest remaining output is below this
#: fraction of the layer's first spike: the spike is "gone". Without it, every ordinary weight that
#: meets the massive input channel (SmolLM2 layer 11: 2996 x 0.42 = 1260 in row 247) would count.
FOLLOW_UP_FRACTION = 0.1


@dataclass
class Candidate:
    """One weight ``W[row, col]`` of ``site`` found by the search, with the spikes that found it.

    ``token`` indexes the valid (unpadded) prompt tokens of the search pass; ``prompt_index`` and
    ``token_index`` are the same token as (prompt, position), filled in by :func:`collect_candidates`.
    """

    site: ProjectionSite
    row: int
    col: int
    value: float
    input_spike: float
    output_spike: float
    input_ratio: float
    output_ratio: float
    share: float
    token: int
    iteration: int
    prompt_index: int = 0
    token_index: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """``(layer, row, col)``: how the weight is zeroed and restored."""
        return (self.site.layer, self.row, self.col)

    def search_extra(self) -> dict[str, Any]:
        """The search statistics every record carries in ``SuperWeight.extra``."""
        return {
            "input_ratio": round(self.input_ratio, 1),
            "output_ratio": round(self.output_ratio, 1),
            "iteration": self.iteration,
        }


class SpikeSearch:
    """Forward hooks on the projection sites: spike statistics and candidates of one search pass.

    Within a layer the paper's zero-and-look-again loop runs on the recorded activations: once a
    candidate ``W[row, col]`` is taken, its contribution ``x[:, col] * W[row, col]`` is subtracted from
    that layer's output (exactly what the layer would compute with the weight zeroed, on the same
    input) and the layer is searched again. Doing it per layer keeps every layer's own input intact,
    so a weight whose spike needs an upstream super activation is still found."""

    def __init__(self, sites: list[ProjectionSite], valid: torch.Tensor, threshold: float, min_ratio: float, rounds: int):
        self.valid = valid.reshape(-1).bool()
        self.threshold, self.min_ratio, self.rounds = threshold, min_ratio, rounds
        self.stats: dict[int, dict[str, Any]] = {}
        self.looks: dict[int, int] = {}
        self.found: list[Candidate] = []
        self.handles = [site.module.register_forward_hook(self._hook(site)) for site in sites]

    def _spikes(self, value: float, median: float) -> bool:
        return value >= self.threshold and value >= self.min_ratio * median

    def _hook(self, site: ProjectionSite):
        def hook(_module, args, output):
            x = args[0].detach()
            y = layer_output(output).detach()
            x = x.reshape(-1, x.shape[-1]).float()
            y = y.reshape(-1, y.shape[-1]).float()
            if x.shape[0] == self.valid.numel():  # drop padding tokens
                x, y = x[self.valid], y[self.valid]
            abs_x, abs_y = x.abs(), y.abs()
            in_flat, out_flat = int(torch.argmax(abs_x)), int(torch.argmax(abs_y))
            in_median, out_median = float(abs_x.median()), float(abs_y.median())
            channel_max = abs_x.amax(dim=0)
            self.stats[site.layer] = {
                "max_input": float(abs_x.reshape(-1)[in_flat]),
                "input_channel": in_flat % x.shape[1],
                "input_median": in_median,
                "max_output": float(abs_y.reshape(-1)[out_flat]),
                "output_channel": out_flat % y.shape[1],
                "output_median": out_median,
            }
            weight = site.module.weight.detach()
            y = y.clone()
            taken: set[tuple[int, int]] = set()
            reference = None
            for look in range(1, self.rounds + 1):
                self.looks[site.layer] = look
                abs_y = y.abs()
                flat = int(torch.argmax(abs_y))
                token, row = divmod(flat, y.shape[1])
                output_spike = float(abs_y[token, row])
                reference = output_spike if reference is None else reference
                if not self._spikes(output_spike, out_median) or output_spike < FOLLOW_UP_FRACTION * reference:
                    break
                w_row = (weight[:, row] if site.transposed else weight[row, :]).float().clone()
                for r, c in taken:
                    if r == row:
                        w_row[c] = 0.0  # zeroed in an earlier round
                contributions = (x[token] * w_row).abs().nan_to_num(0.0)
                col = int(torch.argmax(contributions))
                input_spike = float(channel_max[col])
                contribution = float(contributions[col])
                if not (self._spikes(input_spike, in_median) and self._spikes(contribution, out_median)):
                    # The output still spikes, but no single weight drives it from a spiking input: what
                    # is left is a sum of many ordinary terms (SmolLM2's last layer), not a super weight.
                    break
                taken.add((row, col))
                self.found.append(
                    Candidate(
                        site=site,
                        row=row,
                        col=col,
                        value=float(weight[weight_index(site, row, col)]),
                        input_spike=input_spike,
                        output_spike=output_spike,
                        input_ratio=input_spike / max(in_median, 1e-30),
                        output_ratio=output_spike / max(out_median, 1e-30),
                        share=contribution / max(output_spike, 1e-30),
                        token=token,
                        iteration=look,
                    )
                )
                # What the layer outputs with this weight zeroed, on the same input.
                y[:, row] -= x[:, col] * w_row[col]
            return None

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def token_position(valid: torch.Tensor, flat_valid_index: int) -> tuple[int, int]:
    """Map an index among the valid (unpadded) tokens back to (prompt, position)."""
    positions = valid.nonzero()
    prompt, position = positions[flat_valid_index].tolist()
    return int(prompt), int(position)


def candidate_record(candidate: Candidate, **fields: Any) -> SuperWeight:
    """The :class:`SuperWeight` of a search candidate (site, row, col, value, spikes) plus ``fields``."""
    site = candidate.site
    return SuperWeight(
        module=site.name, row=candidate.row, col=candidate.col, value=candidate.value, layer=site.layer,
        input_spike=candidate.input_spike, output_spike=candidate.output_spike, source="detected", **fields,
    )


def collect_candidates(
    search: SpikeSearch, search_sites: list[ProjectionSite], valid: torch.Tensor, max_super_weights: int
) -> tuple[int, list[LayerSpikes], list[Candidate]]:
    """After a search pass: the most rounds any layer took, each searched layer's spike statistics, and
    the candidates, largest output spike first, capped at ``max_super_weights``, with their (prompt,
    position) filled in."""
    iterations = max(search.looks.values(), default=0)
    layer_spikes = [LayerSpikes(layer=site.layer, module=site.name, **search.stats[site.layer]) for site in search_sites]
    found = sorted(search.found, key=lambda c: -c.output_spike)[:max_super_weights]
    for c in found:
        c.prompt_index, c.token_index = token_position(valid, c.token)
    return iterations, layer_spikes, found


def select_sites(sites: list[ProjectionSite], layers: Iterable[int] | None) -> list[ProjectionSite]:
    """The sites of ``layers`` (default all); fails on an empty list or an index that is not a decoder layer."""
    if layers is None:
        return sites
    wanted = list(layers)
    known = {site.layer for site in sites}
    bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or i not in known]
    if bad or not wanted:
        raise ValueError(
            f"layers={wanted!r} is invalid: {bad or 'an empty list is'} not among the model's decoder layers "
            f"0..{max(known)}."
        )
    return [site for site in sites if site.layer in set(wanted)]
