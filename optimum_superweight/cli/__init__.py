"""``optimum-superweight`` command line: one sub-command module per task.

Each module in ``SUBCOMMAND_MODULES`` defines ``register(subparsers)``, adding its parser with
``set_defaults(func=run)`` where ``run(args) -> int``. Heavy imports stay inside ``run`` so that
``--help`` is instant. The same modules back ``optimum-cli superweight ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "SUBCOMMAND_MODULES"]

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "optimum_superweight.cli.demo",
    "optimum_superweight.cli.quantize",
    "optimum_superweight.cli.hub",
    "optimum_superweight.cli.detect",
    "optimum_superweight.cli.evaluate",
    "optimum_superweight.cli.export",
)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register every sub-command on ``subparsers`` (shared with the optimum-cli integration)."""
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-superweight",
        description="Find a model's super weights, keep them exact, and quantize the rest to low bit.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimum-superweight``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"optimum-superweight {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
