"""The paper's central experiment (Yu et al. 2024, Table 1): what a model loses without its super weights.

:func:`ablate` evaluates, with the perplexity protocol of :mod:`optimum_superweight.evaluation`:

- ``original``: the model as it is;
- ``zero_sw``: every super weight set to 0;
- ``zero_sw_restore_sa``: super weights zeroed, but the super activation written back: a forward hook on
  the super weight's decoder layer replaces, at the layer's output (the residual stream), the value of
  the super-activation channel (``row``) at the first token by the value the intact model has there.
  The first token's residual depends on that token alone (causal attention), so the intact value is
  computed once per distinct first token (with BOS windows: once);
- ``prune_outliers``: the super weights kept, and in every 2-D weight matrix of the decoder layers the
  ``ceil(outlier_fraction * numel)`` largest-magnitude *other* entries set to 0 (the paper prunes about
  7,000 large outliers of Llama-7B while keeping its super weight). Weights listed in ``protect`` (by
  default the weak candidates of the detection) are kept too;
- ``scale_sw_x<f>``: every super weight multiplied by ``f`` (the paper scales it up to improve accuracy).

Each row reports the perplexity, its ratio to the original, and the super-activation magnitude
``|h[0, row]|`` at the output of each super weight's decoder layer on a probe prompt (BOS + the authors'
prompt). The model is always restored bit-exactly.

Example:
    >>> from optimum_superweight import ablate, SuperWeight
    >>> sw = SuperWeight(module="model.layers.11.mlp.down_proj", row=507, col=1229)
    >>> report = ablate(model, tokenizer, [sw])  # doctest: +SKIP
    >>> print(report.to_text())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .evaluation import DEFAULT_MAX_TOKENS, DEFAULT_WINDOW, builtin_text, perplexity, tokenize_text
from .detection import layer_output
from .prompts import PAPER_PROMPT
from .records import SuperWeight

__all__ = ["ablate", "AblationReport", "AblationRow", "DEFAULT_OUTLIER_FRACTION", "DEFAULT_SCALE_FACTORS", "PROBE_PROMPT"]

#: Fraction of each decoder weight matrix pruned in the ``prune_outliers`` row, rounded up so that every
#: matrix loses at least its largest entry. The paper pruned ~7,000 outliers of Llama-7B's ~6.5e9 linear
#: weights (~1.1e-6); on SmolLM2-135M this default zeroes 210 weights (one per matrix).
DEFAULT_OUTLIER_FRACTION = 1e-6
DEFAULT_SCALE_FACTORS: tuple[float, ...] = (0.5, 2.0)
#: The authors' detection prompt; the super activation is read at its first token (BOS when the tokenizer has one).
PROBE_PROMPT = PAPER_PROMPT


@dataclass(frozen=True)
class AblationRow:
    """One setting of the ablation table.

    Attributes:
        name: Machine name (``original``, ``zero_sw``, ``zero_sw_restore_sa``, ``prune_outliers``, ``scale_sw_x2``).
        description: What was done, in words.
        ppl: Perplexity.
        ratio: ``ppl / original ppl``.
        weights_changed: Number of weight entries changed from the original.
        super_activation: ``{"L11[507]": |value|}``: the super-activation magnitude at the output of each
            super weight's decoder layer, first probe token.
    """

    name: str
    description: str
    ppl: float
    ratio: float
    weights_changed: int
    super_activation: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AblationReport:
    """What :func:`ablate` measured; ``to_text()`` prints the table, ``to_dict()``/``to_json()`` keep it."""

    rows: list[AblationRow]
    super_weights: list[SuperWeight]
    protected: list[SuperWeight]
    protocol: dict[str, Any]
    outlier_fraction: float
    timings: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> AblationRow:
        """The row called ``name`` (``KeyError`` if absent)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No ablation row {name!r}; rows: {', '.join(r.name for r in self.rows)}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "super_weights": [sw.to_dict() for sw in self.super_weights],
            "protected": [sw.to_dict() for sw in self.protected],
            "protocol": dict(self.protocol),
            "outlier_fraction": self.outlier_fraction,
            "timings": dict(self.timings),
        }

    def to_json(self, path: str | os.PathLike[str] | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    def to_text(self) -> str:
        keys = list(self.rows[0].super_activation) if self.rows else []
        header = f"{'setting':<44} {'changed':>8} {'perplexity':>12} {'x orig':>9}" + "".join(
            f" {'SA ' + k:>14}" for k in keys
        )
        lines = [
            "Super-weight ablation (paper Table 1): "
            + ", ".join(sw.paper_notation() for sw in self.super_weights),
            f"Perplexity: {self.protocol.get('text_tokens')} tokens of {self.protocol.get('source')}, windows of "
            f"{self.protocol.get('window')} (stride {self.protocol.get('stride')}), BOS={self.protocol.get('add_bos')}. "
            f"SA = |super activation| at the output of the super weight's layer, first token of the probe prompt.",
            header,
            "-" * len(header),
        ]
        for row in self.rows:
            lines.append(
                f"{row.description[:44]:<44} {row.weights_changed:>8} {_fmt_ppl(row.ppl):>12} {row.ratio:>9.3f}"
                + "".join(f" {row.super_activation.get(k, float('nan')):>14.1f}" for k in keys)
            )
        if self.protected:
            lines.append(
                "Also kept when pruning outliers: " + ", ".join(sw.paper_notation() for sw in self.protected)
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _fmt_ppl(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


# --------------------------------------------------------------------------------------------------
# Locating weights and layers
# --------------------------------------------------------------------------------------------------


def _is_conv1d(module: torch.nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _dense_weight(model: torch.nn.Module, module_name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    try:
        module = model.get_submodule(module_name)
    except AttributeError as error:
        raise ValueError(f"Super weight module {module_name!r} does not exist in {type(model).__name__}.") from error
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"Module {module_name!r} has no dense floating-point 2-D weight (got {type(module).__name__}); "
            "ablation needs a full-precision model (dequantize a quantized one first)."
        )
    if weight.device.type == "meta":
        raise ValueError(f"Module {module_name!r} has its weight on the meta device (offloaded); ablation needs it loaded.")
    return module, weight


def _storage_index(module: torch.nn.Module, sw: SuperWeight) -> tuple[int, int]:
    weight = module.weight
    index = (sw.col, sw.row) if _is_conv1d(module) else (sw.row, sw.col)
    if not (0 <= index[0] < weight.shape[0] and 0 <= index[1] < weight.shape[1]):
        raise ValueError(
            f"Super weight {sw.paper_notation()} is outside {sw.module}.weight of shape {tuple(weight.shape)}."
        )
    return index


def _decoder_layer_name(model: torch.nn.Module, sw: SuperWeight) -> str:
    """The decoder layer holding ``sw.module``: the longest prefix ending in ``.<layer index>``."""
    parts = sw.module.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end - 1].isdigit() and (sw.layer is None or int(parts[end - 1]) == sw.layer):
            return ".".join(parts[:end])
    raise ValueError(f"Cannot find the decoder layer of {sw.module!r} (expected a name like 'model.layers.11.mlp.down_proj').")


def _decoder_matrices(model: torch.nn.Module, layer_prefixes: Iterable[str]) -> list[tuple[str, torch.nn.Module]]:
    """Every module with a 2-D floating weight inside the decoder layers (a name under a ``<...>.<i>`` prefix)."""
    prefixes = sorted({p.rsplit(".", 1)[0] + "." for p in layer_prefixes})  # e.g. "model.layers."
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            continue
        if isinstance(module, torch.nn.Embedding):
            continue
        if any(name.startswith(prefix) and name[len(prefix) :].split(".", 1)[0].isdigit() for prefix in prefixes):
            found.append((name, module))
    return found


# --------------------------------------------------------------------------------------------------
# Reversible edits
# --------------------------------------------------------------------------------------------------


class _Edits:
    """Weight entries changed in place, with their originals, restored exactly by :meth:`restore`."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0

    @torch.no_grad()
    def set(self, weight: torch.Tensor, flat_indices: torch.Tensor, values: torch.Tensor | float) -> None:
        flat = weight.view(-1)
        flat_indices = flat_indices.to(weight.device)
        self._saved.append((weight, flat_indices, flat[flat_indices].clone()))
        if isinstance(values, torch.Tensor):
            values = values.to(device=weight.device, dtype=weight.dtype)
        flat[flat_indices] = values
        self.count += int(flat_indices.numel())

    @torch.no_grad()
    def restore(self) -> None:
        for weight, indices, original in reversed(self._saved):
            weight.view(-1)[indices] = original
        self._saved.clear()


@contextmanager
def _edited(fill: Callable[[_Edits], None]) -> Iterator[_Edits]:
    edits = _Edits()
    try:
        fill(edits)
        yield edits
    finally:
        edits.restore()


class _ActivationRestorer:
    """Writes the intact model's super-activation values back at the output of each super weight's layer.

    Token 0's residual stream depends on token 0 only (causal attention), so the intact value is computed
    once per distinct first-token id, by a 1-token forward with the weights temporarily restored.
    """

    def __init__(self, model: torch.nn.Module, sites: dict[str, list[int]], edits: _Edits) -> None:
        self.model = model
        self.sites = sites  # decoder layer name -> channels
        self.edits = edits
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        self._first_tokens: torch.Tensor | None = None
        self._busy = False
        self._handles: list[Any] = []

    def __enter__(self) -> "_ActivationRestorer":
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for name in self.sites:
            self._handles.append(self.model.get_submodule(name).register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError("Restoring the super activation needs the model to be called with input_ids.")
        self._first_tokens = input_ids[:, 0].detach().cpu()
        missing = sorted({int(t) for t in self._first_tokens.tolist()} - set(self.cache))
        for token in missing:
            self.cache[token] = self._intact_values(token, input_ids.device)

    @torch.no_grad()
    def _intact_values(self, token: int, device: torch.device) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name, channels in self.sites.items():
            def capture(module, args, output, name=name, channels=channels):
                captured[name] = layer_output(output)[0, 0, channels].detach().clone()

            handles.append(self.model.get_submodule(name).register_forward_hook(capture))
        # The ablated values, to put back after one forward with the intact weights.
        ablated = [(weight, indices, weight.view(-1)[indices].clone()) for weight, indices, _ in self.edits._saved]
        saved = list(self.edits._saved)
        self._busy = True
        try:
            self.edits.restore()
            self.model(input_ids=torch.tensor([[token]], device=device), use_cache=False)
        finally:
            self._busy = False
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for weight, indices, values in ablated:
                    weight.view(-1)[indices] = values
            self.edits._saved.extend(saved)
        return captured

    def _make_hook(self, name: str):
        channels = self.sites[name]

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if self._busy or self._first_tokens is None:
                return None
            hidden = layer_output(output).clone()
            for b, token in enumerate(self._first_tokens.tolist()):
                hidden[b, 0, channels] = self.cache[int(token)][name].to(hidden.dtype)
            if isinstance(output, tuple):
                return (hidden,) + tuple(output[1:])
            if isinstance(output, list):
                return [hidden] + list(output[1:])
            return hidden

        return hook


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------


def _coerce_records(name: str, values: Iterable[Any] | None) -> list[SuperWeight]:
    if values is None:
        return []
    records: list[SuperWeight] = []
    for value in values:
        if isinstance(value, SuperWeight):
            records.append(value)
        elif isinstance(value, dict):
            records.append(SuperWeight.from_dict(value))
        elif isinstance(value, (tuple, list)) and len(value) == 3 and isinstance(value[0], str):
            records.append(SuperWeight(module=value[0], row=int(value[1]), col=int(value[2])))
        else:
            raise ValueError(
                f"{name} entry {value!r} is invalid: expected a SuperWeight, a dict with module/row/col, "
                "or a (module, row, col) tuple."
            )
    return records


def _probe_ids(tokenizer: Any, vocab_size: int, add_bos: bool) -> list[int]:
    if tokenizer is None:
        return list(range(1, min(vocab_size, 17)))
    ids = tokenize_text(tokenizer, PROBE_PROMPT, max_tokens=None)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    return ([bos] if bos is not None else []) + ids


@torch.no_grad()
def _super_activation(
    model: torch.nn.Module, probe: torch.Tensor, sites: dict[str, list[int]], labels: dict[tuple[str, int], str]
) -> dict[str, float]:
    captured: dict[str, float] = {}
    handles = []
    for name, channels in sites.items():
        def capture(module, args, output, name=name, channels=channels):
            hidden = layer_output(output)
            for channel in channels:
                captured[labels[(name, channel)]] = float(hidden[0, 0, channel].abs())

        handles.append(model.get_submodule(name).register_forward_hook(capture))
    try:
        model(input_ids=probe, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def ablate(
    model: torch.nn.Module,
    tokenizer: Any,
    super_weights: Sequence[SuperWeight | dict | tuple] | None = None,
    *,
    text: str | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 4,
    add_bos: bool = True,
    scale_factors: Sequence[float] = DEFAULT_SCALE_FACTORS,
    outlier_fraction: float | None = DEFAULT_OUTLIER_FRACTION,
    protect: Sequence[SuperWeight | dict | tuple] | None = None,
    restore_activation: bool = True,
    progress: bool = False,
    detection_kwargs: dict[str, Any] | None = None,
) -> AblationReport:
    """Reproduce the paper's Table 1 on ``model``: perplexity and super activation under each ablation.

    Args:
        model: A full-precision causal LM (weights dense and materialised).
        tokenizer: Its tokenizer.
        super_weights: The super weights (``SuperWeight``, dicts, or ``(module, row, col)``); ``None`` runs
            :func:`optimum_superweight.detection.detect_super_weights` and uses its confirmed super weights.
        text, max_tokens, window, stride, batch_size, add_bos: The perplexity protocol
            (see :func:`optimum_superweight.perplexity`); default: 4096 tokens of the built-in text.
        scale_factors: One ``scale_sw_x<f>`` row per factor (empty: none).
        outlier_fraction: Fraction of each decoder weight matrix pruned in ``prune_outliers``, rounded up
            (``None`` or 0: no such row).
        protect: Weights kept, besides the super weights, when pruning outliers. ``None``: the weak
            candidates of the detection when it ran, else nothing.
        restore_activation: Add the ``zero_sw_restore_sa`` row.
        progress: Print each row as it is measured (stderr).
        detection_kwargs: Passed to ``detect_super_weights`` when it runs.

    Returns:
        An :class:`AblationReport` (``print(report.to_text())``).

    Example:
        >>> report = ablate(model, tokenizer, [("model.layers.11.mlp.down_proj", 507, 1229)])  # doctest: +SKIP
        >>> report.row("zero_sw").ratio > 3  # doctest: +SKIP
        True
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    factors = _check_ablation_inputs(outlier_fraction, scale_factors)
    records, protected = _choose_weights(model, tokenizer, super_weights, protect, detection_kwargs, started, timings)
    # Resolve every coordinate before touching the model.
    located = _locate(model, records)
    protected_located = _locate(model, protected)
    sites, labels = _activation_sites(model, records)

    token_ids = tokenize_text(tokenizer, builtin_text() if text is None else text, max_tokens)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 32) or 32)
    probe = torch.tensor([_probe_ids(tokenizer, vocab_size, add_bos)], device=device)
    bench = _Bench(
        model=model, tokenizer=tokenizer, token_ids=token_ids, probe=probe, sites=sites, labels=labels,
        window=window, stride=stride, batch_size=batch_size, add_bos=add_bos, progress=progress, timings=timings,
        protocol={"source": "pydoc_data.topics" if text is None else "user text"},
    )
    was_training = model.training
    model.eval()
    try:
        raw_rows = _measure_rows(bench, located, protected_located, restore_activation, outlier_fraction, factors)
    finally:
        if was_training:
            model.train()

    base = raw_rows[0].ppl
    rows = [
        AblationRow(name=r.name, description=r.description, ppl=r.ppl, ratio=r.ppl / base,
                    weights_changed=r.weights_changed, super_activation=r.super_activation)
        for r in raw_rows
    ]
    timings["total"] = time.perf_counter() - started
    return AblationReport(
        rows=rows,
        super_weights=records,
        protected=protected,
        protocol=bench.protocol,
        outlier_fraction=float(outlier_fraction or 0.0),
        timings=timings,
    )


# One located weight: the record, its dense storage tensor, and the flat index of the weight in it.
_Located = tuple[SuperWeight, torch.Tensor, int]


def _check_ablation_inputs(outlier_fraction: Any, scale_factors: Sequence[float] | None) -> list[float]:
    """Validate ``outlier_fraction`` and return ``scale_factors`` as floats (before anything runs)."""
    if outlier_fraction is not None and (
        isinstance(outlier_fraction, bool) or not isinstance(outlier_fraction, (int, float))
        or not 0 <= outlier_fraction < 1
    ):
        raise ValueError(f"outlier_fraction={outlier_fraction!r} is invalid: expected a number in [0, 1) or None.")
    factors = []
    for factor in scale_factors or ():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"scale_factors entry {factor!r} is invalid: expected a finite number.")
        factors.append(float(factor))
    return factors


def _choose_weights(
    model: torch.nn.Module,
    tokenizer: Any,
    super_weights: Sequence[SuperWeight | dict | tuple] | None,
    protect: Sequence[SuperWeight | dict | tuple] | None,
    detection_kwargs: dict[str, Any] | None,
    started: float,
    timings: dict[str, float],
) -> tuple[list[SuperWeight], list[SuperWeight]]:
    """The super weights to ablate (given, or detected) and the weights kept when pruning outliers.

    Without ``super_weights`` detection runs (its time goes to ``timings["detection"]``), and its weak
    candidates are protected unless ``protect`` says otherwise. Protected weights never include a super weight.
    """
    detected_protect: list[SuperWeight] = []
    if super_weights is None:
        from .detection import detect_super_weights

        detection = detect_super_weights(model, tokenizer, **(detection_kwargs or {}))
        records = list(detection.super_weights)
        detected_protect = [c for c in detection.candidates if c.classification == "weak"]
        timings["detection"] = detection.timings.get("total", time.perf_counter() - started)
        if not records:
            raise ValueError(
                "Detection found no confirmed super weight in this model; pass super_weights=[...] explicitly "
                f"to ablate chosen weights. Candidates: {[c.paper_notation() for c in detection.candidates]}."
            )
    else:
        records = _coerce_records("super_weights", super_weights)
        if not records:
            raise ValueError("super_weights is empty: pass at least one super weight, or None to detect them.")
    protected = _coerce_records("protect", protect) if protect is not None else detected_protect
    protected = [p for p in protected if (p.module, p.row, p.col) not in {(r.module, r.row, r.col) for r in records}]
    return records, protected


def _locate(model: torch.nn.Module, records: list[SuperWeight]) -> list[_Located]:
    """Each record with its dense weight tensor and flat storage index (raises on a bad coordinate)."""
    located = []
    for sw in records:
        module, weight = _dense_weight(model, sw.module)
        row, col = _storage_index(module, sw)
        located.append((sw, weight, row * weight.shape[1] + col))
    return located


def _activation_sites(
    model: torch.nn.Module, records: list[SuperWeight]
) -> tuple[dict[str, list[int]], dict[tuple[str, int], str]]:
    """Decoder layers whose output carries a super activation (layer name -> channels), with labels ``L<i>[<row>]``."""
    sites: dict[str, list[int]] = {}
    labels: dict[tuple[str, int], str] = {}
    for sw in records:
        layer_name = _decoder_layer_name(model, sw)
        channels = sites.setdefault(layer_name, [])
        if sw.row not in channels:
            channels.append(sw.row)
            layer = layer_name.rsplit(".", 1)[-1]
            labels[(layer_name, sw.row)] = f"L{layer}[{sw.row}]"
    return sites, labels


@dataclass
class _RawRow:
    name: str
    description: str
    ppl: float
    super_activation: dict[str, float]
    weights_changed: int


@dataclass
class _Bench:
    """What every row is measured with: the perplexity protocol, the activation probe, and where results go."""

    model: torch.nn.Module
    tokenizer: Any
    token_ids: list[int]
    probe: torch.Tensor
    sites: dict[str, list[int]]
    labels: dict[tuple[str, int], str]
    window: int
    stride: int | None
    batch_size: int
    add_bos: bool
    progress: bool
    timings: dict[str, float]
    protocol: dict[str, Any]

    def measure(self, name: str, description: str, edits_count: int) -> _RawRow:
        """Perplexity and super activation of the model as it is now (one row of the table)."""
        t0 = time.perf_counter()
        result = perplexity(
            self.model, self.tokenizer, token_ids=self.token_ids, max_tokens=None, window=self.window,
            stride=self.stride, batch_size=self.batch_size, add_bos=self.add_bos,
        )
        activation = _super_activation(self.model, self.probe, self.sites, self.labels)
        self.timings[name] = time.perf_counter() - t0
        if self.progress:
            import sys

            print(f"[ablate] {description}: ppl {result.ppl:.3f} ({self.timings[name]:.1f} s)", file=sys.stderr, flush=True)
        self.protocol.update(text_tokens=result.text_tokens, window=result.window, stride=result.stride,
                             add_bos=result.add_bos, n_tokens=result.n_tokens)
        return _RawRow(name, description, result.ppl, activation, edits_count)


def _measure_rows(
    bench: _Bench,
    located: list[_Located],
    protected_located: list[_Located],
    restore_activation: bool,
    outlier_fraction: float | None,
    factors: list[float],
) -> list[_RawRow]:
    """Measure each row of the table in order (original, zeroed, restored, pruned, scaled); every edit is undone."""
    rows = [bench.measure("original", "original", 0)]

    def zero_super(edits: _Edits) -> None:
        for _, weight, flat in located:
            edits.set(weight, torch.tensor([flat]), 0.0)

    with _edited(zero_super) as edits:
        rows.append(bench.measure("zero_sw", "super weights zeroed", edits.count))
        if restore_activation:
            description = "super weights zeroed, super activation restored"
            with _ActivationRestorer(bench.model, bench.sites, edits):
                rows.append(bench.measure("zero_sw_restore_sa", description, edits.count))

    if outlier_fraction:
        rows.append(_measure_pruned(bench, located, protected_located, outlier_fraction))

    for factor in factors:
        def scale(edits: _Edits, factor: float = factor) -> None:
            for _, weight, flat in located:
                index = torch.tensor([flat])
                edits.set(weight, index, weight.view(-1)[index.to(weight.device)] * factor)

        with _edited(scale) as edits:
            rows.append(bench.measure(f"scale_sw_x{factor:g}", f"super weights scaled x{factor:g}", edits.count))
    return rows


def _measure_pruned(
    bench: _Bench, located: list[_Located], protected_located: list[_Located], outlier_fraction: float
) -> _RawRow:
    """The ``prune_outliers`` row: the largest ``outlier_fraction`` of each decoder matrix zeroed, the
    super weights and protected weights kept."""
    keep: dict[int, list[int]] = {}
    for _, weight, flat in [*located, *protected_located]:
        keep.setdefault(id(weight), []).append(flat)
    matrices = _decoder_matrices(bench.model, bench.sites)

    def prune(edits: _Edits) -> None:
        for _, module in matrices:
            weight = module.weight
            k = math.ceil(outlier_fraction * weight.numel())
            magnitude = weight.detach().abs().flatten().float()
            kept = keep.get(id(weight))
            if kept:
                magnitude[torch.tensor(kept, device=magnitude.device)] = -1.0
            edits.set(weight, torch.topk(magnitude, k).indices, 0.0)

    description = f"top {outlier_fraction:g} of each matrix zeroed, SW kept"
    with _edited(prune) as edits:
        row = bench.measure("prune_outliers", description, edits.count)
    bench.protocol["pruned_matrices"] = len(matrices)
    return row
