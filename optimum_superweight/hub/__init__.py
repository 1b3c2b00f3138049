"""Model cards and the Hugging Face Hub: the cards that carry super weights, and where they go.

- :mod:`.reading`: safe card YAML (size, node and depth caps, no anchors, strict numbers) and reading super
  weights back from a card, a model folder or a Hub repo (:func:`read_super_weights`);
- :mod:`.building`: building a quantized checkpoint's card and the index cards, merging into an existing card;
- :mod:`.push`: pushing checkpoint and card in one commit, and the hook behind ``model.push_to_hub``;
- :mod:`.index`: the shipped index of known super weights (``model_cards/``).

Reading knows records and YAML, not the config; the config reads cards and the index through it, and
building (which needs the config) is imported after them.
"""

# Order matters at import time: config imports .reading and .index; .building imports the config.
from .reading import (
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
    check_repo_id,
    load_card,
    parse_card,
    read_super_weights,
    read_text_file,
    records_from_entries,
    super_weights_from_text,
)
from .index import KnownModel, card_filename, find_known_model, known_models, known_super_weights, model_cards_dir
from .building import build_index_card, build_model_card, merge_cards, normalize_perplexity
from .push import (
    DEFAULT_COMMIT_MESSAGE,
    attach_card_hook,
    card_for_folder,
    card_for_model,
    push_folder_to_hub,
    push_to_hub,
)

__all__ = [
    "read_super_weights",
    "super_weights_from_text",
    "load_card",
    "parse_card",
    "card_metadata_block",
    "build_model_card",
    "build_index_card",
    "merge_cards",
    "normalize_perplexity",
    "push_to_hub",
    "push_folder_to_hub",
    "attach_card_hook",
    "card_for_folder",
    "card_for_model",
    "DEFAULT_COMMIT_MESSAGE",
    "KnownModel",
    "known_super_weights",
    "known_models",
    "find_known_model",
    "model_cards_dir",
    "card_filename",
    "CardLoader",
    "CARD_KEY",
    "CARD_VERSION",
    "MAX_CARD_BYTES",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "MAX_SUPER_WEIGHTS",
    "GENERATED_BEGIN",
    "GENERATED_END",
]
