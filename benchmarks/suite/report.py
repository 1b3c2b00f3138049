"""RESULTS.md and plots from the suite's results dict."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _mb(nbytes: float | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:,.1f} MiB"


def _f(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} in {meta['total_seconds'] / 60:.1f} min.",
        f"Model: `{meta['model']}`. Machine: {meta['machine']['cpu_count']} CPU cores "
        f"({meta['machine']['processor']}), torch {meta['machine']['torch']} ({meta['machine']['torch_threads']} threads), "
        f"transformers {meta['machine']['transformers']}, bitsandbytes {meta['machine']['bitsandbytes']}; "
        f"load average at start {meta['machine']['load_average_at_start']}, at end {meta.get('load_average_at_end')}.",
        "Timings on a shared machine vary from run to run; compare rows of the same run.",
        "",
    ]
    if meta.get("updated_sections"):
        prev = meta.get("previous_run") or {}
        minutes = (prev.get("total_seconds") or 0) / 60
        lines[2:3] = [
            f"Sections {', '.join(meta['updated_sections'])} produced by `{meta['command']}` on {meta['date']} "
            f"({meta['total_seconds'] / 60:.1f} min); the other sections by `{prev.get('command')}` on {prev.get('date')} "
            f"({minutes:.1f} min)."
        ]
    quality = results.get("quality")
    if quality:
        p = quality["protocol"]
        lines += [
            "## Quality",
            "",
            f"Perplexity on the first {p['max_tokens']} tokens of the built-in text ({p['text']}), windows of "
            f"{p['window']} tokens each preceded by BOS; ratio = perplexity / float32 perplexity "
            f"({quality['reference_ppl']:.3f}). Every method quantizes the same {quality['quantized_matrices']} decoder "
            f"matrices ({quality['quantized_weights']:,} weights; embeddings and the tied `lm_head` stay full precision). "
            "Bits/weight count codes, scales, zero-points and exact super weights (value + indices) over those weights.",
            "",
            "| method | setting | bits/weight | perplexity | ratio | note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in quality["rows"]:
            lines.append(
                f"| {row['method']} | {row['setting']} | {row['bits_per_weight']:.3f} | {row['ppl']:.3f} | "
                f"x{row['ratio']:.3f} | {row['note']} |"
            )
        lines += [
            "",
            "`superweight` rows run the package's real `SuperWeightLinear` modules (quantize_model with "
            "`SuperWeightConfig(bits, group_size, method=\"rtn\")`, symmetric round-to-nearest unless the row names "
            "clip or GPTQ (the package default until 2026-11-30; the default now is `method=\"hqq\"`, measured in "
            "\"Quality on unseen text\" below), and the detected super weights). `rtn` rows are the same "
            "group quantization without held-out coordinates (simulated: quantize -> dequantize). `flat` rows simulate "
            "the paper's setting: asymmetric min-max over flat 1-D blocks of the row-major matrix, fp16 scale and "
            "offset per block. `bnb` rows are bitsandbytes' own quantize/dequantize functions (simulated).",
            "",
        ]
        if "quality" in plots:
            lines += [f"![quality]({plots['quality']})", ""]
    memory = results.get("memory")
    speed = results.get("speed")
    if memory or speed:
        lines += ["## Loading and memory", "",
                  "| what | from_pretrained | peak RSS | RSS for the model | peak RSS after a forward | checkpoint on disk |",
                  "|---|---:|---:|---:|---:|---:|"]
        if memory:
            loads, sizes = memory["loads"], memory["checkpoint_bytes"]
            names = {"float32": "float32 (plain load)", "quantize_on_load": "superweight int4 g64, quantize-on-load",
                     "quantize_on_load_low_memory": "superweight int4 g64, quantize-on-load, `low_memory=True`",
                     "reload": "superweight int4 g64, reload of the saved checkpoint"}
            size_of = {"reload": sizes.get("superweight int4 g64"), "float32": sizes.get("float32")}
            for key, label in names.items():
                if key not in loads:
                    continue
                r = loads[key]
                extra = " (incl. detection)" if r.get("detected") else ""
                lines.append(
                    f"| {label}{extra} | {r['from_pretrained_seconds']:.2f} s | {r['peak_rss_mb']:,.0f} MiB | "
                    f"{r['load_rss_mb']:,.0f} MiB | {_f(r.get('peak_rss_after_forward_mb'), ',.0f')} MiB | {_mb(size_of.get(key))} |"
                )
            for key in ("bfloat16", "bitsandbytes NF4"):
                if key in sizes:
                    lines.append(f"| {key} checkpoint (saved in-process) | – | – | – | – | {_mb(sizes[key])} |")
        if speed:
            for row in speed["rows"]:
                if "load_seconds_in_process" in row:
                    lines.append(f"| {row['model']}: load in the main process (warm file cache) | {row['load_seconds_in_process']:.2f} s | – | – | – | – |")
        lines += [
            "",
            "Each from_pretrained above the in-process rows ran in a fresh subprocess; peak RSS is the child's high-water mark (`VmHWM`) at the end "
            "of loading, \"RSS for the model\" subtracts the peak after importing torch, transformers and the package. "
            "Weights are memory-mapped from safetensors, so a plain load touches few pages until the first forward: "
            "\"peak RSS after a forward\" is the high-water mark once every weight has been used. Checkpoint sizes "
            "count the weight files only and include the unquantized embeddings in the dtype the model was loaded "
            "with: float32 for the superweight checkpoint (quantized from the float32 model), bfloat16 for the "
            "bitsandbytes one (bitsandbytes needs a 16-bit load).",
            "",
        ]
    if speed:
        det = speed.get("detection")
        lines += ["## Speed", ""]
        if det:
            lines += [
                f"Super-weight detection (search + confirmation by ablation): {det['detection_seconds']:.2f} s, "
                f"{det['detection_over_forward']:.1f}x one forward pass of {det['forward_tokens']} tokens "
                f"({det['forward_seconds']:.3f} s); found "
                + ", ".join(f"`{sw['module']}[{sw['row']}, {sw['col']}]`" for sw in det["super_weights"]) + ".",
                "",
            ]
        b, n = speed["prefill_shape"]
        lines += [
            f"| model | generate, batch 1 (tokens/s) | prefill, batch {b} x {n} (tokens/s) | kernels |",
            "|---|---:|---:|---|",
        ]
        for row in speed["rows"]:
            kernels = ", ".join(f"{k}: {v}" for k, v in (row.get("kernels") or {}).items()) or "–"
            lines.append(
                f"| {row['model']} | {row['generation']['tokens_per_s']:.2f} | {row['prefill']['tokens_per_s']:.1f} | {kernels} |"
            )
        lines += [
            "",
            f"Generation: greedy, {speed['generation_new_tokens']} new tokens forced, from a short prompt, after a "
            "2-token warm-up; tokens/s include the prompt's prefill. Prefill: one forward building the KV cache, "
            "logits of the last position only, after a warm-up.",
            "",
        ]
        if "speed" in plots:
            lines += [f"![speed]({plots['speed']})", ""]
    lines += ["Raw numbers: [`results/results.json`](results/results.json).", ""]
    return "\n".join(lines)


def plots(results: dict[str, Any], folder: Path) -> dict[str, str]:
    """Write PNG plots next to the JSON; returns their paths relative to RESULTS.md's folder."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    folder.mkdir(parents=True, exist_ok=True)
    quality = results.get("quality")
    if quality:
        fig, ax = plt.subplots(figsize=(8, 5))
        colors = {"superweight": "tab:green", "rtn": "tab:orange", "flat": "tab:purple", "bnb": "tab:blue",
                  "bfloat16": "tab:gray", "float32": "black", "ablation": "tab:red"}
        # Plain RTN often lands on the package's point: draw the package as rings, RTN as crosses inside.
        markers = {"superweight": dict(marker="o", s=90, facecolors="none", linewidths=1.5), "rtn": dict(marker="x", s=30)}
        seen = set()
        for row in quality["rows"]:
            if row["method"] == "ablation":
                continue
            label = row["method"] if row["method"] not in seen else None
            seen.add(row["method"])
            style = markers.get(row["method"], dict(marker="o", s=30))
            color_key = "edgecolors" if style.get("facecolors") == "none" else "color"
            ax.scatter(row["bits_per_weight"], row["ratio"], label=label, **{color_key: colors.get(row["method"], "k")}, **style)
            if row["method"] != "rtn":
                ax.annotate(row["setting"], (row["bits_per_weight"], row["ratio"]), fontsize=6, xytext=(4, 3),
                            textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codes + scales + zeros + exact super weights)")
        ax.set_ylabel("perplexity / float32 perplexity")
        ax.axhline(1.0, color="black", lw=0.5)
        ax.legend(fontsize=8)
        ax.set_title("Quality vs size")
        fig.tight_layout()
        path = folder / "quality.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made["quality"] = f"{folder.name}/{path.name}"
    speed = results.get("speed")
    if speed and speed.get("rows"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = [r["model"] for r in speed["rows"]]
        axes[0].barh(names, [r["generation"]["tokens_per_s"] for r in speed["rows"]], color="tab:green")
        axes[0].set_xlabel("generation tokens/s (batch 1)")
        b, n = speed["prefill_shape"]
        axes[1].barh(names, [r["prefill"]["tokens_per_s"] for r in speed["rows"]], color="tab:blue")
        axes[1].set_xlabel(f"prefill tokens/s (batch {b} x {n})")
        axes[1].set_yticklabels([])
        for ax in axes:
            ax.invert_yaxis()
        fig.tight_layout()
        path = folder / "speed.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made["speed"] = f"{folder.name}/{path.name}"
    return made


def standalone_sections(data_dir: Path) -> str:
    """Sections of the benchmarks that run on their own (their own processes, caps or long runs), rendered from
    their result files when present: ``quality_multitext.json`` (``benchmarks/quality_multitext.py``),
    ``low_memory.json`` (``benchmarks/low_memory.py``), ``w8a8.json`` (``benchmarks/w8a8.py``),
    ``kernels_by_cpu.json`` (``benchmarks/kernels_by_cpu.py``), ``llama_cpp.json`` (``benchmarks/llama_cpp.py``),
    ``checkpoint_integrity.json`` (``benchmarks/checkpoint_integrity.py``), ``load_time.json``
    (``benchmarks/load_time.py``), ``export_requantize.json`` (``benchmarks/export_requantize.py``) and
    ``serve.json`` (``benchmarks/serve.py``).
    Each states its own command and date."""
    import importlib.util

    parts = []
    for script, result_file, render in (
        ("quality_multitext.py", "quality_multitext.json", "quality_multitext_markdown"),
        ("low_memory.py", "low_memory.json", "low_memory_markdown"),
        ("w8a8.py", "w8a8.json", "w8a8_markdown"),
        ("kernels_by_cpu.py", "kernels_by_cpu.json", "kernels_by_cpu_markdown"),
        ("llama_cpp.py", "llama_cpp.json", "llama_cpp_markdown"),
        ("checkpoint_integrity.py", "checkpoint_integrity.json", "checkpoint_integrity_markdown"),
        ("load_time.py", "load_time.json", "load_time_markdown"),
        ("export_requantize.py", "export_requantize.json", "export_requantize_markdown"),
        ("serve.py", "serve.json", "serve_markdown"),
    ):
        path = data_dir / result_file
        if not path.is_file():
            continue
        name = f"_standalone_{script[:-3]}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the script executes
        spec.loader.exec_module(module)
        parts.append(getattr(module, render)(json.loads(path.read_text(encoding="utf-8"))))
    return "\n".join(parts)
