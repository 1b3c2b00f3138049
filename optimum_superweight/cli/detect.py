"""``optimum-superweight detect MODEL``: find a model's super weights, confirm them and print the report.

Example::

    optimum-superweight detect ./SmolLM2-135M-Instruct --json report.json --plot report.png
"""

from __future__ import annotations

import argparse
import sys

from .paths import (
    NEEDS_FULL_PRECISION,
    add_overwrite_argument,
    check_model_source,
    check_not_quantized,
    check_output_file,
)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "detect",
        help="find a model's super weights, confirm them by ablation, and print the report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="local model folder or Hub id (loaded with AutoModelForCausalLM)")
    parser.add_argument("--prompt", action="append", default=None, help="detection prompt (repeatable; default: built-in)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--plot", dest="plot_path", default=None, metavar="FILE", help="save the plot (PNG, PDF, SVG)")
    parser.add_argument(
        "--projection",
        default=None,
        metavar="NAME",
        help="MLP output projection relative to a decoder layer (e.g. mlp.down_proj); needed for "
        "architectures outside the built-in table",
    )
    parser.add_argument("--no-confirm", action="store_true", help="skip confirmation by ablation (report raw spikes)")
    parser.add_argument("--threshold", type=float, default=50.0, help="absolute spike threshold (default: 50)")
    parser.add_argument("--min-ratio", type=float, default=100.0, help="spike / layer median (default: 100)")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, metavar="N", help="decoder layers to search (default: all)"
    )
    parser.add_argument("--max-super-weights", type=int, default=16, help="most candidates kept (default: 16)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="load dtype (default: float32)"
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="local folder only: load one decoder layer at a time from the safetensors shards (models larger "
        "than RAM); reports unconfirmed spikes (implies --no-confirm)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    add_overwrite_argument(parser)
    parser.set_defaults(func=run, check=check)


def check(args: argparse.Namespace) -> None:
    """The paths, before torch and transformers are imported (``run`` checks them again: it may run alone)."""
    check_model_source(args.model)
    check_output_file(args.json_path, args.overwrite, "--json")
    check_output_file(args.plot_path, args.overwrite, "--plot")
    _check_plot(args.plot_path)


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from ..detection import run_detection
    from ..errors import reraise_hub_errors

    args.model = check_model_source(args.model)
    with reraise_hub_errors(args.model, "loading"):
        check_not_quantized(args.model, consequence=NEEDS_FULL_PRECISION.format(command="detect", source=args.model))
    check_output_file(args.json_path, args.overwrite, "--json")
    check_output_file(args.plot_path, args.overwrite, "--plot")
    _check_plot(args.plot_path)
    if args.streaming:
        return _run_streaming(args)
    start = time.perf_counter()
    if not args.quiet:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    with reraise_hub_errors(args.model, "loading"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
        tokenizer = _load_tokenizer(args)
    if not args.quiet:
        print(f"loaded in {time.perf_counter() - start:.1f}s; detecting ...", file=sys.stderr, flush=True)
    report = run_detection(_settings(args), model=model, tokenizer=tokenizer, progress=not args.quiet)
    _emit(report, args)
    return 0


def _settings(args: argparse.Namespace):
    """The detection settings of the command line (checked, like a config's, by ``run_detection``)."""
    from ..detection import DetectionSettings

    return DetectionSettings(
        prompts=args.prompt,
        threshold=args.threshold,
        min_ratio=args.min_ratio,
        layers=args.layers,
        max_super_weights=args.max_super_weights,
        confirm=not (args.no_confirm or args.streaming),
        projection=args.projection,
    )


_PLOT_FORMATS = (".png", ".pdf", ".svg")


def _check_plot(path: str | None) -> None:
    """Before detecting: the plot must be possible (matplotlib installed, a format it writes)."""
    if path is None:
        return
    import importlib.util
    from pathlib import Path

    if Path(path).suffix.lower() not in _PLOT_FORMATS:
        raise ValueError(f"--plot {path}: accepted are files ending in {', '.join(_PLOT_FORMATS)}.")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'optimum-superweight[plot]', or drop --plot.")


def _load_tokenizer(args: argparse.Namespace):
    """The model's tokenizer, or ``None`` (fixed token ids then stand in; ``--prompt`` needs a tokenizer)."""
    from transformers import AutoTokenizer

    from ..errors import hub_unavailable

    try:
        return AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        if hub_unavailable(error) is not None:
            raise  # the Hub failed: not the same as "this model has no tokenizer"
        if args.prompt:
            raise ValueError(f"--prompt needs a tokenizer, and none was found for {args.model}")
        print("note: no tokenizer found; fixed token ids stand in for the prompts", file=sys.stderr)
        return None


def _emit(report, args: argparse.Namespace) -> None:
    """Print the table and write the JSON report and plot the user asked for."""
    print(report.to_text())
    if args.json_path:
        report.to_json(args.json_path)
        print(f"JSON report written to {args.json_path}")
    if args.plot_path:
        report.plot(args.plot_path)
        print(f"plot saved to {args.plot_path}")


def _run_streaming(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..detection import run_detection

    if not os.path.isdir(args.model):
        raise ValueError(f"--streaming reads a local model folder; {args.model!r} is not one.")
    tokenizer = _load_tokenizer(args)
    report = run_detection(
        _settings(args), folder=args.model, tokenizer=tokenizer, dtype=getattr(torch, args.dtype), progress=not args.quiet
    )
    _emit(report, args)
    print("note: streaming detection reports unconfirmed spikes (no ablation).", file=sys.stderr)
    return 0
