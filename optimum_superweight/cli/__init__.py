"""``optimum-superweight`` command line: one sub-command module per task.

Each module in ``SUBCOMMAND_MODULES`` defines ``register(subparsers)``, adding its parser with
``set_defaults(func=run)`` where ``run(args) -> int``, and optionally ``check=check`` where ``check(args)`` checks
the paths before any work. Nothing here, in the parsers or in the checks imports torch or transformers (heavy
imports stay inside ``run``), so ``--help``, argument errors and path errors are answered at once when the
console script (:mod:`optimum_superweight_entry`) defers the package's own import. The same modules back
``optimum-cli superweight ...``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

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
    """Register every sub-command on ``subparsers`` (shared with the optimum-cli integration).

    Each sub-command also accepts ``--debug`` (after its own arguments), like the top-level flag.
    """
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for sub in subparsers.choices.values():
        # SUPPRESS: a sub-command without the flag does not reset a top-level --debug to False.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


_DEBUG_HELP = "on error, also print the Python traceback (default: one line saying what and what to do)"


def build_parser(prog: str = "optimum-superweight") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Find a model's super weights, keep them exact, and quantize the rest to low bit.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_subcommands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "optimum-superweight", *,
         ready: Callable[[], None] | None = None) -> int:
    """Entry point of ``optimum-superweight``; returns the process exit code (never raises for a command's error).

    ``ready()`` runs after the arguments and the command's path checks passed, before its work (the console
    script imports the package there: see :mod:`optimum_superweight_entry`).

    >>> main(["card", "--known", "huggyllama/llama-7b"])  # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
    huggyllama/llama-7b — source: ...
    layers[2].mlp.down_proj.weight[3968, 7003]  module=model.layers.2.mlp.down_proj  row=3968  col=7003
    0
    """
    from .boundary import run_command

    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help (0), or a usage error argparse already explained on stderr (2)
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 2)
    return run_command(args, prog, ready=ready)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
