"""Command-line options shared by the commands that quantize: how codes are chosen and the grid's symmetry.

Unset options stay ``None`` so that :class:`~optimum_superweight.SuperWeightConfig` applies its own defaults
(``method="hqq"`` with asymmetric float-offset grids): the command line and the Python API quantize alike.
"""

from __future__ import annotations

import argparse
from typing import Any


__all__ = ["add_method_arguments", "method_options", "describe_grid"]

METHOD_CHOICES = ("hqq", "rtn", "gptq")
#: ``SuperWeightConfig.importance``'s values (``config.IMPORTANCES``; a test checks they agree): not imported
#: from there, because the config module imports transformers and the parser is built before it (fast ``--help``).
IMPORTANCE_CHOICES = ("activations", "none")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", choices=METHOD_CHOICES, default=None,
        help="how codes are chosen (default: hqq, grids weighted by calibration activations; rtn: round-to-nearest; "
        "gptq: error feedback)",
    )
    parser.add_argument(
        "--importance", choices=IMPORTANCE_CHOICES, default=None,
        help="hqq: weigh each weight's error by its input channel's mean squared activation on built-in calibration "
        "text ('activations', the default) or not at all ('none': data-free, no calibration pass)",
    )
    symmetry = parser.add_mutually_exclusive_group()
    symmetry.add_argument(
        "--symmetric", dest="symmetric", action="store_const", const=True, default=None,
        help="symmetric grids, no zero-point (default: asymmetric with hqq, symmetric otherwise)",
    )
    symmetry.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, help="asymmetric grids")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SuperWeightConfig`` keywords the user set (unset ones are left to the config's defaults)."""
    return {"method": args.method, "importance": args.importance, "symmetric": args.symmetric}


def describe_grid(config: Any) -> str:
    """``'hqq weighted by activations, asymmetric (float offsets)'``: how a resolved config chooses and stores codes."""
    method = f"{config.method} weighted by activations" if config.algorithm.needs_input_energy else config.method
    if config.symmetric:
        return f"{method}, symmetric"
    return f"{method}, asymmetric ({'float offsets' if config.zero_point == 'float' else 'uint8 zero-points'})"
