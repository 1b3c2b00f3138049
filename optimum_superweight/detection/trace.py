"""Trace stage: the super activation each super-weight row creates, after every decoder layer, with and
without its super weights (the residual stream of the search pass, and one re-run per row).
"""

from __future__ import annotations

import torch

from ..records import SuperWeight
from .report import SuperActivation
from .run import DetectionRun
from .search import Candidate

__all__ = ["trace_super_activations"]


def trace_super_activations(
    run: DetectionRun, chosen: list[SuperWeight], found: list[Candidate]
) -> list[SuperActivation]:
    """Super-activation stage: one per row of the super weights (all candidates when unconfirmed)."""
    origin = {c.key: c for c in found}
    rows: dict[int, list[SuperWeight]] = {}
    for record in chosen:
        rows.setdefault(record.row, []).append(record)
    activations = []
    for row, records_of_row in rows.items():
        first = min(records_of_row, key=lambda r: r.layer)
        activations.append(trace_row(run, row, records_of_row, first, origin[(first.layer, first.row, first.col)]))
    return activations


def trace_row(
    run: DetectionRun, row: int, records_of_row: list[SuperWeight], first: SuperWeight, c: Candidate
) -> SuperActivation:
    """``|residual[row]|`` after each layer at the candidate's token, from the search pass and re-run on
    its prompt alone with the row's super weights zeroed."""
    prompt_index, token_index = c.prompt_index, c.token_index
    trace_layers = [site.layer for site in run.sites]
    with_weight = [float(run.residual_trace[l][prompt_index, token_index, row]) for l in trace_layers]
    without_trace: dict[int, torch.Tensor] = {}
    handles = run.residual_hooks(without_trace)
    keys = [(r.layer, r.row, r.col) for r in records_of_row]
    try:
        for key in keys:
            run.zero(*key)
        n = int(run.valid[prompt_index].sum())
        run.model(input_ids=run.input_ids[prompt_index : prompt_index + 1, :n], use_cache=False)
    finally:
        run.restore(keys)
        for handle in handles:
            handle.remove()
    without = [float(without_trace[l][0, token_index, row]) for l in trace_layers]
    token_text = None
    if run.tokenizer is not None and hasattr(run.tokenizer, "convert_ids_to_tokens"):
        token_text = run.tokenizer.convert_ids_to_tokens(int(run.input_ids[prompt_index, token_index]))
    return SuperActivation(
        channel=row,
        layer=first.layer,
        prompt_index=prompt_index,
        token_index=token_index,
        token=token_text,
        layers=trace_layers,
        magnitudes=with_weight,
        magnitudes_without=without,
        super_weights=[r.paper_notation() for r in records_of_row],
    )
