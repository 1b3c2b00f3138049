"""Load time, peak memory and checkpoint size; each load runs in a fresh subprocess.

Peak RSS is the child's high-water mark (``VmHWM``; see :func:`.common.peak_rss_mb`) at the end of ``from_pretrained``;
``after_imports_mb`` is the same figure right after importing torch, transformers and this package, so the
difference is what loading the model cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUN_SCRIPT = Path(__file__).resolve().parents[1] / "run.py"
_MARKER = "BENCHMARK-RESULT "


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of ``run.py --child SPEC``: one ``from_pretrained`` in a fresh process, then optionally save."""
    from .common import peak_rss_mb

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.environ.get("BENCHMARK_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCHMARK_TORCH_THREADS"]))

    import optimum_superweight
    from optimum_superweight import SuperWeightConfig

    after_imports = peak_rss_mb()
    kind = spec["kind"]
    kwargs: dict[str, Any] = {}
    if kind == "load":
        kwargs["dtype"] = getattr(torch, spec.get("dtype", "float32"))
    elif kind == "quantize_on_load":
        kwargs["dtype"] = torch.float32
        options = {"low_memory": True} if spec.get("low_memory") else {}
        kwargs["quantization_config"] = SuperWeightConfig(
            bits=spec["bits"], group_size=spec["group_size"], super_weights=spec.get("super_weights"), **options
        )
    elif kind == "reload":
        pass
    else:
        raise ValueError(f"unknown child kind {kind!r}")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], **kwargs)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    result: dict[str, Any] = {
        "kind": kind,
        "from_pretrained_seconds": seconds,
        "peak_rss_mb": peak,
        "after_imports_mb": after_imports,
        "load_rss_mb": peak - after_imports,
    }
    if kind == "quantize_on_load":
        found = model.config.quantization_config.get_super_weights()
        result["super_weights"] = [sw.to_dict() for sw in found]
        result["detected"] = not spec.get("super_weights")
    if spec.get("save_to"):
        start = time.perf_counter()
        model.save_pretrained(spec["save_to"])
        AutoTokenizer.from_pretrained(spec["path"]).save_pretrained(spec["save_to"])
        result["save_seconds"] = time.perf_counter() - start
    with torch.no_grad():  # the loaded model works; a forward also touches every (memory-mapped) weight
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    result["finite_logits"] = bool(torch.isfinite(logits).all())
    result["peak_rss_after_forward_mb"] = peak_rss_mb()
    del optimum_superweight
    return result


def run_child(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run one ``child_main`` in a fresh interpreter and return its result dict."""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), "--child", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            result = json.loads(line[len(_MARKER):])
            result["process_seconds"] = wall
            return result
    raise RuntimeError(
        f"benchmark child {spec.get('kind')} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def print_child_result(result: dict[str, Any]) -> None:
    print(_MARKER + json.dumps(result), flush=True)


def run_memory(source: str, work: Path, *, super_weights: list[dict] | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """fp32 load, quantize-on-load (int4 g64, detection included unless ``super_weights``), reload; sizes on disk."""
    from .common import folder_size

    compressed = work / "superweight-int4-g64"
    rows: dict[str, Any] = {}
    rows["float32"] = run_child({"kind": "load", "path": source, "dtype": "float32"})
    log(f"  float32 from_pretrained           {rows['float32']['from_pretrained_seconds']:7.2f} s  peak RSS {rows['float32']['peak_rss_mb']:7.0f} MiB")
    rows["quantize_on_load"] = run_child({
        "kind": "quantize_on_load", "path": source, "bits": 4, "group_size": 64,
        "super_weights": super_weights, "save_to": str(compressed),
    })
    r = rows["quantize_on_load"]
    log(f"  superweight quantize-on-load      {r['from_pretrained_seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB"
        f"  ({'with' if r['detected'] else 'without'} detection)")
    import inspect

    from optimum_superweight import SuperWeightConfig

    if "low_memory" in inspect.signature(SuperWeightConfig).parameters:
        rows["quantize_on_load_low_memory"] = run_child({
            "kind": "quantize_on_load", "path": source, "bits": 4, "group_size": 64,
            "super_weights": super_weights, "low_memory": True,
        })
        r = rows["quantize_on_load_low_memory"]
        log(f"  superweight quantize-on-load, low_memory {r['from_pretrained_seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB")
    rows["reload"] = run_child({"kind": "reload", "path": str(compressed)})
    r = rows["reload"]
    log(f"  superweight reload                {r['from_pretrained_seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MiB")
    sizes = {"float32": folder_size(source), "superweight int4 g64": folder_size(compressed)}
    return {"loads": rows, "checkpoint_bytes": sizes, "compressed_path": str(compressed)}
