"""Quantize time against model size: synthetic Llamas of growing width and depth, the default against round-to-nearest.

Builds random Llama-shaped models (:func:`optimum_superweight.testing.build_tiny_model`, one planted super weight,
given by its coordinates so no detection runs) and times ``quantize_model`` with the default config (calibration
pass on fixed token ids + weighted HQQ grids) and with round-to-nearest, in one process with torch's default
threads; also the default's code-choosing step alone. Seconds per million linear weights show whether the time
is linear in the weights. Prints a table and writes ``benchmarks/results/quantize_scaling.json``.

    python3 benchmarks/quantize_scaling.py            # ~5 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

#: (hidden size, intermediate size, decoder layers) of the synthetic models, growing.
SIZES = ((256, 704, 4), (512, 1408, 4), (768, 2048, 4), (512, 1408, 8), (512, 1408, 16))


def scaling_markdown(result: dict) -> str:
    """The scaling section of ``benchmarks/RESULTS.md`` from ``results/quantize_scaling.json``."""
    lines = [
        "## Quantize time against model size (synthetic Llamas)",
        "",
        f"`python3 benchmarks/quantize_scaling.py` ({result['date']}, {result['cpu']}, {result['threads']} torch threads, "
        f"1-minute load average {result['load'][0]:.1f}-{result['load'][1]:.1f}): `quantize_model` of random "
        "Llama-shaped models (super weight given, no detection), one run each, in one process. \"codes\" is the "
        "default's code-choosing step alone (the fitting pool of `tensor/rows.py`); s/M = seconds per million linear "
        "weights.",
        "",
        "| hidden x intermediate x layers | linear weights (M) | default s | s/M | codes s | s/M | round-to-nearest s | s/M |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        m = r["weights"] / 1e6
        lines.append(
            f"| {r['hidden']} x {r['intermediate']} x {r['layers']} | {m:.1f} | {r['default_s']:.1f} | "
            f"{r['default_s'] / m:.2f} | {r['codes_s']:.1f} | {r['codes_s'] / m:.2f} | {r['rtn_s']:.1f} | {r['rtn_s'] / m:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _model(hidden: int, intermediate: int, layers: int):
    from optimum_superweight.testing import build_tiny_model

    return build_tiny_model("llama", super_weights=[(1, 5, 7)], hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, head_dim=hidden // 4)


def _timed_quantize(model, options: dict) -> tuple[float, float]:
    """Seconds of ``quantize_model`` and of its code-choosing step."""
    from optimum_superweight import SuperWeightConfig, quantize_model
    from optimum_superweight.models import replace

    config = SuperWeightConfig(super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}], **options)
    original, spent = replace.choose_codes, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    replace.choose_codes = timed
    try:
        start = time.perf_counter()
        quantize_model(model, config)
        return time.perf_counter() - start, sum(spent)
    finally:
        replace.choose_codes = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "quantize_scaling.json")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from optimum_superweight.kernels.guard import cpu_name

    hf_logging.disable_progress_bar()
    rows, loads = [], []
    for hidden, intermediate, layers in SIZES:
        model = _model(hidden, intermediate, layers)
        weights = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith("model.layers."))
        default_s, codes_s = _timed_quantize(model, {})
        rtn_s, _ = _timed_quantize(_model(hidden, intermediate, layers), {"method": "rtn"})
        loads.append(os.getloadavg()[0])
        rows.append({"hidden": hidden, "intermediate": intermediate, "layers": layers, "weights": weights,
                     "default_s": default_s, "codes_s": codes_s, "rtn_s": rtn_s})
        print(f"  {hidden} x {intermediate} x {layers}: {weights / 1e6:.1f} M weights, default {default_s:.1f} s "
              f"(codes {codes_s:.1f} s), rtn {rtn_s:.1f} s, load {loads[-1]:.1f}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "load": [min(loads), max(loads)], "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(scaling_markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
