"""Evaluation texts from outside the package, of different domains, each with its source and license.

None of them is used by the package for calibration or detection (those read ``pydoc_data.topics`` and the
short prompts of ``optimum_superweight.detection``). Each comes from a Debian package or from the Python
standard library of the running interpreter, so a run needs no network beyond the package registry:

- ``austen``: Jane Austen, *Pride and Prejudice* (1813; public domain), narration and dialogue, from Debian's
  ``r-cran-janeaustenr`` (an R data package, MIT; its lazy-load database is read here without R).
- ``jargon``: *The Jargon File* 4.4.7 (public domain), encyclopedic / glossary prose about hacker culture, from
  Debian's ``jargon-text``; the front matter (table of contents, character table) is skipped.
- ``python``: source code of CPython's ``argparse`` module (PSF-2.0) of the running interpreter (about 22k tokens).
- ``kjv``: the Book of Genesis in the King James Version (1611; public domain), archaic English of another register,
  from Debian's ``bible-kjv-text`` (its compressed ``bible.data``) read by the ``bible`` program of ``bible-kjv``
  (GPL-2+; both unpacked from their ``.deb`` into the cache when not installed), one verse a line.

    >>> from suite.texts import evaluation_texts
    >>> [t.key for t in evaluation_texts()]  # doctest: +SKIP
    ['austen', 'jargon', 'python', 'kjv']
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EvalText", "TEXT_LOADERS", "VALIDATION_LOADERS", "evaluation_texts", "read_r_lazyload"]


@dataclass(frozen=True)
class EvalText:
    key: str
    domain: str
    title: str
    source: str
    license: str
    text: str

    def describe(self) -> dict[str, Any]:
        """Everything but the text itself (for the result JSON)."""
        return {"key": self.key, "domain": self.domain, "title": self.title, "source": self.source,
                "license": self.license, "characters": len(self.text)}


def _cache_dir() -> Path:
    root = os.environ.get("OPTIMUM_SUPERWEIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "optimum_superweight")
    return Path(root) / "texts"


def debian_file(package: str, path: str) -> Path:
    """``path`` from Debian package ``package``: the installed file, else the package's ``.deb`` unpacked (without
    installing it, so its dependencies, e.g. R, are not pulled) into the cache by ``apt-get download`` + ``dpkg -x``."""
    installed = Path(path)
    if installed.is_file():
        return installed
    target = _cache_dir() / package
    unpacked = target / path.lstrip("/")
    if unpacked.is_file():
        return unpacked
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise FileNotFoundError(f"{path} (Debian package '{package}') is missing and apt-get/dpkg are not available.")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if result.returncode != 0 or not debs:
            raise FileNotFoundError(
                f"{path} (Debian package '{package}') is missing and 'apt-get download {package}' failed "
                f"(run 'apt-get update' first?): {result.stderr.strip()[-300:]}")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
    if not unpacked.is_file():
        raise FileNotFoundError(f"Debian package '{package}' has no {path}.")
    return unpacked


# ---- R lazy-load databases (.rdx index + .rdb objects), character vectors only ------------------------------


class _RReader:
    """Just enough of R's XDR serialization (format 2/3) for lists, pairlists and atomic vectors."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.data, self.pos = data, 2
        version = self._int()
        self._int(), self._int()  # writer's and minimal reader's R versions
        if version == 3:
            length = self._int()  # native encoding name
            self.pos += length
        self.refs: list[Any] = []

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # SYMSXP
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            text = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return text
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, value, rest
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = (tag[1] if isinstance(tag, tuple) else tag, self.item())
            return [head] + (self.item() or [])
        if kind in (10, 13, 14, 16, 19):  # logical, integer, double, character, list
            n = self._int()
            if kind in (16, 19):
                values: Any = [self.item() for _ in range(n)]
            else:
                fmt, size = (">%dd", 8) if kind == 14 else (">%di", 4)
                values = list(struct.unpack_from(fmt % n, self.data, self.pos))
                self.pos += size * n
            attributes = dict(self.item()) if has_attr else {}
            return {"values": values, "attributes": attributes} if attributes else values
        raise ValueError(f"R object type {kind} is not supported by this reader")


def read_r_lazyload(base: str | os.PathLike[str]) -> dict[str, Any]:
    """Objects of an R lazy-load database (``base.rdx`` gzip index + ``base.rdb`` zlib blobs), by name."""
    index = _RReader(gzip.decompress(Path(f"{base}.rdx").read_bytes())).item()
    variables = index["values"][0]
    names, spans = variables["attributes"]["names"], variables["values"]
    blob = Path(f"{base}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(names, spans):
        # Each object: a 4-byte big-endian uncompressed length, then a zlib stream.
        obj = _RReader(zlib.decompress(blob[offset + 4:offset + length])).item()
        out[name] = obj["values"] if isinstance(obj, dict) else obj
    return out


# ---- the texts ---------------------------------------------------------------------------------------------


def _janeaustenr(book: str, key: str, domain: str, title: str) -> EvalText:
    """One novel of Debian's ``r-cran-janeaustenr`` (its R object ``book``), lines joined by newlines."""
    rdb = debian_file("r-cran-janeaustenr", "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    lines = read_r_lazyload(str(rdb)[: -len(".rdb")])[book]
    return EvalText(key, domain, title,
                    f"Debian package r-cran-janeaustenr (janeaustenr 1.0.0 data, '{book}'), lines joined by newlines",
                    "public domain text (package: MIT)", "\n".join(line or "" for line in lines))


def austen() -> EvalText:
    return _janeaustenr("prideprejudice", "austen", "literature: novel, narration and dialogue",
                        "Jane Austen, Pride and Prejudice (1813)")


def jargon() -> EvalText:
    path = debian_file("jargon-text", "/usr/share/doc/jargon-text/jargon.txt.gz")
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    # After the table of contents and the character table (the headings use no-break spaces).
    found = re.search(r"Chapter\s1\.\sHacker Slang", text)
    return EvalText("jargon", "encyclopedic / glossary prose (hacker culture)", "The Jargon File 4.4.7",
                    "Debian package jargon-text, /usr/share/doc/jargon-text/jargon.txt.gz from 'Chapter 1'",
                    "public domain", text[found.start() if found else 0:])


def python_source() -> EvalText:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "argparse.py").read_text(encoding="utf-8")
    version = ".".join(map(str, sys.version_info[:3]))
    return EvalText("python", "source code (Python)", f"CPython {version} Lib/argparse.py",
                    f"standard library of the running interpreter ({stdlib})", "PSF-2.0", text)


#: The first and last verse of the KJV text evaluated (the whole Book of Genesis, about 50k tokens).
KJV_SPAN = ("gen1:1", "gen50:26")


def kjv() -> EvalText:
    program = debian_file("bible-kjv", "/usr/bin/bible")
    data = debian_file("bible-kjv-text", "/usr/lib/bible.data")
    # -p: where bible.data is (an unpacked .deb's copy too); -l: lines wide enough that no verse is wrapped.
    result = subprocess.run([str(program), "-p", str(data.parent), "-l", "1000000", "-".join(KJV_SPAN)],
                            capture_output=True, text=True)
    lines = [line.strip() for line in result.stdout.splitlines()]
    if result.returncode != 0 or sum(bool(line) for line in lines) < 1000:
        raise RuntimeError(f"{program} {'-'.join(KJV_SPAN)} gave {len(lines)} lines (rc {result.returncode}): "
                           f"{result.stderr.strip()[-300:]}")
    # Chapter headings ("Genesis 1") and verses ("1 In the beginning ..."), blank lines between chapters.
    text = "\n".join(lines).strip("\n")
    return EvalText("kjv", "archaic English: scripture (King James Version, 1611)", "The Bible, King James Version: Genesis",
                    f"Debian packages bible-kjv-text (text) and bible-kjv (its reader), `bible -l 1000000 {'-'.join(KJV_SPAN)}`",
                    "public domain text (reader: GPL-2+)", text)


TEXT_LOADERS: dict[str, Callable[[], EvalText]] = {"austen": austen, "jargon": jargon, "python": python_source, "kjv": kjv}


# ---- validation texts: for choosing between variants of a method, never for the tables' evaluation ----------


def emma() -> EvalText:
    return _janeaustenr("emma", "emma", "literature: novel (another book than the evaluation's)", "Jane Austen, Emma (1815)")


def matthew() -> EvalText:
    program = debian_file("bible-kjv", "/usr/bin/bible")
    data = debian_file("bible-kjv-text", "/usr/lib/bible.data")
    span = "mat1:1-mat28:20"
    result = subprocess.run([str(program), "-p", str(data.parent), "-l", "1000000", span], capture_output=True, text=True)
    text = "\n".join(line.strip() for line in result.stdout.splitlines()).strip("\n")
    if result.returncode != 0 or text.count("\n") < 500:
        raise RuntimeError(f"{program} {span} gave too little text (rc {result.returncode}): {result.stderr.strip()[-300:]}")
    return EvalText("matthew", "archaic English: scripture (another book than the evaluation's)",
                    "The Bible, King James Version: Matthew", f"Debian packages bible-kjv-text and bible-kjv, `bible {span}`",
                    "public domain text (reader: GPL-2+)", text)


def tarfile_source() -> EvalText:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    return EvalText("tarfile", "source code (Python, another module than the evaluation's)", f"CPython {version} Lib/tarfile.py",
                    f"standard library of the running interpreter ({stdlib})", "PSF-2.0",
                    (stdlib / "tarfile.py").read_text(encoding="utf-8"))


#: Texts for choosing between variants (e.g. `benchmarks/quality_multitext.py --texts emma,matthew,tarfile`): other
#: documents than the evaluation texts, of the same three registers, so that a choice is not tuned on the tables' texts.
VALIDATION_LOADERS: dict[str, Callable[[], EvalText]] = {"emma": emma, "matthew": matthew, "tarfile": tarfile_source}


def evaluation_texts(keys: tuple[str, ...] = tuple(TEXT_LOADERS)) -> list[EvalText]:
    from suite.calibration_mix import SIGNAL_LOADERS

    loaders = {**TEXT_LOADERS, **VALIDATION_LOADERS, **SIGNAL_LOADERS}
    return [loaders[key]() for key in keys]
