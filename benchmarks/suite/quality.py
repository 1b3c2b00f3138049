"""Quality: perplexity ratio to full precision and effective bits per weight, side by side.

Every method quantizes the same matrices: the decoder linear layers this package converts (the tied
``lm_head``/embeddings stay in full precision for all of them). Bits per weight count everything stored
per quantized matrix (codes, scales, zero-points, exact super weights and their indices) over the number
of weights of those matrices.

- ``superweight``: this package, ``quantize_model`` with ``SuperWeightConfig(bits, group_size)`` defaults
  and the detected super weights (the real ``SuperWeightLinear`` modules are evaluated).
- ``rtn``: the same group quantization (``optimum_superweight.tensor.quantize``) with no held-out
  coordinates, dequantized into the dense model (simulated): plain RTN without super-weight handling.
- ``flat``: the paper's weight-quantization setting, simulated: asymmetric min-max RTN over flat 1-D blocks
  of the row-major matrix (fp16 scale and offset per block), with and without the super weight held out
  of the block statistics and restored exactly, and with a per-block clip of the range chosen either by
  weight MSE (data-free) or by the block's *output* error under the calibration second moment.
- ``superweight ... (rtn+output clip)``: the package's activation-aware clip search
  (``SuperWeightConfig(clip_search=True, clip_objective="output")``: per group, the clip ratio minimising
  ``(w - q)ᵀ H (w - q)``), super weights held out and exact, real modules.

Calibrated rows (``output clip``, GPTQ) use ``E[x xᵀ]`` of every layer's inputs on the *end* of the
built-in text (8192 tokens, windows of 512 + BOS), disjoint from the evaluated tokens; collected once.
- ``bnb``: bitsandbytes NF4 / FP4 (``quantize_4bit``/``dequantize_4bit``, blocksize 64, absmax fp32) and
  int8 (``int8_vectorwise_quant``: per-row absmax; the LLM.int8() fp16 path for activation outliers is a
  runtime feature and is not simulated), quantize -> dequantize into the dense model (simulated).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from optimum_superweight import SuperWeightConfig
from optimum_superweight.evaluation import perplexity
from optimum_superweight.models.replace import modules_to_convert, quantize_model, resolve_modules_to_not_convert
from optimum_superweight.nn.linear import SuperWeightLinear
from optimum_superweight.records import SuperWeight
from optimum_superweight.tensor.quantize import dequantize_weight, quantize_weight, restore_exact

#: (bits, group_size) settings of the default run; -1 = one group per output row (per channel).
FULL_SETTINGS: tuple[tuple[int, int], ...] = ((8, -1), (8, 128), (4, 64), (4, 128), (4, -1), (3, 64), (3, 128))
QUICK_SETTINGS: tuple[tuple[int, int], ...] = ((8, -1), (4, 32), (4, -1), (3, 32))
#: The paper's smallest flat block (128 x 128 elements) at 4 bits.
FULL_FLAT_BLOCKS: tuple[int, ...] = (16384,)
QUICK_FLAT_BLOCKS: tuple[int, ...] = (1024,)


@dataclass
class QualityRow:
    method: str
    setting: str
    bits: float | None
    group_size: int | None
    bits_per_weight: float
    ppl: float
    ratio: float
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The matrices this package converts, so every method quantizes exactly the same weights."""
    config = SuperWeightConfig(bits=4)
    return modules_to_convert(model, resolve_modules_to_not_convert(model, config))


@contextmanager
def replaced_weights(modules: dict[str, torch.nn.Module], transform: Callable[[str, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Swap each module's weight for ``transform(name, weight)`` and put the original tensors back afterwards."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, module in modules.items():
                saved[name] = module.weight.data
                module.weight.data = transform(name, module.weight.data).to(saved[name].dtype)
        yield
    finally:
        for name, tensor in saved.items():
            modules[name].weight.data = tensor


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ---- simulated quantizers (return the dequantized weight and the bytes they would store) ----------------


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    q = quantize_weight(weight, bits=bits, group_size=group_size, symmetric=True)
    dense = dequantize_weight(q.packed, q.scale, q.zero_point, q.layout, symmetric=True, dtype=torch.float32)
    return dense, _bytes(q.packed, q.scale, q.zero_point)


#: Clip factors tried per flat block by ``flat_blocks(..., clip=True)`` (the block's range shrunk towards 0).
FLAT_CLIP_GRID: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def _block_output_error(error: torch.Tensor, hessian: torch.Tensor, block: int, n_blocks: int) -> torch.Tensor:
    """Per flat block ``b``: ``Σ_rows e_{r,b}ᵀ H e_{r,b}``, the output error of the block's own weights.

    ``error`` is ``[out, in]`` and ``e_{r,b}`` is row ``r``'s error restricted to block ``b``. A row meets
    consecutive blocks; splitting the error into even and odd blocks keeps every row's pieces apart (exact
    when ``block >= in_features``, as in the paper's settings), so two matmuls give every block's error.
    """
    out, inn = error.shape
    block_of = (torch.arange(out * inn, device=error.device) // block).reshape(out, inn)
    even = (block_of % 2) == 0
    e_even = torch.where(even, error, 0.0)
    e_odd = error - e_even
    per_element = e_even * (e_even @ hessian) + e_odd * (e_odd @ hessian)
    flat = torch.nn.functional.pad(per_element.flatten(), (0, n_blocks * block - out * inn))
    return flat.reshape(n_blocks, block).sum(dim=1, keepdim=True)


def _flat_grid(low: torch.Tensor, high: torch.Tensor, qmax: int, block: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight ``[out, in]`` fp16-rounded scale and integer zero-point of flat blocks with ranges ``[low, high]``."""
    scale = ((high - low) / qmax).to(torch.float16).to(torch.float32).clamp(min=1e-8)
    zero = torch.round(-low.clamp(max=0.0) / scale).clamp(0, qmax)
    n = shape[0] * shape[1]
    per_weight = lambda t: t.expand(-1, block).flatten()[:n].reshape(shape)  # noqa: E731
    return per_weight(scale), per_weight(zero)


def flat_blocks(weight: torch.Tensor, bits: int, block: int, holdout: list[tuple[int, int]],
                clip: bool = False, hessian: torch.Tensor | None = None, gptq: bool = False) -> tuple[torch.Tensor, int]:
    """Asymmetric min-max RTN over flat 1-D blocks of the row-major matrix (the authors' simulated setting).

    ``holdout`` coordinates are left out of the block statistics and restored exactly. ``clip=True`` shrinks
    each block's ``[min, max]`` by the factor of :data:`FLAT_CLIP_GRID` with the least error on the block
    (held-out weights count as exact): without ``hessian`` the squared weight error — the paper's "clip the
    other outliers", data-free; with ``hessian`` (``E[x xᵀ]`` of the layer's inputs, ``[in, in]``) the
    block's output error (:func:`_block_output_error`) — activation-aware clipping, calibrated.
    ``gptq=True`` (needs ``hessian``) keeps each block's (clipped) range and lets GPTQ error feedback choose the
    codes (``gptq_fixed_grid``; integer zero-points instead of the fp16 offset, same storage).
    """
    if gptq and hessian is None:
        raise ValueError("flat_blocks(gptq=True) needs the layer's hessian.")
    flat = weight.detach().to(torch.float32).flatten()
    n = flat.numel()
    pad = (-n) % block
    values = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    excluded = torch.zeros_like(values, dtype=torch.bool)
    excluded.view(-1)[n:] = True
    cols = weight.shape[1]
    for row, col in holdout:
        excluded.view(-1)[row * cols + col] = True
    lo = torch.where(excluded, torch.inf, values).amin(dim=1, keepdim=True)
    hi = torch.where(excluded, -torch.inf, values).amax(dim=1, keepdim=True)
    qmax = 2**bits - 1

    def rounded(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        scale = ((high - low) / qmax).to(torch.float16).to(torch.float32).clamp(min=1e-8)
        low = low.to(torch.float16).to(torch.float32)
        return torch.round((values - low) / scale).clamp(0, qmax) * scale + low

    chosen = torch.ones_like(lo)  # clip factor per block
    if clip:
        best, best_err = None, None
        for factor in FLAT_CLIP_GRID:
            candidate = rounded(lo * factor, hi * factor)
            diff = torch.where(excluded, 0.0, values - candidate)
            if hessian is None:
                err = (diff**2).sum(dim=1, keepdim=True)
            else:
                err = _block_output_error(diff.flatten()[:n].reshape(weight.shape), hessian.to(torch.float32),
                                          block, values.shape[0])
            if best is None:
                best, best_err = candidate, err
            else:
                better = err < best_err
                best = torch.where(better, candidate, best)
                best_err = torch.where(better, err, best_err)
                chosen = torch.where(better, factor, chosen)
        dequantized = best
    else:
        dequantized = rounded(lo, hi)
    dense = dequantized.flatten()[:n].reshape(weight.shape)
    if gptq:
        from optimum_superweight.tensor.gptq import gptq_fixed_grid

        scale, zero = _flat_grid(lo * chosen, hi * chosen, qmax, block, weight.shape)
        indices = torch.tensor(holdout, dtype=torch.long).reshape(-1, 2)
        dense = gptq_fixed_grid(weight, hessian, scale, zero, bits=bits, holdout=indices)
    for row, col in holdout:
        dense[row, col] = weight[row, col].float()
    stored = math.ceil(n * bits / 8) + values.shape[0] * 4 + len(holdout) * 12
    return dense, stored


def bnb_4bit(weight: torch.Tensor, quant_type: str, blocksize: int = 64) -> tuple[torch.Tensor, int]:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(weight.detach().to(torch.float32).contiguous(), blocksize=blocksize, quant_type=quant_type)
    dense = F.dequantize_4bit(packed, state).to(torch.float32)
    return dense, _bytes(packed, state.absmax)


def bnb_int8(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    import bitsandbytes.functional as F

    codes, row_stats, _ = F.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    dense = F.int8_vectorwise_dequant(codes, row_stats).to(torch.float32)
    return dense, _bytes(codes, row_stats)


# ---- the sweep ------------------------------------------------------------------------------------------


class QualitySweep:
    """Runs every quality row on one full-precision model, restoring it after each simulated method."""

    def __init__(self, model, tokenizer, super_weights: list[SuperWeight], *, max_tokens: int, window: int,
                 batch_size: int, log: Callable[[str], None] = print) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.super_weights = super_weights
        self.eval_kwargs = dict(max_tokens=max_tokens, window=window, batch_size=batch_size)
        self.log = log
        self.modules = target_modules(model)
        self.n_weights = sum(m.weight.numel() for m in self.modules.values())
        self.rows: list[QualityRow] = []
        self.reference_ppl: float | None = None
        self._hessians: dict[str, torch.Tensor] | None = None

    def hessians(self) -> dict[str, torch.Tensor]:
        """``E[x xᵀ]`` of every target layer's inputs on the calibration text (collected once, then shared)."""
        if self._hessians is None:
            from optimum_superweight.models.calibration import calibration_token_ids, collect_hessians

            start = time.perf_counter()
            ids = calibration_token_ids(self.tokenizer, 8192, vocab_size=getattr(self.model.config, "vocab_size", None))
            bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
            self._hessians = collect_hessians(self.model, list(self.modules), ids, bos_id=bos)
            self.log(f"  calibration statistics: {len(ids)} tokens, {len(self._hessians)} layers "
                     f"({time.perf_counter() - start:.0f} s)")
        return self._hessians

    def _holdouts(self) -> dict[str, list[tuple[int, int]]]:
        holdouts: dict[str, list[tuple[int, int]]] = {}
        for sw in self.super_weights:
            holdouts.setdefault(sw.module, []).append((sw.row, sw.col))
        return holdouts

    def _ppl(self, model) -> float:
        return perplexity(model, self.tokenizer, **self.eval_kwargs).ppl

    def _add(self, method: str, setting: str, bits: float | None, group_size: int | None, stored_bits: float,
             ppl: float, seconds: float, note: str = "", **extra: Any) -> QualityRow:
        ratio = ppl / self.reference_ppl if self.reference_ppl else 1.0
        row = QualityRow(method=method, setting=setting, bits=bits, group_size=group_size,
                         bits_per_weight=stored_bits, ppl=ppl, ratio=ratio, seconds=seconds, note=note, extra=extra)
        self.rows.append(row)
        self.log(f"  {method:<12} {setting:<28} {stored_bits:6.3f} bpw  ppl {ppl:10.3f}  x{ratio:.3f}  ({seconds:.0f} s)")
        return row

    def reference(self) -> None:
        start = time.perf_counter()
        self.reference_ppl = self._ppl(self.model)
        self._add("float32", "full precision", 32, None, 32.0, self.reference_ppl, time.perf_counter() - start)
        start = time.perf_counter()
        bf16 = copy.deepcopy(self.model).to(torch.bfloat16)
        ppl = self._ppl(bf16)
        del bf16
        self._add("bfloat16", "cast", 16, None, 16.0, ppl, time.perf_counter() - start)

    def zeroed_super_weight(self) -> None:
        """The super weights zeroed and nothing else: the damage the package prevents (paper Table 1)."""
        by_module: dict[str, list[tuple[int, int]]] = {}
        for sw in self.super_weights:
            by_module.setdefault(sw.module, []).append((sw.row, sw.col))
        modules = {name: self.model.get_submodule(name) for name in by_module}

        def zero(name: str, weight: torch.Tensor) -> torch.Tensor:
            out = weight.clone()
            for row, col in by_module[name]:
                out[row, col] = 0.0
            return out

        start = time.perf_counter()
        with replaced_weights(modules, zero):
            ppl = self._ppl(self.model)
        self._add("ablation", "super weights zeroed", 32, None, 32.0, ppl, time.perf_counter() - start,
                  note="nothing quantized")

    def superweight(self, bits: int, group_size: int, **options: Any) -> None:
        start = time.perf_counter()
        method = options.pop("method", "rtn")  # the suite's rows are RTN / clip / GPTQ variants of a symmetric grid
        config = SuperWeightConfig(bits=bits, group_size=group_size, super_weights=[sw.to_dict() for sw in self.super_weights],
                                   method=method, **options)
        # Calibrated options reuse the sweep's statistics (same text, same numbers, collected once).
        calibrated = config.method == "gptq" or (config.clip_search and config.clip_objective == "output")
        quantized = quantize_model(copy.deepcopy(self.model), config, tokenizer=self.tokenizer,
                                   hessians=self.hessians() if calibrated else None)
        layers = [m for m in quantized.modules() if isinstance(m, SuperWeightLinear)]
        stored = sum(m.storage_bytes() for m in layers)
        n_weights = sum(m.in_features * m.out_features for m in layers)
        ppl = self._ppl(quantized)
        del quantized
        label = f"int{bits} sym {'per-channel' if group_size == -1 else f'g{group_size}'}"
        output = config.clip_search and config.clip_objective == "output"
        method_note = config.method + ("+output clip" if output else "+clip" if config.clip_search else "")
        if options or method != "rtn":
            label += f" ({method_note})"
        self._add("superweight", label, bits, group_size, 8 * stored / n_weights, ppl, time.perf_counter() - start,
                  note=f"package ({method_note}), {len(self.super_weights)} super weight(s) exact", layers=len(layers))

    def _simulated(self, method: str, label: str, bits: float, group_size: int | None,
                   quantizer: Callable[[str, torch.Tensor], tuple[torch.Tensor, int]], note: str) -> None:
        start = time.perf_counter()
        stored = [0]

        def transform(name: str, weight: torch.Tensor) -> torch.Tensor:
            dense, nbytes = quantizer(name, weight)
            stored[0] += nbytes
            return dense

        with replaced_weights(self.modules, transform):
            ppl = self._ppl(self.model)
        self._add(method, label, bits, group_size, 8 * stored[0] / self.n_weights, ppl, time.perf_counter() - start, note=note)

    def plain_rtn(self, bits: int, group_size: int) -> None:
        label = f"int{bits} sym {'per-channel' if group_size == -1 else f'g{group_size}'}"
        self._simulated("rtn", label, bits, group_size, lambda name, w: rtn(w, bits, group_size),
                        "plain RTN, no super-weight handling (simulated)")

    def flat(self, bits: int, block: int, hold_out: bool, clip: bool = False, output_clip: bool = False,
             gptq: bool = False) -> None:
        """Paper's flat blocks; ``clip``: per-block weight-MSE clip; ``output_clip``: per-block output-error clip;
        ``gptq``: GPTQ error feedback chooses the codes on the (clipped) block grid (one sweep per matrix)."""
        holdouts = self._holdouts() if hold_out else {}
        hessians = self.hessians() if (output_clip or gptq) else {}
        label = f"int{bits} asym flat block {block}" + (" SW out" if hold_out else "")
        label += " + output clip" if output_clip else " + clip" if clip else ""
        label += " + GPTQ" if gptq else ""
        note = "paper's 1-D blocks, simulated" + ("; super weight held out and restored" if hold_out else "; plain")
        if output_clip:
            note += "; per-block clip of the range (x1.0-0.3) minimising the block's output error (calibrated)"
        elif clip:
            note += "; per-block MSE clip of the range (x1.0-0.3)"
        if gptq:
            note += "; GPTQ codes on that grid (calibrated)"
        self._simulated("flat", label, bits, block,
                        lambda name, w: flat_blocks(w, bits, block, holdouts.get(name, []), clip=clip or output_clip,
                                                    hessian=hessians.get(name), gptq=gptq), note)

    def bnb(self) -> None:
        for quant_type in ("nf4", "fp4"):
            self._simulated("bnb", f"{quant_type.upper()} blocksize 64", 4, 64, lambda name, w, q=quant_type: bnb_4bit(w, q),
                            "bitsandbytes quantize_4bit -> dequantize_4bit (simulated)")
        self._simulated("bnb", "int8 per-row absmax", 8, -1, lambda name, w: bnb_int8(w),
                        "bitsandbytes int8_vectorwise_quant -> dequant (simulated; LLM.int8 outlier path not modelled)")


#: ``--variants``: extra package rows with non-default ``SuperWeightConfig`` options, at these settings.
VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {"clip_search": True},
    "output-clip": {"clip_search": True, "clip_objective": "output"},
    "gptq": {"method": "gptq", "clip_search": True},
}
VARIANT_SETTINGS: tuple[tuple[int, int], ...] = ((4, 64), (4, 128), (3, 64), (3, 128))


def run_quality(model, tokenizer, super_weights: list[SuperWeight], *, quick: bool, max_tokens: int, window: int,
                batch_size: int, variants: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    sweep = QualitySweep(model, tokenizer, super_weights, max_tokens=max_tokens, window=window, batch_size=batch_size, log=log)
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    blocks = QUICK_FLAT_BLOCKS if quick else FULL_FLAT_BLOCKS
    sweep.reference()
    sweep.zeroed_super_weight()
    for bits, group_size in settings:
        sweep.superweight(bits, group_size)
        sweep.plain_rtn(bits, group_size)
    # Coarse blocks: per-channel with activation-aware clipping (the paper's setting is the flat rows below),
    # and per-channel GPTQ through the package (real SuperWeightLinear modules).
    sweep.superweight(4, -1, clip_search=True, clip_objective="output")
    if not quick:
        sweep.superweight(4, -1, method="gptq", clip_search=True)
    for variant in variants:
        for bits, group_size in (QUICK_SETTINGS[1:2] if quick else VARIANT_SETTINGS):
            sweep.superweight(bits, group_size, **VARIANTS[variant])
    for block in blocks:
        sweep.flat(4, block, hold_out=False)
        sweep.flat(4, block, hold_out=True)
        sweep.flat(4, block, hold_out=True, clip=True)
        sweep.flat(4, block, hold_out=True, output_clip=True)
        sweep.flat(4, block, hold_out=True, output_clip=True, gptq=True)
    sweep.bnb()
    return {
        "protocol": {**sweep.eval_kwargs, "text": "pydoc_data.topics (built-in)", "bos": True},
        "quantized_matrices": len(sweep.modules),
        "quantized_weights": sweep.n_weights,
        "reference_ppl": sweep.reference_ppl,
        "rows": [row.to_dict() for row in sweep.rows],
    }
