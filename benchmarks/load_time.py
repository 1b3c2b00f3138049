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
    python3 benchmarks/load_time.py --rows rtn default default-serial --busy 2 --output results/load_time_busy.json
    python3 benchmarks/load_time.py --rows rtn default --no-steps --output benchmarks/results/load_time_issue23.json
        # issue 23's check: the default against round-to-nearest with torch's default threads (goal: <= x3)

``--rows`` picks rows by key (:data:`CONFIGS`); ``default-serial`` is the default with the row blocks fitted one
after the other on torch's own threads (how codes were chosen before the fitting pool of
:mod:`optimum_superweight.tensor.rows`), for a before/after in one run. ``--busy N`` adds N busy-looping
processes for the whole run (a loaded machine); the 1-minute load average is recorded with every load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent

#: The rows: key -> (label, SuperWeightConfig keywords).
CONFIGS: dict[str, tuple[str, dict]] = {
    "rtn": ("round-to-nearest, `SuperWeightConfig(method=\"rtn\")` (the previous default)", {"method": "rtn"}),
    "data-free": ("data-free HQQ grids, `SuperWeightConfig(importance=\"none\")`", {"importance": "none"}),
    "default": ("**the default, `SuperWeightConfig()`** (grids weighted by activations)", {}),
    "default-serial": ("the default, blocks fitted one after the other on torch's threads (before issue 23)", {}),
    "low-memory": ("the default, `low_memory=True` (data-free grids while loading)", {"low_memory": True}),
    "gptq": ("GPTQ, `SuperWeightConfig(method=\"gptq\")` (8,192 calibration tokens, whole Hessians)", {"method": "gptq"}),
}
#: Rows measured when ``--rows`` is not given.
DEFAULT_ROWS = ("rtn", "data-free", "default", "low-memory", "gptq")


def load_time_markdown(result: dict, heading: str = "## Quantize-on-load time") -> str:
    """The quantize-on-load section of ``benchmarks/RESULTS.md`` from ``results/load_time.json``."""
    base = result["rows"][0]["median_s"]
    busy = result.get("busy", 0)
    load = result.get("load")
    condition = ""
    if load:
        condition = (f", 1-minute load average {load['min']:.1f}-{load['max']:.1f} during the loads"
                     + (f" with {busy} extra busy-looping processes" if busy else ""))
    lines = [
        heading,
        "",
        f"`python3 benchmarks/load_time.py` ({result['date']}, {result['cpu']}, {result['threads']} torch threads"
        f"{condition}): "
        f"`from_pretrained` of SmolLM2-135M-Instruct (float32 folder, warm file cache) with each configuration, "
        f"detection included, rotated in one process; medians of {result['reps']} loads. Ratios are to "
        f"{result['rows'][0]['label'].split(',')[0]} in the same run.",
        "",
        "| configuration | load s (median) | min s | x first row |",
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
def _serial_fitting(serial: bool):
    """With ``serial``, fit the row blocks one after the other on torch's threads (the path before the pool)."""
    from optimum_superweight.tensor import rows

    original = rows.fitting_workers
    if serial:
        rows.fitting_workers = lambda blocks: 1
    try:
        yield
    finally:
        rows.fitting_workers = original


@contextlib.contextmanager
def _busy_processes(count: int):
    """``count`` processes that spin a core each until the block ends (a loaded machine)."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


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
    parser.add_argument("--rows", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_ROWS),
                        help="rows to measure (the first is the ratios' base)")
    parser.add_argument("--busy", type=int, default=0, help="extra busy-looping processes during the loads")
    parser.add_argument("--no-steps", action="store_true", help="skip the extra load with step timers")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "load_time.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import optimum_superweight  # noqa: F401 - registers the quantizer with transformers
    from optimum_superweight import SuperWeightConfig, default_model_path
    from optimum_superweight.kernels.guard import cpu_name

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = default_model_path()
    AutoModelForCausalLM.from_pretrained(path)  # warm the file cache (the model is dropped)
    keys = list(args.rows)
    times: dict[str, list[float]] = {key: [] for key in keys}
    loads: list[float] = []
    steps: dict[str, float] = {}
    with _busy_processes(args.busy):
        for rep in range(args.reps):
            for key in keys[rep % len(keys):] + keys[: rep % len(keys)]:
                label, options = CONFIGS[key]
                start = time.perf_counter()
                with _serial_fitting(key == "default-serial"):
                    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig(**options))
                times[key].append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
                del model
                print(f"  {times[key][-1]:6.1f} s  load {loads[-1]:.1f}  {label}", flush=True)
                # After every load: a run stopped early (hours under heavy load) still leaves what it measured.
                _write(args.output, _result(args, keys, times, loads, steps, cpu_name()))
        if not args.no_steps:
            with _step_timers(steps):
                start = time.perf_counter()
                AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig())
                steps = {"total": time.perf_counter() - start, **steps}
    result = _result(args, keys, times, loads, steps, cpu_name())
    _write(args.output, result)
    print(load_time_markdown(result))
    print(f"wrote {args.output}")


def _result(args, keys, times, loads, steps, cpu) -> dict:
    """The JSON of the loads measured so far (``reps``: the complete repetitions; rows with no load are left out)."""
    rows = [{"label": CONFIGS[key][0], "key": key, "config": CONFIGS[key][1], "median_s": statistics.median(times[key]),
             "min_s": min(times[key]), "times_s": times[key]} for key in keys if times[key]]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "threads": torch.get_num_threads(),
            "reps": min(len(t) for t in times.values()), "rows": rows, "steps": steps, "busy": args.busy,
            "load": {"min": min(loads), "max": max(loads), "each": loads}}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
