"""The one error an exporter raises when a target format cannot hold our checkpoint exactly."""

from __future__ import annotations

__all__ = ["NotExpressibleError", "require"]


class NotExpressibleError(ValueError):
    """The target format cannot hold a layer exactly; nothing was approximated.

    Carries the layer (``where``) and what the format lacks (``what``); ``allow_requantize=True`` (CLI
    ``--requantize``) re-fits such layers instead, on request only.
    """

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__(
            f"{where}: cannot be exported exactly: {what}. Pass allow_requantize=True (--requantize) to re-fit such "
            "layers for the target format from their dequantized weights instead."
        )


def require(condition: bool, where: str, what: str) -> None:
    """Raise :class:`NotExpressibleError` unless ``condition``."""
    if not condition:
        raise NotExpressibleError(where, what)
