"""The index of known super weights: one card per model in ``model_cards/``, shipped with the package.

Each card (written by :func:`.building.build_index_card`) names a model, the variants that
share its coordinates (e.g. an instruct model fine-tuned from the base), where the coordinates come from,
and the coordinates themselves. Look a model up by its Hub id, case-insensitively:

    >>> [sw.paper_notation() for sw in known_super_weights("mistralai/mistral-7b-instruct-v0.1")]
    ['layers[1].mlp.down_proj.weight[2070, 7310]']
    >>> from optimum_superweight import SuperWeightConfig
    >>> SuperWeightConfig.from_known("huggyllama/llama-7b", bits=4).super_weights
    [{'module': 'model.layers.2.mlp.down_proj', 'row': 3968, 'col': 7003, 'layer': 2, 'source': 'index'}]

The cards live in the top-level ``model_cards/`` folder of the source tree; the package finds them as
``optimum_superweight/model_cards`` (installed as package data, a link in a source checkout), with the
source-tree folder as fallback.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .reading import CARD_KEY, card_metadata_block, parse_card, read_text_file, records_from_entries
from ..records import SuperWeight

__all__ = [
    "KnownModel",
    "known_super_weights",
    "known_models",
    "find_known_model",
    "model_cards_dir",
    "card_filename",
]


@dataclass(frozen=True)
class KnownModel:
    """One entry of the index.

    Attributes:
        model_id: Hub id of the model the coordinates were found in.
        variants: Hub ids of models that share the coordinates.
        source: Where the coordinates come from (paper, authors' code, measured).
        references: URLs backing ``source``.
        super_weights: The coordinates (``source="index"``).
        card: Path of the card.
    """

    model_id: str
    variants: tuple[str, ...]
    source: str
    references: tuple[str, ...]
    super_weights: tuple[SuperWeight, ...]
    card: Path

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.model_id, *self.variants)


def card_filename(model_id: str) -> str:
    """File name of a model's card: ``huggyllama/llama-7b`` -> ``huggyllama--llama-7b.md`` (the Hub cache's convention)."""
    return model_id.replace("/", "--") + ".md"


def model_cards_dir() -> Path:
    """The folder holding the index cards (installed package data, or the source tree's ``model_cards/``)."""
    try:
        packaged = importlib.resources.files("optimum_superweight").joinpath("model_cards")
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, NotADirectoryError):  # pragma: no cover - zip imports
        pass
    fallback = Path(__file__).resolve().parents[2] / "model_cards"  # optimum_superweight/hub/index.py -> the source tree
    if fallback.is_dir():
        return fallback
    raise FileNotFoundError(
        "The index of known super weights (model_cards/) is missing from this installation of optimum-superweight; "
        "reinstall it: pip install --force-reinstall optimum-superweight."
    )


def _string_list(value: Any, what: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what}: '{CARD_KEY}.{key}' must be a list of strings, got {value!r}.")
    return tuple(value)


def _load_card(path: Path) -> KnownModel:
    what = f"Index card {path}"
    metadata, _text = parse_card(read_text_file(path, what), what)
    block = card_metadata_block(metadata, what)
    if block is None or not isinstance(block.get("model"), str):
        raise ValueError(f"{what} has no '{CARD_KEY}' block with a 'model' id; index cards are written by build_index_card.")
    records = records_from_entries(block["super_weights"], what, f"{CARD_KEY}.super_weights", "index")
    if not records:
        raise ValueError(f"{what} lists no super weights.")
    return KnownModel(
        model_id=block["model"],
        variants=_string_list(block.get("variants"), what, "variants"),
        source=str(block.get("source") or "unknown"),
        references=_string_list(block.get("references"), what, "references"),
        super_weights=tuple(records),
        card=path,
    )


@functools.lru_cache(maxsize=1)
def _index() -> tuple[tuple[KnownModel, ...], dict[str, KnownModel]]:
    models = tuple(_load_card(path) for path in sorted(model_cards_dir().glob("*.md")))
    by_id: dict[str, KnownModel] = {}
    for model in models:
        for model_id in model.ids:
            key = model_id.lower()
            if key in by_id:
                raise ValueError(f"{model_id} is listed by two index cards: {by_id[key].card} and {model.card}.")
            by_id[key] = model
    return models, by_id


def known_models() -> list[KnownModel]:
    """Every model of the index, sorted by card name."""
    return list(_index()[0])


def _normalize(model_id: str) -> str:
    key = model_id.strip().rstrip("/")
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "hf.co/", "huggingface.co/"):
        if key.lower().startswith(prefix):
            key = key[len(prefix) :]
    return key.lower()


def find_known_model(model_id: str) -> KnownModel | None:
    """The index entry for ``model_id`` (a Hub id, any case; a bare name when unambiguous), or ``None``.

    >>> find_known_model("Llama-2-7b-chat-hf").model_id
    'meta-llama/Llama-2-7b-hf'
    """
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(f"model_id={model_id!r} is invalid: expected a Hub model id such as 'huggyllama/llama-7b'.")
    _, by_id = _index()
    key = _normalize(model_id)
    if key in by_id:
        return by_id[key]
    if "/" not in key:  # a bare name: match the part after the namespace, if only one model has it
        matches = {id(m): m for k, m in by_id.items() if k.split("/", 1)[-1] == key}
        if len(matches) == 1:
            return next(iter(matches.values()))
        if len(matches) > 1:
            names = ", ".join(sorted(m.model_id for m in matches.values()))
            raise ValueError(f"model_id={model_id!r} is ambiguous: it matches {names}; give the full Hub id.")
    return None


def known_super_weights(model_id: str) -> list[SuperWeight]:
    """The known super weights of a model (``source="index"``), by Hub id; instruct/chat variants that share
    the base model's coordinates resolve to them.

    Raises:
        ValueError: the model is not in the index (the message lists the models that are).

    >>> [(sw.layer, sw.row, sw.col) for sw in known_super_weights("HUGGYLLAMA/LLAMA-13B")]
    [(2, 2231, 2278), (2, 2231, 6939)]
    """
    entry = find_known_model(model_id)
    if entry is None:
        listed = ", ".join(i for m in known_models() for i in m.ids)
        raise ValueError(
            f"No known super weights for model_id={model_id!r}. The index has: {listed}. For another model let "
            "detection find them (SuperWeightConfig(bits=4)), or give super_weights=[...] or a card "
            "(SuperWeightConfig.from_model_card(...))."
        )
    return list(entry.super_weights)
