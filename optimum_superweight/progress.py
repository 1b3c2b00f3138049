"""Progress bars of the steps that can take minutes: detection passes, calibration, choosing codes, exports, evaluation.

One convention, transformers' own: a tqdm bar on stderr, shown unless progress bars are switched off the usual
ways: ``transformers.utils.logging.disable_progress_bar()``, ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (read here at
every bar, not only when transformers is imported) or tqdm's ``TQDM_DISABLE=1``. A bar appears only once its step
has run :data:`DELAY_S` seconds, so quick steps print nothing.

    >>> with progress_bar(total=3, desc="choosing codes", unit="layer") as bar:
    ...     for _ in range(3):
    ...         bar.update()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["DELAY_S", "progress_enabled", "progress_bar", "forward_progress", "routed_tqdm"]

#: Seconds a step runs before its bar appears (tqdm's ``delay``).
DELAY_S = 2.0

_TRUE = ("1", "true", "yes", "on")


def progress_enabled() -> bool:
    """Whether bars are shown: not when transformers' bars are disabled, nor with ``HF_HUB_DISABLE_PROGRESS_BARS``
    or ``TQDM_DISABLE`` set to a true value.

    >>> isinstance(progress_enabled(), bool)
    True
    """
    for variable in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if os.environ.get(variable, "").strip().lower() in _TRUE:
            return False
    from transformers.utils import logging as hf_logging

    return hf_logging.is_progress_bar_enabled()


class _NoBar:
    """What :func:`progress_bar` gives when bars are off: the same calls, doing nothing."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it", unit_scale: bool = False
) -> Any:
    """A tqdm bar (``desc``, ``unit``, ``total``; over ``iterable`` if given; ``unit_scale``: counts as k, M, G) on
    stderr, or a bar that does nothing when :func:`progress_enabled` is false. Use it as a context manager (or close
    it).

    >>> for item in progress_bar([1, 2], desc="saving", unit="file"):
    ...     pass
    """
    if not progress_enabled():
        return _NoBar(iterable)
    from tqdm.auto import tqdm

    # disable=False: tqdm's default (None) hides bars when stderr is not a terminal, e.g. in a log file or a CI
    # job, where a user waiting on a long step needs them most; the switches above are the way to turn them off.
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, delay=DELAY_S, disable=False,
                dynamic_ncols=True)


@contextlib.contextmanager
def forward_progress(modules: Iterable[Any], *, desc: str, unit: str = "layer", total: int | None = None) -> Iterator[Any]:
    """A bar advanced by every forward call of ``modules`` while the block runs (e.g. the decoder layers during a
    detection or calibration pass, whose own code needs no change); the hooks are removed after.

    >>> import torch
    >>> layers = [torch.nn.Linear(2, 2) for _ in range(3)]
    >>> with forward_progress(layers, desc="calibration") as bar:
    ...     _ = [layer(torch.ones(1, 2)) for layer in layers]
    """
    with progress_bar(total=total, desc=desc, unit=unit) as bar:
        if isinstance(bar, _NoBar):
            yield bar
            return
        def advance(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
            bar.update()

        handles = [module.register_forward_hook(advance) for module in modules]
        try:
            yield bar
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def routed_tqdm(module: Any, name: str = "tqdm") -> Iterator[None]:
    """While the block runs, the bars a library makes with its module-level ``tqdm`` (``module.<name>``) come from
    :func:`progress_bar`: they follow the same switches and :data:`DELAY_S` as ours (a library's plain tqdm reads
    ``TQDM_DISABLE`` once, at import, and ignores transformers' switch).

    >>> import types
    >>> library = types.SimpleNamespace(tqdm=lambda iterable, desc=None: iterable)
    >>> with routed_tqdm(library):
    ...     done = [item for item in library.tqdm([1, 2], desc="Compressing model")]
    """
    original = getattr(module, name, None)
    if original is None:  # a version of the library without that name: its bars (if any) stay its own
        yield
        return

    def bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None, *_: Any,
            unit: str = "it", unit_scale: bool = False, **__: Any) -> Any:  # tqdm's order of the first three
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        return progress_bar(iterable, total=total, desc=desc or "", unit=unit, unit_scale=bool(unit_scale))

    setattr(module, name, bar)
    try:
        yield
    finally:
        setattr(module, name, original)
