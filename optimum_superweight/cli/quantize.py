"""``optimum-superweight quantize MODEL OUTPUT``: quantize a full-precision model and save the checkpoint.

OUTPUT must be a new or empty folder (``--overwrite`` replaces a non-empty one); the checkpoint is written to
a temporary sibling and moved into place at the end, so a failure leaves nothing half-written. A MODEL that is
already quantized is refused: quantizing it again would keep its stored settings.
"""

from __future__ import annotations

import argparse
import re
import time

from .options import add_method_arguments, describe_grid, method_options
from .paths import add_overwrite_argument, check_model_source, check_not_quantized, check_output_folder, staged_folder

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
    add_method_arguments(parser)
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
    add_overwrite_argument(parser)
    parser.set_defaults(func=run, check=check)


def _check_shard_size(text: str) -> None:
    """Before quantizing: save_pretrained would only refuse a bad size after all the work."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        size = None
    if not isinstance(size, int) or size <= 0:
        raise ValueError(
            f"--max-shard-size {text!r} is invalid: accepted is a positive integer and a unit, e.g. 5GB or 500MB."
        )


def check(args: argparse.Namespace) -> None:
    """The paths, before torch and transformers are imported (``run`` checks them again: it may run alone)."""
    check_output_folder(args.output, args.overwrite, "OUTPUT", check_model_source(args.model))


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import SuperWeightConfig
    from ..errors import hub_error, hub_unavailable, reraise_hub_errors

    source = check_model_source(args.model)
    output = check_output_folder(args.output, args.overwrite, "OUTPUT", source)
    _check_shard_size(args.max_shard_size)
    config = SuperWeightConfig(
        bits=args.bits,
        group_size=args.group_size,
        **method_options(args),
        super_weights=args.super_weight,
        detection_prompts=args.prompt,
    )
    with reraise_hub_errors(source, "loading"):
        check_not_quantized(source)
        start = time.perf_counter()
        dtype = getattr(torch, args.dtype)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=config)
    elapsed = time.perf_counter() - start
    found = model.config.quantization_config.get_super_weights()
    tokenizer_note = None
    with staged_folder(output) as staging:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            if hub_unavailable(error) is not None:  # the Hub failed: not the same as "this model has no tokenizer"
                raise hub_error(hub_unavailable(error), source, "loading the tokenizer of") from error
            tokenizer = None
            tokenizer_note = "note: no tokenizer found next to the model; the checkpoint holds weights and config only"
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    print(
        f"quantized {args.model} in {elapsed:.1f}s: {config.bits}-bit, group {config.group_size}, "
        f"{describe_grid(config)}, {len(found)} super weight(s) kept exact"
    )
    for sw in found:
        print(f"  {sw.paper_notation():<45} value {sw.value:+.6g}")
    if tokenizer_note:
        print(tokenizer_note)
    print(f"saved to {output}")
    return 0
