"""An experiment of issue 24 (not the package's code): calibration windows drawn from several registers instead of the
package's one source (the end of ``pydoc_data.topics``, Python documentation).

The issue's item 4 asks for "a mixed calibration set: prose, code and dialogue, from sources that are none of the
evaluation texts". The sources here are none of the evaluation texts (``suite.texts.TEXT_LOADERS``) nor of the
validation texts (``VALIDATION_LOADERS``): no Austen, no KJV, neither ``argparse.py`` nor ``tarfile.py``.

- ``docs``: the package's own calibration text (the tail of ``pydoc_data.topics``), as the default uses it;
- ``quotes``: Debian's ``fortunes`` (BSD): the ``humorists``, ``people`` and ``pratchett`` files (sayings,
  anecdotes and exchanges, much of it dialogue);
- ``verse``: the same package's ``songs-poems`` (lyrics and verse, older English among them);
- ``code``: CPython's ``Lib/logging/__init__.py`` of the running interpreter (PSF-2.0).

Each register fills whole windows (``window`` tokens), one register after another, so that no window mixes two.
Used by ``quality_multitext.py`` rows ``w_mixed*`` through ``importance_transform="calib:<registers>"``.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite.texts import debian_file

__all__ = ["REGISTERS", "SIGNAL_LOADERS", "feedback_on_grids", "mixed_calibration_ids", "mixed_calibration_windows",
           "mixed_hessians"]


def _fortunes(*files: str) -> str:
    parts = []
    for name in files:
        path = debian_file("fortunes", f"/usr/share/games/fortunes/{name}")
        # Entries are separated by lines holding only "%".
        parts.extend(e.strip("\n") for e in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"))
    return "\n\n".join(p for p in parts if p.strip())


def _docs() -> str:
    from optimum_superweight.evaluation import builtin_text

    text = builtin_text()
    return text[len(text) // 2:]  # the calibration side of the text (the evaluation protocol scores its start)


def _code() -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / "logging" / "__init__.py").read_text(encoding="utf-8")


REGISTERS: dict[str, Callable[[], str]] = {
    "docs": _docs,
    "quotes": lambda: _fortunes("humorists", "people", "pratchett"),
    "verse": lambda: _fortunes("songs-poems"),
    "code": _code,
}


def mixed_calibration_ids(tokenizer: Any, n_tokens: int, registers: list[str], *, window: int = 512) -> list[int]:
    """``n_tokens`` ids: whole windows taken in turn from each register's text (from its end, as the package takes its
    calibration text), ``n_tokens // window`` windows split as evenly as the count allows."""
    from optimum_superweight.evaluation import tokenize_text

    windows = max(1, n_tokens // window)
    per = [windows // len(registers) + (i < windows % len(registers)) for i in range(len(registers))]
    ids: list[int] = []
    for name, count in zip(registers, per):
        if count == 0:
            continue
        text = REGISTERS[name]()
        tokens = tokenize_text(tokenizer, text[-count * window * 8:], max_tokens=None)
        if len(tokens) < count * window:
            raise ValueError(f"register {name!r} gives {len(tokens)} tokens, fewer than {count * window}")
        ids.extend(tokens[-count * window:])
    return ids


def mixed_calibration_windows(tokenizer: Any, n_tokens: int, registers: list[str]) -> tuple[list[int], int | None]:
    """:func:`mixed_calibration_ids` and the BOS id each window starts with, by the package's rule
    (:func:`~optimum_superweight.models.calibration.tokenizer_adds_bos`), as ``model_calibration_ids`` returns them."""
    from optimum_superweight.models.calibration import tokenizer_adds_bos

    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    return mixed_calibration_ids(tokenizer, n_tokens, registers), bos


def mixed_hessians(model: Any, tokenizer: Any, names: list[str], n_tokens: int, registers: list[str],
                   *, chunk_bytes: float = 4.5e9) -> Any:
    """``E[x xᵀ]`` of each named layer's input on the mixed calibration windows, yielded as ``(name, H)`` in passes
    over the model that each hold at most about ``chunk_bytes`` of matrices (a 1.5 B model's 28 ``down_proj``
    inputs alone are 9 GB in float32)."""
    from optimum_superweight.models.calibration import collect_hessians

    ids, bos = mixed_calibration_windows(tokenizer, n_tokens, registers)
    # Layers reading one input share one matrix (q/k/v, gate/up): count each input once. Widest inputs last, so
    # that the narrow ones all go in the first pass.
    order = sorted(names, key=lambda n: model.get_submodule(n).in_features)
    chunk: list[str] = []
    size, seen = 0.0, set()
    for position, name in enumerate(order):
        width = model.get_submodule(name).in_features
        chunk.append(name)
        reader = name.rsplit(".", 1)[0] + f":{width}"
        if reader not in seen:
            seen.add(reader)
            size += 4.0 * width * width
        if size >= chunk_bytes or position == len(order) - 1:
            yield from collect_hessians(model, chunk, ids, bos_id=bos).items()
            chunk, size = [], 0.0


def feedback_on_grids(reference: Any, layer: Any, hessian: Any) -> Any:
    """GPTQ's column sweep (error feedback under ``hessian``) on the scales and float offsets that ``layer`` (a
    quantized ``SuperWeightLinear`` of ``reference``) chose: the grids stay, the codes change; dense float32 result
    with the layer's super weights exact. ``w = s·q + m`` is swept as ``w - m`` on the zero-point-0 grid ``s·q``."""
    import torch

    from optimum_superweight.tensor.gptq import gptq_fixed_grid

    weight = reference.weight.detach().to(torch.float32)
    columns = torch.arange(weight.shape[1]) // layer.layout.effective_group_size
    scale = layer.weight_scale.to(torch.float32)[:, columns]
    offset = layer.weight_offset.to(torch.float32)[:, columns]
    dense = gptq_fixed_grid(weight - offset, hessian, scale, torch.zeros_like(scale), bits=layer.bits,
                            holdout=layer.super_weight_indices)
    return dense + offset


def _register_text(key: str) -> Any:
    from suite.texts import EvalText

    sources = {"docs": ("the package's calibration text (pydoc_data.topics, second half)", "PSF-2.0"),
               "quotes": ("Debian package fortunes: humorists, people, pratchett", "BSD (fortune-mod); quoted works"),
               "verse": ("Debian package fortunes: songs-poems", "BSD (fortune-mod); quoted works"),
               "code": ("CPython Lib/logging/__init__.py", "PSF-2.0")}
    source, license_ = sources[key]
    return EvalText(f"reg_{key}", f"calibration register '{key}', read from its start", key, source, license_, REGISTERS[key]())


#: The calibration registers as texts (``--texts reg_quotes,...``): scored from their *start*, while calibration takes
#: windows from their *end*, so a score here is on tokens no fit saw. For a signal measured at quantize time.
SIGNAL_LOADERS: dict[str, Callable[[], Any]] = {f"reg_{key}": (lambda key=key: _register_text(key)) for key in REGISTERS}
