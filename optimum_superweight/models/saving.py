"""``save_pretrained`` of a quantized model: all-or-nothing, and the same bytes for the same model.

transformers writes config.json first, then the weight files in place, so a save killed (or a disk filling up)
half-way leaves a folder that mixes two saves. The quantizer therefore wraps ``model.save_pretrained`` (a plain
attribute on the instance, like the card hook of :mod:`optimum_superweight.hub.push`):

1. everything is written into a temporary sibling folder; a failure there (disk full, an exception) removes it
   and leaves the target as it was;
2. a new target folder is that sibling, renamed into place (one atomic step);
3. an existing target is updated in three steps: its config.json is atomically replaced by the new one marked
   ``"save_incomplete": true`` (any load now fails with
   :data:`optimum_superweight.config.INCOMPLETE_MESSAGE`), the weight files are moved
   in (and weight files of the old save that the new one does not have are removed), then the unmarked
   config.json replaces the marked one. A kill at any point leaves the old checkpoint, or a folder that refuses to
   load with an error naming config.json and what to do.

A save killed with SIGKILL (or a power cut) cannot remove its staging folder. The next save to the same target
removes such leftovers of every staging kind of the package (this save's, the CLI's and the export's: all named by
:func:`staging_prefix`, which records the host and the owner's process id), with one log line, when their owner
is gone or nothing in them changed for :data:`STALE_STAGING_SECONDS`.

The safetensors headers are also made canonical: the Rust writer orders the header's ``__metadata__`` entries
by a per-process random hash, so two saves of one model differed in a few header bytes; they are rewritten
sorted, in place (same length).

>>> attach_save_hook(model)  # doctest: +SKIP
>>> model.save_pretrained("out")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from ..config import INCOMPLETE_KEY

__all__ = [
    "IN_PROGRESS",
    "SET_ASIDE",
    "STALE_STAGING_SECONDS",
    "attach_save_hook",
    "canonical_safetensors_header",
    "remove_stale_staging",
    "staged_save",
    "staging_prefix",
]

logger = logging.getLogger(__name__)

_HOOK_MARK = "_optimum_superweight_save_hook"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
#: A staging folder untouched this long is stale even when its process id is in use (the id was reused, or the
#: owner runs on another host of a shared filesystem): a save writes its files continuously.
STALE_STAGING_SECONDS = 24 * 3600
#: Every staging kind of the package: save_pretrained's, the CLI's (partial, old) and the export's (writing,
#: previous). The first three hold a save in progress; the last two the previous output, set aside for the moment
#: between two renames (a kill there leaves it as the only copy, so it is removed only once a new output is in).
_KINDS = ("saving", "partial", "writing", "old", "previous")
IN_PROGRESS = _KINDS[:3]
SET_ASIDE = _KINDS[3:]
_STAGING = re.compile(rf"^\.(?P<base>.+)\.(?P<kind>{'|'.join(_KINDS)})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[^.]*$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_prefix(target: str | os.PathLike[str], kind: str) -> str:
    """The name prefix of a staging sibling of ``target`` (for ``tempfile.mkdtemp(prefix=...)``): it names the
    host and this process, so that a later save can tell a killed save's leftovers from a running one's.

    >>> staging_prefix("out", "saving").startswith(".out.saving-")
    True
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is invalid: expected one of {', '.join(_KINDS)}.")
    return f".{Path(target).name}.{kind}-{_host_tag()}-{os.getpid()}-"


def _owner(name: str, target_name: str) -> tuple[str, str, int] | None:
    """(kind, host tag, process id) when ``name`` is a staging sibling of ``target_name`` (or a staging sibling of
    one, as the CLI's save writes), else ``None``."""
    match = _STAGING.match(name)
    if match is None or (match["base"] != target_name and _owner(match["base"], target_name) is None):
        return None
    return match["kind"], match["host"], int(match["pid"])


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    try:  # a killed process that nobody reaped yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _last_change(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(folder).st_mtime)
    return newest


def remove_stale_staging(target: str | os.PathLike[str], kinds: tuple[str, ...] = IN_PROGRESS) -> list[Path]:
    """Remove the staging siblings of ``target`` of these ``kinds`` left by killed saves or exports (owner process
    gone on this host, or untouched for :data:`STALE_STAGING_SECONDS`); one log line when any were removed.
    Returns them.

    >>> remove_stale_staging("/no/such/folder/out")
    []
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    here, removed = _host_tag(), []
    for sibling in sorted(target.parent.iterdir()):
        owner = _owner(sibling.name, target.name)
        if owner is None or owner[0] not in kinds:
            continue
        try:
            stale = (owner[1] == here and _process_gone(owner[2])) or (
                time.time() - _last_change(sibling) > STALE_STAGING_SECONDS
            )
        except FileNotFoundError:  # its owner just finished with it
            continue
        if stale:
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    sibling.unlink()
            removed.append(sibling)
    if removed:
        logger.warning(
            "optimum-superweight: removed %d staging folder(s) left next to %s by a killed save or export: %s",
            len(removed), target, ", ".join(p.name for p in removed),
        )
    return removed


def canonical_safetensors_header(path: str | os.PathLike[str]) -> bool:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted (same length, in
    place); ``False`` (file untouched) when the header is not in the writer's compact form."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw, object_pairs_hook=lambda pairs: dict(pairs))
        compact = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
        if compact(header) != raw.rstrip(b" ") or not isinstance(header.get("__metadata__"), dict):
            return False
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = compact(header)
        canonical += b" " * (length - len(canonical))
        if canonical != raw:
            handle.seek(8)
            handle.write(canonical)
    return True


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _move_into(staging: Path, target: Path) -> None:
    """Step 3 of the module doc: the marked config.json, the other files, then the final config.json."""
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    marked = json.loads(json.dumps(config))
    marked.setdefault("quantization_config", {})[INCOMPLETE_KEY] = True
    _write_json_atomically(target / "config.json", marked)
    written = {p.name for p in staging.iterdir()}
    for old in target.iterdir():
        stale_shard = old.name.startswith("model-") and old.name.endswith(".safetensors")
        if (old.name in _WEIGHT_FILES or stale_shard) and old.name not in written and old.is_file():
            old.unlink()
    for name in sorted(written - {"config.json"}):
        os.replace(staging / name, target / name)
    os.replace(staging / "config.json", target / "config.json")


def staged_save(save: Any, directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
    """``save(folder, *args, **kwargs)`` (transformers' ``save_pretrained``) written all-or-nothing to ``directory``."""
    target = Path(directory)
    if kwargs.get("push_to_hub") or target.is_file():
        return save(directory, *args, **kwargs)  # the Hub upload reads the folder it was given; a file: its error
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target, "saving"), dir=target.parent))
    try:
        result = save(staging, *args, **kwargs)
        for weights in staging.glob("*.safetensors"):
            canonical_safetensors_header(weights)
        if not target.exists():
            os.replace(staging, target)
        elif (staging / "config.json").is_file():
            _move_into(staging, target)
        else:  # nothing to mark: plain moves
            for item in staging.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def attach_save_hook(model: Any) -> Any:
    """Make ``model.save_pretrained`` all-or-nothing and byte-reproducible (see the module doc); idempotent."""
    current = model.__dict__.get("save_pretrained")
    if getattr(current, _HOOK_MARK, False):
        return model
    original = type(model).save_pretrained

    def save_pretrained(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        return staged_save(lambda folder, *a, **k: original(self, folder, *a, **k), save_directory, *args, **kwargs)

    setattr(save_pretrained, _HOOK_MARK, True)
    bound = types.MethodType(save_pretrained, model)
    setattr(bound.__func__, _HOOK_MARK, True)
    object.__setattr__(model, "save_pretrained", bound)
    return model
