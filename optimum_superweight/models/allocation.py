"""Bits where they matter: each module's code width and group size under a storage budget.

With ``SuperWeightConfig(target_bits_per_weight=...)`` the pipeline (:mod:`.replace`) asks this module for each
layer's ``(bits, group_size)`` after the calibration pass, then chooses every layer's codes at its own width.

1. **Cost** (:func:`layer_cost_bits`): the bits a layer stores at a width, counted from the checkpoint format
   (:class:`optimum_superweight.format.LayerFormat`: codes, scales, zero-points or offsets, exact super weights and
   their indices; the bias is not counted), exactly as :attr:`SuperWeightConfig.bits_per_weight` and the
   benchmarks' bits/weight column count it.
2. **Sensitivity** (:func:`measure_sensitivity`): each layer's codes are chosen at every candidate width
   (:data:`CANDIDATES`, widths the packing and the kernels support) on an evenly spaced sample of its rows, with
   the config's own way of choosing codes; the error is the output error the calibration statistics predict,
   ``Σ_ij g_i E[x_j²] (w_ij - ŵ_ij)²`` (super weights exact, so not counted), where ``g_i`` is the mean squared
   gradient of the model's loss with respect to output ``i`` on the calibration text (:func:`collect_output_gradients`:
   a diagonal estimate of the loss increase, comparable between layers; :data:`SENSITIVITY` ``"loss"``, the
   default). Without gradients (``"relative"``) it is divided by the layer's output energy ``Σ_ij E[x_j²] w_ij²``
   instead: a noise-to-signal ratio, which measured worse (``benchmarks/RESULTS.md``).
3. **Allocation** (:func:`allocate`): minimise the sum of the layers' errors within the budget. Every layer starts
   at its cheapest width; upgrades along each layer's lower convex hull of (cost, error) are taken in order of
   error removed per extra bit (the Lagrangian solution at the budget), then what is left of the budget goes to
   the best remaining upgrade that fits, until none does. The total never exceeds the budget.

>>> options = {"a": [LayerOption(3, 64, 300, 0.10), LayerOption(4, 64, 400, 0.02)],
...            "b": [LayerOption(3, 64, 300, 0.03), LayerOption(4, 64, 400, 0.02)]}
>>> {name: option.bits for name, option in allocate(options, 700).items()}
{'a': 4, 'b': 3}
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import SuperWeightConfig
from ..format import BIAS, LayerFormat
from ..progress import progress_bar
from ..tensor.rows import LayerWeight, quantize_layers

__all__ = ["CANDIDATES", "TWO_BIT_CANDIDATES", "SAMPLE_ROWS", "SENSITIVITY", "SENSITIVITIES", "collect_output_gradients", "LayerOption", "layer_cost_bits", "measure_sensitivity", "allocate",
           "allocate_widths", "total_cost_bits"]

#: The ``(bits, group_size)`` an allocation chooses from: code widths the packing and every kernel run (3, 4 and 8
#: bits), groups of 32 to 128 inputs (a group wider than a layer's rows is skipped for that layer). Read at call time.
CANDIDATES: tuple[tuple[int, int], ...] = ((3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128), (8, 64))
#: 2-bit widths, left out of :data:`CANDIDATES`: with them the allocation measured worse on SmolLM2
#: (``benchmarks/RESULTS.md``, "Widths per module under a budget").
TWO_BIT_CANDIDATES: tuple[tuple[int, int], ...] = ((2, 32), (2, 64))
#: What a layer's error is measured in: ``"relative"``, its activation-weighted output error over its output energy
#: (a noise-to-signal ratio, no further pass), or ``"loss"``, the same error weighted per output channel by the mean
#: squared gradient of the model's loss with respect to that output on the calibration text (a diagonal Fisher
#: estimate of the loss increase: one forward and backward pass; needs the model). Read at call time.
SENSITIVITY = "loss"
SENSITIVITIES = ("relative", "loss")
#: Rows of each layer on which the sensitivity is measured (evenly spaced; all rows of a smaller layer): the error
#: is a sum over rows, so a sample estimates it, at a fraction of fitting the whole layer at every candidate.
SAMPLE_ROWS = 128


@dataclass(frozen=True)
class LayerOption:
    """One layer at one width: its stored ``cost_bits`` and its output ``error`` there (loss units or relative)."""

    bits: int
    group_size: int
    cost_bits: int
    error: float


def layer_cost_bits(config: SuperWeightConfig, out_features: int, in_features: int, bits: int, group_size: int,
                    num_super_weights: int = 0) -> int:
    """Bits a layer stores at ``(bits, group_size)`` in ``config``'s form (scale dtype, zero-point or offset).

    >>> layer_cost_bits(SuperWeightConfig(), 8, 64, 4, 64)  # 8 rows x (64 codes x 4 bits + fp16 scale + fp16 offset)
    2304
    """
    fmt = LayerFormat(out_features, in_features, bits=bits, group_size=group_size, symmetric=config.symmetric,
                      scale_dtype=config.scale_dtype, num_super_weights=num_super_weights, zero_point=config.zero_point)
    nbytes = 0
    for spec in fmt.tensors():
        if spec.name != BIAS:
            numel = 1
            for size in spec.shape:
                numel *= size
            nbytes += numel * spec.dtype.itemsize
    return 8 * nbytes


def _sample(weight: torch.Tensor, coordinates: Sequence[tuple[int, int]], rows: int):
    """Evenly spaced rows of ``weight`` (all of them when it has at most ``rows``), the coordinates in them renumbered,
    and the rows' indices."""
    out_features = weight.shape[0]
    if out_features <= rows:
        return weight, list(coordinates), torch.arange(out_features)
    picked = torch.linspace(0, out_features - 1, rows).round().long().unique()
    position = {int(row): i for i, row in enumerate(picked.tolist())}
    return weight[picked], [(position[r], c) for r, c in coordinates if r in position], picked


def _candidates(in_features: int, candidates: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    fitting = [(b, g) for b, g in candidates if g == -1 or g <= in_features]
    return fitting or [(b, -1) for b in sorted({b for b, _ in candidates})]


def measure_sensitivity(
    config: SuperWeightConfig,
    linears: Mapping[str, nn.Linear],
    coordinates: Mapping[str, Sequence[tuple[int, int]]],
    energies: Mapping[str, torch.Tensor],
    *,
    candidates: Sequence[tuple[int, int]] | None = None,
    rows: int = SAMPLE_ROWS,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list[LayerOption]]:
    """Each layer's :class:`LayerOption` at every candidate width that fits it (``candidates``, by default
    :data:`CANDIDATES`; see the module doc, step 2).

    ``energies`` holds each layer's inputs' mean squares ``E[x²]`` (``[in]``, or a matrix whose diagonal it is);
    ``gradients`` (optional) each layer's outputs' mean squared loss gradients ``[out]``
    (:func:`collect_output_gradients`): the error is then in loss units, not relative to the output energy.
    """
    candidates = CANDIDATES if candidates is None else tuple(candidates)
    samples, energy_of = {}, {}
    for name, linear in linears.items():
        weight, held, picked = _sample(linear.weight.detach(), coordinates.get(name, []), rows)
        energy = energies[name]
        energy = (energy.diagonal() if energy.dim() == 2 else energy).to(torch.float32).clamp_min(0.0)
        if gradients is not None:  # [rows, in]: each weight's error in loss units (scaled back to the whole layer)
            scale = linear.weight.shape[0] / len(picked)
            energy = scale * gradients[name].to(torch.float32)[picked, None] * energy[None, :]
        samples[name], energy_of[name] = LayerWeight(weight, held, energies[name]), energy
    widths = sorted({w for linear in linears.values() for w in _candidates(linear.in_features, candidates)})
    errors: dict[str, dict[tuple[int, int], float]] = {name: {} for name in linears}
    with progress_bar(total=len(widths), desc="sensitivity", unit="width") as bar:
        for bits, group_size in widths:
            wanted = {n: s for n, s in samples.items() if (bits, group_size) in _candidates(s.weight.shape[1], candidates)}
            codes = quantize_layers(wanted, config.with_width(bits, group_size))
            for name, quantized in codes.items():
                errors[name][(bits, group_size)] = _weighted_error(samples[name], quantized.dequantize(), energy_of[name],
                                                                   relative=gradients is None)
            bar.update()
    options = {}
    for name, linear in linears.items():
        out_features, in_features = linear.weight.shape
        held = len(coordinates.get(name, []))
        options[name] = [LayerOption(b, g, layer_cost_bits(config, out_features, in_features, b, g, held), error)
                         for (b, g), error in sorted(errors[name].items())]
    return options


def _weighted_error(sample: LayerWeight, dense: torch.Tensor, weights: torch.Tensor, *, relative: bool) -> float:
    """``Σ c_ij (w - ŵ)²`` over the sample's weights (held-out ones exact), ``c`` the input energy ``[in]`` (or the
    loss weights ``[rows, in]``); ``relative``: over ``Σ c_ij w²``."""
    weight = sample.weight.to(torch.float32)
    diff = (weight - dense).square_()
    for row, col in sample.coordinates:
        diff[row, col] = 0.0
    error = float((diff * weights).sum())
    if not relative:
        return error
    signal = float((weight.square() * weights).sum())
    return error / signal if signal > 0 else 0.0


@torch.no_grad()
def collect_output_gradients(
    model: nn.Module, names: Sequence[str], token_ids: Sequence[int], *, window: int = 512, bos_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each named linear layer's mean squared gradient of the model's next-token loss with respect to each of its
    outputs (float32 ``[out]``), over windows of ``token_ids`` (each preceded by ``bos_id`` when given).

    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("llama", super_weights=None)
    >>> collect_output_gradients(model, ["model.layers.0.mlp.down_proj"], list(range(4, 132)), window=64)["model.layers.0.mlp.down_proj"].shape
    torch.Size([64])
    """
    modules = {name: model.get_submodule(name) for name in names}
    sums: dict[str, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
             for name, module in modules.items()]
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    windows = ids[: len(ids) // window * window].reshape(-1, window) if len(ids) >= window else ids[None]
    if bos_id is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=torch.long), windows], dim=1)
    device = next(model.parameters()).device
    count = 0
    try:
        for row in windows:
            captured.clear()
            with torch.enable_grad():
                logits = model(row[None].to(device)).logits.float()
                loss = nn.functional.cross_entropy(logits[0, :-1], row[1:].to(device), reduction="sum")
                outputs = [captured[n] for n in names]
                grads = torch.autograd.grad(loss, outputs, allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    total = grad.float().square().reshape(-1, grad.shape[-1]).sum(0)
                    sums[name] = total if name not in sums else sums[name] + total
            count += row.numel() - 1
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sums.get(name, torch.zeros(modules[name].weight.shape[0])).cpu() / max(count, 1) for name in names}


def _lower_hull(options: Sequence[LayerOption]) -> list[LayerOption]:
    """The options on the lower convex hull of (cost, error), cheapest first, each strictly better than the last."""
    hull: list[LayerOption] = []
    for option in sorted(options, key=lambda o: (o.cost_bits, o.error)):
        if hull and option.error >= hull[-1].error:
            continue  # costs more and is no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment from a to the new option: never the best trade-off.
            if (b.error - a.error) * (option.cost_bits - a.cost_bits) >= (option.error - a.error) * (b.cost_bits - a.cost_bits):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def total_cost_bits(choice: Mapping[str, LayerOption]) -> int:
    """Bits stored by a choice of one option per layer."""
    return sum(option.cost_bits for option in choice.values())


def allocate(options: Mapping[str, Sequence[LayerOption]], budget_bits: float) -> dict[str, LayerOption]:
    """One option per layer, the sum of errors minimised greedily within ``budget_bits`` (see the module doc, step 3).

    Raises ``ValueError`` when even the cheapest option of every layer exceeds the budget.
    """
    hulls = {name: _lower_hull(opts) for name, opts in options.items()}
    choice = {name: hull[0] for name, hull in hulls.items()}
    total = total_cost_bits(choice)
    if total > budget_bits:
        raise ValueError(f"the cheapest width of every layer already stores {total} bits, over the budget of "
                         f"{budget_bits:.0f} bits")
    step = {name: 0 for name in hulls}

    def push(heap: list, name: str) -> None:
        hull, at = hulls[name], step[name]
        if at + 1 < len(hull):
            gain = (hull[at].error - hull[at + 1].error) / (hull[at + 1].cost_bits - hull[at].cost_bits)
            heapq.heappush(heap, (-gain, name))

    heap: list = []
    for name in hulls:
        push(heap, name)
    while heap:
        _, name = heapq.heappop(heap)
        current, upgrade = hulls[name][step[name]], hulls[name][step[name] + 1]
        if total + upgrade.cost_bits - current.cost_bits <= budget_bits:
            total += upgrade.cost_bits - current.cost_bits
            choice[name], step[name] = upgrade, step[name] + 1
            push(heap, name)
    return _fill(options, choice, budget_bits - total)


def _fill(options: Mapping[str, Sequence[LayerOption]], choice: dict[str, LayerOption], left: float) -> dict[str, LayerOption]:
    """Spend what is left of the budget: the upgrade (any option, hull or not) removing most error per extra bit."""
    while True:
        best, best_gain = None, 0.0
        for name, opts in options.items():
            current = choice[name]
            for option in opts:
                extra = option.cost_bits - current.cost_bits
                if option.error < current.error and extra <= left:
                    gain = (current.error - option.error) / max(extra, 1)
                    if gain > best_gain:
                        best, best_gain = (name, option), gain
        if best is None:
            return choice
        left -= best[1].cost_bits - choice[best[0]].cost_bits
        choice[best[0]] = best[1]


def allocate_widths(
    config: SuperWeightConfig,
    linears: Mapping[str, nn.Linear],
    coordinates: Mapping[str, Sequence[tuple[int, int]]],
    energies: Mapping[str, torch.Tensor] | None,
    gradients: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, int]]:
    """Each layer's ``{"bits", "group_size"}`` within ``config.target_bits_per_weight`` (what ``module_widths``
    records), from its sensitivity on the calibration statistics ``energies`` (and, for ``SENSITIVITY = "loss"``, the
    outputs' loss ``gradients`` of :func:`collect_output_gradients`).

    >>> allocate_widths(SuperWeightConfig(target_bits_per_weight=4.0), linears, coordinates, energies)  # doctest: +SKIP
    {'model.layers.0.self_attn.q_proj': {'bits': 3, 'group_size': 32}, ...}
    """
    target = config.target_bits_per_weight
    if target is None:
        raise ValueError("allocate_widths needs SuperWeightConfig.target_bits_per_weight (a budget in bits per weight).")
    missing = sorted(name for name in linears if energies is None or energies.get(name) is None)
    if missing:
        raise ValueError(f"No calibration statistics for module '{missing[0]}': the allocation's sensitivity reads "
                         "each layer's input mean squares (importance='activations').")
    options = measure_sensitivity(config, linears, coordinates, energies, gradients=gradients)
    weights = sum(linear.weight.numel() for linear in linears.values())
    try:
        choice = allocate(options, target * weights)
    except ValueError as error:
        cheapest = sum(min(o.cost_bits for o in opts) for opts in options.values()) / max(weights, 1)
        raise ValueError(f"SuperWeightConfig.target_bits_per_weight={target!r} is invalid for this model: {error}; "
                         f"accepted is at least {cheapest:.3f} bits/weight here.") from None
    return {name: {"bits": option.bits, "group_size": option.group_size} for name, option in choice.items()}
