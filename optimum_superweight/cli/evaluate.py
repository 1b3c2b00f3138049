"""``optimum-superweight perplexity MODEL`` and ``optimum-superweight ablate MODEL``.

``perplexity`` scores any causal LM (a quantized superweight checkpoint included) with the package's
protocol; ``ablate`` prints the paper's Table 1 for a full-precision model. ``MODEL`` is a local folder,
a Hub id, or ``default`` for the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import sys

from .paths import (
    NEEDS_FULL_PRECISION,
    add_overwrite_argument,
    check_model_source,
    check_not_quantized,
    check_output_file,
)

__all__ = ["register", "run_perplexity", "run_ablate"]


def _add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local model folder, Hub id, or 'default' (embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--text",
        default=None,
        help="evaluation text: a UTF-8 file, 'builtin' (default: pydoc_data.topics), or a dataset name such as "
        "'wikitext' (needs the datasets package and network access)",
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens evaluated, <= 0 for all (default: 4096)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window, BOS not counted (default: 512)")
    parser.add_argument("--stride", type=int, default=None, help="step between windows (default: the window)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward (default: 4)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each window")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load dtype")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the result as JSON")
    add_overwrite_argument(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "perplexity",
        help="perplexity of a model (quantized or not) with the package's protocol",
        description="Perplexity on 4096 tokens of built-in English text (pydoc_data.topics), windows of 512 with "
        "BOS, unless told otherwise. Works on superweight checkpoints and plain models alike.",
    )
    _add_protocol_arguments(parser)
    parser.add_argument(
        "--progress", action="store_true",
        help="kept for old scripts: the bar is shown by default (stderr; off with HF_HUB_DISABLE_PROGRESS_BARS=1 or "
        "TQDM_DISABLE=1)",
    )
    parser.set_defaults(func=run_perplexity, check=check)

    parser = subparsers.add_parser(
        "ablate",
        help="the paper's Table 1: zero the super weights, restore the super activation, prune other outliers",
        description="Evaluate the model as it is, with its super weights zeroed, zeroed with the super activation "
        "restored, with the largest other weights pruned, and with the super weights scaled; prints perplexity "
        "and the super-activation magnitude per row.",
    )
    _add_protocol_arguments(parser)
    from .quantize import parse_super_weight

    parser.add_argument(
        "--super-weight",
        action="append",
        type=parse_super_weight,
        default=None,
        metavar="MODULE:ROW,COL",
        help="ablate this weight instead of detecting (repeatable)",
    )
    parser.add_argument(
        "--scale", action="append", type=float, default=None, metavar="FACTOR",
        help="scale the super weights by FACTOR (repeatable; default: 0.5 and 2)",
    )
    parser.add_argument(
        "--outlier-fraction", type=float, default=None,
        help="fraction of each decoder matrix pruned in the outlier row, rounded up (default: 1e-6; 0 skips the row)",
    )
    parser.add_argument("--no-restore", action="store_true", help="skip the super-activation restore row")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.set_defaults(func=run_ablate, check=check)


def check(args: argparse.Namespace) -> None:
    """The paths, before torch and transformers are imported (the commands check them again: they may run alone)."""
    check_output_file(args.json_path, args.overwrite, "--json")
    if args.model != "default":
        check_model_source(args.model)


def _load(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_superweight  # noqa: F401  (registers the quantizer, so superweight checkpoints load)

    source = args.model
    if source == "default":
        source = str(optimum_superweight.default_model_path())
    else:
        source = check_model_source(source)
    from ..errors import reraise_hub_errors

    with reraise_hub_errors(source, "loading"):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype))
        tokenizer = AutoTokenizer.from_pretrained(source)
    model.eval()
    return model, tokenizer


def _text(args: argparse.Namespace) -> str | None:
    """The evaluation text; first, before any work, the output file is checked."""
    check_output_file(args.json_path, args.overwrite, "--json")
    if args.text is None:
        return None
    from ..evaluation import load_text

    return load_text(args.text)


def _max_tokens(args: argparse.Namespace) -> int | None:
    return args.max_tokens if args.max_tokens and args.max_tokens > 0 else None


def run_perplexity(args: argparse.Namespace) -> int:
    from ..evaluation import perplexity

    text = _text(args)
    model, tokenizer = _load(args)
    result = perplexity(
        model, tokenizer, text, max_tokens=_max_tokens(args), window=args.window, stride=args.stride,
        batch_size=args.batch_size, add_bos=not args.no_bos,
    )
    print(f"{args.model}: {result}")
    if args.json_path:
        data = dict(result.to_dict(), model=args.model, text=args.text or "builtin")
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from ..ablation import DEFAULT_OUTLIER_FRACTION, DEFAULT_SCALE_FACTORS, ablate

    text = _text(args)
    if args.model != "default":
        from ..errors import reraise_hub_errors

        source = check_model_source(args.model)
        with reraise_hub_errors(source, "loading"):
            check_not_quantized(source, consequence=NEEDS_FULL_PRECISION.format(command="ablate", source=source))
    model, tokenizer = _load(args)
    if not args.quiet and args.super_weight is None:
        print("detecting super weights (pass --super-weight to skip) ...", file=sys.stderr, flush=True)
    report = ablate(
        model,
        tokenizer,
        args.super_weight,
        text=text,
        max_tokens=_max_tokens(args),
        window=args.window,
        stride=args.stride,
        batch_size=args.batch_size,
        add_bos=not args.no_bos,
        scale_factors=DEFAULT_SCALE_FACTORS if args.scale is None else tuple(args.scale),
        outlier_fraction=DEFAULT_OUTLIER_FRACTION if args.outlier_fraction is None else args.outlier_fraction,
        restore_activation=not args.no_restore,
        progress=not args.quiet,
    )
    print(report.to_text())
    if args.json_path:
        report.to_json(args.json_path)
    return 0
