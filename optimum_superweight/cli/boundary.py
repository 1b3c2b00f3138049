"""The CLI's one error boundary: every failure of a command becomes one line on stderr and an exit code.

``error: <what>. <what to do>`` for the failures a user can cause or fix (missing or wrong paths, a folder
that is not a model, an unreachable or failing Hub, permissions, invalid values, existing outputs); for
anything else one line too, ending with "run with --debug for the traceback". ``--debug`` (or
``OPTIMUM_SUPERWEIGHT_DEBUG=1``) prints the traceback as well.

    >>> describe_error(FileNotFoundError(2, "No such file or directory", "model/config.json"))[0]
    'model/config.json does not exist (No such file or directory). Check the path.'
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["run_command", "describe_error", "EXIT_USER_ERROR", "EXIT_UNEXPECTED", "EXIT_INTERRUPTED"]

#: Exit code of a failure the message explains (bad input, unreachable Hub, ...); argparse uses it too.
EXIT_USER_ERROR = 2
#: Exit code of an unexpected exception (a bug, or an environment problem we do not recognise).
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
_MAX_MESSAGE = 600


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _os_error(error: OSError) -> str | None:
    """A sentence for file-system errors that carry a file name (``errno`` set)."""
    name = error.filename
    if name is None or error.errno is None:
        return None
    reason = error.strerror or type(error).__name__
    if isinstance(error, FileExistsError):
        return f"{name} already exists. Pass --overwrite to replace it, or choose another path."
    if isinstance(error, PermissionError):
        return f"permission denied on {name} ({reason}). Choose a path you may read/write, or fix its permissions."
    if isinstance(error, IsADirectoryError):
        return f"{name} is a folder, not a file ({reason}). Give a file path."
    if isinstance(error, NotADirectoryError):
        return f"{name} is not a folder ({reason}). Give a folder path."
    if isinstance(error, FileNotFoundError):
        return f"{name} does not exist ({reason}). Check the path."
    if error.errno == 28:  # ENOSPC
        return f"no space left while writing {name}. Free disk space or choose another output path."
    return f"{reason}: {name}. Check the path and the disk."


def describe_error(error: BaseException) -> tuple[str, bool]:
    """``(one-line message, expected)`` for an exception raised by a command.

    ``expected`` is False for exceptions that signal a bug or an unknown condition (TypeError, KeyError, ...).
    """
    from ..errors import SuperWeightError, hub_client_error_in, hub_error

    if isinstance(error, SuperWeightError):
        return _one_line(str(error)), True
    client_error = hub_client_error_in(error)  # e.g. wrapped by transformers in an OSError
    if client_error is not None:
        return _one_line(str(hub_error(client_error, None, "contacting it"))), True
    if isinstance(error, OSError):
        message = _os_error(error)
        if message is not None:
            return message, True
    if isinstance(error, MemoryError):
        return "out of memory. Use a smaller model or dtype, or quantize with low memory (streaming).", True
    if isinstance(error, (ValueError, OSError, RuntimeError)) or type(error).__name__ == "SafetensorError":
        text = _one_line(str(error)) or type(error).__name__
        if type(error).__name__ == "SafetensorError":
            text = f"a safetensors file is corrupt or unreadable ({text}). Re-save or re-download the checkpoint"
        return text, True
    return f"unexpected {type(error).__name__}: {_one_line(str(error))}", False


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("OPTIMUM_SUPERWEIGHT_DEBUG", "") not in ("", "0")


def run_command(args: argparse.Namespace, prog: str, ready: Callable[[], None] | None = None) -> int:
    """Run ``args.check(args)`` (the command's path checks, when it has them), ``ready()`` and ``args.func(args)``
    behind the boundary; returns the exit code (0 on success)."""
    debug = _debug_requested(args)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    if not debug:
        # huggingface_hub logs each retry of an unreachable Hub; the final error says it in one line.
        hub_logger.setLevel(logging.ERROR)
    where = f"{prog} {getattr(args, 'command', '')}".strip()
    try:
        return _run(args, where, debug, ready)
    finally:
        hub_logger.setLevel(level)


def _run(args: argparse.Namespace, where: str, debug: bool, ready: Callable[[], None] | None) -> int:
    try:
        check = getattr(args, "check", None)
        if check is not None:
            check(args)
        if ready is not None:
            ready()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{where}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # the boundary: nothing below prints a traceback unless asked to
        message, expected = describe_error(error)
        if debug:
            traceback.print_exc(file=sys.stderr)
        sys.stdout.flush()
        if not message.rstrip().endswith((".", "!", "?")):
            message = message.rstrip() + "."
        if not expected and not debug:
            message += " Run with --debug for the traceback."
        print(f"{where}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR if expected else EXIT_UNEXPECTED
