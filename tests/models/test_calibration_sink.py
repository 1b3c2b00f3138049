"""The calibration statistic is robust to the attention sink: one token per window whose input is massive in a few
channels (a model without a BOS token puts it on each window's first text token) must not decide those channels'
weight, and the weighted grids must then serve the other tokens."""

from __future__ import annotations

import torch
from torch import nn

from optimum_superweight.models.calibration import (
    DEFAULT_TOKEN_NORM_CLIP,
    calibration_token_ids,
    clip_token_norms,
    collect_hessians,
    collect_input_energy,
    model_calibration_ids,
    tokenizer_adds_bos,
)
from optimum_superweight.tensor.hqq import hqq_quantize_weight

WIDTH, SINK_CHANNEL, SINK_VALUE = 64, 3, 1000.0


class SinkModel(nn.Module):
    """Embeddings -> one linear layer, with the first position of every window carrying a massive activation in one
    channel (what the attention sink does to the residual stream of a real model)."""

    def __init__(self, vocab: int = 300) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, WIDTH)
        self.embed.weight.data = torch.randn(vocab, WIDTH, generator=generator)
        self.proj = nn.Linear(WIDTH, 32, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.embed(input_ids).clone()
        x[:, 0, SINK_CHANNEL] = SINK_VALUE
        return self.proj(x)


def _plain_energy(model: SinkModel, ids: list[int], window: int) -> torch.Tensor:
    return collect_input_energy(model, ["proj"], ids, window=window, token_clip=None)["proj"]


def test_clip_scales_only_rows_beyond_the_bound_and_keeps_their_direction():
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(512, WIDTH, generator=generator)
    flat[0, SINK_CHANNEL] = SINK_VALUE
    clipped = clip_token_norms(flat, DEFAULT_TOKEN_NORM_CLIP)
    norms = flat.norm(dim=1)
    bound = DEFAULT_TOKEN_NORM_CLIP * norms.median()
    assert torch.equal(clipped[1:], flat[1:])  # ordinary tokens untouched, bit for bit
    torch.testing.assert_close(clipped[0].norm(), bound)
    torch.testing.assert_close(clipped[0] / clipped[0].norm(), flat[0] / flat[0].norm())
    assert clip_token_norms(flat, None) is flat


def test_planted_sink_no_longer_dominates_the_channel_importance():
    model = SinkModel()
    ids = calibration_token_ids(None, 2048, vocab_size=300)
    plain = _plain_energy(model, ids, window=512)
    robust = collect_input_energy(model, ["proj"], ids, window=512)["proj"]
    others = torch.arange(WIDTH) != SINK_CHANNEL
    # Plain mean of squares: the sink channel weighs ~SINK_VALUE^2 / 512 against ~1 for every other channel.
    assert plain[SINK_CHANNEL] / plain[others].median() > 1000
    # Clipped: the sink token counts as much as a token 8 median norms long, no more.
    assert robust[SINK_CHANNEL] / robust[others].median() < 2 * DEFAULT_TOKEN_NORM_CLIP**2 * WIDTH / 512 + 2
    # Every other channel keeps (almost) its plain value: the sink token's share of them shrinks, nothing else changes.
    torch.testing.assert_close(robust[others], plain[others], rtol=0.01, atol=0.0)
    # The Hessian path clips the same way (its diagonal is the energy).
    hessian = collect_hessians(model, ["proj"], ids, window=512)["proj"]
    torch.testing.assert_close(torch.diagonal(hessian), robust, rtol=1e-4, atol=1e-4)


def test_the_weighted_fit_serves_the_ordinary_tokens_once_the_sink_is_clipped():
    """Output error on the tokens that are not the sink: grids weighted by the clipped statistic beat grids weighted by
    the plain one (which spend each group's grid on the sink channel's weight)."""
    model = SinkModel()
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(32, WIDTH, generator=generator) * 0.02
    weight[:, SINK_CHANNEL] *= 8  # an outlier column, so that serving it costs the rest of its group
    model.proj.weight.data = weight
    ids = calibration_token_ids(None, 2048, vocab_size=300)
    held_out = calibration_token_ids(None, 4096, vocab_size=300)[2048:]
    inputs = model.embed(torch.tensor(held_out)).detach()  # ordinary tokens only: no sink among them
    errors = {}
    for label, energy in (("plain", _plain_energy(model, ids, window=512)),
                          ("clipped", collect_input_energy(model, ["proj"], ids, window=512)["proj"])):
        q = hqq_quantize_weight(weight, bits=3, group_size=32, importance=energy)
        errors[label] = float(((inputs @ (q.dequantize() - weight).T) ** 2).mean())
    assert errors["clipped"] < errors["plain"], errors


class _Tokenizer:
    bos_token_id = 7

    def __init__(self, adds: bool) -> None:
        self.adds = adds

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [ord(c) % 200 + 10 for c in text]
        return {"input_ids": ([self.bos_token_id] if self.adds and add_special_tokens else []) + ids}


def test_windows_start_with_bos_only_where_the_tokenizer_adds_one():
    assert tokenizer_adds_bos(_Tokenizer(True)) and not tokenizer_adds_bos(_Tokenizer(False))
    assert not tokenizer_adds_bos(None)
    model = SinkModel()
    assert model_calibration_ids(model, _Tokenizer(True), 1024)[1] == 7
    assert model_calibration_ids(model, _Tokenizer(False), 1024)[1] is None
