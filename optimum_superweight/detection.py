"""Find a model's super weights, confirm each by ablation, and track the super activation it creates.

The search is the paper's loop (Yu et al. 2024, "The Super Weight in Large Language Models"): hooks
on every decoder layer's MLP output projection record, per layer, the largest ``|output|`` (its
channel is the row) and the input channel that contributes most to it (the column); a layer whose
input and output both spike, in absolute terms and relative to the layer's median, holds a candidate
``W[row, col]``. The candidate is zeroed and the layer looked at again until no spike is left. Spikes alone
are not proof (SmolLM2-135M spikes in channel 507 at layers 2, 9, 11, 28 and 29; only layer 11's
weight matters), so every candidate is then confirmed: it is zeroed alone and the model's own
next-token predictions on a short built-in text are compared with the original ones.

Example:
    >>> from optimum_superweight.testing import build_tiny_model
    >>> report = detect_super_weights(build_tiny_model("llama", super_weights=[(1, 5, 7)]))
    >>> [(sw.module, sw.row, sw.col, sw.classification) for sw in report.super_weights]
    [('model.layers.1.mlp.down_proj', 5, 7, 'super')]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch

from .architectures import ProjectionSite, projection_sites, weight_index
from .prompts import DEFAULT_PROMPTS, detection_inputs
from .records import SuperWeight

__all__ = [
    "detect_super_weights",
    "DetectionReport",
    "LayerSpikes",
    "SuperActivation",
    "DEFAULT_PROMPTS",
    "SUPER_KL",
    "SUPER_PPL_RATIO",
    "WEAK_KL",
    "WEAK_PPL_RATIO",
    "FOLLOW_UP_FRACTION",
]

# Classification thresholds, on the confirmation text (KL in nats per token, original || ablated;
# perplexity ratio = exp(ablated mean NLL - original mean NLL)). Calibrated on SmolLM2-135M-Instruct,
# whose layer-11 super weight gives a perplexity ratio of ~4.8 on pydoc text, while decoys at layers 2
# and 9 change it by <= 18% and those at layers 28-29 by nothing measurable.
#: ``super`` (catastrophic): KL at least this ...
SUPER_KL = 0.5
#: ... or the perplexity at least this many times the original.
SUPER_PPL_RATIO = 2.0
#: ``weak`` (measurable): KL at least this ...
WEAK_KL = 0.01
#: ... or the perplexity changed by at least this factor (either way).
WEAK_PPL_RATIO = 1.02

#: The zero-and-look-again loop stops in a layer once its largest remaining output is below this
#: fraction of the layer's first spike: the spike is "gone". Without it, every ordinary weight that
#: meets the massive input channel (SmolLM2 layer 11: 2996 x 0.42 = 1260 in row 247) would count.
FOLLOW_UP_FRACTION = 0.1

_DEFAULT_CONFIRM_TOKENS = 256
_CLASS_RANK = {"super": 0, "weak": 1, "no_effect": 2, None: 3}


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


# ----------------------------------------------------------------------------------------- inputs


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


def _vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def encode_prompts(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str | Sequence[int]] | None
) -> tuple[list[str], list[list[int]]]:
    """The detection prompts as (texts, token ids): one rule for every detection path."""
    # One rule for every detection path (text, default prompts, fixed ids without a tokenizer): see prompts.py.
    return detection_inputs(tokenizer, prompts, _vocab_size(model))


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


def _confirmation_ids(model: torch.nn.Module, tokenizer: Any, n_tokens: int) -> tuple[list[int], str]:
    """A few hundred tokens of ``pydoc_data.topics`` (ships with CPython), from the END of the sorted
    topics so they never overlap the package's perplexity protocol (its first 4096 tokens)."""
    from pydoc_data.topics import topics

    pieces: list[str] = []
    for key in sorted(topics, reverse=True):
        pieces.append(topics[key])
        if sum(map(len, pieces)) > 8 * n_tokens:
            break
    text = "\n\n".join(pieces)
    if tokenizer is not None:
        ids = list(tokenizer(text)["input_ids"])[:n_tokens]
    else:
        vocab = _vocab_size(model)
        ids = [b % vocab for b in text.encode("utf-8")[:n_tokens]]
    return ids, "pydoc_data.topics"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: its input embedding's device (else its first parameter's, else the CPU)."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def layer_output(output: Any) -> torch.Tensor:
    """The hidden states of a module's output (the first element of a tuple output)."""
    return output[0] if isinstance(output, (tuple, list)) else output


# ----------------------------------------------------------------------------------------- search


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


# ----------------------------------------------------------------------------------------- confirmation


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


def _classify(kl: float, ppl_ratio: float) -> str:
    if kl >= SUPER_KL or ppl_ratio >= SUPER_PPL_RATIO:
        return "super"
    if kl >= WEAK_KL or ppl_ratio >= WEAK_PPL_RATIO or ppl_ratio <= 1.0 / WEAK_PPL_RATIO:
        return "weak"
    return "no_effect"


# ----------------------------------------------------------------------------------------- entry point


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
    confirm_tokens: int = _DEFAULT_CONFIRM_TOKENS,
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
    settings = _Settings.check(threshold, min_ratio, max_super_weights, max_iterations, confirm, confirm_tokens)
    sites = projection_sites(model, projection)
    projection_name = projection or sites[0].name[len(sites[0].layer_name) + 1 :]
    search_sites = _search_sites(sites, layers)
    run = _DetectionRun.start(model, tokenizer, prompts, sites, progress, started)
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
        with torch.no_grad():
            _run_stages(run, report, search_sites, settings, known_layout=projection is None)
    finally:
        # Whatever happened, every zeroed weight gets its exact original value back.
        run.restore(list(run.zeroed))
        model.train(was_training)
    report.timings["total"] = time.perf_counter() - started
    run.say(f"done: {len(report.super_weights)} super weight(s) among {len(report.candidates)} candidate(s)")
    return report


@dataclass(frozen=True)
class _Settings:
    """The checked numeric arguments of :func:`detect_super_weights`."""

    threshold: float
    min_ratio: float
    max_super_weights: int
    max_iterations: int
    confirm: bool
    confirm_tokens: int

    @classmethod
    def check(
        cls, threshold: Any, min_ratio: Any, max_super_weights: Any, max_iterations: Any, confirm: Any,
        confirm_tokens: Any,
    ) -> "_Settings":
        """Fail on the first invalid argument, naming it, its value and what is accepted."""
        threshold = check_number("threshold", threshold, 0.0)
        min_ratio = check_number("min_ratio", min_ratio, 1.0)
        max_super_weights = check_count("max_super_weights", max_super_weights, 0)
        max_iterations = check_count("max_iterations", max_iterations, 1)
        confirm_tokens = check_count("confirm_tokens", confirm_tokens, 8)
        if not isinstance(confirm, bool):
            raise ValueError(f"confirm={confirm!r} is invalid: expected True or False.")
        return cls(threshold, min_ratio, max_super_weights, max_iterations, confirm, confirm_tokens)


def _run_stages(
    run: _DetectionRun, report: DetectionReport, search_sites: list[ProjectionSite], settings: _Settings,
    known_layout: bool,
) -> None:
    """Search, confirm, classify, trace: fills ``report`` (the caller restores the weights whatever happens)."""
    found: list[Candidate] = []
    if settings.max_super_weights > 0:
        report.iterations, report.layer_spikes, found = _search(
            run, search_sites, settings.threshold, settings.min_ratio, settings.max_iterations,
            settings.max_super_weights,
        )
    run.restore(list(run.zeroed))
    report.timings["search"] = time.perf_counter() - run.started

    confirmation = None
    if settings.confirm and found:
        t0 = time.perf_counter()
        # Skip only where the layout is known: an unlisted architecture may pass state between
        # layers outside their outputs (shared KV, per-layer inputs), where skipping is unsafe.
        skippable = known_layout and _layers_are_contiguous(run.model, run.sites)
        confirmation = _confirm(run, found, settings.confirm_tokens, skippable)
        report.confirmation = confirmation.summary
        report.timings["confirmation"] = time.perf_counter() - t0

    report.candidates = _classify_records(found, confirmation)

    t0 = time.perf_counter()
    report.super_activations = _trace_super_activations(run, report.super_weights, found)
    report.timings["activations"] = time.perf_counter() - t0


def _search_sites(sites: list[ProjectionSite], layers: Iterable[int] | None) -> list[ProjectionSite]:
    """The sites to search (those of ``layers``, default all); fails on an unknown layer or meta weights."""
    if layers is not None:
        wanted = list(layers)
        known = {site.layer for site in sites}
        bad = [i for i in wanted if isinstance(i, bool) or not isinstance(i, int) or i not in known]
        if bad:
            raise ValueError(
                f"layers={wanted!r} is invalid: {bad} not among the model's decoder layers 0..{max(known)}."
            )
        search_sites = [site for site in sites if site.layer in set(wanted)]
    else:
        search_sites = sites
    for site in sites:
        if site.module.weight.device.type == "meta":
            raise ValueError(
                f"{site.name}.weight is on the meta device: detection needs materialised weights "
                "(load the model without disk offload)."
            )
    return search_sites


@dataclass
class _DetectionRun:
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
    ) -> "_DetectionRun":
        """Encode and pad the prompts (pad id: the tokenizer's, else the config's, else 0)."""
        texts, encoded = encode_prompts(model, tokenizer, prompts)
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        if not isinstance(pad_id, int) or not 0 <= pad_id < _vocab_size(model):
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


def _search(
    run: _DetectionRun, search_sites: list[ProjectionSite], threshold: float, min_ratio: float,
    max_iterations: int, max_super_weights: int,
) -> tuple[int, list[LayerSpikes], list[Candidate]]:
    """Search stage: one pass over the prompts; each layer's zero-and-look-again loop runs in its hook.

    Also keeps the residual stream after every layer (``run.residual_trace``) for the super-activation trace.
    """
    # (Re-running the whole model with every candidate zeroed would surface spikes of a broken
    # model, e.g. SmolLM2 layer 27 [199, 903] once layer 11's super weight is gone, all harmless,
    # and would hide weights whose spike needs an upstream super activation.)
    spy = SpikeSearch(search_sites, run.valid, threshold, min_ratio, max_iterations)
    trace_handles = run.residual_hooks(run.residual_trace)
    try:
        run.model(input_ids=run.input_ids, attention_mask=run.attention_mask, use_cache=False)
    finally:
        spy.remove()
        for handle in trace_handles:
            handle.remove()
    iterations, layer_spikes, found = collect_candidates(spy, search_sites, run.valid, max_super_weights)
    run.say("search: " + (", ".join(f"L{c.site.layer} [{c.row}, {c.col}]" for c in found) or "no spike"))
    return iterations, layer_spikes, found


class _Effect(NamedTuple):
    """What zeroing some weights does to the confirmation text: its NLL, KL from the original, perplexity ratio."""

    nll: float
    kl: float
    ppl_ratio: float


@dataclass
class _Confirmation:
    """Ablation results: per candidate (by position in ``found``), per multi-weight (layer, row) group."""

    alone: dict[int, _Effect]
    groups: dict[tuple[int, int], _Effect]
    group_members: dict[tuple[int, int], list[int]]
    summary: dict[str, Any]


def _confirm(run: _DetectionRun, found: list[Candidate], confirm_tokens: int, skippable: bool) -> _Confirmation:
    """Confirmation stage: zero each candidate alone, then each group sharing a layer and row, and measure."""
    ids, text_name = _confirmation_ids(run.model, run.tokenizer, confirm_tokens)
    ablator = _Ablator(run, torch.tensor([ids], device=model_device(run.model)), found, skippable)
    alone: dict[int, _Effect] = {}
    for i, c in enumerate(found):
        run.say(f"confirming {i + 1}/{len(found)}: L{c.site.layer} [{c.row}, {c.col}]")
        alone[i] = ablator.ablate([c.key])
    # Weights that build one activation together (same layer and row) may each be harmless
    # alone, since the other still drives the row: ablate such a group at once too.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(found):
        groups.setdefault((c.site.layer, c.row), []).append(i)
    group_result: dict[tuple[int, int], _Effect] = {}
    group_members: dict[tuple[int, int], list[int]] = {}
    for (layer, row), members in groups.items():
        if len(members) < 2:
            continue
        group_members[(layer, row)] = members
        run.say(f"confirming group L{layer} row {row} ({len(members)} weights)")
        group_result[(layer, row)] = ablator.ablate([found[i].key for i in members])
    summary = {
        "text": text_name,
        "tokens": len(ids),
        "loss": ablator.base_nll,
        "super_kl": SUPER_KL,
        "super_ppl_ratio": SUPER_PPL_RATIO,
        "weak_kl": WEAK_KL,
        "weak_ppl_ratio": WEAK_PPL_RATIO,
        "groups_ablated": len(group_result),
    }
    return _Confirmation(alone, group_result, group_members, summary)


class _Ablator:
    """Scores the confirmation text with some weights zeroed, against the original model's predictions.

    The original pass caches the hidden states after the layer preceding each candidate's layer (keyed by
    position in the decoder-layer list), so that each ablation starts at the candidate's layer."""

    def __init__(self, run: _DetectionRun, text_ids: torch.Tensor, found: list[Candidate], skippable: bool):
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
        self.base_p = base_logp.exp().reshape(-1)
        # KL(p || q) summed over positions = sum p log p - sum p log q: the first term once, the
        # second as one dot product per ablation (no [tokens, vocab] temporaries).
        self.base_plogp = float(torch.dot(self.base_p, base_logp.reshape(-1)))
        self.n_positions = base_logp.shape[0]

    def ablate(self, keys: list[tuple[int, int, int]]) -> _Effect:
        """The effect of zeroing the weights ``keys`` (layer, row, col) together; they are restored after."""
        start = min(self.position[k[0]] for k in keys) if self.skippable else 0
        for key in keys:
            self.run.zero(*key)
        try:
            with _LayerSkip(self.run.decoder_layers, self.cache, start):
                nll, logp = _nll_and_logprobs(self.run.model, self.text_ids)
        finally:
            self.run.restore(keys)
        kl = (self.base_plogp - float(torch.dot(self.base_p, logp.reshape(-1)))) / self.n_positions
        return _Effect(nll, max(kl, 0.0), math.exp(nll - self.base_nll))


def _classify_records(found: list[Candidate], confirmation: _Confirmation | None) -> list[SuperWeight]:
    """Records stage: one :class:`SuperWeight` per candidate with its class, super first then by effect
    (unconfirmed: largest output spike first)."""
    records = []
    for i, c in enumerate(found):
        extra: dict[str, Any] = c.search_extra()
        classification = impact = None
        if confirmation is not None and i in confirmation.alone:
            nll, kl, ppl_ratio = confirmation.alone[i]
            classification, impact = _classify(kl, ppl_ratio), ppl_ratio
            extra["kl"] = kl
            base_loss = confirmation.summary["loss"]
            extra["loss_ratio"] = nll / base_loss if base_loss else None
            group = confirmation.groups.get((c.site.layer, c.row))
            if group is not None:
                _, group_kl, group_ppl_ratio = group
                extra["group_kl"], extra["group_ppl_ratio"] = group_kl, group_ppl_ratio
                group_class = _classify(group_kl, group_ppl_ratio)
                members = [
                    _classify(*confirmation.alone[j][1:]) for j in confirmation.group_members[(c.site.layer, c.row)]
                ]
                # Upgrade only weights that matter jointly: when no member alone reaches the
                # group's class (two halves of one activation), each is as important as the
                # group. A group that is catastrophic because of one member upgrades nobody.
                if all(_CLASS_RANK[group_class] < _CLASS_RANK[m] for m in members):
                    classification = group_class
        records.append(
            candidate_record(
                c, classification=classification, impact=impact, extra={k: v for k, v in extra.items() if v is not None}
            )
        )
    if confirmation is not None:
        records.sort(key=lambda r: (_CLASS_RANK[r.classification], -r.extra.get("kl", 0.0), -(r.impact or 0.0)))
    else:
        records.sort(key=lambda r: -(r.output_spike or 0.0))
    return records


def _trace_super_activations(
    run: _DetectionRun, chosen: list[SuperWeight], found: list[Candidate]
) -> list[SuperActivation]:
    """Super-activation stage: one per row of the super weights (all candidates when unconfirmed)."""
    origin = {c.key: c for c in found}
    rows: dict[int, list[SuperWeight]] = {}
    for record in chosen:
        rows.setdefault(record.row, []).append(record)
    activations = []
    for row, records_of_row in rows.items():
        first = min(records_of_row, key=lambda r: r.layer)
        activations.append(_trace_row(run, row, records_of_row, first, origin[(first.layer, first.row, first.col)]))
    return activations


def _trace_row(
    run: _DetectionRun, row: int, records_of_row: list[SuperWeight], first: SuperWeight, c: Candidate
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


def _layers_are_contiguous(model: torch.nn.Module, sites: list[ProjectionSite]) -> bool:
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
