"""What the load-time checks of a compressed checkpoint cost (SmolLM2-135M-Instruct, int4 g64, warm file cache).

Loads the saved checkpoint repeatedly in this process, rotating: every check on (the default); the content
digests off; every after-load verification off (headers are still read before loading). Weights are memory-mapped:
the digest is the first thing to read the quantized bytes, so its cost in the load includes paging them in, which the
first forward would pay otherwise. Also times the digest of all quantized layers alone (weights resident), per
algorithm. Prints a table and writes ``benchmarks/results/checkpoint_integrity.json``, which
``benchmarks/run.py --report-only`` renders into ``benchmarks/RESULTS.md``.

    python3 benchmarks/checkpoint_integrity.py            # ~1 min on 2 cores (one quantization + 3 x 8 loads)
    python3 benchmarks/checkpoint_integrity.py --reps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent


def checkpoint_integrity_markdown(result: dict) -> str:
    """The checkpoint-integrity section of ``benchmarks/RESULTS.md`` from ``results/checkpoint_integrity.json``."""
    lines = [
        "## Checkpoint integrity: what the load-time checks cost",
        "",
        f"`python3 benchmarks/checkpoint_integrity.py` ({result['date']}, {result['cpu']}, {result['threads']} torch "
        f"threads): SmolLM2-135M-Instruct quantized with `SuperWeightConfig(bits=4, group_size=64)`, reloaded from a "
        f"warm file cache in float32; {result['layers']} quantized layers, {result['mib']:.1f} MiB of quantized state; "
        f"medians of {result['reps']} runs.",
        "",
        "| what | ms |",
        "|---|---:|",
    ]
    lines += [f"| {what} | {ms:.0f} |" for what, ms in result["rows"]]
    lines += [
        "",
        "The digest is the first reader of the memory-mapped quantized bytes, so its cost in the load includes paging "
        "them in, which the first forward pays otherwise; the other checks (headers, completeness, ranges, super "
        "weights) cost little. CRC-32 is cheaper than SHA-256 and detects swapped, rescaled or edited tensors alike; "
        "whoever can rewrite the tensors can rewrite config.json, so a cryptographic hash would add cost, not safety.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--folder", default=None, help="reuse a saved checkpoint folder")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "checkpoint_integrity.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import optimum_superweight  # noqa: F401 - registers the quantizer with transformers
    from optimum_superweight import SuperWeightConfig, SuperWeightLinear, default_model_path
    from optimum_superweight.format import DIGEST_ALGORITHMS
    from optimum_superweight.kernels.guard import cpu_name
    from optimum_superweight.models import quantizer, verify

    hf_logging.set_verbosity_error()
    folder = Path(args.folder or tempfile.mkdtemp()) / "smollm2-int4-g64"
    if not (folder / "config.json").exists():
        config = SuperWeightConfig(bits=4, group_size=64, super_weights=[
            {"module": "model.layers.11.mlp.down_proj", "row": 507, "col": 1229}])
        AutoModelForCausalLM.from_pretrained(default_model_path(), quantization_config=config).save_pretrained(folder)

    model = AutoModelForCausalLM.from_pretrained(folder)
    layers = [(n, m.stored_tensors()) for n, m in model.named_modules() if isinstance(m, SuperWeightLinear)]
    size = sum(t.numel() * t.element_size() for _, tensors in layers for t in tensors.values())
    rows: list[tuple[str, float]] = []
    for algorithm in DIGEST_ALGORITHMS:
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            verify._parallel_digests(layers, {n: algorithm for n, _ in layers})
            times.append(time.perf_counter() - start)
        rows.append((f"digest of every quantized layer, {algorithm} (weights resident)", statistics.median(times) * 1000))
    del model

    real_digests, real_verify = verify._verify_digests, quantizer.verify_quantized_model
    variants = {
        "from_pretrained, every check (default)": (real_digests, real_verify),
        "from_pretrained, digests off": (lambda *a, **k: None, real_verify),
        "from_pretrained, after-load verification off": (lambda *a, **k: None, lambda *a, **k: None),
    }
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        for name in names[rep % 3:] + names[: rep % 3]:  # rotate: no variant always follows the same one
            verify._verify_digests, quantizer.verify_quantized_model = variants[name]
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder)
            times[name].append(time.perf_counter() - start)
            del model
    verify._verify_digests, quantizer.verify_quantized_model = real_digests, real_verify
    for name in names:
        rows.append((name, statistics.median(times[name]) * 1000))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "layers": len(layers), "mib": size / 2**20, "reps": args.reps, "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(checkpoint_integrity_markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
