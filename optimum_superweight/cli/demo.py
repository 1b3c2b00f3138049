"""``optimum-superweight demo``: the main job end to end on a model (the embedded SmolLM2 by default).

Detect the super weights while quantizing on load, save the compressed checkpoint, reload it with a
plain ``from_pretrained``, and report coordinates, perplexity, sizes, timings and a short generation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .options import add_method_arguments, describe_grid, method_options
from .paths import (
    add_overwrite_argument,
    check_model_source,
    check_not_quantized,
    check_output_file,
    check_output_folder,
    staged_folder,
)

__all__ = ["register", "run", "folder_size"]

DEFAULT_PROMPT = "What is the capital of France?"
DEFAULT_OUTPUT = "out/superweight-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="detect, quantize, save, reload and evaluate a model (default: the embedded SmolLM2-135M-Instruct)",
        description=__doc__,
    )
    parser.add_argument("--model", default=None, help="local model folder or Hub id (default: embedded SmolLM2)")
    parser.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=64, help="inputs per scale, -1 per row (default: 64)")
    add_method_arguments(parser)
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT,
        help=f"where to save the compressed checkpoint (default: {DEFAULT_OUTPUT}, where a previous demo checkpoint "
        "is replaced; another non-empty folder needs --overwrite)",
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens of built-in text for perplexity")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the short generation")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens to generate")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    add_overwrite_argument(parser)
    parser.set_defaults(func=run, check=check)


def folder_size(path: Path) -> int:
    """Bytes of the weight files (safetensors) in a model folder."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _holds_superweight_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == "superweight"


def _dense_bytes(model) -> int:
    """Bytes of the floating-point tensors that were not quantized (embeddings, norms, lm_head)."""
    from ..nn.linear import SuperWeightLinear

    quantized = {id(p) for m in model.modules() if isinstance(m, SuperWeightLinear) for p in m.parameters()}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in quantized and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _check_outputs(args: argparse.Namespace, source: str | None) -> Path:
    # Re-running the demo replaces its own previous checkpoint (default folder only); else --overwrite is needed.
    replace = args.overwrite or (args.output == DEFAULT_OUTPUT and _holds_superweight_checkpoint(Path(args.output)))
    output = check_output_folder(args.output, replace, "--output", source)
    check_output_file(args.json, args.overwrite, "--json")
    return output


def check(args: argparse.Namespace) -> None:
    """The paths, before torch and transformers are imported (``run`` checks them again: it may run alone)."""
    _check_outputs(args, check_model_source(args.model, what="--model") if args.model else None)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .. import SuperWeightConfig, default_model_path
    from ..errors import reraise_hub_errors
    from ..evaluation import perplexity

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    source = check_model_source(args.model, what="--model") if args.model else str(default_model_path())
    output = _check_outputs(args, source)
    replacing = output.is_dir() and any(output.iterdir())
    config = SuperWeightConfig(bits=args.bits, group_size=args.group_size, **method_options(args))
    with reraise_hub_errors(source, "loading"):
        check_not_quantized(source, "--model")
    report: dict = {"model": args.model or "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)"}
    print(f"model: {report['model']}")

    with reraise_hub_errors(source, "loading"):
        tokenizer = AutoTokenizer.from_pretrained(source)
        start = time.perf_counter()
        full = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    report["load_full_precision_s"] = time.perf_counter() - start
    full_ppl = float(perplexity(full, tokenizer, max_tokens=args.max_tokens))
    full_text = _generate(full, tokenizer, args.prompt, args.new_tokens)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    del full

    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, quantization_config=config)
    report["quantize_on_load_s"] = time.perf_counter() - start
    found = quantized.config.quantization_config.get_super_weights()

    if replacing:
        print(f"note: replacing the checkpoint in {output}/")
    with staged_folder(output) as staging:
        quantized.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        before = quantized(ids).logits
    del quantized
    start = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    report["reload_s"] = time.perf_counter() - start
    with torch.no_grad():
        identical = bool(torch.equal(reloaded(ids).logits, before))
    quant_ppl = float(perplexity(reloaded, tokenizer, max_tokens=args.max_tokens))
    quant_text = _generate(reloaded, tokenizer, args.prompt, args.new_tokens)

    report.update(
        super_weights=[sw.to_dict() for sw in found],
        settings={"bits": args.bits, "group_size": args.group_size, "method": config.method, "symmetric": config.symmetric,
                  "zero_point": config.zero_point},
        bits_per_weight=config.bits_per_weight,
        perplexity={"full_precision": full_ppl, "quantized": quant_ppl, "ratio": quant_ppl / full_ppl},
        size_bytes={
            "full_precision_fp32": full_bytes,
            "checkpoint": folder_size(output),
            "kept_full_precision": _dense_bytes(reloaded),
        },
        reload_identical_logits=identical,
        generation={"prompt": args.prompt, "full_precision": full_text, "quantized": quant_text},
        checkpoint=str(output),
    )

    print(f"\nsuper weights found ({len(found)}):")
    for sw in found:
        extra = f", {sw.classification}" if sw.classification else ""
        impact = f", zeroing it: perplexity x{sw.impact:.2f}" if sw.impact else ""
        print(f"  {sw.paper_notation():<45} value {sw.value:+.4f}{extra}{impact}")
    settings = describe_grid(config)
    print(f"\nquantized: {args.bits}-bit, group {args.group_size}, {settings}, {config.bits_per_weight:.3f} bits/weight")
    print(f"perplexity ({args.max_tokens} tokens of built-in text, windows of 512):")
    print(f"  full precision  {full_ppl:8.3f}")
    print(f"  quantized       {quant_ppl:8.3f}   (x{quant_ppl / full_ppl:.3f})")
    fp_mb, ck_mb = full_bytes / 2**20, report["size_bytes"]["checkpoint"] / 2**20
    dense_mb = report["size_bytes"]["kept_full_precision"] / 2**20
    print(
        f"size: full precision {fp_mb:.1f} MiB (fp32), compressed checkpoint {ck_mb:.1f} MiB (x{fp_mb / ck_mb:.2f} smaller;"
        f" {dense_mb:.1f} MiB of it is embeddings and norms kept in full precision)"
    )
    print(
        f"time: load fp {report['load_full_precision_s']:.1f}s, quantize on load (incl. detection) "
        f"{report['quantize_on_load_s']:.1f}s, reload {report['reload_s']:.1f}s; reload logits identical: {identical}"
    )
    print(f"\nprompt: {args.prompt}")
    print(f"  full precision: {full_text}")
    print(f"  quantized:      {quant_text}")
    print(f"\ncompressed checkpoint saved in {output}/ (reload: import optimum_superweight; AutoModelForCausalLM.from_pretrained)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if identical and found else 1
