"""Kept for imports written before the index moved: see :mod:`optimum_superweight.hub.index`."""

from .hub.index import KnownModel, card_filename, find_known_model, known_models, known_super_weights, model_cards_dir

__all__ = ["KnownModel", "known_super_weights", "known_models", "find_known_model", "model_cards_dir", "card_filename"]
