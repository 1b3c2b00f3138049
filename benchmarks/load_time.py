"""Quantize-on-load time of the default against round-to-nearest, side by side (SmolLM2-135M-Instruct, warm cache).

Times ``AutoModelForCausalLM.from_pretrained(path, quantization_config=...)`` end to end in this process
(reading the float32 weights, super-weight detection with confirmation, calibration where the method reads it,
choosing the codes, building the modules), rotating the configurations so that none always follows the same
one, and reports the median of each and its ratio to round-to-nearest measured in the same run: these machines
are shared, so only ratios of one run mean anything. Also splits the default's time into its steps (detection,
the calibration pass, the data-free grids, the weighted refinement) from one extra load with timers on them.
Prints a table and writes ``benchmarks/results/load_time.json``, which ``benchmarks/run.py --report-only``
renders into ``benchmarks/RESULTS.md``.

    python3 benchmarks/load_time.py              # ~6 min on 2 cores (3 x 5 loads + 1)
    python3 benchmarks/load_time.py --reps 1     # quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

#: The rows: label -> SuperWeightConfig keywords.
CONFIGS: dict[str, dict] = {
    "round-to-nearest, `SuperWeightConfig(method=\"rtn\")` (the previous default)": {"method": "rtn"},
    "data-free HQQ grids, `SuperWeightConfig(importance=\"none\")`": {"importance": "none"},
    "**the default, `SuperWeightConfig()`** (grids weighted by activations)": {},
    "the default, `low_memory=True` (data-free grids while loading)": {"low_memory": True},
    "GPTQ, `SuperWeightConfig(method=\"gptq\")` (8,192 calibration tokens, whole Hessians)": {"method": "gptq"},
}


def load_time_markdown(result: dict) -> str:
    """The quantize-on-load section of ``benchmarks/RESULTS.md`` from ``results/load_time.json``."""
    base = result["rows"][0]["median_s"]
    lines = [
        "## Quantize-on-load time",
        "",
        f"`python3 benchmarks/load_time.py` ({result['date']}, {result['cpu']}, {result['threads']} torch threads): "
        f"`from_pretrained` of SmolLM2-135M-Instruct (float32 folder, warm file cache) with each configuration, "
        f"detection included, rotated in one process; medians of {result['reps']} loads. Ratios are to "
        "round-to-nearest in the same run.",
        "",
        "| configuration | load s (median) | min s | x round-to-nearest |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['label']} | {r['median_s']:.1f} | {r['min_s']:.1f} | x{r['median_s'] / base:.2f} |"
              for r in result["rows"]]
    steps = result.get("steps")
    if steps:
        lines += ["", "Where the default's load time goes (one extra load with timers): "
                  + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items()) + "."]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _step_timers(totals: dict[str, float]):
    """Add the time spent in the default's steps to ``totals`` (patched module attributes, restored after)."""
    import optimum_superweight.detection as detection  # the quantizer imports run_detection from here at call time
    from optimum_superweight.models import replace
    from optimum_superweight.tensor import hqq

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)
        return owner, name, original

    patched = [
        timed(detection, "run_detection", "detection"),
        timed(replace, "collect_input_energy", "calibration pass"),
        timed(hqq, "fit_group_grids", "data-free grids"),
        timed(hqq, "refine_group_grids", "weighted refinement"),
    ]
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "load_time.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import optimum_superweight  # noqa: F401 - registers the quantizer with transformers
    from optimum_superweight import SuperWeightConfig, default_model_path
    from optimum_superweight.kernels.guard import cpu_name

    hf_logging.set_verbosity_error()
    path = default_model_path()
    AutoModelForCausalLM.from_pretrained(path)  # warm the file cache (the model is dropped)
    labels = list(CONFIGS)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for rep in range(args.reps):
        for label in labels[rep % len(labels):] + labels[: rep % len(labels)]:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig(**CONFIGS[label]))
            times[label].append(time.perf_counter() - start)
            del model
            print(f"  {times[label][-1]:6.1f} s  {label}", flush=True)
    steps: dict[str, float] = {}
    with _step_timers(steps):
        start = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig())
        steps = {"total": time.perf_counter() - start, **steps}
    rows = [{"label": label, "config": CONFIGS[label], "median_s": statistics.median(times[label]),
             "min_s": min(times[label]), "times_s": times[label]} for label in labels]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "reps": args.reps, "rows": rows, "steps": steps}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(load_time_markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
