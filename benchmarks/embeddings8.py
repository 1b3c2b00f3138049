"""8-bit embeddings and head (``SuperWeightConfig(embedding_bits=8)``): checkpoint size and held-out perplexity.

    python3 benchmarks/embeddings8.py                          # SmolLM2 and Gemma 3 270M, 2,048 tokens per text
    python3 benchmarks/embeddings8.py --models smollm2 --tokens 512 --output /tmp/e8.json   # shorter

Per model, the default config (``SuperWeightConfig()``) and the same with ``embedding_bits=8`` are each quantized
from the float32 folder by ``from_pretrained`` (detection, calibration, codes: the real path), saved, and the
saved folder measured: its weight files' size in MB (10^6 bytes), the bytes of the input-embedding and head
tensors in it (read from the safetensors headers), then reloaded in bfloat16 and scored with the package's
``perplexity`` (windows of ``--window`` tokens, BOS where the tokenizer adds one, the model's context limit
applied) on the first ``--tokens`` tokens of held-out texts of other domains (``suite/texts.py``, the texts of
``quality_multitext.py``; never calibration text). Ratio = perplexity with ``embedding_bits=8`` / without, same
tokens. llama.cpp's own Q4_K_M GGUF sizes come from ``results/serve.json`` (``serve.py``), not re-measured here.
Head time: the output head alone (dense bfloat16 ``nn.Linear`` vs the packed head's kernel) on bfloat16 hidden
states of 1 and 512 tokens, median of ``--reps`` calls after a warm-up, in this process, one after the other.

Writes ``benchmarks/results/embeddings8.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import optimum_superweight  # noqa: E402,F401
from suite.models import gemma_model_path  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "embeddings8.json"
SERVE_RESULT = HERE / "results" / "serve.json"


def _source(key: str) -> str:
    if key == "smollm2":
        return str(optimum_superweight.default_model_path())
    if key == "gemma3":
        return str(gemma_model_path())
    raise ValueError(f"model {key!r} is unknown: expected smollm2 or gemma3.")


def _llama_cpp_q4_k_m_mb(key: str) -> float | None:
    if not SERVE_RESULT.is_file():
        return None
    for entry in json.loads(SERVE_RESULT.read_text()).get("llama.cpp", []):
        if entry.get("model") == key:
            for label, row in entry.get("rows", {}).items():
                if label.startswith("llama.cpp Q4_K_M"):
                    return row.get("size_mb")
    return None


def _folder_sizes(folder: Path, names: tuple[str, ...]) -> tuple[float, float]:
    """(MB of the weight files, MB of the tensors under ``names``) from the safetensors headers."""
    from optimum_superweight.format import read_safetensors_index

    files = sorted(folder.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    sizes = {"U8": 1, "I8": 1, "I32": 4, "F32": 4, "F16": 2, "BF16": 2}
    embedded = 0
    for key, entry in read_safetensors_index(files).items():
        if key.rpartition(".")[0] in names:
            count = 1
            for d in entry.shape:
                count *= d
            embedded += count * sizes[entry.dtype]
    return total / 1e6, embedded / 1e6


def _head_ms(head: torch.nn.Module, hidden: int, tokens: int, reps: int) -> float:
    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16)
    with torch.no_grad():
        head(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _variant(key: str, source: str, embedding_bits: int | None, args: argparse.Namespace, texts, scratch: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.detection.inputs import context_length
    from optimum_superweight.evaluation import perplexity, tokenize_text
    from optimum_superweight.models.calibration import tokenizer_adds_bos
    from optimum_superweight.models.embeddings import embedding_pair

    tokenizer = AutoTokenizer.from_pretrained(source)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, quantization_config=SuperWeightConfig(embedding_bits=embedding_bits))
    seconds = time.perf_counter() - started
    pair = embedding_pair(model)
    names = tuple(n for n in (pair.input_name, pair.output_name) if n)
    folder = scratch / f"{key}-{embedding_bits}"
    model.save_pretrained(folder)
    config = model.config.quantization_config
    del model
    size_mb, embeddings_mb = _folder_sizes(folder, names)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    add_bos = tokenizer_adds_bos(tokenizer)
    limit = context_length(model)
    window = args.window if limit is None else max(1, min(args.window, limit - add_bos))
    ppl = {}
    for text in texts:
        ids = tokenize_text(tokenizer, text.text, None)
        ppl[text.key] = perplexity(model, tokenizer, token_ids=ids, max_tokens=args.tokens, window=window,
                                   batch_size=args.batch_size, add_bos=add_bos).ppl
    head = model.get_output_embeddings()
    hidden = model.get_input_embeddings().embedding_dim
    head_ms = {str(t): _head_ms(head, hidden, t, args.reps) for t in (1, 512)}
    shutil.rmtree(folder, ignore_errors=True)
    return {"embedding_bits": embedding_bits, "quantize_seconds": seconds, "size_mb": size_mb,
            "embeddings_mb": embeddings_mb, "embedding_modules": list(names), "tied": pair.tied,
            "super_weights": len(config.super_weights),
            "held_out_channels": config.super_activation_channels if embedding_bits else None,
            "perplexity": ppl, "window": window, "head_ms": head_ms, "head_kernel": getattr(head, "kernel", "dense")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from suite.texts import evaluation_texts

    texts = evaluation_texts(tuple(args.texts.split(",")))
    result = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
              "tokens": args.tokens, "window": args.window, "texts": [t.key for t in texts], "threads": torch.get_num_threads(),
              "models": {}}
    with tempfile.TemporaryDirectory(prefix="embeddings8-") as scratch:
        for key in args.models.split(","):
            source = _source(key)
            rows = [_variant(key, source, bits, args, texts, Path(scratch)) for bits in (None, 8)]
            base, packed = rows
            result["models"][key] = {
                "rows": rows, "llama_cpp_q4_k_m_mb": _llama_cpp_q4_k_m_mb(key),
                "ratio": {t: packed["perplexity"][t] / base["perplexity"][t] for t in base["perplexity"]},
                "size_ratio": packed["size_mb"] / base["size_mb"],
            }
            print(f"[{key}] done: {packed['size_mb']:.1f} vs {base['size_mb']:.1f} MB", flush=True)
    result["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return result


def render(result: dict[str, Any]) -> str:
    texts = result["texts"]
    lines = [
        f"({result['date']}, load {result['load_start']} -> {result['load_end']}, {result['tokens']} tokens per text, "
        f"bfloat16, {result['threads']} threads)",
        "",
        "| model | embeddings and head | checkpoint MB | of it embeddings + head MB | llama.cpp Q4_K_M GGUF MB | "
        + " | ".join(f"ppl {t}" for t in texts) + " | ratio (min–max) | head ms, 1 / 512 tokens |",
        "|---|---|---:|---:|---:|" + "---:|" * len(texts) + "---|---|",
    ]
    for key, model in result["models"].items():
        for row in model["rows"]:
            what = "model dtype (default)" if row["embedding_bits"] is None else (
                f"8 bits per row, channels {row['held_out_channels']} exact")
            ratios = model["ratio"].values()
            ratio = "–" if row["embedding_bits"] is None else f"x{min(ratios):.4f}–x{max(ratios):.4f}"
            gguf = model["llama_cpp_q4_k_m_mb"]
            lines.append(
                f"| {key}{' (tied)' if row['tied'] else ''} | {what} | {row['size_mb']:.1f} | {row['embeddings_mb']:.1f} | "
                f"{'–' if gguf is None else f'{gguf:.1f}'} | " + " | ".join(f"{row['perplexity'][t]:.3f}" for t in texts)
                + f" | {ratio} | {row['head_ms']['1']:.2f} / {row['head_ms']['512']:.1f} ({row['head_kernel']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--texts", default="austen,jargon,python,kjv")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
