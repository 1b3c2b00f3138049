"""CPU speed of optimum-superweight's kernels against dense float32/bfloat16 and bitsandbytes NF4.

Measured side by side in one process, variants interleaved on every repeat, medians reported (the CPU is
shared: absolute numbers are noisy, ratios less so):

1. per matrix (SmolLM2 down_proj 576x1536 and 2048x5632), ``--matrix-tokens`` tokens per call:
   float32 dense, bfloat16 dense, this package (reference kernel, fast kernel), bitsandbytes NF4;
2. the embedded SmolLM2-135M: batch-1 greedy decode tokens/s (with KV cache) and prefill tokens/s
   (``--prefill-batch`` x ``--prefill-len`` tokens; logits of the last position only).

    python3 benchmarks/kernel_speed.py            # writes benchmarks/results/kernel_speed.json
    python3 benchmarks/kernel_speed.py --quick    # fewer repeats, smaller prefill
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from optimum_superweight import SuperWeightConfig, SuperWeightLinear, kernels, quantize_model  # noqa: E402
from optimum_superweight.default_model import default_model_path  # noqa: E402

SUPER_WEIGHT = {"module": "model.layers.11.mlp.down_proj", "row": 507, "col": 1229}


def _time(fn, repeats: int, inner: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timings of ``inner`` calls each."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _bnb_linear(dense: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        dense.in_features, dense.out_features, bias=dense.bias is not None, compute_dtype=compute_dtype,
        quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(dense.weight.detach().to(torch.float32).clone(), requires_grad=False, quant_type="nf4", blocksize=64).to("cpu")
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return layer


def _swap_bnb(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every decoder ``nn.Linear`` (not lm_head) replaced by bitsandbytes NF4 (blocksize 64)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _bnb_linear(module, compute_dtype))
    return model


# -- per matrix ---------------------------------------------------------------------------------------------
def bench_matrices(args) -> list[dict]:
    rows = []
    for out_features, in_features in ((576, 1536), (2048, 5632)):
        torch.manual_seed(0)
        dense = nn.Linear(in_features, out_features, bias=False)
        ours = SuperWeightLinear.from_linear(dense, bits=4, group_size=args.group_size, super_weights=[(5, 7)])
        bnb4 = _bnb_linear(dense, torch.bfloat16)
        dense16 = copy.deepcopy(dense).to(torch.bfloat16)
        for tokens in [int(t) for t in args.matrix_tokens.split(",")]:
            x32 = torch.randn(tokens, in_features)
            x16 = x32.to(torch.bfloat16)

            def reference():
                kernels.force_reference(True)
                try:
                    return ours(x16)
                finally:
                    kernels.force_reference(False)

            variants = {
                "float32 dense": lambda: dense(x32),
                "bfloat16 dense": lambda: dense16(x16),
                "superweight reference (bf16)": reference,
                "superweight fast (bf16)": lambda: ours(x16),
                "bitsandbytes nf4 (bf16)": lambda: bnb4(x16),
            }
            with torch.inference_mode():
                for fn in variants.values():
                    fn(), fn()  # warm-up: kernel layouts, bnb's first-call repack
                samples = {name: [] for name in variants}
                inner = 20 if tokens <= 16 and out_features < 1000 else 3
                for _ in range(args.repeats):
                    for name, fn in variants.items():
                        samples[name].append(_time(fn, 1, inner))
                ours(x16)
                kernel = ours.kernel
            for name, values in samples.items():
                rows.append({
                    "shape": f"{out_features}x{in_features}", "tokens": tokens, "variant": name,
                    "kernel": kernel if name == "superweight fast (bf16)" else None,
                    "ms": 1e3 * statistics.median(values), "ms_min": 1e3 * min(values),
                })
    return rows


# -- whole model ----------------------------------------------------------------------------------------------
def _decode_tokens_per_s(model, prompt_ids: torch.Tensor, steps: int) -> float:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - start)


def _prefill_tokens_per_s(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return ids.numel() / (time.perf_counter() - start)


def bench_models(args) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = SuperWeightConfig(bits=4, group_size=args.group_size, symmetric=True, super_weights=[SUPER_WEIGHT], detect=False)
    models = {
        "float32 dense": base,
        "bfloat16 dense": copy.deepcopy(base).to(torch.bfloat16),
    }
    ours = quantize_model(copy.deepcopy(base).to(torch.bfloat16), config).eval()
    models["superweight fast (bf16)"] = ours
    models["bitsandbytes nf4 (bf16)"] = _swap_bnb(copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16).eval()
    summary = kernels.prepare_kernels(ours, torch.bfloat16)

    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab, (1, 16), generator=generator)
    prefill = torch.randint(100, vocab, (args.prefill_batch, args.prefill_len), generator=generator)

    def run(name, fn):
        reference = name == "superweight reference (bf16)"
        kernels.force_reference(reference)
        try:
            return fn(models["superweight fast (bf16)" if reference else name])
        finally:
            kernels.force_reference(False)

    names = list(models) + ([] if args.no_reference_model else ["superweight reference (bf16)"])
    decode = {n: [] for n in names}
    prefill_speed = {n: [] for n in names}
    for name in names:  # warm-up
        run(name, lambda m: _decode_tokens_per_s(m, prompt, 2))
    # The reference kernel dequantizes every matrix on every call: time fewer steps and one prefill.
    steps = {n: (4 if n == "superweight reference (bf16)" else args.decode_steps) for n in names}
    for repeat in range(args.repeats):
        for name in names:
            decode[name].append(run(name, lambda m: _decode_tokens_per_s(m, prompt, steps[name])))
        for name in names:
            if repeat < (1 if name == "superweight reference (bf16)" else args.prefill_repeats):
                prefill_speed[name].append(run(name, lambda m: _prefill_tokens_per_s(m, prefill)))
        logging.info("model repeat %d done", repeat)
    rows = []
    for name in names:
        rows.append({
            "variant": name,
            "decode_tokens_per_s": statistics.median(decode[name]),
            "decode_samples": decode[name],
            "prefill_tokens_per_s": statistics.median(prefill_speed[name]),
            "prefill_samples": prefill_speed[name],
        })
    return rows, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared CPU)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--matrix-tokens", default="1,16,256", help="comma-separated token counts per matrix call")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--no-reference-model", action="store_true", help="skip the whole model on the reference kernel (slow: 4 decode steps, 1 prefill)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, prefill 2 x 256, 1 prefill repeat")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "kernel_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.prefill_batch, args.prefill_len, args.prefill_repeats = 3, 2, 256, 1
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    matrices = bench_matrices(args)
    print(f"\nPer matrix (4-bit, group {args.group_size}; median ms over {args.repeats} repeats, {args.threads} thread(s))")
    print(f"{'shape':>10} {'tokens':>6}  {'variant':<30} {'ms':>9} {'x bf16':>8}")
    for row in matrices:
        bf16 = next(r["ms"] for r in matrices if r["shape"] == row["shape"] and r["tokens"] == row["tokens"] and r["variant"] == "bfloat16 dense")
        row["ratio_to_bf16_dense"] = row["ms"] / bf16
        kernel = f"  [{row['kernel']}]" if row["kernel"] else ""
        print(f"{row['shape']:>10} {row['tokens']:>6}  {row['variant']:<30} {row['ms']:9.3f} {row['ratio_to_bf16_dense']:8.2f}{kernel}")

    result = {
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "group_size": args.group_size, "repeats": args.repeats, "matrix_tokens": args.matrix_tokens, "matrices": matrices,
    }
    if not args.skip_models:
        models, summary = bench_models(args)
        bf16 = next(r for r in models if r["variant"] == "bfloat16 dense")
        bnb = next(r for r in models if r["variant"] == "bitsandbytes nf4 (bf16)")
        print(f"\nSmolLM2-135M (4-bit, group {args.group_size}); kernels: {summary}")
        print(f"decode: batch 1, {args.decode_steps} steps after a 16-token prompt; prefill: {args.prefill_batch} x {args.prefill_len} tokens")
        print(f"{'variant':<30} {'decode tok/s':>12} {'x bf16':>7} {'x nf4':>7} {'prefill tok/s':>14} {'x bf16':>7}")
        for row in models:
            row["decode_ratio_to_bf16_dense"] = row["decode_tokens_per_s"] / bf16["decode_tokens_per_s"]
            row["decode_ratio_to_bnb_nf4"] = row["decode_tokens_per_s"] / bnb["decode_tokens_per_s"]
            row["prefill_ratio_to_bf16_dense"] = row["prefill_tokens_per_s"] / bf16["prefill_tokens_per_s"]
            print(
                f"{row['variant']:<30} {row['decode_tokens_per_s']:12.1f} {row['decode_ratio_to_bf16_dense']:7.2f} "
                f"{row['decode_ratio_to_bnb_nf4']:7.2f} {row['prefill_tokens_per_s']:14.1f} {row['prefill_ratio_to_bf16_dense']:7.2f}"
            )
        result.update({
            "decode_steps": args.decode_steps, "prefill_batch": args.prefill_batch, "prefill_len": args.prefill_len,
            "prefill_repeats": args.prefill_repeats, "kernel_summary": summary, "models": models,
        })
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
