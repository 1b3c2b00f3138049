"""What detection reports: per-layer spike statistics, super activations, and the report of a run.

:class:`DetectionReport` is what :func:`~optimum_superweight.detection.detect_super_weights` and
:func:`~optimum_superweight.detection.detect_super_weights_streaming` return; it prints as a table, saves as
JSON (and reads back with :meth:`DetectionReport.from_dict`), and plots.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..records import SuperWeight

__all__ = ["LayerSpikes", "SuperActivation", "DetectionReport"]


@dataclass(frozen=True)
class LayerSpikes:
    """Spike statistics of one layer's MLP output projection on the detection prompts (first pass).

    ``max_*`` are the largest absolute values over all prompt tokens and channels, ``*_channel`` where
    they occur, ``*_median`` the median absolute value over the whole layer (the reference of the ratio).
    """

    layer: int
    module: str
    max_input: float
    input_channel: int
    input_median: float
    max_output: float
    output_channel: int
    output_median: float

    @property
    def input_ratio(self) -> float:
        return self.max_input / max(self.input_median, 1e-30)

    @property
    def output_ratio(self) -> float:
        return self.max_output / max(self.output_median, 1e-30)


@dataclass(frozen=True)
class SuperActivation:
    """The massive residual-stream activation a super weight creates, and how it persists.

    Attributes:
        channel: Hidden channel (the super weights' row).
        layer: Decoder layer whose MLP creates it.
        prompt_index: Which detection prompt it was measured on.
        token_index: Token position inside that prompt (usually 0: the first token).
        token: That token's text, when a tokenizer was given.
        layers: Decoder-layer indices of ``magnitudes``.
        magnitudes: ``|residual[channel]|`` at that token after each decoder layer.
        magnitudes_without: The same with this channel's super weights zeroed.
        super_weights: Module names with coordinates (paper notation) of the weights zeroed for
            ``magnitudes_without``.
    """

    channel: int
    layer: int
    prompt_index: int
    token_index: int
    token: str | None
    layers: list[int]
    magnitudes: list[float]
    magnitudes_without: list[float]
    super_weights: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DetectionReport:
    """What :func:`detect_super_weights` found.

    Attributes:
        candidates: Every candidate found by the search, with its confirmation (``classification``,
            ``impact`` = perplexity ratio, ``extra["kl"]``), super first then by effect.
        super_activations: One per confirmed super-weight row.
        layer_spikes: Per-layer spike statistics of the first search pass.
        model_type, projection, prompts, threshold, min_ratio: The inputs that produced the report.
        iterations: Most zero-and-look-again rounds any layer took (1: no layer had a second candidate).
        confirmation: Text size, original loss and thresholds of the confirmation, ``None`` when skipped.
        timings: Seconds spent in ``search``, ``confirmation``, ``activations`` and ``total``.
    """

    model_type: str | None
    projection: str
    prompts: list[str]
    threshold: float
    min_ratio: float
    iterations: int
    candidates: list[SuperWeight] = field(default_factory=list)
    super_activations: list[SuperActivation] = field(default_factory=list)
    layer_spikes: list[LayerSpikes] = field(default_factory=list)
    confirmation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def super_weights(self) -> list[SuperWeight]:
        """The confirmed super weights, strongest first.

        Without confirmation (``confirm=False``), every candidate, largest output spike first: the
        paper's unconfirmed rule.
        """
        if self.confirmation is None:
            return list(self.candidates)
        return [c for c in self.candidates if c.classification == "super"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (candidates as ``SuperWeight.to_dict()``)."""
        return {
            "model_type": self.model_type,
            "projection": self.projection,
            "prompts": list(self.prompts),
            "threshold": self.threshold,
            "min_ratio": self.min_ratio,
            "iterations": self.iterations,
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "candidates": [c.to_dict() for c in self.candidates],
            "super_activations": [a.to_dict() for a in self.super_activations],
            "layer_spikes": [
                {**asdict(s), "input_ratio": s.input_ratio, "output_ratio": s.output_ratio} for s in self.layer_spikes
            ],
            "confirmation": self.confirmation,
            "timings": dict(self.timings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectionReport":
        """Rebuild a report from :meth:`to_dict` output (e.g. a saved JSON file), to re-plot or re-print it."""
        if not isinstance(data, dict) or "candidates" not in data or "projection" not in data:
            raise ValueError("DetectionReport.from_dict expects the dict written by DetectionReport.to_dict().")
        spike_fields = {f for f in LayerSpikes.__dataclass_fields__}
        return cls(
            model_type=data.get("model_type"),
            projection=data["projection"],
            prompts=list(data.get("prompts", [])),
            threshold=float(data.get("threshold", 50.0)),
            min_ratio=float(data.get("min_ratio", 100.0)),
            iterations=int(data.get("iterations", 0)),
            candidates=[SuperWeight.from_dict(c) for c in data["candidates"]],
            super_activations=[SuperActivation(**a) for a in data.get("super_activations", [])],
            layer_spikes=[
                LayerSpikes(**{k: v for k, v in s.items() if k in spike_fields}) for s in data.get("layer_spikes", [])
            ],
            confirmation=data.get("confirmation"),
            timings=dict(data.get("timings", {})),
        )

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        """The report as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    def to_text(self) -> str:
        """A readable table of the candidates, the super activations and how they were measured."""
        lines = [
            f"Super-weight detection: model_type={self.model_type}, projection={self.projection}, "
            f"{len(self.layer_spikes)} layers, {len(self.prompts)} prompts, up to {self.iterations} search round(s) per layer "
            f"(spike: |x| >= {self.threshold:g} and >= {self.min_ratio:g}x the layer median)"
        ]
        if not self.candidates:
            lines.append("No candidate: no layer's MLP output projection has a spiking input and output.")
        else:
            header = (
                f"{'#':>2}  {'class':<9} {'module':<34} {'row':>6} {'col':>6} {'value':>9} "
                f"{'|input|':>9} {'|output|':>9} {'ppl x':>7} {'KL':>7}"
            )
            lines += [header, "-" * len(header)]
            for i, c in enumerate(self.candidates, 1):
                kl = c.extra.get("kl")
                lines.append(
                    f"{i:>2}  {c.classification or '-':<9} {c.module:<34} {c.row:>6} {c.col:>6} "
                    f"{_fmt(c.value, '+.4f'):>9} {_fmt(c.input_spike, '.1f'):>9} {_fmt(c.output_spike, '.1f'):>9} "
                    f"{_fmt(c.impact, '.3f'):>7} {_fmt(kl, '.4f'):>7}"
                )
        for act in self.super_activations:
            token = f" {act.token!r}" if act.token is not None else ""
            pairs = [
                (layer, with_w, without)
                for layer, with_w, without in zip(act.layers, act.magnitudes, act.magnitudes_without)
                if layer >= act.layer
            ]
            shown = pairs if len(pairs) <= 8 else pairs[:4] + pairs[-4:]
            trace = ", ".join(f"L{layer} {w:.0f}/{wo:.0f}" for layer, w, wo in shown)
            lines.append(
                f"Super activation: channel {act.channel}, prompt {act.prompt_index} token {act.token_index}{token}, "
                f"from layer {act.layer}; |residual| with/without the super weight: {trace}"
            )
        if self.confirmation is None:
            lines.append("Not confirmed by ablation (confirm=False): candidates are spikes, not proven super weights.")
        else:
            conf = self.confirmation
            lines.append(
                f"Confirmation: each candidate zeroed alone, {conf['tokens']} tokens of {conf['text']} "
                f"(original loss {conf['loss']:.3f}); super: KL >= {conf['super_kl']:g} or ppl x >= "
                f"{conf['super_ppl_ratio']:g}; weak: KL >= {conf['weak_kl']:g} or ppl changed >= "
                f"{conf['weak_ppl_ratio']:g}x; else no_effect."
            )
        if self.timings:
            lines.append("Time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def plot(self, path: str | os.PathLike[str]) -> str:
        """Save a figure: per-layer max |input| / |output| of the projection (super-weight layers marked),
        and each super activation across layers with and without its super weight. Returns ``path``."""
        try:
            import matplotlib
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise RuntimeError("DetectionReport.plot needs matplotlib: pip install 'optimum-superweight[plot]'") from error
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_panels = 2 if self.super_activations else 1
        fig, axes = plt.subplots(n_panels, 1, figsize=(9, 3.6 * n_panels), squeeze=False)
        ax = axes[0][0]
        layers = [s.layer for s in self.layer_spikes]
        ax.plot(layers, [s.max_input for s in self.layer_spikes], "o-", label="max |input| (intermediate)")
        ax.plot(layers, [s.max_output for s in self.layer_spikes], "s-", label="max |output| (hidden)")
        ax.axhline(self.threshold, color="grey", linestyle=":", linewidth=1, label=f"threshold {self.threshold:g}")
        marked: set[int] = set()
        for c in self.candidates:
            if c.layer is None:
                continue
            if c.classification == "super" or (self.confirmation is None and c.layer not in marked):
                if c.layer not in marked:
                    ax.axvline(c.layer, color="red", alpha=0.35, linewidth=6)
                    ax.annotate(
                        f"L{c.layer} [{c.row}, {c.col}]",
                        (c.layer, c.output_spike or self.threshold),
                        textcoords="offset points",
                        xytext=(8, -10),
                        color="red",
                        fontsize=8,
                    )
                    marked.add(c.layer)
        # Every confirmed candidate at its output spike, coloured by class.
        styles = {"super": ("red", "*", 160), "weak": ("tab:purple", "^", 70), "no_effect": ("grey", "v", 50)}
        for name, (color, marker, size) in styles.items():
            points = [(c.layer, c.output_spike) for c in self.candidates if c.classification == name and c.output_spike]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=color, marker=marker, s=size, zorder=5, label=f"candidate: {name}")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("|activation|")
        ax.set_title(f"MLP output projection ({self.projection}) on {len(self.prompts)} prompts")
        ax.legend(fontsize=8)
        if self.super_activations:
            ax = axes[1][0]
            for act in self.super_activations:
                ax.plot(act.layers, act.magnitudes, "o-", label=f"channel {act.channel} (from L{act.layer})")
                ax.plot(act.layers, act.magnitudes_without, "x--", label=f"channel {act.channel}, super weight zeroed")
            ax.set_yscale("log")
            ax.set_xlabel("decoder layer (residual stream after it)")
            ax.set_ylabel("|residual|")
            ax.set_title("Super activation across layers")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return os.fspath(path)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
