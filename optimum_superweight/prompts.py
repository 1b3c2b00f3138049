"""What detection runs on: the prompts, the tokenizer, and the fallback when there is none (one rule for all paths).

The rule, shared by in-memory detection (:func:`~optimum_superweight.detection.detect_super_weights`), streaming
detection (:func:`~optimum_superweight.detection.detect_super_weights_streaming`), the quantizer (in memory and
``low_memory=True``) and the CLI:

1. Prompts given (``prompts=`` / ``SuperWeightConfig.detection_prompts`` / ``--prompt``) are used as given; text
   needs a tokenizer, lists of token ids do not.
2. Otherwise :data:`DEFAULT_PROMPTS` (the paper's prompt first), encoded with the tokenizer.
3. The tokenizer is the one passed; the quantizer and streaming detection load the model's own from the folder
   (or Hub id) the model comes from (:func:`load_tokenizer`).
4. Without a tokenizer, fixed, spread-out token ids (:func:`fallback_token_ids`) stand in for the default prompts,
   and a log line says so: spikes then depend on which tokens those are, so results can differ from a run with
   the tokenizer.

    >>> detection_inputs(None, None, vocab_size=100)[0][0]
    '<token ids [17, 48, 79, 10]...>'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["PAPER_PROMPT", "DEFAULT_PROMPTS", "fallback_token_ids", "load_tokenizer", "detection_inputs"]

logger = logging.getLogger(__name__)

#: The prompt the paper's authors used to find super weights.
PAPER_PROMPT = "Apple Inc. is a worldwide tech company."
#: Built-in detection prompts: the authors' prompt plus ordinary prose, a date-heavy sentence and code.
DEFAULT_PROMPTS: tuple[str, ...] = (
    PAPER_PROMPT,
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In 1905, Albert Einstein published four papers that changed physics.",
    "def add(a, b):\n    return a + b",
)


def fallback_token_ids(vocab_size: int, count: int = 4, length: int = 16) -> list[list[int]]:
    """Fixed, spread-out token ids: the deterministic stand-in for :data:`DEFAULT_PROMPTS` without a tokenizer."""
    return [[(17 + 31 * k + 101 * i) % vocab_size for k in range(length)] for i in range(count)]


def load_tokenizer(source: Any) -> Any:
    """The tokenizer saved with a model (``source``: its folder or Hub id), or ``None`` when there is none.

    >>> load_tokenizer("./SmolLM2-135M-Instruct")  # doctest: +SKIP
    """
    if not source:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    except Exception as error:  # any failure means "no tokenizer": detection then says it uses fixed ids
        logger.info("No tokenizer could be loaded from %s (%s).", source, " ".join(str(error).split())[:200])
        return None


def model_tokenizer(model: Any) -> Any:
    """The tokenizer saved with ``model`` (from its ``name_or_path``), or ``None`` (then fixed token ids are used).

    Both quantize paths (in memory and ``low_memory=True``) call it, so they detect on the same prompts.

    >>> model_tokenizer(model)  # doctest: +SKIP
    """
    return load_tokenizer(getattr(model.config, "name_or_path", None) or getattr(model, "name_or_path", None))


def detection_inputs(
    tokenizer: Any, prompts: Sequence[str | Sequence[int]] | None, vocab_size: int
) -> tuple[list[str], list[list[int]]]:
    """``(labels, token ids)`` of the detection prompts under the module's rule; ``ValueError`` for bad prompts."""
    if prompts is None:
        if tokenizer is None:
            ids = fallback_token_ids(vocab_size)
            logger.warning(
                "optimum-superweight detection: no tokenizer, so %d fixed token-id sequences stand in for the default "
                "prompts (pass the model's tokenizer, or save it next to the model, to detect on text).", len(ids)
            )
            return [f"<token ids {p[:4]}...>" for p in ids], ids
        prompts = DEFAULT_PROMPTS
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            f"prompts={prompts!r} is invalid: expected a non-empty list of strings (or of token-id lists), or None."
        )
    texts: list[str] = []
    encoded: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompts contains an empty string: {list(prompts)!r}.")
            if tokenizer is None:
                raise ValueError(
                    f"prompts contains text ({prompt!r}) but tokenizer is None: pass the model's tokenizer, "
                    "or prompts as lists of token ids."
                )
            ids = list(tokenizer(prompt)["input_ids"])
            texts.append(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in prompt
        ):
            ids = list(prompt)
            texts.append(f"<token ids {ids[:4]}...>")
        else:
            raise ValueError(
                f"prompt {prompt!r} is invalid: expected a string or a non-empty list of token ids in "
                f"[0, {vocab_size})."
            )
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens.")
        encoded.append(ids)
    return texts, encoded
