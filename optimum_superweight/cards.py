"""Kept for imports written before the cards moved into :mod:`optimum_superweight.hub`: building is
:mod:`optimum_superweight.hub.building`, reading :mod:`optimum_superweight.hub.reading`. New code imports from there
(or from ``optimum_superweight.hub``)."""

from .hub.building import build_index_card, build_model_card, merge_cards, normalize_perplexity
from .hub.reading import (
    CARD_KEY,
    CARD_VERSION,
    GENERATED_BEGIN,
    GENERATED_END,
    MAX_CARD_BYTES,
    MAX_COORDINATE,
    MAX_SUPER_WEIGHTS,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    PACKAGE_URL,
    PAPER_CODE_URL,
    PAPER_URL,
    CardLoader,
    card_metadata_block,
    load_card,
    parse_card,
    read_super_weights,
    super_weights_from_text,
)

__all__ = [
    "CardLoader",
    "CARD_KEY",
    "CARD_VERSION",
    "MAX_CARD_BYTES",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "MAX_YAML_DEPTH",
    "MAX_SUPER_WEIGHTS",
    "MAX_COORDINATE",
    "GENERATED_BEGIN",
    "GENERATED_END",
    "PACKAGE_URL",
    "PAPER_URL",
    "PAPER_CODE_URL",
    "build_model_card",
    "build_index_card",
    "read_super_weights",
    "super_weights_from_text",
    "load_card",
    "parse_card",
    "merge_cards",
    "card_metadata_block",
    "normalize_perplexity",
]
