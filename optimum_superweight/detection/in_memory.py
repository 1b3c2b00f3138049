"""In-memory detection: search, confirm, classify and trace (the stages of :mod:`optimum_superweight.detection`) on
a loaded model, whose weights are always restored bit-exactly.

Example:
    >>> from optimum_superweight.testing import build_tiny_model
    >>> report = detect_super_weights(build_tiny_model("llama", super_weights=[(1, 5, 7)]))
    >>> [(sw.module, sw.row, sw.col, sw.classification) for sw in report.super_weights]
    [('model.layers.1.mlp.down_proj', 5, 7, 'super')]
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..architectures import ProjectionSite, projection_sites
from ..progress import forward_progress
from .classify import classify_records, confirmation_summary
from .confirm import confirm_candidates, layers_are_contiguous
from .inputs import DEFAULT_CONFIRM_TOKENS, DetectionSettings
from .report import DetectionReport
from .run import DetectionRun, search_pass
from .search import Candidate, select_sites
from .trace import trace_super_activations

__all__ = ["detect_super_weights"]


def detect_super_weights(
    model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    prompts: Sequence[str | Sequence[int]] | None = None,
    threshold: float = 50.0,
    min_ratio: float = 100.0,
    layers: Iterable[int] | None = None,
    max_super_weights: int = 16,
    max_iterations: int = 8,
    confirm: bool = True,
    confirm_tokens: int = DEFAULT_CONFIRM_TOKENS,
    projection: str | None = None,
    progress: bool = False,
) -> DetectionReport:
    """Find the super weights of ``model``, confirm them by ablation, and report their super activations.

    Search (the paper's loop): run the prompts once, with hooks on every decoder layer's MLP output
    projection. In each layer, the largest ``|output|`` gives the row; the input channel contributing
    most to it (``|x[col] * W[row, col]|``) gives the column. The layer holds a candidate when that
    output, that input channel and that contribution all reach ``threshold`` and ``min_ratio`` times the
    layer's median ``|activation|``. The candidate is then zeroed in that layer (its contribution is
    removed from the layer's output, exactly what the layer computes without it on the same input) and
    the layer is searched again -- another weight in the same row or column shows up once the first is
    gone -- until the spike is gone (no test passes, or the largest output left is below
    :data:`FOLLOW_UP_FRACTION` of the layer's first spike) or ``max_iterations`` rounds. At most
    ``max_super_weights`` candidates are kept, largest spikes first.

    Confirmation (``confirm=True``): each candidate alone is zeroed and the model scores
    ``confirm_tokens`` tokens of built-in text (``pydoc_data.topics``); the perplexity ratio (``impact``)
    and the KL divergence of next-token distributions from the original (``extra["kl"]``) classify it
    ``super`` (KL >= :data:`SUPER_KL` or ppl x >= :data:`SUPER_PPL_RATIO`), ``weak`` (KL >=
    :data:`WEAK_KL` or ppl changed >= :data:`WEAK_PPL_RATIO` x) or ``no_effect``. Candidates sharing a
    layer and row are also zeroed together; when the group reaches a class none of them reaches alone
    (two halves of one activation), each member gets the group's class (``extra["group_kl"]``). Each
    ablation re-runs only the layers from the candidate's on (earlier hidden states are cached).

    The model's weights are always restored bit-exactly, whatever happens.

    Args:
        model: A causal LM (``*ForCausalLM``) whose projection weights are materialised (not meta).
        tokenizer: Its tokenizer; without one, fixed token ids stand in for the prompts (with a log line) and
            text bytes for the confirmation text, so detection works on any model. The rule is shared by every
            detection path: see :mod:`optimum_superweight.prompts`.
        prompts: Detection prompts (strings, or lists of token ids); default :data:`DEFAULT_PROMPTS`.
        threshold: Minimum absolute activation of a spike (the authors used 50).
        min_ratio: Minimum ratio of a spike to the median absolute activation of its layer.
        layers: Decoder-layer indices to search (default: all).
        max_super_weights: Most candidates collected (and confirmed).
        max_iterations: Most zero-and-look-again rounds per layer.
        confirm: Confirm candidates by ablation (otherwise every candidate is reported unclassified).
        confirm_tokens: Length of the confirmation text in tokens.
        projection: The MLP output projection relative to a decoder layer (``"mlp.down_proj"``); needed
            for architectures missing from :mod:`optimum_superweight.architectures`.
        progress: Print progress to stderr.

    Returns:
        A :class:`DetectionReport`; ``report.super_weights`` are the confirmed ones.

    Example:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from optimum_superweight import default_model_path, detect_super_weights
        >>> path = default_model_path()  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
        >>> report = detect_super_weights(model, AutoTokenizer.from_pretrained(path))  # doctest: +SKIP
        >>> report.super_weights[0].paper_notation()  # doctest: +SKIP
        'layers[11].mlp.down_proj.weight[507, 1229]'
    """
    started = time.perf_counter()
    settings = DetectionSettings(
        prompts=prompts, threshold=threshold, min_ratio=min_ratio, layers=layers, max_super_weights=max_super_weights,
        max_iterations=max_iterations, confirm=confirm, confirm_tokens=confirm_tokens, projection=projection,
    ).checked()
    sites = projection_sites(model, projection)
    projection_name = projection or sites[0].name[len(sites[0].layer_name) + 1 :]
    search_sites = _materialised(sites, select_sites(sites, settings.layers))
    run = DetectionRun.start(model, tokenizer, prompts, sites, progress, started)
    report = DetectionReport(
        model_type=getattr(getattr(model, "config", None), "model_type", None),
        projection=projection_name,
        prompts=run.texts,
        threshold=settings.threshold,
        min_ratio=settings.min_ratio,
        iterations=0,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forward_progress(run.decoder_layers, desc="super-weight detection", unit="layer"):
            _run_stages(run, report, search_sites, settings, known_layout=projection is None)
    finally:
        # Whatever happened, every zeroed weight gets its exact original value back.
        run.restore(list(run.zeroed))
        model.train(was_training)
    report.timings["total"] = time.perf_counter() - started
    run.say(f"done: {len(report.super_weights)} super weight(s) among {len(report.candidates)} candidate(s)")
    return report


def _run_stages(
    run: DetectionRun, report: DetectionReport, search_sites: list[ProjectionSite], settings: DetectionSettings,
    known_layout: bool,
) -> None:
    """Search, confirm, classify, trace: fills ``report`` (the caller restores the weights whatever happens)."""
    found: list[Candidate] = []
    if settings.max_super_weights > 0:
        report.iterations, report.layer_spikes, found = search_pass(run, search_sites, settings)
    run.restore(list(run.zeroed))
    report.timings["search"] = time.perf_counter() - run.started

    confirmation = None
    if settings.confirm and found:
        t0 = time.perf_counter()
        # Skip only where the layout is known: an unlisted architecture may pass state between
        # layers outside their outputs (shared KV, per-layer inputs), where skipping is unsafe.
        skippable = known_layout and layers_are_contiguous(run.model, run.sites)
        confirmation = confirm_candidates(run, found, settings.confirm_tokens, skippable)
        report.confirmation = confirmation_summary(confirmation)
        report.timings["confirmation"] = time.perf_counter() - t0

    report.candidates = classify_records(found, confirmation)

    t0 = time.perf_counter()
    report.super_activations = trace_super_activations(run, report.super_weights, found)
    report.timings["activations"] = time.perf_counter() - t0


def _materialised(sites: list[ProjectionSite], search_sites: list[ProjectionSite]) -> list[ProjectionSite]:
    """``search_sites``, once every site's weight is checked to be materialised (not on the meta device)."""
    for site in sites:
        if site.module.weight.device.type == "meta":
            raise ValueError(
                f"{site.name}.weight is on the meta device: detection needs materialised weights "
                "(load the model without disk offload)."
            )
    return search_sites
