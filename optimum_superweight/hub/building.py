"""Building model cards that carry super weights: one for a quantized checkpoint, one per model of the index.

A card written by :func:`build_model_card` holds the super weights twice: machine-readable in the YAML
metadata (key ``superweight``, one entry per weight, ``SuperWeight.to_dict()`` fields) next to the
quantization settings, and human-readable as a table in the text. Reading them back (safe YAML, the
``superweight`` block, coordinates in the paper's notation anywhere in a card's text) is :mod:`.reading`;
every card built here passes that reader's checks before it is returned. :func:`merge_cards` puts a generated
card into a repo's existing one, replacing only the generated part.
"""


from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config import SuperWeightConfig
from ..records import SuperWeight
from .reading import (
    CARD_KEY,
    CARD_VERSION,
    GENERATED_END,
    GENERATED_BEGIN,
    MAX_YAML_NODES,
    PACKAGE_URL,
    PAPER_URL,
    _GENERATED_BEGIN_PREFIX,
    _TRANSFORMERS_DEFAULT_CARD_MARK,
    _bounded_copy,
    check_repo_id,
    parse_card,
)

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

__all__ = ["build_model_card", "build_index_card", "merge_cards", "normalize_perplexity"]



# ---------------------------------------------------------------------------------------------------------------
# Building cards
# ---------------------------------------------------------------------------------------------------------------
def normalize_perplexity(perplexity: Any) -> dict[str, Any] | None:
    """Validate perplexity numbers for a card: ``{"before": 14.99, "after": 15.8}`` (+ optional ``text``, ``tokens``).

    A ``(before, after)`` pair is accepted too; ``after`` alone is allowed (``before`` unknown).

    >>> normalize_perplexity((14.99, 15.8))
    {'before': 14.99, 'after': 15.8}
    """
    if perplexity is None:
        return None
    if isinstance(perplexity, (tuple, list)) and len(perplexity) == 2:
        perplexity = {"before": perplexity[0], "after": perplexity[1]}
    if not isinstance(perplexity, Mapping):
        raise ValueError(
            f"perplexity={perplexity!r} is invalid: accepted are a (before, after) pair or a mapping with 'after' "
            "and optionally 'before', 'text' (what was scored), 'tokens'."
        )
    allowed = {"before", "after", "text", "tokens", "window"}
    unknown = sorted(set(perplexity) - allowed)
    if unknown:
        raise ValueError(f"perplexity has unknown keys {unknown}: accepted keys are {sorted(allowed)}.")
    result: dict[str, Any] = {}
    for key in ("before", "after"):
        value = perplexity.get(key)
        if value is None:
            continue
        if hasattr(value, "ppl"):  # an evaluation.PerplexityResult
            value = value.ppl
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"perplexity['{key}']={value!r} is invalid: accepted is a finite number > 0.")
        result[key] = float(value)
    if "after" not in result:
        raise ValueError("perplexity needs at least 'after' (the quantized model's perplexity).")
    if perplexity.get("text") is not None:
        text = perplexity["text"]
        if not isinstance(text, str) or not text.strip() or len(text) > 500 or "\n" in text:
            raise ValueError(f"perplexity['text']={text!r} is invalid: accepted is a one-line description (<= 500 chars).")
        result["text"] = text.strip()
    for key in ("tokens", "window"):
        if perplexity.get(key) is not None:
            value = perplexity[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"perplexity['{key}']={value!r} is invalid: accepted is an integer > 0.")
            result[key] = value
    return result


def _check_repo_id(name: str, value: str | None) -> str | None:
    return None if value is None else check_repo_id(value, name)


def _human_bytes(size: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _format_value(value: float | None) -> str:
    return "–" if value is None else f"{value:.6g}"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _resolve_quantization(source: Any) -> tuple[dict[str, Any], list[SuperWeight]]:
    """Quantization settings (without super weights) and super weights from a config, a dict or a model."""
    config = source
    if not isinstance(source, (SuperWeightConfig, Mapping)):
        model_config = getattr(source, "config", None)
        config = getattr(model_config, "quantization_config", None)
        if config is None:
            raise ValueError(
                f"{type(source).__name__} is not quantized with optimum-superweight (its config has no "
                "quantization_config); quantize it first: from_pretrained(..., quantization_config=SuperWeightConfig(bits=4))."
            )
    if isinstance(config, Mapping):
        if config.get("quant_method") != "superweight":
            raise ValueError(
                f"quantization_config.quant_method={config.get('quant_method')!r}: expected 'superweight' (a model "
                "quantized with optimum-superweight)."
            )
        config = SuperWeightConfig.from_dict(dict(config))
    elif not isinstance(config, SuperWeightConfig):
        method = getattr(config, "quant_method", None)
        raise ValueError(
            f"The model's quantization_config.quant_method is {getattr(method, 'value', method)!r}: expected "
            "'superweight' (a model quantized with optimum-superweight)."
        )
    settings = config.to_dict()
    settings.pop("super_weights", None)
    return settings, config.get_super_weights()


def _coordinates_table(records: Sequence[SuperWeight]) -> list[str]:
    """The coordinates as a Markdown table (+ a note on ``impact`` when any record has one)."""
    lines = [
        "| # | module | layer | row | col | paper notation | value | class | impact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, sw in enumerate(records, 1):
        impact = "–" if sw.impact is None else f"×{sw.impact:.3g}"
        lines.append(
            f"| {i} | `{_md_cell(sw.module)}` | {'–' if sw.layer is None else sw.layer} | {sw.row} | {sw.col} | "
            f"`{_md_cell(sw.paper_notation())}` | {_format_value(sw.value)} | {sw.classification or '–'} | {impact} |"
        )
    if any(sw.impact is not None for sw in records):
        lines += ["", "`impact`: perplexity with that weight alone zeroed, divided by the original perplexity."]
    return lines


_SUPER_WEIGHTS_EXPLAINED = (
    "Super weights are a handful of scalar weights, usually in an early layer's MLP down-projection, whose "
    "removal breaks a large language model: zeroing a single one can raise perplexity by orders of magnitude "
    f"and push zero-shot accuracy to chance ([Yu et al., 2024]({PAPER_URL})). They produce a massive "
    "\"super activation\" that persists through the residual stream, so a quantizer must keep them exact."
)


def build_model_card(
    source: "SuperWeightConfig | Mapping[str, Any] | Any",
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    perplexity: Mapping[str, Any] | tuple[float, float] | None = None,
    checkpoint_bytes: int | None = None,
    dense_bytes: int | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    tokenizer: bool = True,
) -> "ModelCard":
    """The model card of a checkpoint quantized with optimum-superweight.

    Args:
        source: The quantized model, its ``SuperWeightConfig``, or the ``quantization_config`` dict of its
            ``config.json``. The super weights and settings come from there.
        base_model: Hub id of the full-precision model (``base_model`` + ``base_model_relation: quantized``).
        repo_id: Where the checkpoint is (or will be) on the Hub; used in the loading snippet and the title.
        perplexity: ``{"before": ..., "after": ..., "text": ..., "tokens": ...}`` or ``(before, after)``.
        checkpoint_bytes: Size of the checkpoint's weight files.
        dense_bytes: Size of the same weights in 16-bit, for comparison.
        license: SPDX-like license id for the metadata (``"apache-2.0"``).
        tags: Extra Hub tags.
        tokenizer: Whether the repo ships the tokenizer (else the loading snippet takes it from ``base_model``).

    >>> from optimum_superweight import SuperWeightConfig
    >>> config = SuperWeightConfig(bits=4, super_weights=[{"module": "model.layers.2.mlp.down_proj", "row": 3968, "col": 7003}])
    >>> card = build_model_card(config, base_model="huggyllama/llama-7b")
    >>> card.data.base_model_relation, card.data.superweight["super_weights"][0]["row"]
    ('quantized', 3968)
    """
    from huggingface_hub import ModelCard, ModelCardData

    settings, records = _resolve_quantization(source)
    base_model = _check_repo_id("base_model", base_model)
    repo_id = _check_repo_id("repo_id", repo_id)
    ppl = normalize_perplexity(perplexity)
    for name, value in (("checkpoint_bytes", checkpoint_bytes), ("dense_bytes", dense_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}={value!r} is invalid: accepted is a positive integer (bytes) or None.")
    if license is not None and (not isinstance(license, str) or not re.fullmatch(r"[\w.\-+]{1,64}", license)):
        raise ValueError(f"license={license!r} is invalid: accepted is a license id such as 'apache-2.0'.")
    extra_tags = list(tags)
    if not all(isinstance(t, str) and re.fullmatch(r"[\w.\-:+]{1,64}", t) for t in extra_tags):
        raise ValueError(f"tags={extra_tags!r} is invalid: accepted are short tags of letters, digits and -_.:+")

    bits = settings["bits"]
    tag_list = ["superweight", "optimum-superweight", f"{bits}-bit", "quantized"]
    tag_list += [t for t in extra_tags if t not in tag_list]
    block: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "super_weights": [sw.with_updates(source=None).to_dict() for sw in records],
        "quantization": settings,
    }
    if ppl is not None:
        block["perplexity"] = ppl
    if checkpoint_bytes is not None:
        block["checkpoint_bytes"] = checkpoint_bytes
    if dense_bytes is not None:
        block["dense_16bit_bytes"] = dense_bytes

    card_fields: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tag_list}
    if license is not None:
        card_fields["license"] = license
    if base_model is not None:
        card_fields["base_model"] = base_model
        card_fields["base_model_relation"] = "quantized"
    data = ModelCardData(**card_fields, **{CARD_KEY: block})

    body = _generated_body(records, settings, base_model=base_model, repo_id=repo_id, ppl=ppl,
                           checkpoint_bytes=checkpoint_bytes, dense_bytes=dense_bytes, tokenizer=bool(tokenizer))
    content = f"---\n{data.to_yaml()}\n---\n{body}"
    parse_card(content, "generated model card")  # the card we write must pass our own reader's checks
    return ModelCard(content)


def _generated_body(
    records: Sequence[SuperWeight],
    settings: Mapping[str, Any],
    *,
    base_model: str | None,
    repo_id: str | None,
    ppl: Mapping[str, Any] | None,
    checkpoint_bytes: int | None,
    dense_bytes: int | None,
    tokenizer: bool = True,
) -> str:
    bits = settings["bits"]
    group = settings["group_size"]
    title_name = (repo_id or base_model or "Model").split("/")[-1]
    lines = [GENERATED_BEGIN, f"# {title_name} ({bits}-bit, optimum-superweight)", ""]
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "This model"
    lines += [
        f"{base_link} quantized to {bits} bits with [optimum-superweight]({PACKAGE_URL}), which finds the model's "
        "super weights and keeps them exact while every other weight of the converted layers is stored in low bit.",
        "",
        "## Super weights",
        "",
        _SUPER_WEIGHTS_EXPLAINED,
        "",
    ]
    if records:
        lines += _coordinates_table(records)
        lines += [
            "",
            "`row` is the hidden (output) channel and `col` the intermediate (input) channel: the weight is "
            "`<module>.weight[row, col]` of the `[out_features, in_features]` matrix. The same list is in this "
            f"card's YAML metadata under `{CARD_KEY}.super_weights`; "
            f"`optimum_superweight.read_super_weights(\"{repo_id or 'REPO_ID'}\")` reads it back.",
        ]
    else:
        lines += ["No super weight was found in this model, so none is held out of quantization."]
    load_id = repo_id or "REPO_ID"
    lines += [
        "",
        "## How to load",
        "",
        "```bash",
        "pip install optimum-superweight",
        "```",
        "",
        "```python",
        "import optimum_superweight  # first: registers the \"superweight\" quantization method with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained(\"{load_id}\")",
        f"tokenizer = AutoTokenizer.from_pretrained(\"{load_id if tokenizer or not base_model else base_model}\")"
        + ("" if tokenizer or not base_model else "  # this repo ships no tokenizer: the base model's"),
        "```",
        "",
        "Without `import optimum_superweight`, transformers does not know the `superweight` method and cannot "
        "load the packed weights.",
        "",
        "## Quantization",
        "",
        "| setting | value |",
        "|---|---|",
        f"| bits | {bits} |",
        f"| group size | {'one group per output row' if group == -1 else group} |",
        f"| scheme | {'symmetric' if settings.get('symmetric', True) else 'asymmetric (zero-point per group)'} |",
        f"| scale dtype | {settings.get('scale_dtype')} |",
        *([f"| method | {settings['method']}{' + per-group clip search' if settings.get('clip_search') else ''} |"]
          if settings.get("method") else []),
        f"| modules kept in full precision | {_md_cell(', '.join(settings.get('modules_to_not_convert') or []) or 'output embedding (default)')} |",
        f"| super weights kept exact | {len(records)} |",
        f"| format version | {settings.get('format_version')} |",
    ]
    if ppl is not None:
        lines += ["", "## Perplexity", "", "| model | perplexity |", "|---|---|"]
        if "before" in ppl:
            lines.append(f"| original{f' ({base_model})' if base_model else ''} | {ppl['before']:.4g} |")
        ratio = f" (×{ppl['after'] / ppl['before']:.3f})" if "before" in ppl else ""
        lines.append(f"| this checkpoint | {ppl['after']:.4g}{ratio} |")
        detail = ", ".join(
            part for part in (
                ppl.get("text"),
                f"{ppl['tokens']} tokens" if "tokens" in ppl else None,
                f"windows of {ppl['window']}" if "window" in ppl else None,
            ) if part
        )
        if detail:
            lines += ["", f"Measured on {_md_cell(detail)}."]
    if checkpoint_bytes is not None or dense_bytes is not None:
        lines += ["", "## Size", "", "| | size |", "|---|---|"]
        if checkpoint_bytes is not None:
            lines.append(f"| this checkpoint (weight files) | {_human_bytes(checkpoint_bytes)} |")
        if dense_bytes is not None:
            lines.append(f"| same weights in 16-bit | {_human_bytes(dense_bytes)} |")
        if checkpoint_bytes is not None and dense_bytes is not None:
            lines.append(f"| ratio | {checkpoint_bytes / dense_bytes:.2f} |")
    lines += [
        "",
        f"Super weights: Yu, Wang, Shan, Reed, Wan, *The Super Weight in Large Language Models*, 2024, {PAPER_URL}.",
        GENERATED_END,
        "",
    ]
    return "\n".join(lines)


def build_index_card(
    model_id: str,
    super_weights: Sequence[SuperWeight],
    *,
    source: str,
    references: Sequence[str] = (),
    variants: Sequence[str] = (),
    notes: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> "ModelCard":
    """A card of the known-super-weights index (``model_cards/``): one full-precision model's coordinates.

    >>> sw = SuperWeight(module="model.layers.1.mlp.down_proj", row=2070, col=7310)
    >>> card = build_index_card("mistralai/Mistral-7B-v0.1", [sw], source="paper")
    >>> card.data.superweight["model"]
    'mistralai/Mistral-7B-v0.1'
    """
    from huggingface_hub import ModelCard, ModelCardData

    _check_repo_id("model_id", model_id)
    for variant in variants:
        _check_repo_id("variants[]", variant)
    if not super_weights:
        raise ValueError(f"build_index_card({model_id!r}): an index card needs at least one super weight.")
    block: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "model": model_id,
        "variants": list(variants),
        "source": source,
        "references": list(references),
        "super_weights": [sw.with_updates(source=None).to_dict() for sw in super_weights],
    }
    if extra:
        block.update(extra)
    data = ModelCardData(library_name="transformers", tags=["superweight", "super-weight-index"], **{CARD_KEY: block})
    lines = [
        f"# Super weights of {model_id}",
        "",
        _SUPER_WEIGHTS_EXPLAINED,
        "",
        *_coordinates_table(super_weights),
        "",
        "`row` is the hidden (output) channel and `col` the intermediate (input) channel.",
        "",
        f"**Source:** {source}",
    ]
    if references:
        lines += ["", "**References:** " + ", ".join(f"<{ref}>" for ref in references)]
    if variants:
        lines += ["", "**Shared by:** " + ", ".join(f"`{v}`" for v in variants) + " (same coordinates)."]
    if notes:
        lines += ["", notes.strip()]
    lines += [
        "",
        "Quantize with these coordinates instead of running detection:",
        "",
        "```python",
        "import optimum_superweight",
        "from transformers import AutoModelForCausalLM",
        "",
        f"config = optimum_superweight.SuperWeightConfig.from_known(\"{model_id}\", bits=4)",
        f"model = AutoModelForCausalLM.from_pretrained(\"{model_id}\", quantization_config=config)",
        "```",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)
    parse_card(content, "generated index card")
    return ModelCard(content)


# ---------------------------------------------------------------------------------------------------------------
# Merging a generated card into an existing one
# ---------------------------------------------------------------------------------------------------------------
def merge_cards(existing: "str | ModelCard | None", generated: "ModelCard") -> "ModelCard":
    """Put a generated card into an existing one: metadata merged (generated keys win, tags united), the
    generated section replacing the previous one, or replacing the whole text when the existing card is
    transformers' default template or has no content of its own. Human text outside the markers is kept.

    An existing card that cannot be parsed safely is replaced entirely (never half-merged).
    """
    from huggingface_hub import ModelCard

    if existing is None:
        return generated
    try:
        if isinstance(existing, ModelCard):
            old_meta = _bounded_copy(existing.data.to_dict(), "existing model card", [MAX_YAML_NODES])
            old_text = existing.text
        else:
            old_meta, old_text = parse_card(existing, "existing model card")
    except ValueError:
        return generated
    new_meta, new_text = parse_card(str(generated), "generated model card")

    merged_meta = dict(old_meta)
    old_tags = old_meta.get("tags") if isinstance(old_meta.get("tags"), list) else []
    merged_meta.update(new_meta)
    merged_meta["tags"] = list(dict.fromkeys([*new_meta.get("tags", []), *[t for t in old_tags if isinstance(t, str)]]))

    begin = old_text.find(_GENERATED_BEGIN_PREFIX)
    end = old_text.find(GENERATED_END)
    if begin != -1 and end > begin:
        text = old_text[:begin] + new_text.strip("\n") + old_text[end + len(GENERATED_END) :]
    elif _TRANSFORMERS_DEFAULT_CARD_MARK in old_text or not old_text.strip():
        text = new_text
    else:
        text = new_text.rstrip("\n") + "\n\n" + old_text.lstrip("\n")

    from huggingface_hub import ModelCardData

    try:
        data = ModelCardData(**merged_meta)
    except (ValueError, TypeError, KeyError):  # e.g. a malformed model-index in the old card: start over
        return generated
    content = f"---\n{data.to_yaml()}\n---\n{text}"
    parse_card(content, "merged model card")
    return ModelCard(content)
