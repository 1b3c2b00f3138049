"""Are the reference weights already on a 4-bit grid, and how much of it does a data-free fit find?

The quality benchmarks' reference models come from GGUF files (SmolLM2: Q4_1; Gemma 3 and Qwen2.5-Coder: Q4_K_M),
dequantized. For each decoder linear matrix this prints how many distinct values a block of 32 holds
(:func:`suite.lattice.grid_levels`: 16 or fewer on a 4-bit block grid) and the weight error of the package's
data-free 4-bit g64 fit relative to round-to-nearest on the min-max grid (both ``hqq_quantize_weight``, the
first ``--rows`` rows), summed by matrix class (on a 4-bit grid or not).

    python3 benchmarks/reference_lattice.py --models smollm2,gemma3,qwen_coder

Writes ``benchmarks/results/reference_lattice.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from importance_sinks import _model_path  # noqa: E402
from suite.lattice import grid_levels  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "reference_lattice.json"


def _relative_error(weight: torch.Tensor, **options: Any) -> float:
    from optimum_superweight.tensor.hqq import hqq_quantize_weight

    dense = hqq_quantize_weight(weight, bits=4, group_size=64, **options).dequantize(torch.float32)
    return float((dense - weight).pow(2).sum() / weight.pow(2).sum())


def measure(key: str, rows: int) -> dict[str, Any]:
    from safetensors import safe_open

    path = _model_path(key) / "model.safetensors"
    matrices = []
    with safe_open(str(path), "pt") as tensors:
        for name in tensors.keys():
            if not (".layers." in name and name.endswith("proj.weight")):
                continue
            weight = tensors.get_slice(name)[:rows].to(torch.float32)
            rtn = _relative_error(weight, iters=0)
            levels = grid_levels(weight)
            matrices.append({"name": name, "levels_per_32": levels,
                             "rtn": rtn, "data_free": _relative_error(weight), "on_4bit_grid": levels <= 16})
    classes = {}
    for on_grid in (True, False):
        group = [m for m in matrices if m["on_4bit_grid"] == on_grid]
        if group:
            classes["on a 4-bit grid" if on_grid else "not on a 4-bit grid"] = {
                "matrices": len(group),
                "median_levels_per_32": statistics.median(m["levels_per_32"] for m in group),
                "median_data_free_over_rtn": statistics.median(m["data_free"] / m["rtn"] for m in group),
            }
    return {"source": str(path.parent), "rows_per_matrix": rows, "classes": classes, "matrices": matrices}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3,qwen_coder")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "models": {}}
    print("| model | matrices | blocks of 32: median distinct values | data-free error / round-to-nearest error (median) |")
    print("|---|---:|---:|---:|")
    for key in args.models.split(","):
        result["models"][key] = measured = measure(key, args.rows)
        for label, c in measured["classes"].items():
            print(f"| {key}, {label} | {c['matrices']} | {c['median_levels_per_32']:.0f} | x{c['median_data_free_over_rtn']:.2f} |")
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
