"""A 1B-class model end to end: the default-quantized Qwen2.5-Coder-1.5B against the same model dense in bfloat16.

Both models load with ``dtype=torch.bfloat16`` in one process (the quantized checkpoint that
``benchmarks/quantize_scaling.py --models qwen-coder --save ~/.cache/optimum_superweight/serve`` writes, and the
float32 folder it was quantized from); rounds interleave them, the order alternating. Measured, with torch's
default threads:

- batch-1 decode tokens/s: greedy steps with the KV cache after a 16-token prompt (the steps alone are timed);
- 512-token prefill tokens/s: one forward pass of 512 tokens of built-in text;
- ``kernel_summary`` of the quantized layers at 1 and 512 tokens;
- per projection shape (one decoder layer's seven), one thread's CPU time of the quantized layer's call against
  ``F.linear`` with the dense bfloat16 weight of the same layer, at 1 and 512 tokens (median of interleaved repeats);
- with ``--llama-cpp``: our GGUF export of the checkpoint and the original Q4_K_M GGUF in one
  ``llama-bench -n 64 -p 512 -t 2`` run (written once to ``<checkpoint>.gguf``).

Prints a table and writes ``benchmarks/results/big_model.json``. The float32 weights are read while loading the
dense model (about 7 GB for a moment): run under the shared lock where there is one
(``flock /work/notes/big.lock python3 benchmarks/big_model.py``).

    python3 benchmarks/big_model.py                     # ~5 min on 2 cores
    python3 benchmarks/big_model.py --llama-cpp         # + llama.cpp's llama-bench on both GGUF files
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CHECKPOINT = Path.home() / ".cache" / "optimum_superweight" / "serve" / "qwen-coder-default"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dense_path() -> Path:
    sys.path.insert(0, str(ROOT))
    from suite.models import qwen_coder_model_path

    return Path(qwen_coder_model_path())


def _decode_tokens_per_s(model, prompt: torch.Tensor, steps: int) -> float:
    """Greedy steps with the KV cache after ``prompt``: tokens per second of the steps alone."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - start)


def _prefill_tokens_per_s(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return ids.shape[1] / (time.perf_counter() - start)


def _thread_cpu_ms(call, reps: int) -> float:
    """Median one-thread CPU time of ``call()`` in ms (after a warm-up call)."""
    call()
    times = []
    for _ in range(reps):
        start = time.thread_time()
        call()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3


def layer_timings(quantized, dense, layer: int, tokens_list: tuple[int, ...], reps: int) -> list[dict]:
    """One thread's CPU time of each projection of decoder layer ``layer``: the quantized module's call against
    ``F.linear`` with the dense bfloat16 weight, interleaved."""
    from optimum_superweight.kernels import kernel_label

    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in PROJECTIONS:
            prefix = f"model.layers.{layer}."
            sub = "self_attn." if name in PROJECTIONS[:4] else "mlp."
            module = quantized.get_submodule(prefix + sub + name)
            reference = dense.get_submodule(prefix + sub + name)
            for tokens in tokens_list:
                x = torch.randn(1, tokens, reference.in_features, dtype=torch.bfloat16)
                with torch.no_grad():
                    q_ms, d_ms = [], []
                    for _ in range(3):  # interleaved rounds of medians
                        q_ms.append(_thread_cpu_ms(lambda: module(x), reps))
                        d_ms.append(_thread_cpu_ms(lambda: torch.nn.functional.linear(x, reference.weight, reference.bias), reps))
                rows.append({"module": sub + name, "shape": [reference.out_features, reference.in_features],
                             "tokens": tokens, "kernel": kernel_label(module), "ms": min(q_ms), "dense_ms": min(d_ms)})
                print(f"  {sub + name} {tokens:4d} tokens: {rows[-1]['kernel']} {rows[-1]['ms']:.3f} ms, "
                      f"dense {rows[-1]['dense_ms']:.3f} ms, x{rows[-1]['ms'] / rows[-1]['dense_ms']:.2f}", flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


class _Pair:
    """A model-like holder of one decoder layer's projections under their model names (for :func:`layer_timings`)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    def get_submodule(self, name: str) -> torch.nn.Module:
        return self.modules[name]


def shape_timings(dense_path: Path, tokens_list: tuple[int, ...], reps: int) -> list[dict]:
    """:func:`layer_timings` on random layers of the model's projection shapes (read from its config.json; no
    weights loaded, so it runs beside other jobs): default-format layers (4-bit, groups of 64, float offsets; the
    kernels' speed does not depend on the codes' values) against bfloat16 ``F.linear``."""
    from transformers import AutoConfig

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.nn.linear import SuperWeightLinear

    config, default = AutoConfig.from_pretrained(dense_path), SuperWeightConfig()
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = {"q_proj": (hidden, config.num_attention_heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (config.num_attention_heads * head_dim, hidden), "gate_proj": (hidden, inter),
              "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
    quantized, dense = {}, {}
    torch.manual_seed(0)
    for name, (inp, out) in shapes.items():
        full = f"model.layers.0.{'self_attn' if name in PROJECTIONS[:4] else 'mlp'}.{name}"
        linear = torch.nn.Linear(inp, out, bias=bias and name in PROJECTIONS[:3])
        quantized[full] = SuperWeightLinear.from_linear(
            linear, bits=default.bits, group_size=default.group_size, symmetric=default.symmetric,
            zero_point=default.zero_point, scale_dtype=default.scale_dtype).to(torch.bfloat16)
        dense[full] = linear.to(torch.bfloat16)
    return layer_timings(_Pair(quantized), _Pair(dense), 0, tokens_list, reps)


def measure(checkpoint: Path, dense_path: Path, rounds: int, steps: int, prefill: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import optimum_superweight  # noqa: F401 - registers the quantizer
    from optimum_superweight import kernel_summary
    from optimum_superweight.evaluation import builtin_text, tokenize_text

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    load = [os.getloadavg()[0]]
    quantized = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = torch.tensor([tokenize_text(tokenizer, builtin_text(), max_tokens=prefill)])
    prompt = ids[:, :16]
    models = {"quantized": quantized, "dense": dense}
    kernels = {"decode": kernel_summary(quantized, torch.bfloat16, 1),
               "prefill": kernel_summary(quantized, torch.bfloat16, prefill)}
    print(f"  kernels: {kernels}", flush=True)
    for model in models.values():  # warm-up: kernel layouts, first-use speed checks, allocator
        _decode_tokens_per_s(model, prompt, 2)
        _prefill_tokens_per_s(model, ids[:, :64])
    decode: dict[str, list[float]] = {k: [] for k in models}
    prefill_speed: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(rounds):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for key in order:
            decode[key].append(_decode_tokens_per_s(models[key], prompt, steps))
            prefill_speed[key].append(_prefill_tokens_per_s(models[key], ids))
            load.append(os.getloadavg()[0])
            print(f"  round {rep + 1} {key}: decode {decode[key][-1]:.2f} tok/s, prefill {prefill_speed[key][-1]:.1f} tok/s, "
                  f"load {load[-1]:.1f}", flush=True)
    layers = layer_timings(quantized, dense, quantized.config.num_hidden_layers // 2, (1, prefill), reps)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(), "rounds": rounds,
            "decode_steps": steps, "prefill_tokens": ids.shape[1], "kernels": kernels, "load": [min(load), max(load)],
            "decode_tok_s": decode, "prefill_tok_s": prefill_speed, "layers": layers}


def _llama_bench() -> Path:
    found = sorted(glob.glob(str(Path.home() / ".cache/optimum_superweight/llama.cpp-*/*/build/bin/llama-bench")))
    if not found:
        raise FileNotFoundError("llama-bench not found under ~/.cache/optimum_superweight/llama.cpp-*/*/build/bin")
    return Path(found[-1])


def _converter() -> Path:
    found = sorted(glob.glob(str(Path.home() / ".cache/optimum_superweight/llama.cpp-*/src/llama_cpp_python-*")))
    if os.environ.get("OPTIMUM_SUPERWEIGHT_LLAMA_CPP"):
        return Path(os.environ["OPTIMUM_SUPERWEIGHT_LLAMA_CPP"])
    if not found:
        raise FileNotFoundError("llama.cpp's converter not found: set OPTIMUM_SUPERWEIGHT_LLAMA_CPP")
    return Path(found[-1])


def llama_cpp(checkpoint: Path, threads: int, repetitions: int = 5) -> dict:
    """Our GGUF export (written once beside the checkpoint) and the original Q4_K_M in one llama-bench run."""
    sys.path.insert(0, str(ROOT))
    from suite.models import qwen_coder_gguf

    ours = checkpoint.with_suffix(".gguf")
    export_s = None
    if not ours.is_file():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "optimum_superweight.cli", "export", str(checkpoint), str(ours),
                        "--format", "gguf", "--converter", str(_converter())], check=True)
        export_s = time.perf_counter() - start
    original = Path(qwen_coder_gguf())
    bench = _llama_bench()
    command = [str(bench), "-m", str(ours), "-m", str(original), "-n", "64", "-p", "512", "-t", str(threads),
               "-r", str(repetitions), "-o", "json"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(bench.parent) + ":" + os.environ.get("LD_LIBRARY_PATH", ""))
    load_before = os.getloadavg()[0]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    rows = []
    for entry in json.loads(out.stdout):
        rows.append({"file": Path(entry["model_filename"]).name, "type": entry.get("model_type"),
                     "size_mb": entry.get("model_size", 0) / 2**20, "n_prompt": entry["n_prompt"], "n_gen": entry["n_gen"],
                     "tok_s": entry["avg_ts"], "stddev": entry.get("stddev_ts")})
        print(f"  llama-bench {rows[-1]['file']}: p{rows[-1]['n_prompt']} n{rows[-1]['n_gen']} {rows[-1]['tok_s']:.2f} tok/s", flush=True)
    return {"command": " ".join(["llama-bench"] + command[1:]), "export_s": export_s, "rows": rows,
            "load": [load_before, os.getloadavg()[0]], "gguf_mb": ours.stat().st_size / 2**20}


def _layer_table(layers: list[dict]) -> list[str]:
    lines = ["| projection | out x in | tokens | kernel | ms | bf16 dense ms | time / dense |", "|---|---|---:|---|---:|---:|---:|"]
    for r in layers:
        lines.append(f"| {r['module']} | {r['shape'][0]} x {r['shape'][1]} | {r['tokens']} | `{r['kernel']}` | {r['ms']:.3f} | "
                     f"{r['dense_ms']:.3f} | x{r['ms'] / r['dense_ms']:.2f} |")
    return lines


def shapes_markdown(result: dict) -> str:
    """The ``--shapes-only`` table."""
    return "\n".join([
        f"`python3 benchmarks/big_model.py --shapes-only` ({result['date']}, {result['cpu']}, 1-minute load average "
        f"{result['load']:.1f}): random layers of {result['dense']}'s projection shapes in the default format, one "
        "thread's CPU time (median of repeats, best of 3 interleaved rounds) against bfloat16 `F.linear`:", "",
        *_layer_table(result["layers"])]) + "\n"


def big_model_markdown(result: dict) -> str:
    """The section of ``benchmarks/RESULTS.md`` from ``results/big_model.json``."""
    med = {kind: {k: statistics.median(v) for k, v in result[kind].items()} for kind in ("decode_tok_s", "prefill_tok_s")}
    lines = [
        f"## {result.get('dense', 'Qwen2.5-Coder-1.5B')} end to end: the default against bfloat16 dense (issue 23)",
        "",
        f"`python3 benchmarks/big_model.py` ({result['date']}, {result.get('cpu', '')}, {result['threads']} torch threads, "
        f"1-minute load average {result['load'][0]:.1f}-{result['load'][1]:.1f}): the default-quantized checkpoint and "
        f"the dense model, both loaded with `dtype=torch.bfloat16` in one process, {result['rounds']} interleaved rounds "
        f"(medians); decode = {result['decode_steps']} greedy steps with the KV cache at batch 1, prefill = one "
        f"{result['prefill_tokens']}-token forward pass. Kernels of the quantized layers: {result['kernels']['decode']} "
        f"at 1 token, {result['kernels']['prefill']} at {result['prefill_tokens']}.",
        "",
        "| | quantized tok/s | bf16 dense tok/s | quantized / dense |",
        "|---|---:|---:|---:|",
    ]
    for kind, label in (("decode_tok_s", "batch-1 decode"), ("prefill_tok_s", f"{result['prefill_tokens']}-token prefill")):
        q, d = med[kind]["quantized"], med[kind]["dense"]
        lines.append(f"| {label} | {q:.2f} | {d:.2f} | x{q / d:.2f} |")
    lines += ["", "One decoder layer's projections, one thread's CPU time (median of interleaved repeats) of the quantized "
              "layer's call against `F.linear` with the same layer's dense bfloat16 weight:", "",
              *_layer_table(result["layers"])]
    llama = result.get("llama_cpp")
    if llama:
        lines += ["", f"llama.cpp on the same machine: `{llama['command']}` (load {llama['load'][0]:.1f}-{llama['load'][1]:.1f}), "
                  "our GGUF export of the checkpoint and the original Q4_K_M GGUF in one run:", "",
                  "| file | type | size MiB | test | tok/s |", "|---|---|---:|---|---:|"]
        for r in llama["rows"]:
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            lines.append(f"| {r['file']} | {r['type']} | {r['size_mb']:.0f} | {test} | {r['tok_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--dense", type=Path, help="the full-precision folder (default: Qwen2.5-Coder-1.5B's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per round")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5, help="repeats per layer timing")
    parser.add_argument("--llama-cpp", action="store_true", help="also export to GGUF and run llama-bench")
    parser.add_argument("--shapes-only", action="store_true",
                        help="only the per-projection timings, on random layers of the model's shapes (little memory)")
    parser.add_argument("--llama-only", action="store_true", help="only the llama.cpp part (added to the result file)")
    parser.add_argument("--llama-reps", type=int, default=5, help="llama-bench repetitions (its -r; 5 is its default)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "big_model.json")
    args = parser.parse_args()
    if args.shapes_only:
        from optimum_superweight.kernels.guard import cpu_name

        dense = args.dense or _dense_path()
        layers = shape_timings(dense, (1, args.prefill), args.reps)
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "dense": dense.name, "layers": layers,
                  "load": os.getloadavg()[0]}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(shapes_markdown(result))
        return
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint} holds no checkpoint: make it with `python3 "
                         "benchmarks/quantize_scaling.py --models qwen-coder --save ~/.cache/optimum_superweight/serve`.")
    from optimum_superweight.kernels.guard import cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llama_only:
        result = json.loads(args.output.read_text(encoding="utf-8"))
    else:
        dense = args.dense or _dense_path()
        result = {**measure(args.checkpoint, dense, args.rounds, args.steps, args.prefill, args.reps), "cpu": cpu_name(),
                  "checkpoint": args.checkpoint.name, "dense": dense.name}
    if args.llama_cpp or args.llama_only:
        result["llama_cpp"] = llama_cpp(args.checkpoint, threads=2, repetitions=args.llama_reps)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(big_model_markdown(result))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
