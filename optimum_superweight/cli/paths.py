"""Checks of the CLI's path arguments, done before any model is loaded, and outputs written all-or-nothing.

    >>> check_model_source("/no/such/folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: MODEL /no/such/folder does not exist: expected a folder written by save_pretrained ...
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "add_overwrite_argument",
    "check_model_source",
    "check_not_quantized",
    "check_output_file",
    "check_output_folder",
    "staged_folder",
]

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def add_overwrite_argument(parser: Any) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files or folders")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/")
        or text.endswith((".json", ".safetensors", ".md", ".bin", ".txt"))
    )


def check_model_source(source: str, *, what: str = "MODEL", need_weights: bool = True) -> str:
    """``source`` if it names a usable local model folder or looks like a Hub repo id; else a ``ValueError``
    saying what is wrong (missing path, a file, no config.json, no weights) and what is expected."""
    path = Path(source).expanduser()
    expected = (
        "expected a folder written by save_pretrained (config.json + *.safetensors) or a Hub repo id such as "
        "'user/model'"
    )
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{what} {source} is a file, not a model folder: {expected}.")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"{what} {source} cannot be read (permission denied). Fix its permissions or copy it.")
        if not (path / "config.json").is_file():
            raise ValueError(f"{what} {source} is not a model folder (it has no config.json): {expected}.")
        if need_weights and not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
            raise ValueError(
                f"{what} {source} holds config.json but no weights (*.safetensors): {expected}. Copy the weight "
                "files next to config.json."
            )
        return str(path)
    if _looks_like_path(source) or ".." in source or "--" in source:
        raise ValueError(f"{what} {source} does not exist: {expected}. Check the path.")
    from ..hub.reading import REPO_ID  # only now: importing the hub package imports transformers (a fast path error)

    if not REPO_ID.match(source):
        raise ValueError(f"{what} {source} does not exist: {expected}. Check the path.")
    return source


_REQUANTIZE = (
    "quantizing it again would keep those settings. Quantize the full-precision model it came from instead (its "
    "base_model), or use this checkpoint as it is (from_pretrained, perplexity, card)."
)
#: What to say when a command that needs the full-precision weights gets a quantized checkpoint.
NEEDS_FULL_PRECISION = (
    "{command} needs the full-precision weights. Run it on the model the checkpoint came from (its base_model); "
    "the super weights this checkpoint keeps are in its config: optimum-superweight card {source}"
)


def check_not_quantized(source: str, what: str = "MODEL", consequence: str = _REQUANTIZE) -> None:
    """Refuse a checkpoint that is already quantized (``consequence`` says why and what to do instead)."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(source)
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        return
    method = quantization.get("quant_method", "unknown")
    if method == "superweight":
        scheme = "symmetric" if quantization.get("symmetric", True) else "asymmetric"
        method_name = quantization.get("method")
        settings = f"superweight, {quantization.get('bits')}-bit, group {quantization.get('group_size')}, {scheme}"
        settings += f", method {method_name}" if isinstance(method_name, str) else ""
    else:
        settings = str(method)
    raise ValueError(f"{what} {source} is already quantized ({settings}); {consequence}")


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path(".")


def _check_parent(path: Path, option: str) -> None:
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise ValueError(
            f"{option} {path}: {ancestor} is a file, so the output cannot be written there. Choose another path."
        )
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"{option} {path}: {ancestor} is not writable (permission denied). Choose another path.")


def check_output_file(path: str | os.PathLike[str] | None, overwrite: bool, option: str) -> None:
    """Before any work: an output file must not exist (unless ``overwrite``), must not be a folder, and its
    folder must be creatable."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {target} is a folder; give a file path.")
    if target.exists() and not overwrite:
        raise ValueError(f"{option} {target} already exists. Pass --overwrite to replace it, or choose another path.")
    _check_parent(target, option)


def check_output_folder(path: str | os.PathLike[str], overwrite: bool, option: str, source: str | None = None) -> Path:
    """Before any work: an output folder must not be a file, nor the input, nor hold files (unless ``overwrite``)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {target} is an existing file, not a folder. Give a folder path (new or empty).")
    if source is not None and target.exists() and Path(source).exists() and target.resolve() == Path(source).resolve():
        raise ValueError(f"{option} {target} is the input model's folder. Write the quantized checkpoint elsewhere.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"{option} {target} exists and is not empty. Pass --overwrite to replace its content, or choose a new "
            "folder."
        )
    _check_parent(target, option)
    return target


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Write into a temporary sibling of ``target`` and move it into place only if everything succeeded, so a
    failure (or Ctrl-C) never leaves a half-written checkpoint and a replaced folder has no stale files."""
    from ..models.saving import SET_ASIDE, remove_stale_staging, staging_prefix

    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)  # a killed run's leftovers
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target, "partial"), dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=staging_prefix(target, "old"), dir=target.parent))
        os.replace(target, old / "content")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_staging(target, SET_ASIDE)  # a killed run's previous output: a new one is in place

