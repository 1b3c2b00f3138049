"""``optimum-cli superweight detect|quantize|push|card ...``: optimum-superweight's commands inside optimum-cli.

optimum-cli imports every module of the ``optimum.commands.register`` namespace package (no ``__init__.py``
anywhere on this path, PEP 420) and registers the commands listed in ``REGISTER_COMMANDS``. This module
stays light: optimum-cli imports it on every start, so the package (torch, transformers) is only imported
when a ``superweight`` command actually runs (or its help is shown). The sub-commands are the ones of
``optimum-superweight``, built by :func:`optimum_superweight.cli.add_subcommands`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["SuperWeightCommand", "REGISTER_COMMANDS"]

_PROG = "optimum-cli superweight"


def _build_parser() -> argparse.ArgumentParser:
    from optimum_superweight.cli import build_parser

    return build_parser(_PROG)


class SuperWeightCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="superweight",
        help="optimum-superweight: detect super weights, quantize keeping them exact, push/read model cards",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        # Everything after "superweight" goes to optimum-superweight's own parser, built only when needed.
        parser.add_argument("--debug", action="store_true", help="on error, also print the traceback")
        parser.add_argument("superweight_args", nargs=argparse.REMAINDER, help="COMMAND and its arguments")
        # `optimum-cli superweight --help` shows the real commands (imports the package only then).
        parser.print_help = lambda file=None: _build_parser().print_help(file)  # type: ignore[method-assign]

    def run(self) -> None:
        from optimum_superweight.cli import main

        argv = list(getattr(self.args, "superweight_args", None) or [])
        if getattr(self.args, "debug", False):  # `optimum-cli superweight --debug COMMAND ...`
            argv.insert(0, "--debug")
        if not argv or argv == ["--debug"]:
            _build_parser().print_help()
            sys.exit(1)
        # The same error boundary as optimum-superweight: one line on stderr, --debug for the traceback.
        code = main(argv, prog=_PROG)
        if code:
            sys.exit(code)


def __getattr__(name: str) -> list:
    """``REGISTER_COMMANDS``, once per optimum-cli start even when this folder is on the namespace path twice.

    optimum-cli walks every folder of the ``optimum.commands.register`` namespace and reads ``REGISTER_COMMANDS`` of
    each file it finds there; with two copies of this package on the path (a clone on ``PYTHONPATH`` beside an
    editable install of another one) both names resolve to this one module, and registering the command twice
    stops optimum-cli with "conflicting subparser". The command is therefore listed only when optimum-cli is
    walking this module's own folder (its loop variable, read from the caller); any other caller gets it always.
    """
    if name != "REGISTER_COMMANDS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    walking = sys._getframe(1).f_locals.get("register_path")
    if isinstance(walking, (str, Path)) and Path(walking).resolve() != Path(__file__).resolve().parent:
        return []
    return [SuperWeightCommand]
