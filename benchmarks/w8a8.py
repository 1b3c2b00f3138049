"""W8A8 (int8 activations x int8 weights: oneDNN for prefill, ``torch._int_mm`` for decode) on SmolLM2-135M,
with and without the super activation held out of the activation quantization (the paper's section 4.1).

Quality: perplexity ratio (ppl / full-precision ppl) on ``--tokens`` tokens of the built-in text, windows of
512 with BOS, float32 model, for full precision, naive W8A8 (same kernels, no hold-out) and W8A8 with the
hold-out, per-tensor and per-token activation scales; "recovered" = share of naive W8A8's perplexity loss the
hold-out removes. Speed: prefill (``--prefill-batch`` x ``--prefill-len``) and batch-1 greedy decode tokens/s
of the bfloat16 W8A8 models against the bfloat16 dense model, every row back to back in each round, best round
of each (the CPU is shared: interference only adds time, so the minimum is the most repeatable estimate). Then the
prefill rows again on a random model with Llama-3.2-1B's layer shapes (``--no-scaled`` skips it).

    python3 benchmarks/w8a8.py            # writes benchmarks/results/w8a8.json
    python3 benchmarks/w8a8.py --no-speed
    python3 benchmarks/w8a8.py --no-quality   # speed only; keeps the recorded quality rows
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from optimum_superweight import SuperWeightConfig  # noqa: E402
from optimum_superweight.default_model import default_model_path
from optimum_superweight.kernels.guard import cpu_name  # noqa: E402
from optimum_superweight.evaluation import perplexity  # noqa: E402
from optimum_superweight.kernels import kernel_summary  # noqa: E402

SUPER_WEIGHT = {"module": "model.layers.11.mlp.down_proj", "row": 507, "col": 1229}


#: Quality variants: (row label, hold_out_super_activation, massive_activation_ratio, smoothquant_alpha).
VARIANTS = (
    ("naive", False, None, None),
    ("super activation held out", True, None, None),
    ("super + massive activations held out", True, 20.0, None),
    ("SmoothQuant alpha 0.5, nothing held out", False, None, 0.5),
)


def w8a8_config(
    scale: str, holdout: bool, massive: float | None = 20.0, alpha: float | None = None
) -> SuperWeightConfig:
    return SuperWeightConfig(
        bits=8, group_size=-1, activation_bits=8, activation_scale=scale, hold_out_super_activation=holdout,
        massive_activation_ratio=massive, smoothquant_alpha=alpha, super_weights=[SUPER_WEIGHT],
    )


def load(path: str, dtype: torch.dtype, config: SuperWeightConfig | None = None):
    kwargs = {} if config is None else {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


def _perplexity(model, tokenizer, tokens: int, reference: bool) -> float:
    from optimum_superweight.kernels import force_reference

    force_reference(reference)
    try:
        with torch.no_grad():
            return float(perplexity(model, tokenizer, max_tokens=tokens, window=512))
    finally:
        force_reference(False)


def quality(path: str, tokenizer, tokens: int) -> dict:
    """Perplexity rows, each W8A8 model evaluated twice: on its int8 kernels, and on the float32 fake-quant
    reference kernel. Both compute the same codes; they differ in float32 summation order (1e-6 relative per
    layer), which flips activation codes that sit on rounding ties and so moves W8A8 perplexity by about 1%:
    the spread between the two columns is the measurement's own noise."""
    rows = {}
    fp = _perplexity(load(path, torch.float32), tokenizer, tokens, False)
    rows["full precision"] = {"ppl": fp, "ratio": 1.0}
    print(f"full precision: ppl {fp:.3f}", flush=True)
    for scale in ("per_tensor", "per_token"):
        naive: dict[str, float] = {}
        for label, holdout, massive, alpha in VARIANTS:
            model = load(path, torch.float32, w8a8_config(scale, holdout, massive, alpha))
            name = f"W8A8 {scale}, {label}"
            held = model.config.quantization_config.activation_holdout or {}
            row = {"kernels": kernel_summary(model, torch.float32, 512),
                   "held_out_channels": sum(len(c) for c in held.values()), "layers_holding_out": len(held)}
            for prefix, reference in (("", False), ("reference_", True)):
                ppl = _perplexity(model, tokenizer, tokens, reference)
                row[prefix + "ppl"], row[prefix + "ratio"] = ppl, ppl / fp
                if prefix not in naive:
                    naive[prefix] = ppl
                elif naive[prefix] > fp:
                    row[prefix + "recovered"] = (naive[prefix] - ppl) / (naive[prefix] - fp)
            rows[name] = row
            print(f"{name}: ppl {row['ppl']:.3f} (x{row['ratio']:.4f}), reference kernel {row['reference_ppl']:.3f} "
                  f"(x{row['reference_ratio']:.4f})", flush=True)
    return rows


@dataclass
class SpeedRow:
    """A model in the speed table and how it runs: which W8A8 kernels stay registered, fused quantizer or not."""

    config: SuperWeightConfig | None
    portable_kernel_only: bool = False  # every int8 kernel but torch._int_mm taken out of the registry
    fused: bool = True  # the torch.compile-fused activation quantizer (kernels/fused.py)


SPEED_ROWS = {
    "bf16 dense": SpeedRow(None),
    "W8A8 per_tensor, naive": SpeedRow(w8a8_config("per_tensor", False, None)),
    "W8A8 per_tensor, held out": SpeedRow(w8a8_config("per_tensor", True)),
    "W8A8 per_token, held out": SpeedRow(w8a8_config("per_token", True)),
    "W8A8 per_tensor, held out, eager quantizer": SpeedRow(w8a8_config("per_tensor", True), fused=False),
    "W8A8 per_tensor, held out, torch._int_mm kernel": SpeedRow(
        w8a8_config("per_tensor", True), portable_kernel_only=True
    ),
}


@contextmanager
def running(row: SpeedRow):
    """The kernel registry and quantizer setting of ``row`` while a measurement runs."""
    from optimum_superweight.kernels import w8a8 as w8a8_kernels
    from optimum_superweight.kernels.fused import set_fused_quantization

    registered = list(w8a8_kernels._W8A8_KERNELS)
    if row.portable_kernel_only:
        w8a8_kernels._W8A8_KERNELS[:] = [k for k in registered if k.name in ("cpu-w8a8", "w8a8-reference")]
    set_fused_quantization(row.fused)
    try:
        yield
    finally:
        w8a8_kernels._W8A8_KERNELS[:] = registered
        set_fused_quantization(True)


def speed(path: str, rows: dict[str, SpeedRow], batch: int, length: int, decode_tokens: int, repeats: int) -> dict:
    models = {name: load(path, torch.bfloat16, row.config) for name, row in rows.items()}
    vocab = min(m.config.vocab_size for m in models.values())
    ids = torch.randint(min(100, vocab // 2), min(10000, vocab), (batch, length))
    prompt = ids[:1, :16]
    prefill_s: dict[str, list[float]] = {name: [] for name in models}
    decode_s: dict[str, list[float]] = {name: [] for name in models}

    def prefill(name):
        with running(rows[name]), torch.no_grad():
            start = time.perf_counter()
            models[name](input_ids=ids, logits_to_keep=1)
            return time.perf_counter() - start

    def decode(name):
        with running(rows[name]), torch.no_grad():
            start = time.perf_counter()
            models[name].generate(prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                  do_sample=False, pad_token_id=0)
            return time.perf_counter() - start

    for name in models:  # warm-up: kernel layouts, compiled quantizer, allocator
        prefill(name)
        if decode_tokens:
            decode(name)
    for _ in range(repeats):  # interleaved: every variant sees the same machine load
        for name in models:
            prefill_s[name].append(prefill(name))
            if decode_tokens:
                decode_s[name].append(decode(name))
    # Best of the rounds: on a shared machine interference only ever adds time, so the minimum is the most
    # repeatable estimate (the raw times are kept in the result file).
    base = next(iter(models))
    out = {}
    for name in models:
        row = {"prefill_tokens_per_s": batch * length / min(prefill_s[name]),
               "prefill_vs_bf16": min(prefill_s[base]) / min(prefill_s[name]), "prefill_s": prefill_s[name],
               "kernels": None}
        if decode_tokens:
            row["decode_tokens_per_s"] = decode_tokens / min(decode_s[name])
            row["decode_vs_bf16"] = min(decode_s[base]) / min(decode_s[name])
            row["decode_s"] = decode_s[name]
        if rows[name].config is not None:
            with running(rows[name]):
                row["kernels"] = kernel_summary(models[name], torch.bfloat16, length)
        out[name] = row
        decode_text = ""
        if decode_tokens:
            decode_text = f", decode {row['decode_tokens_per_s']:.1f} tok/s (x{row['decode_vs_bf16']:.2f})"
        print(f"{name}: prefill {row['prefill_tokens_per_s']:.0f} tok/s (x{row['prefill_vs_bf16']:.2f}){decode_text}",
              flush=True)
    return {"prefill": f"{batch}x{length}", "decode_tokens": decode_tokens, "repeats": repeats, "rows": out}


#: Llama-3.2-1B's layer shapes (hidden 2048, MLP 8192, 32 query / 8 key-value heads), 2 layers, random weights
#: with a planted super weight: where the GEMMs, not the per-call overheads, dominate prefill.
SCALED_SHAPE = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_hidden_layers": 2}
SCALED_SUPER_WEIGHT = {"module": "model.layers.0.mlp.down_proj", "row": 100, "col": 200}


def scaled_speed(batch: int, length: int, repeats: int) -> dict:
    """Prefill speed of W8A8 against bfloat16 on a synthetic model with 1B-class layer shapes."""
    import tempfile

    from optimum_superweight.testing import build_tiny_model

    def config(scale: str, holdout: bool) -> SuperWeightConfig:
        return SuperWeightConfig(bits=8, group_size=-1, activation_bits=8, activation_scale=scale,
                                 hold_out_super_activation=holdout, massive_activation_ratio=None,
                                 super_weights=[SCALED_SUPER_WEIGHT])

    sw = SCALED_SUPER_WEIGHT
    model = build_tiny_model("llama", super_weights=[(0, sw["row"], sw["col"])], **SCALED_SHAPE)
    rows = {"bf16 dense": SpeedRow(None), "W8A8 per_tensor, naive": SpeedRow(config("per_tensor", False)),
            "W8A8 per_tensor, held out": SpeedRow(config("per_tensor", True)),
            "W8A8 per_token, held out": SpeedRow(config("per_token", True))}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        result = speed(folder, rows, batch, length, 0, repeats)
    result["shape"] = SCALED_SHAPE
    return result


#: (tokens, channels) of activations quantized per call: SmolLM2's q/k/v and down_proj inputs at 8 x 512
#: tokens, and a 1B-class down_proj input at 4 x 512.
QUANTIZER_SHAPES = ((4096, 576), (4096, 1536), (2048, 8192))


def quantizer_speed(repeats: int) -> dict:
    """Milliseconds to quantize one bfloat16 activation (one held-out channel): the eager path against the
    ``torch.compile``-fused one, best of ``repeats`` (both give the reference's codes, checked here too)."""
    from optimum_superweight.kernels.w8a8 import quantize_activations, quantize_activations_onednn

    rows = []
    for tokens, channels in QUANTIZER_SHAPES:
        x = torch.randn(tokens, channels).to(torch.bfloat16)
        holdout = torch.tensor([5])
        keep = torch.ones(channels, dtype=torch.bfloat16)
        keep[holdout] = 0
        for scale in ("per_tensor", "per_token"):
            codes, _ = quantize_activations(x, holdout, scale)
            row = {"tokens": tokens, "channels": channels, "scale": scale}
            for label, mask in (("eager_ms", None), ("fused_ms", keep)):
                result = quantize_activations_onednn(x, holdout, scale, mask)  # warm-up (compiles once)
                assert torch.equal(result.signed_codes(), codes), "fast quantizer codes differ from the reference"
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    quantize_activations_onednn(x, holdout, scale, mask)
                    times.append(time.perf_counter() - start)
                row[label] = 1000 * min(times)
            rows.append(row)
            print(f"quantize {tokens}x{channels} {scale}: eager {row['eager_ms']:.2f} ms, "
                  f"fused {row['fused_ms']:.2f} ms", flush=True)
    return {"repeats": repeats, "rows": rows}


def quantizer_table(result: dict) -> str:
    lines = ["| activation (tokens x channels) | scale | eager ms | torch.compile-fused ms | speed-up |",
             "|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['tokens']} x {row['channels']} | {row['scale']} | {row['eager_ms']:.2f} | "
                     f"{row['fused_ms']:.2f} | x{row['eager_ms'] / row['fused_ms']:.1f} |")
    return "\n".join(lines)


#: Profiler op names -> where prefill time goes (the W8A8 model's own aten::mm calls are the hold-out's rank-k
#: GEMMs; both models' lm_head runs on one token only).
def _profile_category(op: str, quantized: bool) -> str:
    if op == "onednn::qlinear_pointwise":
        return "int8 GEMM"
    if op == "aten::mm":
        return "held-out rank-k GEMMs" if quantized else "bf16 GEMM"
    if "CompiledFxGraph" in op or op in ("aten::quantize_per_tensor", "aten::aminmax", "aten::amax", "aten::amin",
                                         "TorchDynamo Cache Lookup"):
        return "activation quantization"
    return "everything else"


def prefill_profile(path: str, batch: int, length: int) -> dict:
    """Seconds of CPU time per category (torch.profiler, self time) in one prefill of the bfloat16 dense model
    and of W8A8 per-tensor with the hold-out, after a warm-up prefill."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, 10000, (batch, length))
    out = {}
    for name in ("bf16 dense", "W8A8 per_tensor, held out"):
        row = SPEED_ROWS[name]
        model = load(path, torch.bfloat16, row.config)
        with running(row), torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(input_ids=ids, logits_to_keep=1)
        seconds: dict[str, float] = {}
        for event in prof.key_averages():
            category = _profile_category(event.key, row.config is not None)
            seconds[category] = seconds.get(category, 0.0) + event.self_cpu_time_total / 1e6
        out[name] = seconds
        print(f"profile {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(seconds.items())), flush=True)
    return {"prefill": f"{batch}x{length}", "rows": out}


def profile_table(result: dict) -> str:
    categories = ["bf16 GEMM", "int8 GEMM", "activation quantization", "held-out rank-k GEMMs", "everything else"]
    lines = [f"| prefill {result['prefill']}, CPU seconds | " + " | ".join(categories) + " | total |",
             "|---|" + "---:|" * (len(categories) + 1)]
    for name, seconds in result["rows"].items():
        cells = [f"{seconds[c]:.2f}" if c in seconds else "–" for c in categories]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(seconds.values()):.2f} |")
    return "\n".join(lines)


def quality_table(rows: dict) -> str:
    def percent(value):
        return "" if value is None else f"{value:.0%}"

    lines = ["| setting | held-out channels (layers) | ppl | ratio | recovered | ratio, reference kernel "
             "| recovered, reference kernel |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        held = f"{row['held_out_channels']} ({row['layers_holding_out']})" if "held_out_channels" in row else ""
        reference = f"x{row['reference_ratio']:.4f}" if "reference_ratio" in row else ""
        lines.append(f"| {name} | {held} | {row['ppl']:.3f} | x{row['ratio']:.4f} | {percent(row.get('recovered'))} "
                     f"| {reference} | {percent(row.get('reference_recovered'))} |")
    return "\n".join(lines)


def speed_table(speed: dict, title: str = "model (bfloat16)") -> str:
    decode = bool(speed.get("decode_tokens"))
    head = f"| {title} | prefill {speed['prefill']} tok/s | vs bf16 |"
    head += " decode b1 tok/s | vs bf16 |" if decode else ""
    lines = [head + " kernels |", "|---|---:|---:|" + ("---:|---:|" if decode else "") + "---|"]
    for name, row in speed["rows"].items():
        kernels = ", ".join(f"{k}: {v}" for k, v in (row.get("kernels") or {}).items()) or "–"
        line = f"| {name} | {row['prefill_tokens_per_s']:.0f} | x{row['prefill_vs_bf16']:.2f} |"
        if decode:
            line += f" {row['decode_tokens_per_s']:.1f} | x{row['decode_vs_bf16']:.2f} |"
        lines.append(line + f" {kernels} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    parts = [quality_table(result["quality"])] if "quality" in result else []
    if "speed" in result:
        parts.append(speed_table(result["speed"]))
    if "scaled_speed" in result:
        parts.append(speed_table(result["scaled_speed"], "1B-shaped layers (bfloat16)"))
    if "quantizer_speed" in result:
        parts.append(quantizer_table(result["quantizer_speed"]))
    if "profile" in result:
        parts.append(profile_table(result["profile"]))
    return "\n\n".join(parts)


def _speed_verdict(speed: dict) -> str:
    rows = speed["rows"]
    held = rows.get("W8A8 per_tensor, held out")
    if held is None:
        return ""
    verdict = "faster than" if held["prefill_vs_bf16"] > 1 else "slower than"
    return f"W8A8 per-tensor with the hold-out prefills {verdict} bfloat16 dense here (x{held['prefill_vs_bf16']:.2f})."


def w8a8_markdown(result: dict) -> str:
    """The W8A8 section of ``benchmarks/RESULTS.md`` from ``results/w8a8.json``."""
    quality = result.get("quality", {})
    lines = [
        "## W8A8: int8 activations with the super activation held out",
        "",
        f"`python3 benchmarks/w8a8.py` ({result.get('date', 'date not recorded')}"
        + (f"; quality rows from {result['quality_date']}" if result.get("quality_date") else "")
        + (f"; speed rows from {result['speed_date']}" if result.get("speed_date") else "")
        + f", {result.get('threads')} threads, {result.get('machine', 'CPU not recorded')}, "
        f"torch {result.get('torch')}). {result['model']}, 8-bit symmetric per-row weights and dynamic 8-bit "
        f"activations for every decoder projection; perplexity on {result['tokens']} tokens of the built-in text "
        "(windows of 512 with BOS), float32 model; *recovered* = share of naive W8A8's perplexity increase the "
        "hold-out removes; *reference kernel*: the same models on the float32 fake-quant reference instead of the "
        "int8 kernels (same codes, other float32 summation order: their spread is the measurement's noise). "
        "*Super activation held out*: the paper's section 4.1 (the super weights' rows on "
        "hidden-size inputs, their columns in their own layer). *Super + massive*: also each layer's input "
        "channels whose peak on 2048 calibration tokens (the end of the built-in text, disjoint from the "
        "evaluated tokens) is at least 20x the median channel's, at most 8 per layer "
        "(`massive_activation_ratio`, `max_holdout_channels`; the default). *SmoothQuant*: "
        "`smoothquant_alpha=0.5`, the migration of Xiao et al. (2023) folded into the norms before q/k/v and "
        "gate/up, factors from the same calibration text, nothing held out (the paper's comparison; it runs the "
        "naive rows' kernels, so its speed is theirs).",
        "",
        quality_table(quality),
    ]
    if "speed" in result:
        s = result["speed"]
        lines += [
            "",
            f"Speed, bfloat16 models, every row measured back to back in each of {s['repeats']} rounds (prefill "
            f"{s['prefill']}, batch-1 greedy decode of {s['decode_tokens']} tokens), best round of each (the "
            "machine is shared: interference only adds time; raw times in the result file). *Kernels* at 512 "
            "tokens per call: below `dense_threshold()` = 64 tokens, decode included, every row runs "
            "`torch._int_mm`. *Eager quantizer*: the activation "
            "quantization without `torch.compile` (`OPTIMUM_SUPERWEIGHT_COMPILE=0`). " + _speed_verdict(s),
            "",
            speed_table(s),
            "",
        ]
    if "profile" in result:
        lines += [
            "",
            "Where SmolLM2's prefill time goes (torch.profiler self CPU time, one prefill of each after a warm-up: "
            "a single sample on a shared machine, so the wall-clock rows above are the measure): its matrices are "
            "small (576 x 576 to 576 x 1536), so the GEMMs are only about half of a bfloat16 prefill, and W8A8 "
            "adds the activation quantization and the hold-out's rank-k GEMMs (one output-sized pass each) to "
            "the int8 GEMM.",
            "",
            profile_table(result["profile"]),
        ]
    if "scaled_speed" in result:
        s = result["scaled_speed"]
        shape = s["shape"]
        lines += [
            "",
            f"The same kernels on 1B-class layer shapes (a random Llama with hidden size {shape['hidden_size']}, MLP "
            f"{shape['intermediate_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, "
            f"{shape['num_hidden_layers']} layers, planted super weight; prefill {s['prefill']}, {s['repeats']} "
            "rounds): the int8 GEMM's gain grows with the matrices while the per-call quantization and hold-out "
            "costs grow only with the activations. " + _speed_verdict(s),
            "",
            speed_table(s, "1B-shaped layers (bfloat16)"),
        ]
    if "quantizer_speed" in result:
        q = result["quantizer_speed"]
        lines += [
            "",
            f"Activation quantization alone (bfloat16 input, one held-out channel, best of {q['repeats']}; both "
            "paths give the reference's codes): the `torch.compile`-fused quantizer against the eager one.",
            "",
            quantizer_table(q),
        ]
    lines += ["", result.get("note", "")]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-scaled", action="store_true", help="skip the 1B-shaped prefill table")
    parser.add_argument("--output", default=str(ROOT / "results" / "w8a8.json"))
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = {"model": "SmolLM2-135M-Instruct", "date": time.strftime("%Y-%m-%d %H:%M"), "super_weight": SUPER_WEIGHT,
              "tokens": args.tokens, "window": 512, "threads": args.threads, "torch": torch.__version__,
              "machine": cpu_name()}
    previous = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    if not args.no_quality:
        result["quality"] = quality(path, tokenizer, args.tokens)
    elif "quality" in previous:  # a speed-only rerun keeps the recorded quality rows
        result["quality"] = previous["quality"]
        result["quality_date"] = previous.get("quality_date", previous.get("date"))
    if args.no_speed:  # ... and a quality-only rerun the recorded speed rows
        for key in ("speed", "scaled_speed"):
            if key in previous:
                result[key] = previous[key]
                result["speed_date"] = previous.get("speed_date", previous.get("date"))
    else:
        result["speed"] = speed(
            path, SPEED_ROWS, args.prefill_batch, args.prefill_len, args.decode_tokens, args.repeats
        )
        if not args.no_scaled:
            result["scaled_speed"] = scaled_speed(4, 512, args.repeats)
    result["quantizer_speed"] = quantizer_speed(args.repeats * 4)
    result["profile"] = prefill_profile(path, args.prefill_batch, args.prefill_len)
    print(table(result))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
