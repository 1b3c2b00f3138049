"""Calibration for data-aware quantization: built-in text and per-layer input second moments.

GPTQ (:mod:`optimum_superweight.tensor.gptq`) needs, for every linear layer, ``H = E[x xᵀ]`` of the layer's
inputs. :func:`collect_hessians` runs the full-precision model once over calibration windows and
accumulates ``H`` with forward hooks; layers that read the same input tensor (q/k/v, gate/up) share one
matrix, which halves time and memory.

The calibration text is the *end* of :func:`~optimum_superweight.evaluation.builtin_text`, while the
package's perplexity protocol scores its *first* 4096 tokens: calibration and evaluation are disjoint, so
quality numbers are not measured on the text the codes were tuned on. Without a tokenizer, fixed
pseudo-random token ids (seeded) are used. Everything is deterministic. Each window starts with the BOS token
only when the tokenizer adds one to what it encodes (:func:`tokenizer_adds_bos`), as the model is run.

The statistics bound each token's share (:data:`DEFAULT_TOKEN_NORM_CLIP`): a token whose input vector is far
longer than the batch's median token (the attention sink, which carries the massive activations: the BOS token,
or a window's first token in a model without one) is scaled down to that bound before it is accumulated. A
plain mean of squares lets that one token in every window decide the weight of the few massive channels, a
hundred thousand times the median channel's, so the weighted fit serves the sink token and neglects the others.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    >>> ids = calibration_token_ids(None, 256, vocab_size=260)
    >>> hessians = collect_hessians(model, ["model.layers.0.mlp.down_proj"], ids, window=128)
    >>> hessians["model.layers.0.mlp.down_proj"].shape
    torch.Size([128, 128])
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..detection.inputs import context_length, model_device
from ..evaluation import DEFAULT_MAX_TOKENS, builtin_text, tokenize_text

__all__ = [
    "calibration_token_ids", "model_calibration_ids", "collect_hessians", "collect_input_energy", "collect_input_absmax",
    "DEFAULT_CALIBRATION_TOKENS", "DEFAULT_CALIBRATION_WINDOW", "DEFAULT_TOKEN_NORM_CLIP", "fitting_window",
    "clip_token_norms", "tokenizer_adds_bos",
]

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_TOKENS = 8192
DEFAULT_CALIBRATION_WINDOW = 512
# Characters per token are ~3-5 on English/code; taking 8x the token count of characters from the end of
# the text is always enough, and tokenizing only that tail keeps calibration fast.
_CHARS_PER_TOKEN_BOUND = 8
_FALLBACK_SEED = 1234
#: A calibration token's input vector is scaled down to at most this multiple of the median token norm of its batch
#: (per layer) before it enters the statistics. Ordinary tokens stay within a few medians; the attention sink's
#: vector is tens to hundreds of medians long (measured in benchmarks/RESULTS.md, "Importance and the attention sink").
DEFAULT_TOKEN_NORM_CLIP = 8.0


def calibration_token_ids(
    tokenizer: Any, n_tokens: int = DEFAULT_CALIBRATION_TOKENS, *, vocab_size: int | None = None
) -> list[int]:
    """``n_tokens`` token ids from the end of the built-in text (disjoint from the evaluation tokens).

    Without a tokenizer, ``vocab_size`` is required and seeded pseudo-random ids are returned.

    >>> calibration_token_ids(None, 4, vocab_size=100)
    [19, 55, 10, 57]
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} is invalid: expected a positive integer.")
    if tokenizer is None:
        if not vocab_size or vocab_size < 2:
            raise ValueError("calibration_token_ids needs a tokenizer or vocab_size >= 2 for fixed token ids.")
        generator = torch.Generator().manual_seed(_FALLBACK_SEED)
        # Skip the lowest ids, which are usually special tokens.
        low = min(4, vocab_size - 1)
        return torch.randint(low, vocab_size, (n_tokens,), generator=generator).tolist()
    text = builtin_text()
    tail_start = max(0, len(text) - n_tokens * _CHARS_PER_TOKEN_BOUND)
    # The evaluation's first DEFAULT_MAX_TOKENS tokens span far fewer characters than this bound.
    evaluation_chars = DEFAULT_MAX_TOKENS * _CHARS_PER_TOKEN_BOUND
    if tail_start < evaluation_chars:
        raise ValueError(
            f"n_tokens={n_tokens} is too many: calibration text would overlap the evaluation text; "
            f"use at most {(len(text) - evaluation_chars) // _CHARS_PER_TOKEN_BOUND}."
        )
    # Start at a paragraph boundary so the first window begins with a whole word.
    boundary = text.find("\n\n", tail_start)
    tail = text[boundary + 2 if boundary >= 0 else tail_start :]
    ids = tokenize_text(tokenizer, tail, max_tokens=None)
    return ids[-n_tokens:]


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts what it encodes with its BOS token (Llama 2/3, Gemma do; SmolLM2's and Qwen2.5's
    tokenizers do not, though they name a BOS token): calibration and evaluation windows follow it.

    >>> tokenizer_adds_bos(None)
    False
    """
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        return False
    try:
        encoded = tokenizer("a", add_special_tokens=True)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode text adds nothing we can rely on
        return False
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
    return bool(ids) and ids[0] == bos


def clip_token_norms(flat: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``flat`` ``[tokens, features]`` with every row longer than ``clip`` x the median row norm scaled down to that
    length (its direction kept); ``clip=None`` returns ``flat`` itself.

    >>> x = torch.ones(5, 4); x[0] *= 100
    >>> clip_token_norms(x, 8.0).norm(dim=1).tolist()
    [16.0, 2.0, 2.0, 2.0, 2.0]
    """
    if clip is None:
        return flat
    if not clip > 0:
        raise ValueError(f"clip={clip!r} is invalid: expected a positive multiple of the median token norm, or None.")
    norms = flat.norm(dim=1)
    bound = clip * norms.median()
    if not bool((norms > bound).any()):
        return flat
    factor = torch.where(norms > bound, bound / norms.clamp_min(torch.finfo(flat.dtype).tiny), torch.ones_like(norms))
    return flat * factor.unsqueeze(1)


def fitting_window(model: nn.Module, window: int, bos_id: int | None = None) -> int:
    """``window``, shortened to what one forward pass of ``model`` holds (its position limit, less the BOS token that
    starts each window): a GPT-2-style model with ``n_positions=128`` calibrates on windows of 127 tokens + BOS.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> fitting_window(build_tiny_model("gpt2", super_weights=None, n_positions=128), 512, bos_id=0)
    127
    """
    limit = context_length(model)
    if limit is None:
        return window
    return max(1, min(window, limit - (bos_id is not None)))


def _windows(token_ids: Sequence[int], window: int, bos_id: int | None) -> torch.Tensor:
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    n = (len(ids) // window) * window
    if n == 0:
        raise ValueError(f"{len(ids)} calibration tokens are fewer than one window of {window}.")
    rows = ids[:n].reshape(-1, window)
    if bos_id is not None:
        # Like the evaluation protocol: each window starts with BOS, which is also where super activations live.
        rows = torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows




def _run_with_input_hooks(
    model: nn.Module,
    names: list[str],
    token_ids: Sequence[int],
    *,
    window: int,
    batch_size: int,
    bos_id: int | None,
    accumulate: Any,
    caller: str,
    token_clip: float | None = None,
) -> dict[str, str]:
    """Run the model over the calibration windows, calling ``accumulate(name, flat_float32_input)`` for each
    named layer (each token's row clipped by :func:`clip_token_norms` at ``token_clip``); returns ``{module: module whose input it shares}`` for layers reading another's input."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{caller}: no module named {missing[:3]} in {type(model).__name__}.")
    window = fitting_window(model, window, bos_id)
    batches = _windows(token_ids, window, bos_id).split(batch_size)
    device = model_device(model)
    alias: dict[str, str] = {}  # module -> module whose accumulator it shares
    # The previous hooked call's input and module. q/k/v (and gate/up) are called one after the other on
    # the very same tensor object; identity (not data_ptr, which the allocator reuses) detects that.
    last: list[Any] = [None, None]
    first_batch = [True]
    seen: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if name in alias:
                return
            if first_batch[0] and last[0] is x:
                alias[name] = last[1]
                return
            last[0], last[1] = x, name
            seen.add(name)
            accumulate(name, clip_token_norms(x.detach().reshape(-1, x.shape[-1]).to(torch.float32), token_clip))

        return record

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    model.eval()
    runner = _body_holding(model, [modules[n] for n in names])
    try:
        for batch in batches:
            runner(input_ids=batch.to(device), use_cache=False)
            first_batch[0] = False
            last[0] = last[1] = None
    finally:
        for handle in handles:
            handle.remove()
        if was_training:
            model.train()
    never = [n for n in names if n not in seen and n not in alias]
    if never:
        raise ValueError(f"{caller}: modules {never[:3]} never ran during the calibration forward pass.")
    return alias


def _body_holding(model: nn.Module, layers: list[nn.Module]) -> nn.Module:
    """The model without its output head when every hooked layer is inside that body (``model.base_model``):
    the statistics are the same and the vocabulary projection, a large share of a small model's cost, is skipped."""
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return model
    inside = {id(m) for m in body.modules()}
    return body if all(id(layer) in inside for layer in layers) else model


def model_calibration_ids(model: nn.Module, tokenizer: Any, n_tokens: int) -> tuple[list[int], int | None]:
    """:func:`calibration_token_ids` for ``model`` (its vocabulary bounds the fixed ids used without a tokenizer)
    and the BOS id each calibration window starts with: ``None`` without a tokenizer or when the tokenizer adds no
    BOS token to what it encodes (:func:`tokenizer_adds_bos`), so that the windows look like the model's input."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = calibration_token_ids(tokenizer, n_tokens, vocab_size=vocab)
    if tokenizer is not None and len(ids) < min(n_tokens, DEFAULT_CALIBRATION_WINDOW):
        # A tokenizer that cannot encode the built-in text (a toy vocabulary): calibrate on fixed ids rather than fail.
        logger.warning(
            "optimum-superweight calibration: the tokenizer encodes the built-in calibration text into %d token(s), "
            "fewer than %d; %d fixed token ids stand in (save a tokenizer that encodes English text next to the model "
            "to calibrate on text).", len(ids), min(n_tokens, DEFAULT_CALIBRATION_WINDOW), n_tokens,
        )
        return calibration_token_ids(None, n_tokens, vocab_size=vocab), None
    return ids, (tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None)


def _input_statistics(
    model: nn.Module,
    module_names: Iterable[str],
    token_ids: Sequence[int],
    *,
    window: int,
    batch_size: int,
    bos_id: int | None,
    fold: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor],
    mean: bool,
    caller: str,
    token_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """One statistic of each named layer's inputs: ``fold(total_or_None, flat_input)`` over the calibration
    batches, divided by the number of tokens when ``mean``; layers reading one input share one tensor."""
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str, flat: torch.Tensor) -> None:
        totals[name] = fold(totals.get(name), flat)
        counts[name] = counts.get(name, 0) + flat.shape[0]

    alias = _run_with_input_hooks(
        model, list(module_names), token_ids, window=window, batch_size=batch_size, bos_id=bos_id,
        accumulate=accumulate, caller=caller, token_clip=token_clip,
    )
    if mean:
        for name, total in totals.items():
            total.div_(max(counts[name], 1))
    for name, owner in alias.items():
        totals[name] = totals[owner]
    return totals


def _add_second_moment(total: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
    if total is None:
        total = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float32, device=flat.device)
    return total.addmm_(flat.T, flat)


def _add_energy(total: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
    energy = flat.square().sum(dim=0)
    return energy if total is None else total.add_(energy)


def _max_magnitude(total: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
    peak = flat.abs().amax(dim=0)
    return peak if total is None else torch.maximum(total, peak)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    module_names: Iterable[str],
    token_ids: Sequence[int],
    *,
    window: int = DEFAULT_CALIBRATION_WINDOW,
    batch_size: int = 4,
    bos_id: int | None = None,
    token_clip: float | None = DEFAULT_TOKEN_NORM_CLIP,
) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (float32 ``[in, in]``) of the inputs of each named linear layer over the calibration tokens.

    The tokens are cut into windows of ``window`` (a trailing partial window is dropped), each optionally
    preceded by ``bos_id``. Each token's input is clipped to ``token_clip`` x its batch's median token norm first
    (:func:`clip_token_norms`; ``None``: the plain mean). Modules reading the same input tensor get the same
    (shared) matrix object. Conv1D-style layers work too: their input's last dimension is ``in_features`` either way.
    """
    return _input_statistics(model, module_names, token_ids, window=window, batch_size=batch_size, bos_id=bos_id,
                             fold=_add_second_moment, mean=True, caller="collect_hessians", token_clip=token_clip)


@torch.no_grad()
def collect_input_energy(
    model: nn.Module,
    module_names: Iterable[str],
    token_ids: Sequence[int],
    *,
    window: int = DEFAULT_CALIBRATION_WINDOW,
    batch_size: int = 4,
    bos_id: int | None = None,
    token_clip: float | None = DEFAULT_TOKEN_NORM_CLIP,
) -> dict[str, torch.Tensor]:
    """Mean squared input ``E[x²]`` (float32 ``[in]``, the diagonal of :func:`collect_hessians`' matrix) of each
    input channel of each named linear layer over the calibration tokens (windows and ``token_clip`` as in
    :func:`collect_hessians`; layers reading the same input share one tensor). What the activation-weighted grid refinement reads
    (:func:`optimum_superweight.tensor.hqq.refine_group_grids`): ``in`` floats per layer instead of ``in²``.

    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    >>> ids = calibration_token_ids(None, 256, vocab_size=260)
    >>> collect_input_energy(model, ["model.layers.1.mlp.down_proj"], ids, window=128)["model.layers.1.mlp.down_proj"].shape
    torch.Size([128])
    """
    return _input_statistics(model, module_names, token_ids, window=window, batch_size=batch_size, bos_id=bos_id,
                             fold=_add_energy, mean=True, caller="collect_input_energy", token_clip=token_clip)


@torch.no_grad()
def collect_input_absmax(
    model: nn.Module,
    module_names: Iterable[str],
    token_ids: Sequence[int],
    *,
    window: int = DEFAULT_CALIBRATION_WINDOW,
    batch_size: int = 4,
    bos_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """Largest ``|x|`` (float32 ``[in]``) of each input channel of each named linear layer over the calibration
    tokens (windows as in :func:`collect_hessians`; layers reading the same input share one tensor).

    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    >>> ids = calibration_token_ids(None, 256, vocab_size=260)
    >>> collect_input_absmax(model, ["model.layers.1.mlp.down_proj"], ids, window=128)["model.layers.1.mlp.down_proj"].shape
    torch.Size([128])
    """
    return _input_statistics(model, module_names, token_ids, window=window, batch_size=batch_size, bos_id=bos_id,
                             fold=_max_magnitude, mean=False, caller="collect_input_absmax")
