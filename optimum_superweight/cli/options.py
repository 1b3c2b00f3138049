"""Command-line options shared by the commands that quantize: how codes are chosen and the grid's symmetry.

Unset options stay ``None`` so that :class:`~optimum_superweight.SuperWeightConfig` applies its own defaults
(``method="hqq"`` with asymmetric float-offset grids): the command line and the Python API quantize alike.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_method_arguments", "method_options", "describe_grid"]

METHOD_CHOICES = ("hqq", "rtn", "gptq")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", choices=METHOD_CHOICES, default=None,
        help="how codes are chosen (default: hqq, data-free; rtn: round-to-nearest; gptq: calibrated)",
    )
    symmetry = parser.add_mutually_exclusive_group()
    symmetry.add_argument(
        "--symmetric", dest="symmetric", action="store_const", const=True, default=None,
        help="symmetric grids, no zero-point (default: asymmetric with hqq, symmetric otherwise)",
    )
    symmetry.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False, help="asymmetric grids")


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SuperWeightConfig`` keywords the user set (unset ones are left to the config's defaults)."""
    return {"method": args.method, "symmetric": args.symmetric}


def describe_grid(config: Any) -> str:
    """``'hqq, asymmetric (float offsets)'``: how a resolved config chooses and stores codes."""
    if config.symmetric:
        return f"{config.method}, symmetric"
    return f"{config.method}, asymmetric ({'float offsets' if config.zero_point == 'float' else 'uint8 zero-points'})"
