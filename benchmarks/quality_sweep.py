"""Quality sweep on the embedded SmolLM2-135M-Instruct: perplexity ratio per quantization setting.

Every decoder linear layer is quantized (the tied lm_head/embedding stays full precision), perplexity is
measured with the package protocol (first 4096 tokens of the built-in text, windows of 512 + BOS), and the
ratio to the full-precision model is reported with the true storage cost in bits per weight (codes,
scales, zero-points and exact super weights, over all quantized weights). GPTQ calibrates on the *end* of
the built-in text (disjoint from the evaluated tokens); its statistics are collected once and shared.

    python3 benchmarks/quality_sweep.py                    # all settings (~15-30 min on 2 busy cores)
    python3 benchmarks/quality_sweep.py --only gptq        # rows whose name contains "gptq"
    python3 benchmarks/quality_sweep.py --max-tokens 2048  # quicker, noisier

Writes ``benchmarks/results/quality_sweep.json`` (with ``--only``: ``quality_sweep.partial.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimum_superweight import SuperWeightConfig  # noqa: E402
from optimum_superweight.default_model import DEFAULT_MODEL_SUPER_WEIGHT, default_model_path  # noqa: E402
from optimum_superweight.evaluation import perplexity  # noqa: E402
from optimum_superweight.models.calibration import calibration_token_ids, collect_hessians  # noqa: E402
from optimum_superweight.models.replace import modules_to_convert, quantize_model, resolve_modules_to_not_convert  # noqa: E402
from optimum_superweight.nn.linear import SuperWeightLinear  # noqa: E402

MODULE, ROW, COL = DEFAULT_MODEL_SUPER_WEIGHT
SW = [{"module": MODULE, "row": ROW, "col": COL}]

# name -> (SuperWeightConfig kwargs, hold the super weight out?)
SETTINGS: dict[str, tuple[dict, bool]] = {
    "rtn int4 sym g64": ({"bits": 4, "group_size": 64}, True),
    "rtn int4 asym g128": ({"bits": 4, "group_size": 128, "symmetric": False}, True),
    "rtn+clip int4 sym g64": ({"bits": 4, "group_size": 64, "clip_search": True}, True),
    "rtn+clip int4 asym g128": ({"bits": 4, "group_size": 128, "symmetric": False, "clip_search": True}, True),
    "gptq int4 sym g64": ({"bits": 4, "group_size": 64, "method": "gptq", "clip_search": True}, True),
    "gptq int4 sym g64 noclip": ({"bits": 4, "group_size": 64, "method": "gptq"}, True),
    "gptq int4 asym g128": ({"bits": 4, "group_size": 128, "symmetric": False, "method": "gptq", "clip_search": True}, True),
    "gptq int4 sym g128": ({"bits": 4, "group_size": 128, "method": "gptq", "clip_search": True}, True),
    "rtn int3 asym g64": ({"bits": 3, "group_size": 64, "symmetric": False}, True),
    "gptq int3 asym g64": ({"bits": 3, "group_size": 64, "symmetric": False, "method": "gptq", "clip_search": True}, True),
    "gptq int3 sym g64": ({"bits": 3, "group_size": 64, "method": "gptq", "clip_search": True}, True),
    "gptq int3 asym g128": ({"bits": 3, "group_size": 128, "symmetric": False, "method": "gptq", "clip_search": True}, True),
    "rtn int4 sym per-channel, no hold-out": ({"bits": 4, "group_size": -1}, False),
    "rtn+clip int4 sym per-channel, no hold-out": ({"bits": 4, "group_size": -1, "clip_search": True}, False),
    "rtn+clip int4 sym per-channel, SW held out": ({"bits": 4, "group_size": -1, "clip_search": True}, True),
    "rtn int4 asym per-channel, no hold-out": ({"bits": 4, "group_size": -1, "symmetric": False}, False),
    "rtn+clip int4 asym per-channel, SW held out": ({"bits": 4, "group_size": -1, "symmetric": False, "clip_search": True}, True),
    "gptq int4 sym per-channel, SW held out": ({"bits": 4, "group_size": -1, "method": "gptq", "clip_search": True}, True),
    "gptq int4 asym per-channel, SW held out": (
        {"bits": 4, "group_size": -1, "symmetric": False, "method": "gptq", "clip_search": True},
        True,
    ),
}


def _bits_per_weight(model: torch.nn.Module) -> float:
    stored = weights = 0
    for module in model.modules():
        if isinstance(module, SuperWeightLinear):
            stored += module.storage_bytes() * 8
            weights += module.in_features * module.out_features
    return stored / weights


@torch.no_grad()
def _nf4(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    """bitsandbytes NF4 (blocksize 64) quantize -> dequantize of the same layers: the reference to beat."""
    import bitsandbytes.functional as bnbf

    for name in targets:
        linear = model.get_submodule(name)
        packed, state = bnbf.quantize_4bit(linear.weight.data.contiguous(), blocksize=64, quant_type="nf4")
        linear.weight.data = bnbf.dequantize_4bit(packed, state).to(linear.weight.dtype)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only settings whose name contains this")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--no-nf4", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--hessian-cache", type=Path, default=None,
                        help="safetensors file to reuse calibration statistics across runs (written if missing)")
    args = parser.parse_args()
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text_ids = None

    def ppl(model: torch.nn.Module) -> float:
        return float(perplexity(model, tokenizer, max_tokens=args.max_tokens))

    t0 = time.time()
    full = ppl(base)
    print(f"fp32 perplexity {full:.4f} ({time.time() - t0:.0f}s)", flush=True)

    config_probe = SuperWeightConfig()
    targets = list(modules_to_convert(base, resolve_modules_to_not_convert(base, config_probe)))
    selected = {k: v for k, v in SETTINGS.items() if not args.only or any(o in k for o in args.only)}
    rows = []
    hessians = None
    if any(kwargs.get("method") == "gptq" for kwargs, _ in selected.values()):
        t0 = time.time()
        if args.hessian_cache is not None and args.hessian_cache.exists():
            from safetensors.torch import load_file

            hessians = load_file(args.hessian_cache)
            print(f"calibration statistics read from {args.hessian_cache}", flush=True)
        else:
            ids = calibration_token_ids(tokenizer, args.calibration_tokens)
            hessians = collect_hessians(base, targets, ids, bos_id=tokenizer.bos_token_id)
            print(f"calibration: {len(ids)} tokens, {len(targets)} layers ({time.time() - t0:.0f}s)", flush=True)
            if args.hessian_cache is not None:
                from safetensors.torch import save_file

                save_file({k: v.clone().contiguous() for k, v in hessians.items()}, args.hessian_cache)

    if not args.no_nf4 and (not args.only or any(o in "bnb nf4 blocksize 64" for o in args.only)):
        t0 = time.time()
        value = ppl(_nf4(copy.deepcopy(base), targets))
        rows.append({"setting": "bnb nf4 blocksize 64", "bits_per_weight": 4.25, "ppl": value, "ratio": value / full,
                     "quantize_s": None})
        print(f"{'bnb nf4 blocksize 64':48s} bpw 4.250  ppl {value:9.3f}  x{value / full:.3f} ({time.time() - t0:.0f}s)", flush=True)

    for name, (kwargs, hold_out) in selected.items():
        model = copy.deepcopy(base)
        config = SuperWeightConfig(super_weights=SW if hold_out else [], detect=False, **kwargs)
        t0 = time.time()
        quantize_model(model, config, tokenizer=tokenizer, hessians=hessians)
        seconds = time.time() - t0
        value = ppl(model)
        bpw = _bits_per_weight(model)
        rows.append({"setting": name, "config": config.to_dict() | {"super_weights": config.super_weights},
                     "bits_per_weight": bpw, "ppl": value, "ratio": value / full, "quantize_s": seconds})
        print(f"{name:48s} bpw {bpw:.3f}  ppl {value:9.3f}  x{value / full:.3f} (quantize {seconds:.0f}s)", flush=True)
        del model

    print()
    print(f"| setting | bits/weight | ppl | ratio |\n|---|---|---|---|\n| fp32 | 32 | {full:.3f} | x1.000 |")
    for row in rows:
        print(f"| {row['setting']} | {row['bits_per_weight']:.3f} | {row['ppl']:.3f} | x{row['ratio']:.3f} |")
    output = args.output or ROOT / "benchmarks" / "results" / ("quality_sweep.partial.json" if args.only else "quality_sweep.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (embedded, float32)",
        "protocol": f"first {args.max_tokens} tokens of builtin_text(), windows of 512 + BOS",
        "calibration": f"last {args.calibration_tokens} tokens of builtin_text() (disjoint), windows of 512 + BOS",
        "fp32_ppl": full,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
