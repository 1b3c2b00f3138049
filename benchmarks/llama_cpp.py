"""Our GGUF export in llama.cpp next to our transformers path and llama.cpp's own Q4_0 / Q4_K_M of SmolLM2.

    python3 benchmarks/llama_cpp.py [--tokens 4096] [--converter PATH]

Size, perplexity (the package's protocol: disjoint windows of 512 after BOS, built-in text) and batch-1 CPU
decode tokens/s. llama.cpp's own rows: the full-precision model converted to F16 by its converter, then
quantized by ``llama_model_quantize``. Writes ``benchmarks/results/llama_cpp.json`` and rebuilds
``benchmarks/RESULTS.md`` (``run.py --report-only``), which renders it with :func:`llama_cpp_markdown`. Needs llama-cpp-python and llama.cpp's converter (see scripts/test_llama_cpp.sh).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "llama_cpp.json"
HEADING = "## llama.cpp: our GGUF export next to llama.cpp's own quantizations"


def _llama_quantize(source: Path, out: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed")


def _transformers_decode(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - start)


def measure(tokens: int, converter: str | None, decode_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_superweight as osw
    from optimum_superweight.evaluation import builtin_text, tokenize_text
    from optimum_superweight.export import export
    from optimum_superweight.export.gguf import find_converter
    from optimum_superweight.export.llama_cpp_eval import llama_decode_speed, llama_perplexity, load_llama

    converter_dir = find_converter(converter)
    source = osw.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenize_text(tokenizer, builtin_text(), max_tokens=tokens)
    prompt = [tokenizer.bos_token_id] + ids[:16]
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        fp = AutoModelForCausalLM.from_pretrained(source)
        rows["transformers float32"] = {"ppl": float(osw.perplexity(fp, tokenizer, token_ids=ids)), "size_mb": None,
                                        "decode_tok_s": _transformers_decode(fp, prompt, decode_tokens)}
        del fp
        quantized = AutoModelForCausalLM.from_pretrained(source, quantization_config=osw.SuperWeightConfig(bits=4, group_size=64, method="rtn", symmetric=True))
        quantized.save_pretrained(scratch / "ours")
        tokenizer.save_pretrained(scratch / "ours")
        size = sum(f.stat().st_size for f in (scratch / "ours").glob("*.safetensors")) / 2**20
        ppl = float(osw.perplexity(osw.dequantize_model(quantized), tokenizer, token_ids=ids))  # the exact weights
        bf16 = AutoModelForCausalLM.from_pretrained(scratch / "ours", dtype=torch.bfloat16)
        rows["ours, transformers (int4 g64 RTN, bf16 cpu-int4 kernel for decode)"] = {
            "ppl": ppl, "size_mb": size, "decode_tok_s": _transformers_decode(bf16, prompt, decode_tokens)}
        del bf16, quantized
        files = {"ours, GGUF export (Q4_0 from our codes, super-weight tensors F32)": scratch / "ours.gguf"}
        export(scratch / "ours", files[next(iter(files))], format="gguf", converter=converter_dir)
        env = dict(os.environ, PYTHONPATH=str(converter_dir / "gguf-py"))
        f16 = scratch / "f16.gguf"
        subprocess.run([sys.executable, str(converter_dir / "convert_hf_to_gguf.py"), source, "--outtype", "f16", "--outfile", str(f16)],
                       check=True, capture_output=True, env=env)
        files["llama.cpp F16 (its converter)"] = f16
        for ftype in ("Q4_0", "Q4_K_M"):
            target = scratch / f"{ftype}.gguf"
            _llama_quantize(f16, target, ftype)
            files[f"llama.cpp {ftype} (llama_model_quantize of F16)"] = target
        for name, path in files.items():
            llm = load_llama(path, n_ctx=1024)
            rows[name] = {"ppl": llama_perplexity(llm, ids, tokenizer.bos_token_id), "size_mb": path.stat().st_size / 2**20,
                          "decode_tok_s": llama_decode_speed(llm, prompt, decode_tokens)}
            del llm
            print(name, rows[name], flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), "tokens": len(ids),
            "decode_tokens": decode_tokens, "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct", "rows": rows}


def llama_cpp_markdown(result: dict) -> str:
    """The llama.cpp section of ``benchmarks/RESULTS.md`` from ``results/llama_cpp.json``."""
    base = result["rows"]["transformers float32"]["ppl"]
    lines = [
        HEADING, "",
        f"`python3 benchmarks/llama_cpp.py` ({result['date']}, {result['threads']} threads). {result['model']}; perplexity on "
        f"{result['tokens']} tokens of the built-in text (windows of 512 with BOS, the same token ids in both runtimes); "
        f"batch-1 greedy decode of {result['decode_tokens']} tokens after a 17-token prompt (a shared 2-core machine: "
        "compare rows of one run). Sizes: the GGUF file, or our checkpoint's safetensors (fp32 embeddings included). "
        "Our export keeps `token_embd` (tied: also the output projection) at F32, since SmolLM2's float32 embeddings "
        "are not exact in F16 (`dense_type=\"auto\"`): 108 MiB of its size and the largest per-token matmul; "
        "`--dense-type f16` / `q8_0` trade that exactness for size and speed (not measured here). Its perplexity "
        "differs from ours in transformers only by llama.cpp's 8-bit activation quantization on CPU."
        + (f" Transformers decode rows re-measured at {result['transformers_decode_date']}: torch decode on this "
           "oversubscribed shared machine was far below the 17-24 tok/s of the main benchmark's quieter runs, so "
           "compare llama.cpp rows with each other, not with those." if result.get("transformers_decode_date") else ""),
        "", "| model | size (MiB) | perplexity | ratio to float32 | decode tok/s |", "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        size = "" if row["size_mb"] is None else f"{row['size_mb']:.1f}"
        lines.append(f"| {name} | {size} | {row['ppl']:.3f} | x{row['ppl'] / base:.3f} | {row['decode_tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    # This script is named like the llama_cpp package: keep its own folder off the import path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--converter", default=None)
    parser.add_argument("--render-only", action="store_true", help="rebuild RESULTS.md from the recorded JSON")
    args = parser.parse_args()
    if args.render_only:
        result = json.loads(RESULT.read_text())
    else:
        result = measure(args.tokens, args.converter, args.decode_tokens)
        RESULT.write_text(json.dumps(result, indent=2))
    print(llama_cpp_markdown(result))
    # RESULTS.md is rebuilt from every result file, this one included (suite/report.py standalone_sections).
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--report-only"], check=True)


if __name__ == "__main__":
    main()
