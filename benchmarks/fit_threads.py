"""Choosing codes on a busy machine: the fitting pool against the blocks one after the other, same process, rotated.

Chooses the default's codes (HQQ grids weighted by activations) for the projections of the first decoder layers
of SmolLM2-135M-Instruct (with each input channel's mean squared activation from a calibration pass) three ways:
the row blocks one after the other on torch's default threads (how codes were chosen before the pool of
:mod:`optimum_superweight.tensor.rows`), the same on one thread (``OMP_NUM_THREADS=1``), and the pool (one intra-op
thread per worker, as many workers as torch has threads). The three ways are rotated within each repetition and
their codes compared bit for bit. ``--busy N`` adds N busy-looping processes; the 1-minute load average is
recorded. Prints a table and writes ``benchmarks/results/fit_threads.json`` (or ``--output``).

    python3 benchmarks/fit_threads.py --layers 1 --reps 2
    python3 benchmarks/fit_threads.py --layers 1 --reps 2 --busy 2 --output benchmarks/results/fit_threads_busy.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_time import _busy_processes  # noqa: E402  (one owner of the synthetic load)

ROOT = Path(__file__).resolve().parent

WAYS = ("serial, torch's threads (before)", "serial, one thread", "pool (after)")


def fit_threads_markdown(result: dict) -> str:
    """A table of ``results/fit_threads*.json``."""
    base = result["rows"][-1]["median_s"]
    busy = f" with {result['busy']} extra busy-looping processes" if result["busy"] else ""
    lines = [
        f"`python3 benchmarks/fit_threads.py --layers {result['layers']} --reps {result['reps']}"
        f"{' --busy ' + str(result['busy']) if result['busy'] else ''}` ({result['date']}, {result['cpu']}, "
        f"{result['threads']} torch threads, 1-minute load average {result['load'][0]:.1f}-{result['load'][1]:.1f}{busy}): "
        f"the default's codes for {result['matrices']} SmolLM2 projections ({result['weights'] / 1e6:.1f} M weights), "
        f"medians of {result['reps']} rotated runs; codes identical in every way: {result['identical']}.",
        "",
        "| way | s (median) | min s | x pool |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['way']} | {r['median_s']:.1f} | {r['min_s']:.1f} | x{r['median_s'] / base:.1f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _layers(first_layers: int):
    """The projections of the first decoder layers with their calibration statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_superweight import default_model_path
    from optimum_superweight.models.calibration import collect_input_energy, model_calibration_ids
    from optimum_superweight.tensor.rows import LayerWeight

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n.startswith(f"model.layers.{i}.") for i in range(first_layers))]
    ids, bos = model_calibration_ids(model, AutoTokenizer.from_pretrained(path), 2048)
    energy = collect_input_energy(model, names, ids, bos_id=bos)
    modules = dict(model.named_modules())
    return {n: LayerWeight(modules[n].weight.detach().clone(), [], energy[n]) for n in names}


def _same(a, b) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip((a.packed, a.scale, a.zero_point, a.offset), (b.packed, b.scale, b.zero_point, b.offset)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers whose projections are quantized")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "fit_threads.json")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.kernels.guard import cpu_name
    from optimum_superweight.tensor.rows import quantize_layers

    hf_logging.disable_progress_bar()
    layers = _layers(args.layers)
    config = SuperWeightConfig()
    threads = torch.get_num_threads()
    runs = {
        WAYS[0]: lambda: quantize_layers(layers, config, workers=1),
        WAYS[1]: lambda: _one_thread(layers, config),
        WAYS[2]: lambda: quantize_layers(layers, config),
    }
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    codes, loads, identical = {}, [], True
    with _busy_processes(args.busy):
        for rep in range(args.reps):
            for way in WAYS[rep % 3:] + WAYS[: rep % 3]:
                start = time.perf_counter()
                got = runs[way]()
                times[way].append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
                print(f"  {times[way][-1]:7.1f} s  load {loads[-1]:.1f}  {way}", flush=True)
                reference = codes.setdefault("first", got)
                identical &= all(_same(reference[n], got[n]) for n in layers)
    rows = [{"way": way, "median_s": statistics.median(times[way]), "min_s": min(times[way]), "times_s": times[way]}
            for way in WAYS]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": threads, "reps": args.reps,
              "layers": args.layers, "matrices": len(layers), "busy": args.busy, "identical": identical,
              "weights": sum(layer.weight.numel() for layer in layers.values()),
              "load": [min(loads), max(loads)], "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(fit_threads_markdown(result))
    print(f"wrote {args.output}")


def _one_thread(layers, config):
    from optimum_superweight.tensor.rows import quantize_layers

    with _threads(1):
        return quantize_layers(layers, config, workers=1)


if __name__ == "__main__":
    main()
