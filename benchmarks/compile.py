"""``torch.compile``d ``generate`` against eager on the embedded SmolLM2-135M, batch-1 greedy decode.

The quantized layers run as one ``torch.library`` op each (``optimum_superweight/kernels/ops.py``), so the
quantizer declares the model compileable and transformers compiles the decode step when the cache is static
(``cache_implementation="static"``; on CPU transformers compiles only when the compile config asks for every
device). Both variants run on one model in one process, rounds interleaved (eager, compiled, eager, ...);
decode tokens/s is ``(new_tokens - 1) / (t(new_tokens) - t(1))``: generate's time for ``new_tokens`` minus its
time for one (the prefill and the first token), so only decode steps count. Whether the compiled run's tokens
equal eager's (greedy) is recorded. ``--dense`` adds the dense model, eager and compiled, to the same rounds.

    nice -n 10 python3 benchmarks/compile.py --dense            # writes benchmarks/results/compile.json
    nice -n 10 python3 benchmarks/compile.py --rounds 1 --new-tokens 8   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from optimum_superweight import SuperWeightConfig, kernels, quantize_model  # noqa: E402
from optimum_superweight.default_model import default_model_path  # noqa: E402

# SmolLM2-135M's super weight (benchmarks/kernel_speed.py): given, so the benchmark runs no detection.
SUPER_WEIGHT = {"module": "model.layers.11.mlp.down_proj", "row": 507, "col": 1229}
PROMPT = "The capital of France is Paris. The capital of Italy is"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (eager, compiled) (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--method", choices=("rtn", "hqq"), default="rtn",
                        help="way of choosing codes (rtn: fast to quantize; the kernels and format are the default's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads stall on each other)")
    parser.add_argument("--dense", action="store_true", help="also the dense model, eager and compiled (same rounds)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compile.json")
    args = parser.parse_args(argv)
    for name in ("rounds", "new_tokens", "threads"):
        if getattr(args, name) < 1 + (name == "new_tokens"):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: use at least {1 + (name == 'new_tokens')}.")
    return args


def _model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    config = SuperWeightConfig(bits=4, group_size=64, method=args.method, super_weights=[SUPER_WEIGHT])
    if args.method == "hqq":
        quantize_model(model, config, config.get_super_weights(), tokenizer=tokenizer)
    else:
        quantize_model(model, config, config.get_super_weights())
    model.eval()
    return model, tokenizer


def _generate(model, ids, new_tokens: int, compiled: bool, compile_config) -> tuple[float, torch.Tensor]:
    model.generation_config.disable_compile = not compiled
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
            compile_config=compile_config if compiled else None, pad_token_id=model.config.eos_token_id,
        )
    return time.perf_counter() - start, out


def _decode_rate(model, ids, args, compiled: bool, compile_config) -> tuple[float, torch.Tensor]:
    one, _ = _generate(model, ids, 1, compiled, compile_config)
    many, out = _generate(model, ids, args.new_tokens, compiled, compile_config)
    return (args.new_tokens - 1) / max(many - one, 1e-9), out


def _compile(model, ids, args, compile_config) -> float:
    """Warm-up: eager (kernel layouts, speed verdicts), then the compilation, timed (what a user waits once)."""
    _decode_rate(model, ids, args, False, None)
    start = time.perf_counter()
    _generate(model, ids, 2, True, compile_config)
    _generate(model, ids, args.new_tokens, True, compile_config)
    if getattr(model, "_compiled_call", None) is None:
        raise SystemExit("generate() did not compile (is_compileable, static cache and compile_config were set).")
    return time.perf_counter() - start


def _rounds(models: dict, ids, args, compile_config) -> tuple[dict, dict, list]:
    """Every variant once per round, in the same order each round; the compiled tokens compared with eager's."""
    rates: dict[str, list[float]] = {f"{m} {v}": [] for m in models for v in ("eager", "compiled")}
    same = dict.fromkeys(models, True)
    loads = []
    for round_ in range(args.rounds):
        for label, model in models.items():
            outputs = {}
            for variant in ("eager", "compiled"):
                rate, outputs[variant] = _decode_rate(model, ids, args, variant == "compiled", compile_config)
                rates[f"{label} {variant}"].append(rate)
            same[label] &= bool(torch.equal(outputs["eager"], outputs["compiled"]))
        loads.append(os.getloadavg()[0])
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) +
              f" tok/s, load {loads[-1]:.1f}", flush=True)
    return rates, same, loads


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, CompileConfig

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model, tokenizer = _model(args)
    models = {"quantized": model}
    if args.dense:
        models["dense"] = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=getattr(torch, args.dtype)).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked to
    summary = kernels.kernel_summary(model, getattr(torch, args.dtype), 1)
    print(f"SmolLM2-135M, 4-bit g64 ({args.method}), {args.dtype}, {torch.get_num_threads()} threads; decode kernels {summary}")
    compile_seconds = {label: _compile(m, ids, args, compile_config) for label, m in models.items()}
    print("compile + first compiled generate: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_seconds.items()))
    rates, same, loads = _rounds(models, ids, args, compile_config)

    median = {name: statistics.median(values) for name, values in rates.items()}
    print()
    print(f"| model | variant | decode tokens/s (median of {args.rounds}) | rounds | vs its eager | same tokens as eager |")
    print("|---|---|---|---|---|---|")
    for name, values in rates.items():
        label, variant = name.split()
        print(f"| {label} | {variant} | {median[name]:.1f} | {', '.join(f'{r:.1f}' for r in values)} | "
              f"x{median[name] / median[label + ' eager']:.2f} | {same[label] if variant == 'compiled' else ''} |")
    result = {
        "model": "SmolLM2-135M-Instruct", "format": "4-bit g64", "method": args.method, "dtype": args.dtype,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "decode_kernels": summary, "compile_seconds": compile_seconds, "decode_tokens_per_s": rates,
        "median": median, "same_tokens": same,
        "compiled_vs_eager": {label: median[f"{label} compiled"] / median[f"{label} eager"] for label in models},
        "machine": {"cpu": kernels.cpu_name(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_start": list(load_start), "load_average_rounds": loads,
                    "load_average_end": list(os.getloadavg())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
