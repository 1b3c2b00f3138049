"""Tiny models with real, planted super weights, and an offline tokenizer: for tests and experiments.

:func:`build_tiny_model` builds a small random causal LM from a transformers config and plants super
weights with the paper's mechanism rather than just writing a large number: a hidden "driver" channel
is made constant across all token embeddings, the MLP input projections of the planted layer read that
channel strongly, so the intermediate channel ``col`` spikes on every token; a large
``W_down[row, col]`` turns that into a massive output at hidden channel ``row``, which is added to the
residual stream and persists in later layers. Zeroing the weight removes the super activation and
changes the model's predictions.

Example:
    >>> import torch
    >>> from optimum_superweight.testing import build_tiny_model
    >>> model = build_tiny_model("llama", super_weights=[(1, 5, 7)])
    >>> model.model.layers[1].mlp.down_proj.weight[5, 7].item()
    2.5
    >>> ids = torch.arange(2, 18).unsqueeze(0)
    >>> hidden = model(ids, output_hidden_states=True).hidden_states
    >>> bool(hidden[3][0, :, 5].abs().min() > 100)  # the super activation persists in the residual stream
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .architectures import ARCHITECTURES, architecture_spec

__all__ = ["build_tiny_model", "tiny_tokenizer", "TINY_MODEL_TYPES", "TINY_VOCAB_SIZE"]

#: Vocabulary of the tiny models: 256 byte tokens + <pad>, <s>, </s>, <unk> (see :func:`tiny_tokenizer`).
TINY_VOCAB_SIZE = 260
_PAD, _BOS, _EOS, _UNK = 256, 257, 258, 259

_HIDDEN = 64
_INTERMEDIATE = 128
_LAYERS = 4
_HEADS = 4

# Planting strength: the planted gate/up (or fc_in) rows reach these pre-activations on every token, so
# the intermediate channel is ~ act(20) * 20 ~ 400 (gated) or act(400) ~ 400 (plain); the planted
# down-projection weight is _SUPER_VALUE, so the output channel reaches ~1000 (others ~0.1).
_GATED_PREACT = 20.0
_PLAIN_PREACT = 400.0
_SUPER_VALUE = 2.5
# Value of the driver channel in every token embedding (others are ~N(0, 0.02)).
_DRIVER_VALUE = 1.0
# Standard deviation of the output embedding (untied): the default 0.02 gives near-uniform predictions,
# which would hide how much a super weight changes them.
_LM_HEAD_STD = 0.2
# Gain of the post-MLP norm at the planted rows for architectures that normalise the MLP output
# (Gemma2/3, OLMo2): the norm squashes the spike, the gain restores a massive residual activation.
_POST_NORM_GAIN = 100.0

#: The model types :func:`build_tiny_model` can build (every entry of the architecture table but the
#: multimodal ``gemma3`` wrapper, whose text decoder is ``gemma3_text``).
TINY_MODEL_TYPES: tuple[str, ...] = tuple(sorted(t for t in ARCHITECTURES if t != "gemma3"))


def _config_kwargs(model_type: str) -> dict[str, Any]:
    common_ids = dict(tie_word_embeddings=False, vocab_size=TINY_VOCAB_SIZE, pad_token_id=_PAD, bos_token_id=_BOS, eos_token_id=_EOS)
    if model_type == "gpt2":
        return dict(
            n_embd=_HIDDEN, n_inner=_INTERMEDIATE, n_layer=_LAYERS, n_head=_HEADS, n_positions=512,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common_ids,
        )
    if model_type == "opt":
        return dict(
            hidden_size=_HIDDEN, ffn_dim=_INTERMEDIATE, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
            word_embed_proj_dim=_HIDDEN, max_position_embeddings=512, dropout=0.0, **common_ids,
        )
    if model_type == "falcon":
        return dict(
            hidden_size=_HIDDEN, ffn_hidden_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, max_position_embeddings=512, **common_ids,
        )
    if model_type == "gpt_neox":
        return dict(
            hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, max_position_embeddings=512, **common_ids,
        )
    # Llama-like decoders.
    kwargs = dict(
        hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=2, head_dim=_HIDDEN // _HEADS,
        max_position_embeddings=512, **common_ids,
    )
    if model_type in ("gemma2", "gemma3_text"):
        kwargs.update(sliding_window=64, query_pre_attn_scalar=_HIDDEN // _HEADS)
    return kwargs


def _check_super_weights(
    super_weights: Sequence[Sequence[int]] | None, num_layers: int, hidden: int, intermediate: int
) -> list[tuple[int, int, int]]:
    if super_weights is None:
        return []
    planted: list[tuple[int, int, int]] = []
    for entry in super_weights:
        if (
            not isinstance(entry, (tuple, list))
            or len(entry) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
        ):
            raise ValueError(
                f"super_weights entry {entry!r} is invalid: expected (layer, row, col) integers, "
                "row = hidden channel, col = intermediate channel."
            )
        layer, row, col = entry
        limits = {"layer": (layer, num_layers), "row": (row, hidden), "col": (col, intermediate)}
        for name, (value, limit) in limits.items():
            if not 0 <= value < limit:
                raise ValueError(f"super_weights entry {tuple(entry)}: {name}={value} is out of range [0, {limit}).")
        planted.append((layer, row, col))
    if len(set(planted)) != len(planted):
        raise ValueError(f"super_weights={list(super_weights)!r} lists the same coordinates twice.")
    return planted


def _embedding_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    # Token embeddings (and learned position embeddings, so position never cancels the driver).
    weights = [model.get_input_embeddings().weight]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module.weight is not weights[0]:
            if name.endswith(("wpe", "embed_positions")):
                weights.append(module.weight)
    return weights


def _mlp_input(model: torch.nn.Module, module: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The input of ``module`` on ``probe`` as ``[tokens, hidden]``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()) and None)
    try:
        model(probe)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _plant(model: torch.nn.Module, planted: list[tuple[int, int, int]]) -> None:
    spec = architecture_spec(model)
    layers = model.get_submodule(spec.layers)
    hidden = model.get_input_embeddings().weight.shape[1]
    rows = {row for _, row, _ in planted}
    # The driver channel must not be a planted row, or the planted spike would feed itself.
    driver = next(c for c in range(hidden - 1, -1, -1) if c not in rows)
    probe = torch.arange(min(32, model.config.vocab_size)).unsqueeze(0)
    # Pre-activation the planted rows of the MLP input projections reach: act(20) * 20 ~ 400 when gated,
    # act(400) ~ 400 when plain, so both kinds of MLP spike alike.
    target = _GATED_PREACT if spec.mlp_kind != "plain" else _PLAIN_PREACT
    with torch.no_grad():
        token_embedding, *position_embeddings = _embedding_weights(model)
        token_embedding[:, driver] = _DRIVER_VALUE
        for weight in position_embeddings:
            # Zero at the driver so that embedding + position stays _DRIVER_VALUE on every token.
            weight[:, driver] = 0.0
        # Plant layer by layer: a later planted layer sees a residual stream already dominated by the
        # earlier super activations (squashing the driver after each norm), so it reads those rows too.
        for layer_index in sorted({layer for layer, _, _ in planted}):
            layer = layers[layer_index]
            inputs = [layer.get_submodule(name) for name in spec.mlp_inputs]
            read = [driver] + sorted({row for lay, row, _ in planted if lay < layer_index})
            # Measure what the MLP actually receives on those channels (normalised or not, e.g. OLMo2
            # feeds the raw residual), and set the read weights so every token hits the target.
            seen = _mlp_input(model, inputs[0], probe)[:, read].mean(dim=0)
            read_weights = torch.sign(seen) * (target / seen.abs().sum())
            cols = sorted({col for lay, _, col in planted if lay == layer_index})
            for col in cols:
                if spec.mlp_kind == "gated":
                    targets = [(inputs[0], col), (inputs[1], col)]
                elif spec.mlp_kind == "fused_gated":
                    half = inputs[0].weight.shape[0] // 2
                    targets = [(inputs[0], col), (inputs[0], half + col)]
                else:
                    targets = [(inputs[0], col)]
                for module, out_index in targets:
                    if spec.layout == "conv1d":  # weight [in, out]
                        module.weight[:, out_index] = 0.0
                        module.weight[read, out_index] = read_weights
                    else:
                        module.weight[out_index, :] = 0.0
                        module.weight[out_index, read] = read_weights
                    if getattr(module, "bias", None) is not None:
                        module.bias[out_index] = 0.0
            projection = layer.get_submodule(spec.projection)
            for lay, row, col in planted:
                if lay != layer_index:
                    continue
                if spec.layout == "conv1d":
                    projection.weight[col, row] = _SUPER_VALUE
                else:
                    projection.weight[row, col] = _SUPER_VALUE
            if spec.post_mlp_norm is not None:
                norm = layer.get_submodule(spec.post_mlp_norm)
                # Gemma's RMSNorm multiplies by (1 + weight).
                offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0
                for lay, row, _ in planted:
                    if lay == layer_index:
                        norm.weight[row] = _POST_NORM_GAIN - offset


def build_tiny_model(
    model_type: str = "llama",
    super_weights: Sequence[Sequence[int]] | None = ((1, 5, 7),),
    seed: int = 0,
    **config_overrides: Any,
):
    """Build a tiny random causal LM (float32, eval mode) with real super weights planted in it.

    The model has hidden size 64, intermediate size 128, 4 layers and a 260-token vocabulary (the
    byte-level :func:`tiny_tokenizer`) unless ``config_overrides`` say otherwise. Each
    ``(layer, row, col)`` in ``super_weights`` (paper convention: row = hidden channel, col =
    intermediate channel) becomes a super weight: the MLP input channel ``col`` spikes on every token,
    ``W[row, col]`` of the MLP output projection is set to 2.5, so the output channel ``row`` spikes
    (~1000 against ~0.1) and stays massive in the residual stream. Several entries may share a row or a
    column. A hidden channel (the last one not used as a row) is reserved to drive the spikes.

    Args:
        model_type: A ``config.model_type`` from :data:`TINY_MODEL_TYPES` (``"llama"``, ``"gpt2"``, ...).
        super_weights: Coordinates to plant, or ``None`` / ``()`` for a model without super weights.
        seed: Seed of the random initialisation.
        **config_overrides: Passed to the transformers config (e.g. ``num_hidden_layers=6``).

    Example:
        >>> model = build_tiny_model("gpt2", super_weights=[(2, 10, 99)])
        >>> model.transformer.h[2].mlp.c_proj.weight[99, 10].item()  # Conv1D stores [in, out]
        2.5

    Raises:
        ValueError: unknown ``model_type`` or coordinates outside the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported by build_tiny_model: expected one of "
            f"{', '.join(TINY_MODEL_TYPES)}."
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid: expected an integer.")
    kwargs = _config_kwargs(model_type)
    kwargs.update(config_overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    hidden = config.hidden_size
    intermediate = (
        getattr(config, "n_inner", None)
        or getattr(config, "ffn_dim", None)
        or getattr(config, "ffn_hidden_size", None)
        or getattr(config, "intermediate_size", None)
        or 4 * hidden
    )
    planted = _check_super_weights(super_weights, config.num_hidden_layers, hidden, intermediate)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        output_embedding = model.get_output_embeddings()
        if output_embedding is not None and output_embedding.weight is not model.get_input_embeddings().weight:
            with torch.no_grad():
                output_embedding.weight.normal_(0.0, _LM_HEAD_STD)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    if planted:
        _plant(model, planted)
    return model


def tiny_tokenizer():
    """A byte-level tokenizer built offline (256 byte tokens + ``<pad> <s> </s> <unk>``, ids 256-259).

    Every string round-trips; ids match :data:`TINY_VOCAB_SIZE` and the special token ids of
    :func:`build_tiny_model`'s configs. A ``PreTrainedTokenizerFast``, so ``save_pretrained`` works.

    Example:
        >>> tok = tiny_tokenizer()
        >>> ids = tok("Hi!")["input_ids"]
        >>> ids, tok.decode(ids, skip_special_tokens=True)
        ([257, 72, 105, 33], 'Hi!')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 byte-level symbols by the byte they stand for, so id == byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab.update({"<pad>": _PAD, "<s>": _BOS, "</s>": _EOS, "<unk>": _UNK})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", _BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte -> printable character map that ByteLevel pre-tokenizers use.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}

