"""``optimum-superweight quantize MODEL OUTPUT``: quantize a full-precision model and save the checkpoint."""

from __future__ import annotations

import argparse
import re
import time

__all__ = ["register", "run", "parse_super_weight"]

_COORDINATE = re.compile(r"^(?P<module>[\w.]+):(?P<row>\d+),(?P<col>\d+)$")


def parse_super_weight(text: str) -> dict:
    """Parse ``MODULE:ROW,COL`` (e.g. ``model.layers.2.mlp.down_proj:3968,7003``)."""
    match = _COORDINATE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"--super-weight {text!r} is invalid: expected MODULE:ROW,COL, e.g. model.layers.2.mlp.down_proj:3968,7003"
        )
    return {"module": match["module"], "row": int(match["row"]), "col": int(match["col"]), "source": "user"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a full-precision model, keeping its super weights exact, and save it",
        description=__doc__,
    )
    parser.add_argument("model", help="local model folder or Hub id (full precision)")
    parser.add_argument("output", help="folder for the compressed checkpoint")
    parser.add_argument("--bits", type=int, default=4, help="weight bits: 2, 3, 4 or 8 (default: 4)")
    parser.add_argument("--group-size", type=int, default=64, help="inputs per scale, -1 per row (default: 64)")
    parser.add_argument("--asymmetric", action="store_true", help="use zero-points (default: symmetric)")
    parser.add_argument(
        "--super-weight",
        action="append",
        type=parse_super_weight,
        default=None,
        metavar="MODULE:ROW,COL",
        help="keep this weight exact instead of detecting (repeatable)",
    )
    parser.add_argument("--prompt", action="append", default=None, help="detection prompt (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load dtype")
    parser.add_argument("--max-shard-size", default="5GB", help="shard size for save_pretrained (default: 5GB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import SuperWeightConfig

    config = SuperWeightConfig(
        bits=args.bits,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        super_weights=args.super_weight,
        detection_prompts=args.prompt,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), quantization_config=config
    )
    elapsed = time.perf_counter() - start
    model.save_pretrained(args.output, max_shard_size=args.max_shard_size)
    try:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(args.output)
    except (OSError, ValueError):
        print("note: no tokenizer found next to the model; the checkpoint holds weights and config only")
    found = model.config.quantization_config.get_super_weights()
    print(f"quantized {args.model} in {elapsed:.1f}s: {config.bits}-bit, group {config.group_size}, {len(found)} super weight(s) kept exact")
    for sw in found:
        print(f"  {sw.paper_notation():<45} value {sw.value:+.6g}")
    print(f"saved to {args.output}")
    return 0
