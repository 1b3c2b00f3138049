"""Speed verdicts kept beside the kernel cache, so that a model gets the same kernels in every run on a machine.

The first-use speed check (:mod:`~optimum_superweight.kernels.guard`) times kernels whose float results differ
(summation orders, bfloat16 roundings); on a loaded machine two runs could time them differently and give
different logits. So each verdict (which kernels stepped aside for a layer signature, and which one ran) is
stored in ``<kernel cache>/optimum_superweight_speed_verdicts.json`` under this machine's key (CPU model and
torch version) and reused by every later process instead of timing again. The file is JSON, merged with what
other processes wrote and replaced atomically (a temporary file in the same folder, then ``os.replace``) under a
file lock; a file that cannot be read or written (read-only cache, damaged JSON) is ignored with one log line
and the verdicts stay in memory for the process. Delete the file to time again.

>>> machine_key().endswith(f"torch {torch.__version__}")
True
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .machine import cache_root, cpu_name

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["VERDICTS_FILE", "verdicts_path", "machine_key", "signature_key", "recall", "remember", "forget"]

logger = logging.getLogger(__name__)

VERDICTS_FILE = "optimum_superweight_speed_verdicts.json"
_FORMAT = 1
# This process's view of the stored verdicts of this machine: {path: {signature key: entry}}.
_loaded: dict[Path, dict[str, dict[str, Any]]] = {}
_warned: set[str] = set()


def verdicts_path() -> Path:
    return cache_root() / VERDICTS_FILE


def machine_key() -> str:
    """Verdicts hold for one CPU model and one torch version (its GEMMs change between versions)."""
    return f"{cpu_name()} | torch {torch.__version__}"


def signature_key(signature: tuple) -> str:
    """A verdict signature (``guard.signature``) as a JSON key.

    >>> signature_key(("SuperWeightLinear", 576, 1536, 4, 64, None, torch.float32, 0))
    'SuperWeightLinear 576 1536 4 64 None float32 0'
    """
    return " ".join(str(part).removeprefix("torch.") for part in signature)


def _note_once(message: str, *args: Any) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.info(message, *args)


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("chosen"), str)
        and isinstance(entry.get("stepped_aside"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in entry["stepped_aside"].items())
    )


def _read(path: Path) -> dict[str, Any]:
    """The whole file (every machine), or an empty store if it is missing or not ours to trust."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"format": _FORMAT, "machines": {}}
    except (OSError, ValueError) as error:
        _note_once("optimum-superweight: ignoring the kernel speed verdicts in %s (%s).", path, error)
        return {"format": _FORMAT, "machines": {}}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("machines"), dict):
        _note_once("optimum-superweight: ignoring the kernel speed verdicts in %s (not format %d).", path, _FORMAT)
        return {"format": _FORMAT, "machines": {}}
    return data


def _machine(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = data["machines"].get(machine_key())
    if not isinstance(entries, dict):
        return {}
    return {key: entry for key, entry in entries.items() if _valid_entry(entry)}


def _stored() -> dict[str, dict[str, Any]]:
    path = verdicts_path()
    if path not in _loaded:
        _loaded[path] = _machine(_read(path))
    return _loaded[path]


def recall(signature: tuple) -> dict[str, Any] | None:
    """The stored verdict for ``signature`` on this machine: ``{"chosen": name, "stepped_aside": {name: why}}``."""
    entry = _stored().get(signature_key(signature))
    return None if entry is None else {"chosen": entry["chosen"], "stepped_aside": dict(entry["stepped_aside"])}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        with contextlib.suppress(OSError):  # a filesystem without locks: last writer wins, still a valid file
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _write(path: Path, change) -> None:
    """Apply ``change(entries of this machine)`` to the file, merged with what is there, atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = _read(path)
            entries = _machine(data)
            change(entries)
            data["machines"][machine_key()] = entries
            handle, temporary = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    json.dump(data, stream, indent=1, sort_keys=True)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        _loaded[path] = entries
    except OSError as error:
        _note_once(
            "optimum-superweight: kernel speed verdicts are kept for this process only (%s: %s).", path, error.strerror
        )


def remember(signature: tuple, chosen: str, stepped_aside: dict[str, str]) -> None:
    """Store the verdict for ``signature`` on this machine (the in-memory view is updated even if writing fails)."""
    entry = {"chosen": chosen, "stepped_aside": dict(stepped_aside)}
    key = signature_key(signature)
    _stored()[key] = entry
    _write(verdicts_path(), lambda entries: entries.__setitem__(key, entry))


def forget() -> None:
    """Drop this machine's stored verdicts (the next run times the kernels again)."""
    _loaded.pop(verdicts_path(), None)
    if verdicts_path().exists():
        _write(verdicts_path(), lambda entries: entries.clear())
