"""What ``--requantize`` costs where it must act: SmolLM2 quantized with the default (float offsets), exported to AWQ
and compressed-tensors with re-fitting, weights read back from the written files, perplexity on held-out text.

    python3 benchmarks/export_requantize.py                 # SmolLM2, 4096 tokens of two held-out texts
    python3 benchmarks/export_requantize.py --tokens 1024   # shorter

Rows, all on the same tokens, float32: the full-precision model; the optimum-superweight checkpoint
(``SuperWeightConfig()``, what the exports start from); each export's weights decoded from its files (AWQ by this
package's unpacker, checked against the layout's spec in tests/export/test_awq.py; compressed-tensors by
compressed-tensors' own decompressor); and, for comparison, the re-fit with GPTQ's error feedback (the same weighted
grids, codes chosen for each layer's output under its input second moment on the calibration text: tried, not the
default) and plain round-to-nearest of the checkpoint's dequantized weights (what ``--requantize`` did before it
re-fitted). The texts are outside the package
(``benchmarks/suite/texts.py``); the re-fit's importance is measured on the package's calibration text
(``pydoc_data``), which is not scored here. Writes ``benchmarks/results/export_requantize.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "export_requantize.json"


def _decode_awq(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from optimum_superweight.export.awq import unpack_awq

    state = load_file(str(folder / "model.safetensors"))
    out = {}
    for key in state:
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            q = unpack_awq(state[key]).float()
            z = unpack_awq(state[f"{name}.qzeros"]).float()
            s = state[f"{name}.scales"].float()
            group = q.shape[0] // s.shape[0]
            out[name] = ((q - z.repeat_interleave(group, 0)) * s.repeat_interleave(group, 0)).T.contiguous()
    return out


def _decode_ct(folder: Path) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    scheme = config.config_groups["group_0"]
    state = load_file(str(folder / "model.safetensors"))
    names = {k.rpartition(".")[0] for k in state if k.endswith(".weight_packed")}
    return {n: PackedQuantizationCompressor.decompress(
        {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == n}, scheme)["weight"].float()
        for n in names}


def _rtn(model, symmetric: bool) -> dict[str, torch.Tensor]:
    from optimum_superweight.export.codes import quantized_modules
    from optimum_superweight.tensor.quantize import quantize_weight, restore_exact

    out = {}
    for codes in quantized_modules(model):
        w = quantize_weight(codes.dequantize(), bits=4, group_size=codes.group_size, symmetric=symmetric,
                            holdout=codes.super_indices).dequantize()
        if codes.super_indices is not None:
            restore_exact(w, codes.super_indices, codes.super_values)
        out[codes.name] = w
    return out


def _error_feedback_refit(model, tokenizer, dense: set[str]) -> dict[str, torch.Tensor]:
    """The re-fit with error feedback: weighted HQQ grids in the AWQ form, GPTQ codes on them (layers in ``dense``,
    which the export keeps dense, left as they are)."""
    from optimum_superweight.export.codes import quantized_modules
    from optimum_superweight.export.refit import TargetForm, input_hessians, refit_layer

    target = TargetForm(bits=4, group_size=64, variants=("zero_point", "symmetric"), refit_form="uint8")
    pending = [codes for codes in quantized_modules(model) if codes.variant == "float_offset" and codes.name not in dense]
    hessians, _ = input_hessians(model, tokenizer, [codes.name for codes in pending])
    return {codes.name: refit_layer(codes, target, hessian=hessians[codes.name]).dequantize()
            for codes in pending}


def _ppl(model, tokenizer, texts, tokens: int) -> dict[str, float]:
    from optimum_superweight.evaluation import perplexity

    return {t.key: round(float(perplexity(model, tokenizer, t.text, max_tokens=tokens)), 4) for t in texts}


def export_requantize_markdown(result: dict) -> str:
    """The RESULTS.md section (``suite/report.py`` renders it from ``results/export_requantize.json``)."""
    meta, rows = result["meta"], result["rows"]
    keys = [t["key"] for t in meta["texts"]]
    lines = [
        "## Export with `--requantize`: what re-fitting costs where it must act",
        "",
        f"`{meta['command']}` ({meta['date']}, {meta['machine']}, shared with other jobs): SmolLM2-135M-Instruct "
        "quantized with `SuperWeightConfig()` (float offsets, which neither AWQ nor compressed-tensors holds), exported "
        "with `--requantize`, the weights decoded from the written files (AWQ: this package's unpacker, checked against "
        "the layout's spec in the tests; compressed-tensors: its own decompressor) and scored in float32 on the first "
        f"{meta['tokens']} tokens of each held-out text ({', '.join(keys)}: `benchmarks/suite/texts.py`; the re-fit's "
        "importance comes from the package's calibration text, `pydoc_data`). Ratio = perplexity / the checkpoint's.",
        "",
        f"| weights | layers re-fitted | {' | '.join(keys)} | ratio to checkpoint |",
        "|---|---:|" + "---:|" * len(keys) + "---|",
    ]
    for row in rows:
        ppl = " | ".join(f"{row['ppl'][k]:.3f}" for k in keys)
        ratio = ", ".join(f"x{row['ratio_to_checkpoint'][k]:.4f}" for k in keys)
        refitted = row.get("refitted", row.get("layers_replaced", ""))
        lines.append(f"| {row['row']} | {refitted} | {ppl} | {ratio} |")
    lines += ["", "The exports' re-fit (`--requantize`): each group's grid (scale, integer zero-point) by the weighted HQQ "
              "fit, each weight's nearest code on it. The error-feedback row keeps those grids and chooses the codes by "
              "GPTQ's column updates under each layer's input second moment on the calibration text (damping 0.01), "
              "with the checkpoint's own dequantized weight as the target. Round-to-nearest rows re-quantize every layer "
              "of the checkpoint (super weights held out and exact) on the min-max grid of its group: what "
              "`--requantize` did before it re-fitted."]
    refit = [max(r["ratio_to_checkpoint"].values()) for r in rows if "export_s" in r]
    feedback = [max(r["ratio_to_checkpoint"].values()) for r in rows if r["row"].startswith("error-feedback")]
    old = [max(r["ratio_to_checkpoint"].values()) for r in rows if "old --requantize" in r["row"]]
    if refit and feedback and old:
        verdict = ("within the 2% goal of issue 21" if max(refit) <= 1.02 else
                   "above the 2% goal of issue 21: it re-quantizes weights that are already quantized (on float-offset "
                   "grids) onto integer-zero grids, a second rounding")
        lines += ["", f"The re-fit costs up to x{max(refit):.3f} where it must act, against x{feedback[0]:.3f} with error "
                  f"feedback and x{old[0]:.3f} for the old rounding: {verdict}. Checkpoints with integer zero-points "
                  "(`SuperWeightConfig(zero_point=\"uint8\")`) export bit-exactly, with no re-fit."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--texts", default="austen,jargon")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--formats", default="awq,compressed-tensors",
                        help="zero-point exports to run (they re-fit alike; one is enough on a busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="only the checkpoint, the two zero-point exports, the error-feedback re-fit and the old symmetric "
                        "rounding (no "
                        "full-precision, symmetric compressed-tensors or zero-point rounding rows)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_superweight as osw
    from optimum_superweight.export import export
    from suite.texts import evaluation_texts

    torch.manual_seed(0)
    source = osw.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    texts = evaluation_texts(tuple(args.texts.split(",")))
    work = Path(tempfile.mkdtemp(prefix="export-requantize-"))
    rows = []
    if not args.quick:
        full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        rows.append({"row": "full precision (float32)", "ppl": _ppl(full, tokenizer, texts, args.tokens)})
    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, quantization_config=osw.SuperWeightConfig())
    quantize_s = time.perf_counter() - start
    quantized.save_pretrained(work / "q")
    tokenizer.save_pretrained(work / "q")
    dense = osw.dequantize_model(copy.deepcopy(quantized), torch.float32)
    rows.append({"row": "checkpoint: SuperWeightConfig() (float offsets)", "ppl": _ppl(dense, tokenizer, texts, args.tokens)})

    def weights_row(label: str, weights: dict[str, torch.Tensor], extra: dict) -> None:
        model = copy.deepcopy(dense)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in weights.items():
                modules[name].weight.copy_(weight)
        rows.append({"row": label, "layers_replaced": len(weights), "ppl": _ppl(model, tokenizer, texts, args.tokens), **extra})

    kept_dense: set[str] = set()
    exports = [e for e in [("awq", {}, _decode_awq), ("compressed-tensors", {"dtype": "float32"}, _decode_ct)]
               if e[0] in args.formats.split(",")]
    if not args.quick:
        exports.append(("compressed-tensors", {"dtype": "float32", "zero_point": "symmetric"}, _decode_ct))
    checkpoint_row = len(rows) - 1
    for fmt, options, decode in exports:
        out = work / f"{fmt}-{options.get('zero_point', 'auto')}"
        start = time.perf_counter()
        result = export(work / "q", out, format=fmt, allow_requantize=True, **options)
        seconds = time.perf_counter() - start
        label = f"{fmt} --requantize" + (" (symmetric)" if options.get("zero_point") == "symmetric" else " (zero-points)")
        kept_dense.update(result["dense"])
        weights_row(label, decode(out), {"refitted": len(result["requantized"]), "dense": result["dense"],
                                         "export_s": round(seconds, 1), "export_effect": result["refit"]["effect"]})
    weights_row("error-feedback re-fit: weighted grids, GPTQ codes (tried, not the default)",
                _error_feedback_refit(quantized, tokenizer, kept_dense), {})
    if not args.quick:
        weights_row("round-to-nearest, zero-points (for comparison)", _rtn(quantized, symmetric=False), {})
    weights_row("round-to-nearest, symmetric (old --requantize)", _rtn(quantized, symmetric=True), {})

    base = rows[checkpoint_row]["ppl"]
    for row in rows:
        row["ratio_to_checkpoint"] = {k: round(v / base[k], 4) for k, v in row["ppl"].items()}
    result = {
        "meta": {"date": _dt.date.today().isoformat(), "command": "python3 " + " ".join(sys.argv),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores", "tokens": args.tokens,
                 "texts": [t.describe() for t in texts], "quantize_s": round(quantize_s, 1),
                 "torch_threads": torch.get_num_threads()},
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    print(export_requantize_markdown(result))

if __name__ == "__main__":
    main()
