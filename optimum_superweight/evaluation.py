"""Perplexity of a causal language model on a text, with a fixed, documented protocol.

The default protocol is the one every quality number of this package is quoted with:
the first 4096 tokens of the built-in English text (``pydoc_data.topics``, shipped with every CPython),
cut into non-overlapping windows of 512 tokens, each window preceded by the tokenizer's BOS token, every
text token scored once. Measured perplexities (SmolLM2-135M-Instruct and others): ``benchmarks/RESULTS.md``.

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from optimum_superweight import perplexity, default_model_path
    >>> path = default_model_path()  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    >>> tokenizer = AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    >>> round(float(perplexity(model, tokenizer)), 2)  # doctest: +SKIP
    14.99

With ``stride < window`` the windows overlap and only the tokens a window adds beyond the previous one
are scored (the sliding-window recipe of the transformers documentation), so each token is still scored
exactly once, with up to ``window - stride`` tokens of extra context.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .detection.inputs import context_length
from .progress import progress_bar

__all__ = [
    "PerplexityResult",
    "builtin_text",
    "load_text",
    "tokenize_text",
    "perplexity",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_WINDOW",
]

DEFAULT_MAX_TOKENS = 4096
DEFAULT_WINDOW = 512

#: Names accepted by :func:`load_text` for WikiText-2 (raw), the corpus GPTQ and the paper report on.
_WIKITEXT2_NAMES = ("wikitext", "wikitext2", "wikitext-2", "wikitext-2-raw-v1")


def builtin_text() -> str:
    """The built-in English evaluation text: every ``pydoc_data.topics`` entry, by sorted key, joined by blank lines.

    About 465 kB of Python documentation prose and code that ships with CPython, so evaluation works offline.

    >>> text = builtin_text()
    >>> len(text) > 100_000
    True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str | os.PathLike[str] | None = None) -> str:
    """Return the evaluation text named by ``source``.

    Args:
        source: ``None`` or ``"builtin"`` for :func:`builtin_text`; a path to a UTF-8 text file; or a dataset
            name for the ``datasets`` library (needs it installed and the Hub reachable): ``"wikitext"``
            (also ``"wikitext2"``) gives WikiText-2 raw, test split, joined with ``"\\n\\n"`` — the protocol of
            GPTQ and of the super-weight paper. Any other ``"name"`` or ``"owner/name:config"`` loads that dataset's
            ``test`` split and joins its ``text`` column the same way.

    >>> load_text() == builtin_text()
    True
    """
    if source is None or (isinstance(source, str) and source in ("builtin", "pydoc", "pydoc_data.topics")):
        return builtin_text()
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"source={source!r} is invalid: expected None, 'builtin', a text file path or a dataset name such as 'wikitext'."
        )
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    name = str(source)
    if path.suffix or path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists():
        raise FileNotFoundError(f"source={name!r} is not a readable text file.")
    try:
        from datasets import load_dataset  # optional dependency
    except ImportError as error:
        raise FileNotFoundError(
            f"source={name!r} is neither a file nor 'builtin', and loading it as a dataset needs the 'datasets' "
            "package (pip install datasets) and network access to the Hugging Face Hub."
        ) from error

    if name.lower() in _WIKITEXT2_NAMES:
        dataset = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    else:
        dataset_name, _, config = name.partition(":")
        dataset = load_dataset(dataset_name, config or None, split="test")
    if "text" not in dataset.column_names:
        raise ValueError(f"Dataset {name!r} has no 'text' column (columns: {dataset.column_names}).")
    return "\n\n".join(dataset["text"])


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity`; ``float(result)`` is the perplexity.

    Attributes:
        ppl: ``exp(nll)``.
        nll: Mean negative log-likelihood per scored token, in nats.
        n_tokens: Number of scored tokens.
        n_windows: Number of forward windows.
        window: Window length in text tokens (BOS not counted).
        stride: Step between window starts, in tokens.
        add_bos: Whether a BOS token preceded each window.
        text_tokens: Number of text tokens evaluated (after ``max_tokens``).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    window: int
    stride: int
    add_bos: bool
    text_tokens: int

    def __float__(self) -> float:
        return float(self.ppl)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"perplexity {self.ppl:.4f} (nll {self.nll:.4f} over {self.n_tokens} tokens, "
            f"{self.n_windows} windows of {self.window}, stride {self.stride}, bos={self.add_bos})"
        )


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[int]:
    """Token ids of ``text`` without special tokens, truncated to ``max_tokens`` (``None`` or ``<= 0``: all)."""
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    ids = list(ids)
    if max_tokens is not None and max_tokens > 0:
        ids = ids[:max_tokens]
    return ids


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive integer{' or None' if allow_none else ''}.")


def _windows(n_tokens: int, window: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window over text positions ``[0, n_tokens)``.

    A text token at position ``i`` is scored when predicted from everything before it in its window
    (BOS included), and each token is scored in exactly one window: the first that reaches it.
    """
    spans: list[tuple[int, int, int]] = []
    prev_end = 0
    begin = 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        # Without BOS the first token of a window has nothing to be predicted from.
        first_scored = max(prev_end, begin if bos else begin + 1)
        if first_scored < end:
            spans.append((begin, end, first_scored))
        prev_end = end
        begin += stride
    return spans


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str | None = None,
    *,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    batch_size: int = 4,
    add_bos: bool = True,
    progress: bool = True,
    token_ids: Sequence[int] | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``text`` (default: :func:`builtin_text`) with the package's protocol.

    Args:
        model: Any transformers causal LM (quantized or not); called as ``model(input_ids=..., attention_mask=...)``.
        tokenizer: Its tokenizer; text is encoded without special tokens.
        text: The text to score; ``None`` means :func:`builtin_text`. Use :func:`load_text` for files/datasets.
        max_tokens: Evaluate only the first ``max_tokens`` text tokens (``None``: all of them).
        window: Text tokens per forward window (BOS not counted).
        stride: Step between windows; ``None`` = ``window`` (disjoint windows). With ``stride < window`` only
            the tokens not already scored by the previous window are scored.
        batch_size: Windows per forward call; the last (shorter) window is padded on the right and masked.
        add_bos: Prepend ``tokenizer.bos_token_id`` to each window; ignored (no BOS) when the tokenizer has none.
        progress: A bar over the batches (:func:`~optimum_superweight.progress.progress_bar`: on stderr once the
            evaluation has run a moment, off with transformers' and tqdm's usual switches); ``False``: none.
        token_ids: Already tokenized text (skips tokenization; ``max_tokens`` still applies).

    Returns:
        A :class:`PerplexityResult`; ``float(result)`` is the perplexity.

    >>> result = perplexity(model, tokenizer, max_tokens=1024)  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    perplexity ... (nll ... over 1024 tokens, 2 windows of 512, stride 512, bos=True)
    """
    _check_positive_int("window", window)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_tokens", max_tokens, allow_none=True)
    if stride is None:
        stride = window
    _check_positive_int("stride", stride)
    if stride > window:
        raise ValueError(f"stride={stride} is invalid: it must not exceed window={window} (tokens would be skipped).")

    if token_ids is None:
        ids = tokenize_text(tokenizer, builtin_text() if text is None else text, max_tokens)
    else:
        ids = [int(t) for t in token_ids]
        if max_tokens is not None:
            ids = ids[:max_tokens]
    bos_id = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    use_bos = bos_id is not None
    limit = context_length(model)
    if limit is not None and window + use_bos > limit:  # a short-context model: windows fit its positions
        window = max(1, limit - use_bos)
        stride = min(stride, window)
    spans = _windows(len(ids), window, stride, use_bos)
    if not spans:
        raise ValueError(
            f"The text gives {len(ids)} token(s): too few to score any (need at least {1 if use_bos else 2})."
        )

    device = _model_device(model)
    was_training = model.training
    model.eval()
    all_ids = torch.tensor(ids, dtype=torch.long)
    total_nll = 0.0  # float64 accumulation keeps the result independent of batching order
    total_tokens = 0
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    bar = progress_bar(total=len(batches), desc="perplexity", unit="batch") if progress else None
    try:
        for batch in batches:
            prefix = 1 if use_bos else 0
            length = max(end - begin for begin, end, _ in batch) + prefix
            input_ids = torch.zeros((len(batch), length), dtype=torch.long)
            attention = torch.zeros((len(batch), length), dtype=torch.long)
            labels = torch.full((len(batch), length), -100, dtype=torch.long)
            for i, (begin, end, first_scored) in enumerate(batch):
                n = end - begin + prefix
                if use_bos:
                    input_ids[i, 0] = bos_id
                input_ids[i, prefix:n] = all_ids[begin:end]
                attention[i, :n] = 1
                # Position p of input_ids predicts position p+1; label text position j sits at prefix + j - begin.
                start = prefix + first_scored - begin
                labels[i, start:n] = input_ids[i, start:n]
            outputs = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            # One row at a time: a float32 copy of a whole batch of logits is large (4 x 512 x 49k = 400 MB).
            for i in range(len(batch)):
                logits = outputs.logits[i, :-1, :].float()
                targets = labels[i, 1:].to(logits.device)
                nll = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
                total_nll += float(nll.double())
                total_tokens += int((targets != -100).sum())
            del outputs
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()

    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        n_tokens=total_tokens,
        n_windows=len(spans),
        window=window,
        stride=stride,
        add_bos=use_bos,
        text_tokens=len(ids),
    )
