"""Score a GGUF file in llama.cpp (llama-cpp-python) with the package's perplexity protocol.

Same windows as :func:`optimum_superweight.perplexity` (disjoint windows of ``window`` text tokens, each after
BOS, every text token scored once), so the numbers compare with transformers' on the same token ids.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["load_llama", "llama_perplexity", "llama_decode_speed"]


def load_llama(path: str | os.PathLike[str], n_ctx: int = 1024, n_threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` keeping every position's logits (CPU)."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise ImportError("needs llama-cpp-python: pip install 'optimum-superweight[llama-cpp]'") from error
    return Llama(model_path=os.fspath(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=n_threads)


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64)
    peak = scores.max(axis=-1, keepdims=True)
    return scores - peak - np.log(np.exp(scores - peak).sum(axis=-1, keepdims=True))


def llama_perplexity(llm: Any, token_ids: Sequence[int], bos_id: int | None, window: int = 512) -> float:
    """Perplexity of ``token_ids`` (text tokens, no BOS) in disjoint windows, each prefixed by ``bos_id``."""
    nll, count = 0.0, 0
    for begin in range(0, len(token_ids), window):
        chunk = list(token_ids[begin : begin + window])
        prefix = [bos_id] if bos_id is not None else []
        tokens = prefix + chunk
        llm.reset()
        llm.eval(tokens)
        logp = _log_softmax(np.asarray(llm.scores[: len(tokens)]))
        first = len(prefix) if prefix else 1  # without BOS the window's first token has no context
        targets = np.asarray(tokens[first:])
        rows = np.arange(first - 1, len(tokens) - 1)
        nll -= float(logp[rows, targets].sum())
        count += len(targets)
    return math.exp(nll / count)


def llama_decode_speed(llm: Any, prompt: Sequence[int], new_tokens: int = 64) -> float:
    """Greedy batch-1 decode tokens/s after a short prompt."""
    llm.reset()
    llm.eval(list(prompt))
    start = time.perf_counter()
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(new_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return new_tokens / (time.perf_counter() - start)
