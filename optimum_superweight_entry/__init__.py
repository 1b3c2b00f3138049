"""The ``optimum-superweight`` console script: ``--help``, argument errors and path checks before torch loads.

Importing any module of :mod:`optimum_superweight` first runs the package's ``__init__``, which imports torch and
transformers and registers the quantizer with transformers: what ``import optimum_superweight`` promises to a
library user, and seconds (tens of seconds on a busy machine) that a command line asked for ``--help`` or given a
wrong path should not wait. This entry point lives outside the package, so it runs first: it makes the package
importable without running its ``__init__`` (a module object created from the package's spec, not executed),
builds the parser and runs the commands' argument and path checks (:mod:`optimum_superweight.cli`), and executes
the ``__init__`` only when a command starts its work (the ``ready`` hook of :func:`optimum_superweight.cli.main`).

    optimum-superweight --help     # answered without importing torch or transformers
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence

__all__ = ["main"]

_PACKAGE = "optimum_superweight"


def _deferred_package() -> Callable[[], None]:
    """Put the package in ``sys.modules`` without running its ``__init__``; returns what runs it (once)."""
    if _PACKAGE in sys.modules:  # already imported (e.g. by a test runner): nothing to defer
        return lambda: None
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {_PACKAGE!r}: reinstall optimum-superweight.")
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package
    state = {"done": False}

    def ready() -> None:
        if not state["done"]:
            state["done"] = True
            spec.loader.exec_module(package)

    return ready


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimum-superweight``: :func:`optimum_superweight.cli.main` with the package's import deferred.

    >>> main(["--help"])  # doctest: +SKIP
    0
    """
    ready = _deferred_package()
    from optimum_superweight.cli import main as cli_main

    return cli_main(argv, ready=ready)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
