"""Push compressed checkpoints to the Hugging Face Hub with a model card that carries the super weights.

Two ways, one commit each, and everything validated before the first byte is uploaded:

    >>> import optimum_superweight
    >>> optimum_superweight.push_to_hub(model, "user/SmolLM2-135M-Instruct-sw4",
    ...                                 perplexity={"before": ppl_full, "after": ppl_quantized})  # doctest: +SKIP
    >>> model.push_to_hub("user/SmolLM2-135M-Instruct-sw4")  # doctest: +SKIP

The second works because the quantizer calls :func:`attach_card_hook` on every model it loads: transformers'
own ``push_to_hub`` (and ``save_pretrained(push_to_hub=True)``) writes the repo's existing README, or its
default template, and then uploads the folder through ``model._upload_modified_files``; the hook replaces
that README with the generated card (merged into an existing card's own text) just before the upload.

:func:`push_folder_to_hub` pushes a folder written by ``save_pretrained`` without loading the model (the
``optimum-superweight push`` command).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UPLOAD_REMEDY, SuperWeightHubError, reraise_hub_errors
from ..format import SCALE, SUPER_WEIGHT_INDICES, WEIGHT, read_safetensors_index
from ..records import SuperWeight
from .building import _resolve_quantization, build_model_card, merge_cards, normalize_perplexity
from .reading import MAX_CARD_BYTES, REPO_ID, check_repo_id, parse_card, read_super_weights, read_text_file

__all__ = [
    "push_to_hub",
    "push_folder_to_hub",
    "attach_card_hook",
    "card_for_folder",
    "card_for_model",
    "DEFAULT_COMMIT_MESSAGE",
]

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload superweight-quantized model"
_HOOK_MARK = "_optimum_superweight_card_hook"
_CARD_KWARGS_ATTR = "_optimum_superweight_card_kwargs"
# Files and folders of a save_pretrained folder that never belong on the Hub.
_SKIP_NAMES = {".git", ".cache", "__pycache__", ".DS_Store", ".ipynb_checkpoints"}


def _check_commit_message(message: Any) -> str:
    if not isinstance(message, str) or not message.strip():
        raise ValueError(f"commit_message={message!r} is invalid: accepted is a non-empty string.")
    return message


# ---------------------------------------------------------------------------------------------------------------
# What goes into the card
# ---------------------------------------------------------------------------------------------------------------
def _base_model_from_readme(readme: Path) -> str | None:
    try:
        metadata, _ = parse_card(read_text_file(readme, f"Model card {readme}"), f"Model card {readme}")
    except (OSError, ValueError):
        return None
    value = metadata.get("base_model")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) and REPO_ID.match(value) else None


def _infer_base_model(name_or_path: str | None) -> str | None:
    """The Hub id of the full-precision model a quantized model came from, when it can be told for sure enough.

    A Hub id is taken as is; a local folder contributes its README's ``base_model`` (a superweight checkpoint
    being re-pushed), else a model of the index whose name is the folder's name (e.g. the embedded default
    model's ``.../SmolLM2-135M-Instruct``).
    """
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.is_dir():
        readme = path / "README.md"
        if readme.is_file():
            base = _base_model_from_readme(readme)
            if base:
                return base
        from .index import find_known_model

        try:
            entry = find_known_model(path.name)
        except ValueError:
            entry = None
        if entry is not None:
            matches = [i for i in entry.ids if i.split("/")[-1].lower() == path.name.lower()]
            return matches[0] if matches else None
        return None
    if REPO_ID.match(name_or_path) and "/" in name_or_path:
        return name_or_path
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _checkpoint_bytes(folder: Path) -> int | None:
    total = sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file())
    return total or None


def _dense_16bit_bytes(model: Any) -> int | None:
    """Size of the model's weights in a 16-bit dtype: quantized layers counted as their dense matrices."""
    try:
        from ..nn.layers import is_quantized_layer
    except ImportError:  # pragma: no cover
        return None
    counted: set[int] = set()
    total = 0
    for module in model.modules():
        own = {id(p) for p in module.parameters(recurse=False)}
        if is_quantized_layer(module) and not own <= counted:  # a tied packed head (embedding_bits=8) counts once
            total += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
            counted.update(own)
    for parameter in model.parameters():
        if id(parameter) not in counted:
            counted.add(id(parameter))
            total += parameter.numel()
    return 2 * total if total else None


def _read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: expected a folder written by save_pretrained.")
    if path.stat().st_size > 16 * MAX_CARD_BYTES:
        raise ValueError(f"{path} is over {16 * MAX_CARD_BYTES} bytes: not a model config.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "superweight":
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(
            f"{folder} is not an optimum-superweight checkpoint (config.json quantization_config.quant_method="
            f"{method!r}, expected 'superweight'). Quantize first: from_pretrained(path, "
            "quantization_config=SuperWeightConfig(bits=4)), then save_pretrained."
        )
    return config


def _check_weights_hold(folder: Path, records: list[SuperWeight]) -> None:
    """Every super weight of config.json is stored in the checkpoint at its coordinates (headers + tiny tensors)."""
    files = sorted(p for p in folder.rglob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no *.safetensors weights: expected a folder written by save_pretrained.")
    index = read_safetensors_index(files)
    by_module: dict[str, list[SuperWeight]] = {}
    for sw in records:
        by_module.setdefault(sw.module, []).append(sw)
    for module, expected in by_module.items():
        if f"{module}.{WEIGHT}" not in index:
            raise ValueError(
                f"config.json lists super weights of module '{module}', but the checkpoint in {folder} has no "
                f"tensor '{module}.{WEIGHT}': the folder's config and weights disagree."
            )
        indices_key = f"{module}.{SUPER_WEIGHT_INDICES}"
        if f"{module}.{SCALE}" not in index:
            continue  # a module kept in full precision stores its super weights in the dense weight itself
        if indices_key not in index:
            raise ValueError(
                f"config.json lists {len(expected)} super weight(s) of '{module}', but the checkpoint stores none "
                f"for it ({indices_key} is missing): the folder's config and weights disagree."
            )
        from safetensors import safe_open

        with safe_open(index[indices_key].file, framework="pt") as handle:
            stored = {tuple(int(v) for v in pair) for pair in handle.get_tensor(indices_key).reshape(-1, 2).tolist()}
        for sw in expected:
            if (sw.row, sw.col) not in stored:
                raise ValueError(
                    f"config.json lists super weight {sw.paper_notation()} of '{module}', but the checkpoint stores "
                    f"its super weights at {sorted(stored)}: the folder's config and weights disagree."
                )


def _check_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any], list[SuperWeight]]:
    """A save_pretrained folder of a superweight checkpoint whose config and weights agree, or a ValueError."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: expected a folder written by save_pretrained.")
    config = _read_config_json(folder)
    quantization = config["quantization_config"]
    _settings, records = _resolve_quantization(quantization)
    _check_weights_hold(folder, records)
    return config, quantization, records


def card_for_folder(
    folder: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    perplexity: Mapping[str, Any] | tuple[float, float] | None = None,
    dense_bytes: int | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    existing_card: str | None = None,
):
    """The card for a quantized checkpoint folder (``save_pretrained`` output), merged into the folder's own
    README.md (or ``existing_card``) when it has one. Validates the folder first.

    >>> print(card_for_folder("out/smollm2-sw4", base_model="HuggingFaceTB/SmolLM2-135M-Instruct"))  # doctest: +SKIP
    """
    folder = Path(folder)
    config, quantization, records = _check_folder(folder)
    readme = folder / "README.md"
    if existing_card is None and readme.is_file():
        existing_card = read_text_file(readme, f"Model card {readme}")
    if base_model is None and readme.is_file():
        base_model = _base_model_from_readme(readme)
    if base_model is None:
        base_model = _infer_base_model(config.get("_name_or_path"))
    card = build_model_card(
        quantization,
        base_model=base_model,
        repo_id=repo_id,
        perplexity=perplexity,
        checkpoint_bytes=_checkpoint_bytes(folder),
        dense_bytes=dense_bytes,
        license=license,
        tags=tags,
        tokenizer=_has_tokenizer(folder),
    )
    merged = merge_cards(existing_card, card)
    _check_card_round_trip(merged, records)
    return merged


def card_for_model(model: Any, *, repo_id: str | None = None, folder: str | os.PathLike[str] | None = None, **kwargs: Any):
    """The card for a quantized model (sizes from ``folder`` when it was just saved there).

    ``kwargs``: ``base_model``, ``perplexity``, ``license``, ``tags`` as in :func:`build_model_card`. A missing
    ``base_model`` is inferred from ``model.config.name_or_path`` (see :func:`attach_card_hook`).
    """
    kwargs = {**getattr(model, _CARD_KWARGS_ATTR, {}), **{k: v for k, v in kwargs.items() if v is not None}}
    if kwargs.get("base_model") is None:
        kwargs["base_model"] = _infer_base_model(getattr(model.config, "name_or_path", None) or getattr(model, "name_or_path", None))
    kwargs.setdefault("dense_bytes", _dense_16bit_bytes(model))
    checkpoint_bytes = _checkpoint_bytes(Path(folder)) if folder is not None else None
    tokenizer = _has_tokenizer(Path(folder)) if folder is not None else False
    card = build_model_card(model, repo_id=repo_id, checkpoint_bytes=checkpoint_bytes, tokenizer=tokenizer, **kwargs)
    return card


def _check_card_round_trip(card: Any, records: list[SuperWeight]) -> None:
    """The card we upload must give back exactly the checkpoint's super weights."""
    read = read_super_weights(card)
    key = lambda sw: (sw.module, sw.row, sw.col, sw.value)  # noqa: E731
    if sorted(map(key, read), key=str) != sorted(map(key, records), key=str):
        raise ValueError(
            "The model card does not carry the checkpoint's super weights (the existing README.md conflicts with the "
            f"generated block): card {[sw.paper_notation() for sw in read]}, checkpoint "
            f"{[sw.paper_notation() for sw in records]}."
        )


# ---------------------------------------------------------------------------------------------------------------
# Uploading
# ---------------------------------------------------------------------------------------------------------------
def _remote_readme(api: Any, repo_id: str, revision: str | None, token: Any) -> str | None:
    """The repo's current README.md, or None when the repo or the file does not exist (or is unreadable)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from huggingface_hub.errors import LocalEntryNotFoundError


    try:
        with reraise_hub_errors(repo_id, "reading the existing README.md of", UPLOAD_REMEDY):
            try:
                path = hf_hub_download(repo_id, "README.md", revision=revision, token=token, endpoint=api.endpoint)
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
                if isinstance(error, LocalEntryNotFoundError):  # unreachable, not a missing file: fail before pushing
                    raise
                return None
    except SuperWeightHubError as error:
        if error.cause.startswith("http") and not error.cause.startswith("http 5"):
            # e.g. 401/403 on a README we may not read: the push itself decides whether we may write.
            logger.warning("Could not read the README.md of %s (%s); it will be replaced by the generated card.", repo_id, error)
            return None
        raise
    try:
        return read_text_file(Path(path), f"README.md of {repo_id}")
    except ValueError as error:
        logger.warning("%s; it will be replaced by the generated card.", error)
        return None


def _folder_operations(folder: Path, card_text: str) -> list[Any]:
    from huggingface_hub import CommitOperationAdd

    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part in _SKIP_NAMES for part in relative.parts) or not path.is_file() or path.is_symlink():
            continue
        name = relative.as_posix()
        if name == "README.md":
            continue
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
    return operations


def push_folder_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    base_model: str | None = None,
    perplexity: Mapping[str, Any] | tuple[float, float] | None = None,
    dense_bytes: int | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
):
    """Upload a quantized checkpoint folder and its generated card (README.md) to ``repo_id`` in one commit.

    Everything is checked before anything is written: the repo id, the folder (an optimum-superweight
    checkpoint whose weights hold the super weights of its config.json), the card's inputs, and the card
    itself (it must read back to the checkpoint's super weights). Only then is the repo created (if needed)
    and the single commit made. An existing README (in the folder, else in the repo) keeps its own text; the
    generated section and metadata are merged into it.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit.

    >>> push_folder_to_hub("out/smollm2-sw4", "user/SmolLM2-135M-Instruct-sw4")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    _check_commit_message(commit_message)
    folder = Path(folder)
    perplexity = normalize_perplexity(perplexity)
    _check_folder(folder)  # before any request: a bad folder is an error about the folder, not the network
    api = HfApi()  # built now, so a patched/changed endpoint is honoured
    existing = None
    if not (folder / "README.md").is_file():
        existing = _remote_readme(api, repo_id, revision, token) if "/" in repo_id else None
    card = card_for_folder(
        folder, repo_id=repo_id, base_model=base_model, perplexity=perplexity, dense_bytes=dense_bytes,
        license=license, tags=tags, existing_card=existing,
    )
    card_text = str(card)
    operations = _folder_operations(folder, card_text)
    with reraise_hub_errors(repo_id, "creating the repo", UPLOAD_REMEDY):
        repo_url = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
    with reraise_hub_errors(repo_id, f"uploading {len(operations)} file(s) in one commit to", UPLOAD_REMEDY):
        # One commit: if it fails, the Hub keeps the repo as it was (nothing half-uploaded).
        return api.create_commit(
            repo_id=repo_url.repo_id,
            operations=operations,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=revision,
        )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    base_model: str | None = None,
    perplexity: Mapping[str, Any] | tuple[float, float] | None = None,
    max_shard_size: int | str = "5GB",
    license: str | None = None,
    tags: Iterable[str] = (),
    tokenizer: Any = None,
):
    """Save a superweight-quantized model (and its tokenizer) and upload them with the model card, in one commit.

    Args:
        model: A model loaded with ``quantization_config=SuperWeightConfig(...)`` (or a reloaded checkpoint).
        repo_id: ``"namespace/name"`` (or ``"name"`` for the token's user).
        token, private, revision: As in ``huggingface_hub.HfApi.create_commit`` / ``create_repo``.
        commit_message, commit_description: The commit's message.
        base_model: Hub id of the full-precision model; inferred from ``model.config.name_or_path`` if omitted.
        perplexity: ``{"before": ..., "after": ..., "text": ..., "tokens": ...}`` or ``(before, after)``.
        max_shard_size: Passed to ``save_pretrained``.
        license, tags: Card metadata.
        tokenizer: A tokenizer to save and upload with the model (recommended: the card's snippet loads it).

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit.

    Raises:
        ValueError: invalid arguments, or a model not quantized with optimum-superweight; nothing is uploaded.
        SuperWeightHubError: the Hub could not be reached or refused the upload (the message names the repo,
            the cause and what to do); the commit is all-or-nothing, so the repo is left as it was.

    >>> import optimum_superweight
    >>> optimum_superweight.push_to_hub(model, "user/tiny-sw4", tokenizer=tokenizer, perplexity=(14.99, 15.9))  # doctest: +SKIP
    """
    check_repo_id(repo_id)
    _check_commit_message(commit_message)
    perplexity = normalize_perplexity(perplexity)
    _resolve_quantization(model)  # a clear error for a model that is not quantized with optimum-superweight
    card_kwargs = getattr(model, _CARD_KWARGS_ATTR, {})
    if base_model is None:
        base_model = card_kwargs.get("base_model") or _infer_base_model(
            getattr(model.config, "name_or_path", None) or getattr(model, "name_or_path", None)
        )
    if perplexity is None:
        perplexity = card_kwargs.get("perplexity")
    with tempfile.TemporaryDirectory(prefix="optimum-superweight-push-") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        readme = Path(tmp) / "README.md"
        if readme.exists():  # save_pretrained never writes one; a hook of a subclass might
            readme.unlink()
        return push_folder_to_hub(
            tmp, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
            commit_description=commit_description, base_model=base_model, perplexity=perplexity,
            dense_bytes=_dense_16bit_bytes(model), license=license or card_kwargs.get("license"),
            tags=[*card_kwargs.get("tags", ()), *tags],
        )


# ---------------------------------------------------------------------------------------------------------------
# model.push_to_hub(...)
# ---------------------------------------------------------------------------------------------------------------
def _upload_modified_files(self: Any, working_dir: str | os.PathLike[str], repo_id: str, *args: Any, **kwargs: Any):
    """Bound to a quantized model by :func:`attach_card_hook`: write the generated card, then upload as usual.

    transformers calls this from ``push_to_hub`` / ``save_pretrained(push_to_hub=True)`` after it saved the
    model and wrote README.md (the repo's existing card, or its default template) into ``working_dir``.
    """
    folder = Path(working_dir)
    readme = folder / "README.md"
    existing = read_text_file(readme, f"README.md in {folder}") if readme.is_file() else None
    card = card_for_model(self, repo_id=repo_id, folder=folder)
    merged = merge_cards(existing, card)
    _check_card_round_trip(merged, _resolve_quantization(self)[1])
    merged.save(readme)
    with reraise_hub_errors(repo_id, "uploading the model to", UPLOAD_REMEDY):
        return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def attach_card_hook(
    model: Any,
    *,
    base_model: str | None = None,
    perplexity: Mapping[str, Any] | tuple[float, float] | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
) -> Any:
    """Make ``model.push_to_hub(repo_id)`` (and ``save_pretrained(..., push_to_hub=True)``) upload the
    super-weight card as README.md. Idempotent; returns ``model``.

    The quantizer calls it on every model it loads (fresh quantization and reloaded checkpoints). Call it
    again to set card fields, e.g. measured perplexity:

    >>> attach_card_hook(model, perplexity={"before": 14.99, "after": 15.9})  # doctest: +SKIP
    >>> model.push_to_hub("user/SmolLM2-135M-Instruct-sw4")  # doctest: +SKIP

    ``base_model`` defaults to ``model.config.name_or_path`` when that is a Hub id, the ``base_model`` of the
    README of a local checkpoint folder, or the index model named like the folder.
    """
    kwargs = dict(getattr(model, _CARD_KWARGS_ATTR, {}))
    if base_model is not None:
        kwargs["base_model"] = check_repo_id(base_model, "base_model")
    if perplexity is not None:
        kwargs["perplexity"] = normalize_perplexity(perplexity)
    if license is not None:
        kwargs["license"] = license
    tags = list(tags)
    if tags:
        kwargs["tags"] = list(dict.fromkeys([*kwargs.get("tags", ()), *tags]))
    # Plain attributes (not registered as parameters/buffers/modules): nn.Module.__setattr__ stores them as is.
    object.__setattr__(model, _CARD_KWARGS_ATTR, kwargs)
    current = model.__dict__.get("_upload_modified_files")
    if not getattr(getattr(current, "__func__", None), _HOOK_MARK, False):
        # A bound method in the instance dict shadows the class's; copy.deepcopy rebinds it to the copy.
        object.__setattr__(model, "_upload_modified_files", types.MethodType(_upload_modified_files, model))
    return model


setattr(_upload_modified_files, _HOOK_MARK, True)
