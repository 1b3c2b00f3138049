"""Peak memory of quantize-on-load (``SuperWeightConfig(low_memory=True)``) against model size.

Synthetic Llamas (random weights, super weights planted by ``optimum_superweight.testing``) are saved as
float32 safetensors shards; each load runs in a fresh subprocess whose peak RSS (``ru_maxrss``) is read:

- ``import``: python + torch + transformers + optimum_superweight imported (the fixed overhead);
- ``low_memory``: ``from_pretrained(..., SuperWeightConfig(low_memory=True))`` with streaming detection;
- ``stream_detect``: ``detect_super_weights_streaming(folder)`` alone;
- ``in_memory``: the default path (full-precision load, detection, then quantization), for comparison.

    python3 benchmarks/low_memory.py                 # 3 sizes (~100 MB, 400 MB, 1.2 GB fp32), results/low_memory.json
    python3 benchmarks/low_memory.py --sizes 2 4     # number of decoder layers per model (~50 MB fp32 each)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Hidden 1024, intermediate 2816, 8 heads (2 KV heads): ~49 MB of float32 per decoder layer.
MODEL_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 2}
PLANTED = ((1, 5, 7),)  # (layer, row, col): a super weight in layer 1


def make_checkpoint(folder: str, num_layers: int, shard_mb: int = 100) -> dict:
    """Save a synthetic float32 Llama with ``num_layers`` layers and a planted super weight as shards."""
    import torch

    from optimum_superweight.testing import build_tiny_model

    model = build_tiny_model("llama", super_weights=PLANTED, num_hidden_layers=num_layers, **MODEL_SHAPE)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"layers": num_layers, "fp32_bytes": fp32_bytes}


CHILD = r"""
import json, re, resource, sys, threading, time
mode, folder = sys.argv[1], sys.argv[2]
# ru_maxrss counts file pages of the memory-mapped shards (reclaimable page cache) as well as private
# memory; a sampler splits the peak into RssAnon (what must fit) and RssFile (mapped checkpoint pages).
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        status = open("/proc/self/status").read()
        for key in peaks:
            peaks[key] = max(peaks[key], int(re.search(key + r":\s+(\d+)", status).group(1)) * 1024)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import torch
torch.set_num_threads(1)
import optimum_superweight
from optimum_superweight import SuperWeightConfig
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
hf_logging.disable_progress_bar()
result = {"mode": mode}
start = time.perf_counter()
if mode == "low_memory" or mode == "in_memory":
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SuperWeightConfig(low_memory=mode == "low_memory"))
    from optimum_superweight.models.replace import compressed_size_bytes
    result["compressed_bytes"] = compressed_size_bytes(model)
    result["super_weights"] = [(s["module"], s["row"], s["col"]) for s in model.config.quantization_config.super_weights]
elif mode == "stream_detect":
    from optimum_superweight.streaming import detect_super_weights_streaming
    report = detect_super_weights_streaming(folder)
    result["super_weights"] = [(s.module, s.row, s.col) for s in report.candidates]
result["seconds"] = time.perf_counter() - start
time.sleep(0.02)
result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result["peak_anon_bytes"], result["peak_file_bytes"] = peaks["RssAnon"], peaks["RssFile"]
print("RESULT " + json.dumps(result))
"""


def measure(mode: str, folder: str) -> dict:
    """Run one load in a fresh process; its peak RSS (bytes), seconds and what it found."""
    # glibc raises its mmap threshold after large frees, then keeps freed per-tensor temporaries in the heap:
    # a fixed threshold returns them to the OS, so the peak reflects what is live.
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    done = subprocess.run([sys.executable, "-c", CHILD, mode, folder], capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 24], help="decoder layers per model")
    parser.add_argument("--in-memory-max", type=int, default=8, help="largest model (layers) also loaded in memory")
    parser.add_argument("--out", default=str(HERE / "results" / "low_memory.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as empty:
        overhead = measure("import", empty)
    print(f"import overhead: {overhead['peak_rss_bytes'] / 2**20:.0f} MiB (anon {overhead['peak_anon_bytes'] / 2**20:.0f})", flush=True)
    for layers in args.sizes:
        folder = tempfile.mkdtemp(prefix=f"lowmem{layers}_")
        try:
            info = make_checkpoint(folder, layers)
            row = dict(info)
            for mode in ("low_memory", "stream_detect") + (("in_memory",) if layers <= args.in_memory_max else ()):
                result = measure(mode, folder)
                row[mode] = result
            lm = row["low_memory"]
            row["low_memory_seconds_per_gb"] = lm["seconds"] / (info["fp32_bytes"] / 1e9)
            rows.append(row)
            cells = [
                f"{layers:3d} layers",
                f"fp32 {info['fp32_bytes'] / 2**20:7.0f} MiB",
                f"compressed {lm['compressed_bytes'] / 2**20:6.0f} MiB",
                f"low_memory peak RSS {lm['peak_rss_bytes'] / 2**20:6.0f} (anon {lm['peak_anon_bytes'] / 2**20:5.0f}) MiB",
                f"stream_detect peak RSS {row['stream_detect']['peak_rss_bytes'] / 2**20:6.0f} "
                f"(anon {row['stream_detect']['peak_anon_bytes'] / 2**20:5.0f}) MiB",
            ]
            if "in_memory" in row:
                im = row["in_memory"]
                cells.append(f"in_memory peak RSS {im['peak_rss_bytes'] / 2**20:6.0f} (anon {im['peak_anon_bytes'] / 2**20:5.0f}) MiB")
            cells.append(f"{row['low_memory_seconds_per_gb']:.1f} s/GB")
            print(" | ".join(cells), flush=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"import_overhead": overhead, "model_shape": MODEL_SHAPE, "planted": PLANTED, "rows": rows}, indent=2)
    )
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
