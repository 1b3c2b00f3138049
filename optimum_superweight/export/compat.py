"""The keys transformers 4.x readers need, written next to transformers 5's in every exported folder.

Servers pin transformers 4.x (vLLM 0.16 pins 4.57), and 4.x reads a config and a tokenizer saved by transformers
5 without an error but not as saved:

- 5.x keeps RoPE settings only in ``rope_parameters`` (``{"rope_theta": ..., "rope_type": ...}``, or one such dict
  per attention type for Gemma 3); 4.x reads the top-level ``rope_theta`` (and ``rope_scaling``,
  ``partial_rotary_factor``, Gemma 3's ``rope_local_base_freq``) and falls back to its default (10000) when they
  are absent: a model with another base runs with the wrong positions, silently.
- Gemma 3's per-attention-type ``rope_parameters`` cannot stay beside the top-level keys: vLLM on transformers 4.x
  (``patch_rope_parameters`` in ``vllm/transformers_utils/config.py``, 0.16) writes the top-level ``rope_theta``
  into whatever ``rope_parameters`` holds, so the nested dict stops looking nested and is refused ("rope_parameters
  should have a 'rope_type' key"). There the nested dict is replaced by the top-level keys, which transformers 5
  reads back into the same per-type dict (checked on every folder written: otherwise the folder is left as it was).
- 5.x writes ``dtype``; 4.x reads ``torch_dtype``.
- 5.x writes ``"tokenizer_class": "TokenizersBackend"``, a class 4.x does not have (loading fails). 4.x's
  ``PreTrainedTokenizerFast`` reads the same ``tokenizer.json``.

:func:`add_transformers4_keys` adds the 4.x keys (it never removes or changes a 5.x key) to ``config.json`` and
``tokenizer_config.json`` of a folder; every folder writer of :mod:`optimum_superweight.export` calls it.

>>> legacy_rope_keys({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
{'rope_theta': 100000.0}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["add_transformers4_keys", "legacy_config", "legacy_rope_keys", "legacy_tokenizer_class", "TRANSFORMERS4_TOKENIZERS",
           "comparable_rope"]

logger = logging.getLogger(__name__)

#: Tokenizer classes of transformers 4.x for the families this package quantizes (a 5.x config naming one of
#: these is kept; any other class becomes ``PreTrainedTokenizerFast``, which 4.x has and which reads tokenizer.json).
TRANSFORMERS4_TOKENIZERS = frozenset({
    "PreTrainedTokenizerFast",
    "GPT2Tokenizer", "GPT2TokenizerFast",
    "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
    "Qwen2Tokenizer", "Qwen2TokenizerFast",
    "GemmaTokenizer", "GemmaTokenizerFast",
    "MistralTokenizer", "T5Tokenizer", "T5TokenizerFast",
    "PhiTokenizer", "CodeGenTokenizer", "CodeGenTokenizerFast",
    "GPTNeoXTokenizerFast", "BloomTokenizerFast", "OPTTokenizer",
})
_FALLBACK_TOKENIZER = "PreTrainedTokenizerFast"
# Gemma 3 (5.x): one RoPE dict per attention type; 4.x: rope_theta (global layers), rope_local_base_freq (local).
_GLOBAL, _LOCAL = "full_attention", "sliding_attention"


def _flat_rope(parameters: dict[str, Any]) -> dict[str, Any]:
    """4.x keys of one flat ``rope_parameters`` dict: ``rope_theta``, ``partial_rotary_factor``, ``rope_scaling``."""
    keys: dict[str, Any] = {}
    if "rope_theta" in parameters:
        keys["rope_theta"] = parameters["rope_theta"]
    if "partial_rotary_factor" in parameters:
        keys["partial_rotary_factor"] = parameters["partial_rotary_factor"]
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        # 4.x's rope_scaling: the same dict without the base (kept at top level), with both spellings of the type.
        scaling = {k: v for k, v in parameters.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = rope_type
        scaling.setdefault("type", rope_type)
        keys["rope_scaling"] = scaling
    return keys


def legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level RoPE keys transformers 4.x reads, derived from 5.x's ``rope_parameters`` (empty if none).

    >>> legacy_rope_keys({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
    ...                                       "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})
    {'rope_theta': 1000000.0, 'rope_scaling': {'rope_type': 'linear', 'factor': 8.0, 'type': 'linear'}, 'rope_local_base_freq': 10000.0}
    """
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict) or not parameters:
        return {}
    if isinstance(parameters.get(_GLOBAL), dict) or isinstance(parameters.get(_LOCAL), dict):
        keys = _flat_rope(parameters.get(_GLOBAL) or {})
        local = parameters.get(_LOCAL) or {}
        if "rope_theta" in local:
            keys["rope_local_base_freq"] = local["rope_theta"]
        return keys
    nested = [v for v in parameters.values() if isinstance(v, dict)]
    if nested:
        logger.warning("rope_parameters has per-layer-type entries %s: only %r/%r (Gemma 3) have a known transformers "
                       "4.x spelling; no top-level RoPE keys written.",
                       sorted(k for k, v in parameters.items() if isinstance(v, dict)), _GLOBAL, _LOCAL)
        return {}
    return _flat_rope(parameters)


def _per_type_rope(config: dict[str, Any]) -> bool:
    parameters = config.get("rope_parameters")
    return isinstance(parameters, dict) and bool(parameters) and set(parameters) <= {_GLOBAL, _LOCAL}


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` plus the 4.x keys (RoPE, ``torch_dtype``), in every nested sub-config too (``text_config``).

    A RoPE key already present is never overwritten (a config that has both spellings keeps what it says);
    ``torch_dtype`` always follows ``dtype``, the key transformers 5 writes for what the folder holds. A
    per-attention-type ``rope_parameters`` (Gemma 3) gives way to the top-level keys (see the module's notes).

    >>> legacy_config({"model_type": "gemma3_text", "rope_parameters": {
    ...     "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
    ...     "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})
    {'model_type': 'gemma3_text', 'rope_theta': 1000000.0, 'rope_local_base_freq': 10000.0}
    """
    out = dict(config)
    for key, value in config.items():
        if isinstance(value, dict) and ("rope_parameters" in value or "model_type" in value):
            out[key] = legacy_config(value)
    for key, value in legacy_rope_keys(config).items():
        out.setdefault(key, value)
    if _per_type_rope(config) and "rope_theta" in out:
        del out["rope_parameters"]
    if "dtype" in config and isinstance(config["dtype"], str):
        out["torch_dtype"] = config["dtype"]  # 5.x's dtype is what the folder holds; a stale torch_dtype would lie
    return out


def comparable_rope(parameters: Any) -> Any:
    """``rope_parameters`` without 4.x's duplicate spelling of the type (``"type"`` equal to ``"rope_type"``), per
    attention type too, so that two readings of the same settings compare equal."""
    if not isinstance(parameters, dict):
        return parameters
    if all(isinstance(v, dict) for v in parameters.values()) and parameters:
        return {k: comparable_rope(v) for k, v in parameters.items()}
    return {k: v for k, v in parameters.items() if not (k == "type" and v == parameters.get("rope_type"))}


def _reads_same_rope(config: dict[str, Any], legacy: dict[str, Any]) -> bool:
    """Whether transformers 5 holds the same ``rope_parameters`` for ``legacy`` as for ``config`` (always true when
    ``legacy`` keeps them)."""
    if "rope_parameters" in legacy or "rope_parameters" not in config:
        return True
    from transformers import AutoConfig

    def rope(values: dict[str, Any]) -> Any:
        fields = {k: v for k, v in values.items() if k != "model_type"}
        return comparable_rope(AutoConfig.for_model(values["model_type"], **fields).rope_parameters)

    try:
        return rope(config) == rope(legacy)
    except (KeyError, ValueError, TypeError):
        return False


def legacy_tokenizer_class(name: str | None) -> str | None:
    """A tokenizer class 4.x has: ``name`` when it is one of :data:`TRANSFORMERS4_TOKENIZERS`, else the generic one.

    >>> legacy_tokenizer_class("TokenizersBackend"), legacy_tokenizer_class("Qwen2Tokenizer")
    ('PreTrainedTokenizerFast', 'Qwen2Tokenizer')
    """
    if name is None or name in TRANSFORMERS4_TOKENIZERS:
        return name
    return _FALLBACK_TOKENIZER


def add_transformers4_keys(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Add the transformers 4.x keys to ``folder``'s ``config.json`` and ``tokenizer_config.json`` in place.

    Returns what was added (``{"config": {...}, "tokenizer_class": (old, new) or None}``).

    >>> add_transformers4_keys("smollm2-awq")  # doctest: +SKIP
    {'config': {'rope_theta': 100000.0, 'torch_dtype': 'float16'}, 'tokenizer_class': ('TokenizersBackend', 'PreTrainedTokenizerFast')}
    """
    folder = Path(folder)
    added: dict[str, Any] = {"config": {}, "tokenizer_class": None}
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        legacy = legacy_config(config)
        if not _reads_same_rope(config, legacy):
            logger.warning("%s: transformers 5 would not read the same RoPE settings from the transformers 4.x keys; "
                           "rope_parameters kept as written (vLLM on transformers 4.x may refuse this config).", config_file)
            legacy = {**legacy, "rope_parameters": config["rope_parameters"]}
        added["config"] = {k: v for k, v in legacy.items() if config.get(k, object()) != v}
        if "rope_parameters" in config and "rope_parameters" not in legacy:
            added["config"]["rope_parameters"] = None  # removed: the top-level keys say the same
        if legacy != config:
            config_file.write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
    tokenizer_file = folder / "tokenizer_config.json"
    if tokenizer_file.is_file():
        tokenizer = json.loads(tokenizer_file.read_text())
        old = tokenizer.get("tokenizer_class")
        new = legacy_tokenizer_class(old)
        if new != old:
            if new == _FALLBACK_TOKENIZER and not (folder / "tokenizer.json").is_file():
                logger.warning("%s: tokenizer_class %r is not in transformers 4.x and there is no tokenizer.json for %s; "
                               "left as is.", tokenizer_file, old, _FALLBACK_TOKENIZER)
            else:
                tokenizer["tokenizer_class"] = new
                tokenizer_file.write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False) + "\n")
                added["tokenizer_class"] = (old, new)
    return added
