"""Quantize time against model size on real models: SmolLM2-135M, Gemma 3 270M, Qwen2.5-Coder-1.5B, split by phase.

Times ``AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig())`` (the default:
detection with confirmation, the calibration pass, HQQ grids weighted by activations, building the modules, the
kernel layouts) for each model, each in its own child process (so that each peak resident memory is its own),
with torch's default threads. Timers on the pipeline's steps split the time into phases: reading the float32
weights (everything before the after-load hook), detection, calibration, choosing the codes (the fitting pool of
``tensor/rows.py``), building the modules and kernel layouts. Seconds per million linear weights (those of the
decoder layers) show whether the time is linear in the size. The 1-minute load average and the child's CPU time
(user + system, against its wall time) record how busy the machine was.

Prints a table and writes ``benchmarks/results/quantize_scaling.json``. Models over 4 GB in float32 load under the
shared lock (``flock /work/notes/big.lock`` where that file exists).

    python3 benchmarks/quantize_scaling.py                       # all three, ~15 min on 2 quiet cores
    python3 benchmarks/quantize_scaling.py --models smollm2 gemma # the small ones
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: The shared lock of jobs that need more than 4 GB (see the helpers' working notes); used only where it exists.
BIG_LOCK = Path("/work/notes/big.lock")
#: Model key -> (label, benchmarks/suite/models.py function or "default", needs the big-model lock).
MODELS: dict[str, tuple[str, str, bool]] = {
    "smollm2": ("SmolLM2-135M-Instruct", "default", False),
    "gemma": ("Gemma 3 270M", "gemma_model_path", False),
    "qwen-coder": ("Qwen2.5-Coder-1.5B", "qwen_coder_model_path", True),
}
PHASES = ("reading", "detection", "calibration", "codes", "building", "kernels")


def scaling_markdown(result: dict) -> str:
    """The scaling section of ``benchmarks/RESULTS.md`` from ``results/quantize_scaling.json``."""
    lines = [
        "### Quantize time against model size (real models, by phase)",
        "",
        f"`python3 benchmarks/quantize_scaling.py` ({result['date']}, {result['cpu']}, {result['threads']} torch "
        "threads): `from_pretrained(path, quantization_config=SuperWeightConfig())` of each model (float32 folder, "
        "the default: detection with confirmation, calibration, weighted HQQ grids), each in its own process. "
        "s/M = seconds per million linear weights of the decoder layers; \"CPU\" is the process's user + system "
        "time over its wall time (2.0 = both cores all along); load = 1-minute load average before / after.",
        "",
        "| model | linear weights (M) | total s | s/M | " + " | ".join(f"{p} s" for p in PHASES)
        + " | peak RSS GB | CPU | load |",
        "|---|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|---|",
    ]
    for r in result["rows"]:
        m = r["weights"] / 1e6
        lines.append(
            f"| {r['label']} | {m:.0f} | {r['total_s']:.0f} | {r['total_s'] / m:.2f} | "
            + " | ".join(f"{r['phases'].get(p, 0.0):.1f}" for p in PHASES)
            + f" | {r['peak_rss_gb']:.1f} | {r['cpu_s'] / r['total_s']:.2f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines += ["", "The same runs in CPU seconds of the process (all its threads; on a busy machine wall time is mostly waiting "
              "for a core, CPU time is the work):", "",
              "| model | total CPU s | CPU s/M | " + " | ".join(f"{p}" for p in PHASES) + " |",
              "|---|---:|---:|" + "---:|" * len(PHASES)]
    for r in result["rows"]:
        cpu = r.get("phases_cpu_s", {})
        lines.append(f"| {r['label']} | {r['cpu_s']:.0f} | {r['cpu_s'] / (r['weights'] / 1e6):.2f} | "
                     + " | ".join(f"{cpu.get(p, 0.0):.1f}" for p in PHASES) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def phase_timers(totals: dict[str, float], cpu: dict[str, float] | None = None):
    """Add the seconds of the default's steps to ``totals``, and the process's CPU seconds in them to ``cpu``
    (patched module attributes, restored after)."""
    import optimum_superweight.detection as detection  # the quantizer imports run_detection from here at call time
    from optimum_superweight.models import quantizer, replace

    def timed(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start, used = time.perf_counter(), _cpu_seconds()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
                if cpu is not None:
                    cpu[label] = cpu.get(label, 0.0) + _cpu_seconds() - used

        setattr(owner, name, wrapper)
        return owner, name, original

    patched = [timed(detection, "run_detection", "detection"), timed(replace, "calibrate", "calibration"),
               timed(replace, "choose_codes", "codes"), timed(replace, "build_modules", "building"),
               timed(quantizer, "prepare_kernels", "kernels"),
               timed(quantizer.SuperWeightQuantizer, "_process_model_after_weight_loading", "after-load hook")]
    try:
        yield
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def model_path(key: str) -> Path:
    """The float32 folder of model ``key`` (:data:`MODELS`)."""
    source = MODELS[key][1]
    if source == "default":
        from optimum_superweight import default_model_path

        return Path(default_model_path())
    sys.path.insert(0, str(ROOT))
    from suite import models

    return Path(getattr(models, source)())


@contextlib.contextmanager
def phases_on_torch_threads():
    """Run detection, calibration and building on torch's threads, as before issue 23 (the fitting pool unchanged):
    the quantizer's and the pipeline's one-intra-op-thread context replaced by a no-op."""
    from optimum_superweight.models import quantizer, replace

    originals = quantizer.single_intra_op_thread, replace.single_intra_op_thread
    quantizer.single_intra_op_thread = replace.single_intra_op_thread = contextlib.nullcontext
    try:
        yield
    finally:
        quantizer.single_intra_op_thread, replace.single_intra_op_thread = originals


def measure_one(key: str, save: Path | None = None, torch_threads: bool = False) -> dict:
    """Quantize model ``key`` with the default in this process; its phases, peak memory and CPU time; with
    ``save``, the quantized model is saved there after (timed apart: ``saving_s``); with ``torch_threads``, the
    phases other than the fitting pool run on torch's threads (:func:`phases_on_torch_threads`)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import optimum_superweight  # noqa: F401 - registers the quantizer
    from optimum_superweight import SuperWeightConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(key)
    load_before = os.getloadavg()[0]
    totals: dict[str, float] = {}
    cpu: dict[str, float] = {}
    cpu_start, start = _cpu_seconds(), time.perf_counter()
    with phase_timers(totals, cpu), (phases_on_torch_threads() if torch_threads else contextlib.nullcontext()):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SuperWeightConfig())
    total = time.perf_counter() - start
    cpu_total = _cpu_seconds() - cpu_start
    weights = 0
    for name, module in model.named_modules():
        if ".layers." in name and hasattr(module, "in_features") and hasattr(module, "out_features") \
                and not any(True for _ in module.children()):
            weights += module.in_features * module.out_features
    hook = totals.pop("after-load hook", 0.0)
    phases = {"reading": total - hook, **{p: totals.get(p, 0.0) for p in PHASES[1:]}}
    phases_cpu = {"reading": cpu_total - cpu.pop("after-load hook", 0.0), **{p: cpu.get(p, 0.0) for p in PHASES[1:]}}
    saving = None
    if save is not None:
        start = time.perf_counter()
        model.save_pretrained(save)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path).save_pretrained(save)
        saving = time.perf_counter() - start
    return {"key": key, "label": MODELS[key][0] + (" (phases on torch's threads, before)" if torch_threads else ""),
            "torch_threads": torch_threads, "weights": weights, "total_s": total, "phases": phases,
            "saving_s": saving,
            "phases_cpu_s": phases_cpu, "cpu_s": cpu_total,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads(), "load": [load_before, os.getloadavg()[0]]}


def _run_child(key: str, output: Path, save: Path | None, torch_threads: bool = False) -> dict:
    command = [sys.executable, __file__, "--one", key, "--output", str(output)] + (["--torch-threads"] if torch_threads else [])
    if save is not None:
        command += ["--save", str(save / f"{key}-default")]
    if MODELS[key][2] and BIG_LOCK.exists():
        command = ["flock", str(BIG_LOCK)] + command
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    return json.loads(output.read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--one", choices=list(MODELS), help=argparse.SUPPRESS)  # the child: one model, this process
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "quantize_scaling.json")
    parser.add_argument("--before", action="store_true",
                        help="each model also with the phases on torch's threads (before issue 23), alternating")
    parser.add_argument("--torch-threads", action="store_true", help=argparse.SUPPRESS)  # the child: that way
    parser.add_argument("--save", type=Path, help="save each quantized model under this folder (as <folder>/<model key>-default)")
    args = parser.parse_args()
    if args.one:
        row = measure_one(args.one, args.save, args.torch_threads)
        args.output.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
        return

    from optimum_superweight.kernels.guard import cpu_name

    rows = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    runs = [(key, False) for key in args.models]
    if args.before:  # before and after alternate, first one way then the other
        runs = [run for i, key in enumerate(args.models) for run in ([(key, True), (key, False)] if i % 2 == 0 else
                                                                       [(key, False), (key, True)])]
    for key, torch_threads in runs:
        row = _run_child(key, args.output.with_suffix(f".{key}.json"), args.save if not torch_threads else None, torch_threads)
        args.output.with_suffix(f".{key}.json").unlink()
        rows.append(row)
        print(f"  {row['label']}: {row['total_s']:.1f} s, "
              + ", ".join(f"{p} {s:.1f}" for p, s in row["phases"].items())
              + ", CPU s " + ", ".join(f"{p} {s:.0f}" for p, s in row["phases_cpu_s"].items())
              + f", peak {row['peak_rss_gb']:.1f} GB, CPU {row['cpu_s']:.0f} s, load {row['load']}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": rows[0]["threads"], "rows": rows}
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(scaling_markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
