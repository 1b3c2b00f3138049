"""Reading super weights from model cards: safe YAML, the card's ``superweight`` block, coordinates in text.

The reading half of the card format (:mod:`.building` builds cards). It knows records and YAML only, not the
quantization config, so the config can read a card (:meth:`SuperWeightConfig.from_model_card`) and the shipped
index (:mod:`.index`) can parse its cards without an import cycle.

    >>> from huggingface_hub import ModelCard
    >>> card = ModelCard("The super weight is `layers[2].mlp.down_proj.weight[3968, 7003]`.")
    >>> [(sw.module, sw.row, sw.col) for sw in read_super_weights(card)]
    [('model.layers.2.mlp.down_proj', 3968, 7003)]

Untrusted input is checked before it is parsed: a size cap on the card and on its YAML block, YAML
anchors and aliases refused (they are how "billion laughs" bombs multiply), a cap on the number of YAML nodes
and on nesting, and a safe loader only (:class:`CardLoader`, stricter than ``yaml.safe_load``). A card is read
completely or not at all: a repeated key, a number not in plain decimal notation, or a coordinate that cannot
be read is an error naming its line, never a silently shorter or different list.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..records import SuperWeight, layer_index_from_module_name

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

__all__ = [
    "CardLoader",
    "CARD_KEY",
    "CARD_VERSION",
    "MAX_CARD_BYTES",
    "MAX_YAML_BYTES",
    "MAX_YAML_NODES",
    "MAX_SUPER_WEIGHTS",
    "GENERATED_BEGIN",
    "GENERATED_END",
    "read_super_weights",
    "super_weights_from_text",
    "load_card",
    "parse_card",
    "card_metadata_block",
    "read_text_file",
    "records_from_entries",
    "check_repo_id",
    "REPO_ID",
]

#: Top-level YAML key of the machine-readable block.
CARD_KEY = "superweight"
#: Version of the block's layout; a newer one is refused with an upgrade hint.
CARD_VERSION = 1
#: Largest card (README) accepted, in bytes. Real cards are a few kB; the Hub itself caps far lower than this.
MAX_CARD_BYTES = 1 << 20
#: Largest YAML metadata block accepted, in bytes.
MAX_YAML_BYTES = 256 << 10
#: Most YAML nodes (scalars, lists, mappings) accepted in the metadata block.
MAX_YAML_NODES = 50_000
#: Deepest nesting accepted in the metadata block.
MAX_YAML_DEPTH = 32
#: Most super weights one card may list (models have a handful; this only bounds hostile input).
MAX_SUPER_WEIGHTS = 4096
#: Largest row, column or layer index a card may give.
MAX_COORDINATE = 2**31 - 1

#: Markers around the generated part of a card text, so that a re-push replaces it and keeps the rest.
GENERATED_BEGIN = "<!-- optimum-superweight:begin (generated; edits inside are replaced on the next push) -->"
GENERATED_END = "<!-- optimum-superweight:end -->"
_GENERATED_BEGIN_PREFIX = "<!-- optimum-superweight:begin"

#: The text transformers writes when a repo has no README (``create_and_tag_model_card``).
_TRANSFORMERS_DEFAULT_CARD_MARK = "This is the model card of a 🤗 transformers model that has been pushed on the Hub."

PAPER_URL = "https://arxiv.org/abs/2411.07191"
PAPER_CODE_URL = "https://github.com/mengxiayu/LLMSuperWeight"
PACKAGE_URL = "https://pypi.org/project/optimum-superweight/"

# Same regex as huggingface_hub (and the Hub server) use to find the metadata block.
_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
# Anchor of a coordinate in the paper's notation; the module path in front of it is read backwards (bounded),
# which keeps the scan linear on hostile text (a forward regex over long dotted chains would be quadratic).
_COORD_ANCHOR = re.compile(r"\.weight[ \t]*\[")
# What the brackets after the anchor must hold: two plain decimal integers (the closing bracket is searched
# within _MAX_INDEX_CHARS characters, so the scan stays linear).
_COORD_INDEX = re.compile(r"[ \t]*(\d+)[ \t]*,[ \t]*(\d+)[ \t]*")
_MAX_INDEX_CHARS = 64
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.[]")
_MAX_PATH_CHARS = 256
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(?:\.(?:\d+|[A-Za-z_]\w*))*")
# Module roots that already name the model's base module; anything else is relative to ``model.`` like the paper's.
_MODULE_ROOTS = ("model.", "transformer.", "gpt_neox.", "base_model.")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(?:/[A-Za-z0-9][\w.\-]{0,95})?$")


def check_repo_id(value: Any, field: str = "repo_id") -> str:
    """``value`` if it is a Hub repo id (``'namespace/name'`` or ``'name'``), else a ValueError naming ``field``.

    >>> check_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    if not isinstance(value, str) or not REPO_ID.match(value) or ".." in value or "--" in value:
        raise ValueError(
            f"{field}={value!r} is invalid: accepted is a Hub repo id 'namespace/name' or 'name' (letters, digits, "
            "'-', '_', '.'; no '--' or '..'), such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
        )
    return value


# ---------------------------------------------------------------------------------------------------------------
# Safe parsing
# ---------------------------------------------------------------------------------------------------------------
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.1 (PyYAML) also reads 1:30 (sexagesimal, 90), 1_0 (10), 0x1F, 0o7, 017 (octal) and 1_000.5 as numbers:
# a coordinate written that way is a typo far more often than a wish. Only plain decimal notation is a number.
_PLAIN_INT = re.compile(r"^-?(?:0|[1-9][0-9]*)$")
_PLAIN_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class CardLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` made strict for model cards: a repeated mapping key is an error (safe_load keeps the
    last one silently), and numbers are only read in plain decimal notation (``1:30``, ``1_0``, ``0x1F`` stay
    strings, so a coordinate written that way is refused instead of becoming 90, 10 or 31).

    >>> yaml.load("row: 1:30", Loader=CardLoader)
    {'row': '1:30'}
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            first: dict[Any, int] = {}
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # unhashable: the base class reports it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first[key] + 1} of the block)", key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def _plain_number(self, node: yaml.Node, pattern: re.Pattern[str], kind: str) -> str:
        value = self.construct_scalar(node)
        if not pattern.match(value):
            raise yaml.constructor.ConstructorError(
                None, None, f"{kind} {value!r} is not in plain decimal notation", node.start_mark
            )
        return value

    def construct_plain_int(self, node: yaml.Node) -> int:
        return int(self._plain_number(node, _PLAIN_INT, "integer"))

    def construct_plain_float(self, node: yaml.Node) -> float:
        self._plain_number(node, _PLAIN_FLOAT, "number")
        return self.construct_yaml_float(node)  # .inf / .nan spelled the YAML way


CardLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
CardLoader.add_implicit_resolver(_INT_TAG, _PLAIN_INT, list("-0123456789"))
CardLoader.add_implicit_resolver(_FLOAT_TAG, _PLAIN_FLOAT, list("-+0123456789."))
CardLoader.add_constructor(_INT_TAG, CardLoader.construct_plain_int)
CardLoader.add_constructor(_FLOAT_TAG, CardLoader.construct_plain_float)


def _check_yaml_events(block: str, what: str, first_line: int = 0) -> None:
    """Refuse aliases, too many nodes and too deep nesting by scanning parser events (nothing is built)."""
    nodes = depth = 0
    for event in yaml.parse(block, Loader=CardLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError(
                f"{what}: line {first_line + event.start_mark.line + 1}: the YAML metadata uses an alias "
                f"(*{event.anchor}); aliases and anchors are not accepted in model cards (they are how YAML bombs "
                "multiply). Write the values out."
            )
        if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if event.anchor is not None:  # harmless alone, but only aliases use it: refused like them, by line
                raise ValueError(
                    f"{what}: line {first_line + event.start_mark.line + 1}: the YAML metadata defines an anchor "
                    f"(&{event.anchor}); aliases and anchors are not accepted in model cards. Write the values out."
                )
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise ValueError(
                    f"{what}: the YAML metadata has more than {MAX_YAML_NODES} nodes; accepted are metadata blocks "
                    f"of at most {MAX_YAML_NODES} nodes and {MAX_YAML_BYTES} bytes."
                )
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(
                    f"{what}: the YAML metadata nests deeper than {MAX_YAML_DEPTH} levels; accepted are blocks nested "
                    f"at most {MAX_YAML_DEPTH} levels deep."
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _safe_yaml_mapping(block: str, what: str, first_line: int = 0) -> dict[str, Any]:
    """The block parsed with :class:`CardLoader`; ``first_line``: lines of the card before the block (for messages)."""
    size = len(block.encode("utf-8"))
    if size > MAX_YAML_BYTES:
        raise ValueError(
            f"{what}: the YAML metadata block is {size} bytes; accepted are blocks of at most {MAX_YAML_BYTES} bytes."
        )
    try:
        _check_yaml_events(block, what, first_line)
        data = yaml.load(block, Loader=CardLoader)  # noqa: S506 - CardLoader is a SafeLoader
    except yaml.YAMLError as error:
        raise ValueError(
            f"{what}: the YAML metadata between the '---' lines is malformed ({_yaml_error_summary(error, first_line)}); "
            "accepted is a YAML mapping of plain scalars (numbers in decimal notation), lists and mappings, with no "
            "repeated keys and no tags."
        ) from None
    except ValueError as error:  # e.g. an integer literal longer than Python converts
        if str(error).startswith(what):
            raise
        raise ValueError(f"{what}: the YAML metadata holds a value that cannot be read ({error}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{what}: the YAML metadata is a {type(data).__name__}, not a mapping; accepted is a mapping of keys "
            "such as 'library_name', 'base_model' and 'superweight'."
        )
    return data


def _yaml_error_summary(error: yaml.YAMLError, first_line: int = 0) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    problem = re.sub(r"line (\d+) of the block", lambda m: f"line {int(m.group(1)) + first_line}", problem)
    return f"{problem} at line {first_line + mark.line + 1}, column {mark.column + 1}"


@dataclass(frozen=True)
class _SplitCard:
    """A card's metadata and text, with what is needed to name lines in error messages."""

    metadata: dict[str, Any]
    text: str
    block: str = ""
    block_line: int = 0  # lines of the card before the YAML block
    text_line: int = 0  # lines of the card before the text

    def line_of(self, path: Sequence[Any]) -> int | None:
        """The card line of the YAML node at ``path`` (keys and list indices), or None."""
        if not self.block:
            return None
        try:
            node = yaml.compose(self.block, Loader=CardLoader)
        except yaml.YAMLError:
            return None
        for step in path:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == step), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
                node = node.value[step]
            else:
                node = None
            if node is None:
                return None
        return self.block_line + node.start_mark.line + 1


def parse_card(content: str, what: str = "model card") -> tuple[dict[str, Any], str]:
    """Split a card into ``(metadata, text)`` with every safety check; raise ``ValueError`` naming the problem
    (and its line).

    >>> parse_card("---\\nlibrary_name: transformers\\n---\\n# Hello\\n")
    ({'library_name': 'transformers'}, '# Hello\\n')
    """
    card = _split_card(content, what)
    return card.metadata, card.text


def _split_card(content: str, what: str) -> _SplitCard:
    if not isinstance(content, str):
        raise ValueError(f"{what}: expected the card's text as a str, got {type(content).__name__}.")
    size = len(content.encode("utf-8"))
    if size > MAX_CARD_BYTES:
        raise ValueError(f"{what} is {size} bytes; accepted are cards of at most {MAX_CARD_BYTES} bytes.")
    match = _YAML_BLOCK.search(content)
    if match is None:
        if content.lstrip().startswith("---"):
            raise ValueError(
                f"{what}: the card starts a YAML metadata block with '---' but never closes it; accepted is a block "
                "between two '---' lines at the top of the card."
            )
        return _SplitCard({}, content)
    block_line = content[: match.start(2)].count("\n")
    metadata = _safe_yaml_mapping(match.group(2), what, block_line)
    return _SplitCard(metadata, content[match.end() :], match.group(2), block_line, content[: match.end()].count("\n"))


def read_text_file(path: Path, what: str) -> str:
    size = path.stat().st_size
    if size > MAX_CARD_BYTES:
        raise ValueError(f"{what} is {size} bytes; accepted are cards of at most {MAX_CARD_BYTES} bytes.")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{what}: line {line} is not UTF-8 text ({error}); accepted are UTF-8 Markdown files.") from None


def load_card(source: "str | os.PathLike[str] | ModelCard") -> "ModelCard":
    """A ``huggingface_hub.ModelCard`` from a README path or card text, parsed with the safety checks of this module.

    >>> card = load_card("---\\nlicense: mit\\n---\\nhi")
    >>> card.data.license
    'mit'
    """
    from huggingface_hub import ModelCard

    if isinstance(source, ModelCard):
        return source
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and Path(source).is_file()):
        path = Path(source)
        content = read_text_file(path, f"Model card {path}")
    elif isinstance(source, str):
        content = source
    else:
        raise ValueError(f"load_card expects a README path, card text or a ModelCard, got {type(source).__name__}.")
    parse_card(content, "model card")  # all checks before huggingface_hub parses it again
    return ModelCard(content)


def _bounded_copy(value: Any, what: str, budget: list[int], depth: int = 0) -> Any:
    """A plain copy of already-parsed metadata, refusing shared or oversized structures (an alias bomb's shape)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(
            f"{what}: the card metadata has more than {MAX_YAML_NODES} nodes (or repeats structures the way a YAML "
            f"bomb does); accepted are metadata blocks of at most {MAX_YAML_NODES} nodes."
        )
    if depth > MAX_YAML_DEPTH:
        raise ValueError(f"{what}: the card metadata nests deeper than {MAX_YAML_DEPTH} levels.")
    if isinstance(value, Mapping):
        return {k: _bounded_copy(v, what, budget, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_bounded_copy(v, what, budget, depth + 1) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# Reading super weights
# ---------------------------------------------------------------------------------------------------------------
def card_metadata_block(metadata: Mapping[str, Any], what: str = "model card") -> dict[str, Any] | None:
    """The ``superweight`` block of card metadata, validated; ``None`` when the card has none.

    Also accepts a bare top-level ``super_weights:`` list (hand-written cards) as ``{"super_weights": [...]}``.
    """
    if CARD_KEY in metadata:
        block = metadata[CARD_KEY]
        if not isinstance(block, Mapping):
            raise ValueError(
                f"{what}: metadata key '{CARD_KEY}' is a {type(block).__name__}; accepted is a mapping with a "
                "'super_weights' list (entries with 'module', 'row', 'col' and optionally 'value', 'layer', "
                "'classification', 'impact')."
            )
        block = dict(block)
        version = block.get("card_version", CARD_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{what}: {CARD_KEY}.card_version={version!r} is invalid; accepted is an integer >= 1.")
        if version > CARD_VERSION:
            raise ValueError(
                f"{what}: {CARD_KEY}.card_version={version} is newer than this optimum-superweight understands "
                f"({CARD_VERSION}). Upgrade: pip install -U optimum-superweight."
            )
        if "super_weights" not in block:
            raise ValueError(
                f"{what}: metadata key '{CARD_KEY}' has no 'super_weights' list; accepted is "
                f"'{CARD_KEY}: {{super_weights: [{{module: ..., row: ..., col: ...}}, ...]}}'."
            )
        return block
    if "super_weights" in metadata:
        return {"super_weights": metadata["super_weights"]}
    return None


def records_from_entries(
    entries: Any, what: str, where: str, source_label: str, line_of: Callable[[int | None], int | None] | None = None
) -> list[SuperWeight]:
    """Every entry as a record, or a ValueError naming the entry (and its card line, via ``line_of(index)``)."""

    def at(index: int | None) -> str:
        line = line_of(index) if line_of is not None else None
        return f"{what}: line {line}:" if line is not None else f"{what}:"

    if not isinstance(entries, (list, tuple)):
        raise ValueError(
            f"{at(None)} '{where}' is a {type(entries).__name__}; accepted is a list of mappings with 'module', 'row', "
            "'col' (and optionally 'value', 'layer', 'classification', 'impact')."
        )
    if len(entries) > MAX_SUPER_WEIGHTS:
        raise ValueError(f"{at(None)} '{where}' lists {len(entries)} entries; at most {MAX_SUPER_WEIGHTS} are accepted.")
    records: list[SuperWeight] = []
    seen: set[tuple[str, int, int]] = set()
    for index, entry in enumerate(entries):
        try:
            record = SuperWeight.from_dict(dict(entry) if isinstance(entry, Mapping) else entry)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{at(index)} '{where}[{index}]' is invalid: {error} Coordinates are plain decimal integers "
                "(row: 3968, not 3_968, 0xF80 or 1:30)."
            ) from None
        if max(record.row, record.col, record.layer or 0) > MAX_COORDINATE:
            raise ValueError(
                f"{at(index)} '{where}[{index}]' has a coordinate above {MAX_COORDINATE} ({record.paper_notation()}); "
                "no weight matrix is that large."
            )
        key = (record.module, record.row, record.col)
        if key in seen:
            raise ValueError(f"{at(index)} '{where}[{index}]' repeats {record.paper_notation()}; entries must be distinct.")
        seen.add(key)
        records.append(record.with_updates(source=source_label))
    return records


def _module_from_notation(path: str) -> str | None:
    path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
    if not _MODULE_PATH.fullmatch(path):
        return None
    if layer_index_from_module_name(path) is None:
        return None  # not a decoder-layer weight: prose like `embed.weight[0, 1]` is not a super weight
    if not path.startswith(_MODULE_ROOTS):
        path = "model." + path  # the paper drops the base-model prefix: layers[2] is model.layers.2
    return path


def super_weights_from_text(
    text: str, source_label: str = "card", *, what: str = "card text", first_line: int = 0
) -> list[SuperWeight]:
    """Coordinates written in the paper's notation anywhere in ``text`` (first occurrence of each wins).

    ``layers[2].mlp.down_proj.weight[3968, 7003]`` and ``model.layers.2.mlp.down_proj.weight[3968, 7003]`` both
    give module ``model.layers.2.mlp.down_proj``, row 3968, col 7003 (row = hidden/output channel). A path
    without a ``model.``/``transformer.`` root is taken relative to ``model.``, as in the paper; the path must
    name a decoder layer (prose such as ``lm_head.weight[1, 2]`` is not a super weight). A decoder-layer weight
    whose brackets do not hold two plain decimal integers (``weight[3968, abc]``, ``weight[1:30, 5]``,
    ``weight[3968]``) is an error naming its line (``first_line``: lines of the card before ``text``): a card is
    read completely or not at all.

    >>> [sw.paper_notation() for sw in super_weights_from_text("W = layers[1].mlp.down_proj.weight[2070, 7310]")]
    ['layers[1].mlp.down_proj.weight[2070, 7310]']
    """
    records: list[SuperWeight] = []
    seen: set[tuple[str, int, int]] = set()
    line, counted = first_line + 1, 0
    for match in _COORD_ANCHOR.finditer(text):
        start = match.start()
        begin = start
        while begin > 0 and start - begin < _MAX_PATH_CHARS and text[begin - 1] in _PATH_CHARS:
            begin -= 1
        module = _module_from_notation(text[begin:start])
        if module is None:
            continue
        line, counted = line + text.count("\n", counted, start), start
        close = text.find("]", match.end(), match.end() + _MAX_INDEX_CHARS)
        inside = text[match.end() : close] if close != -1 else None
        coordinates = _COORD_INDEX.fullmatch(inside) if inside is not None and "\n" not in inside else None
        if coordinates is None or max(len(coordinates.group(1)), len(coordinates.group(2))) > 10 or max(
            int(coordinates.group(1)), int(coordinates.group(2))
        ) > MAX_COORDINATE:
            shown = text[begin : (close + 1 if close != -1 else match.end() + 16)].splitlines()[0][:120]
            raise ValueError(
                f"{what}: line {line}: `{shown}` is not a coordinate the reader understands; accepted is "
                "layers[L].mlp.down_proj.weight[ROW, COL] with ROW and COL plain decimal integers "
                f"(at most {MAX_COORDINATE}). Fix or remove it: a card is read completely or not at all."
            )
        row, col = int(coordinates.group(1)), int(coordinates.group(2))
        key = (module, row, col)
        if key in seen:
            continue
        seen.add(key)
        records.append(SuperWeight(module=module, row=row, col=col, source=source_label))
        if len(records) > MAX_SUPER_WEIGHTS:
            raise ValueError(f"{what} holds more than {MAX_SUPER_WEIGHTS} coordinates; that many are not accepted.")
    return records


def _records_from_card(
    metadata: Mapping[str, Any], text: str, what: str, source_label: str, card: _SplitCard | None = None
) -> list[SuperWeight] | None:
    try:
        block = card_metadata_block(metadata, what)
    except ValueError as error:
        line = card.line_of((CARD_KEY,)) if card is not None else None
        if line is None:
            raise
        raise ValueError(str(error).replace(f"{what}:", f"{what}: line {line}:", 1)) from None
    if block is not None:
        path: tuple[str, ...] = (CARD_KEY, "super_weights") if CARD_KEY in metadata else ("super_weights",)
        line_of = None
        if card is not None:
            line_of = lambda index: card.line_of(path if index is None else (*path, index))  # noqa: E731
        return records_from_entries(block["super_weights"], what, ".".join(path), source_label, line_of)
    found = super_weights_from_text(text, source_label, what=what, first_line=card.text_line if card else 0)
    return found or None


def _records_from_config_json(path: Path, what: str) -> list[SuperWeight] | None:
    size = path.stat().st_size
    if size > MAX_CARD_BYTES * 16:
        raise ValueError(f"{what} is {size} bytes; accepted are config files of at most {MAX_CARD_BYTES * 16} bytes.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} is not valid JSON ({error}).") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "superweight":
        return None
    return records_from_entries(
        quantization.get("super_weights", []), what, "quantization_config.super_weights", "card"
    )


def _no_super_weights(what: str) -> ValueError:
    return ValueError(
        f"{what}: no super weights found. Accepted are a card whose YAML metadata has "
        f"'{CARD_KEY}: {{super_weights: [{{module, row, col, value}}, ...]}}' (as written by "
        "optimum_superweight.build_model_card), or a card whose text gives coordinates in the paper's notation, "
        "e.g. `layers[2].mlp.down_proj.weight[3968, 7003]`, or a folder whose config.json was written by an "
        "optimum-superweight quantized model."
    )


def _built_from(content: str, metadata: Mapping[str, Any], text: str, what: str) -> bool:
    """Whether a ModelCard's metadata and text are still what ``yaml.safe_load`` made of ``content``."""
    match = _YAML_BLOCK.search(content)
    if match is None:
        return not metadata and text == content
    if len(match.group(2).encode("utf-8")) > MAX_YAML_BYTES:
        return True  # the strict reader refuses it, naming the size
    _check_yaml_events(match.group(2), what, content[: match.start(2)].count("\n"))  # bounds before building
    try:
        lenient = yaml.safe_load(match.group(2)) or {}
    except (yaml.YAMLError, ValueError):
        return True  # the strict reader reports it
    return lenient == metadata and content[match.end() :] == text


def _read_folder(folder: Path) -> list[SuperWeight]:
    readme = folder / "README.md"
    config = folder / "config.json"
    metadata: dict[str, Any] = {}
    text = ""
    card = None
    if readme.is_file():
        what = f"Model card {readme}"
        card = _split_card(read_text_file(readme, what), what)
        metadata, text = card.metadata, card.text
        if CARD_KEY in metadata or "super_weights" in metadata:
            return _records_from_card(metadata, text, what, "card", card) or []
    if config.is_file():
        records = _records_from_config_json(config, f"{config}")
        if records is not None:
            return records
    if text and card is not None:
        records = super_weights_from_text(text, what=f"Model card {readme}", first_line=card.text_line)
        if records:
            return records
    if not readme.is_file() and not config.is_file():
        raise ValueError(f"Folder {folder} has neither README.md nor config.json: it is not a model folder.")
    raise _no_super_weights(f"Model folder {folder}")


def _read_hub(repo_id: str, revision: str | None, token: str | bool | None) -> list[SuperWeight]:
    from ..errors import reraise_hub_errors

    with reraise_hub_errors(repo_id, "reading the model card of"):
        return _read_hub_files(repo_id, revision, token)


def _read_hub_files(repo_id: str, revision: str | None, token: str | bool | None) -> list[SuperWeight]:
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.file_download import get_hf_file_metadata

    what = f"Hub repo {repo_id}"

    def fetch(filename: str, cap: int) -> Path | None:
        if constants.HF_HUB_OFFLINE:  # the cache only (sizes are checked again when the files are read)
            try:
                return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
            except EntryNotFoundError:  # LocalEntryNotFoundError included: not cached
                return None
        try:
            # HF_HUB_ETAG_TIMEOUT bounds the wait on an unresponsive Hub, as it does for hf_hub_download.
            metadata = get_hf_file_metadata(
                hf_hub_url(repo_id, filename, revision=revision), token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):  # offline / unreachable, not a missing file
                raise
            return None
        if metadata.size is not None and metadata.size > cap:
            raise ValueError(f"{what}: {filename} is {metadata.size} bytes; accepted are files of at most {cap} bytes.")
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token))

    readme = fetch("README.md", MAX_CARD_BYTES)
    metadata: dict[str, Any] = {}
    text = ""
    card_what = f"Model card of {repo_id}"
    card = None
    if readme is not None:
        card = _split_card(read_text_file(readme, card_what), card_what)
        metadata, text = card.metadata, card.text
        if CARD_KEY in metadata or "super_weights" in metadata:
            return _records_from_card(metadata, text, card_what, "card", card) or []
    config = fetch("config.json", MAX_CARD_BYTES * 16)
    if readme is None and config is None and constants.HF_HUB_OFFLINE:
        from ..errors import SuperWeightHubError

        raise SuperWeightHubError(
            f"Cannot read the model card of {repo_id}: offline mode is on (HF_HUB_OFFLINE=1) and neither its README.md "
            "nor its config.json is in the cache. Unset HF_HUB_OFFLINE, or pass a local folder or README path.",
            repo_id=repo_id, cause="offline",
        )
    if readme is None and config is None:
        raise ValueError(
            f"{what} has neither README.md nor config.json, so it records no super weights: expected the repo of a "
            "model quantized with optimum-superweight, or of a card that lists coordinates."
        )
    if config is not None:
        records = _records_from_config_json(config, f"config.json of {repo_id}")
        if records is not None:
            return records
    records = super_weights_from_text(text, what=card_what, first_line=card.text_line) if card and text else []
    if records:
        return records
    raise _no_super_weights(what + (" (it has no README.md)" if readme is None else ""))


def read_super_weights(
    source: "str | os.PathLike[str] | ModelCard",
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> list[SuperWeight]:
    """The super weights recorded in a model card, as :class:`SuperWeight` records with ``source="card"``.

    Args:
        source: A Hub repo id (``"user/model"``: its README.md, then its config.json), a local model folder
            (README.md, then config.json), a README path, or a ``huggingface_hub.ModelCard``.
        revision: Hub revision, for a repo id.
        token: Hub token, for a repo id.

    The YAML block written by :func:`build_model_card` wins; without it, a quantized checkpoint's
    ``config.json``; without either, coordinates in the paper's notation in the card text.

    Raises:
        ValueError: malformed or unsafe YAML (aliases, too large, too deep), a card over
            :data:`MAX_CARD_BYTES`, invalid entries, or no super weights anywhere in the card.
        SuperWeightHubError: for a repo id, the Hub could not be reached or failed (offline, network, HTTP
            5xx); :class:`~optimum_superweight.errors.SuperWeightRepoNotFoundError` (also a ``ValueError``)
            when the repo or revision does not exist. The message names the repo, the cause and what to do.

    >>> from optimum_superweight.hub.index import model_cards_dir
    >>> read_super_weights(model_cards_dir() / "huggyllama--llama-7b.md")[0].paper_notation()
    'layers[2].mlp.down_proj.weight[3968, 7003]'
    """
    from huggingface_hub import RepoCard

    if isinstance(source, RepoCard):
        what = "ModelCard"
        text = source.text if isinstance(source.text, str) else ""
        if len(text.encode("utf-8")) > MAX_CARD_BYTES:
            raise ValueError(f"{what} text is over {MAX_CARD_BYTES} bytes; accepted are cards of at most that size.")
        # huggingface_hub parsed the card with yaml.safe_load (repeated keys kept silently, 1:30 read as 90):
        # the text it was built from, when it still has it, must pass this module's reader too.
        original = getattr(source, "_content", None)
        metadata = _bounded_copy(source.data.to_dict(), what, [MAX_YAML_NODES])
        split = None
        if isinstance(original, str) and _built_from(original, metadata, text, what):
            split = _split_card(original, what)  # errors name the line; a card edited since is read as it is now
            metadata = split.metadata
        records = _records_from_card(metadata, text, what, "card", split)
        if records is None:
            raise _no_super_weights(what)
        return records
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"read_super_weights: source={source!r} is invalid; accepted are a Hub repo id, a local model folder, a "
            "README path or a huggingface_hub.ModelCard."
        )
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        what = f"Model card {path}"
        card = _split_card(read_text_file(path, what), what)
        records = _records_from_card(card.metadata, card.text, what, "card", card)
        if records is None:
            raise _no_super_weights(what)
        return records
    if isinstance(source, str) and REPO_ID.match(source) and not source.endswith((".md", ".json")):
        return _read_hub(source, revision, token)
    raise ValueError(
        f"read_super_weights: {str(source)!r} is not an existing file or folder, nor a Hub repo id ('user/model'); "
        "accepted are a Hub repo id, a local model folder, a README path or a huggingface_hub.ModelCard."
    )
