"""Perplexity: protocol, stride handling, BOS handling, batching, sources."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_superweight.evaluation import PerplexityResult, builtin_text, load_text, perplexity, tokenize_text
from optimum_superweight.testing import build_tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", super_weights=[(1, 5, 7)], seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


TEXT = builtin_text()[:3000]


def _reference(model, ids, window, stride, bos_id):
    """Direct computation: one unpadded forward per window, scoring only tokens not scored before."""
    total, count, prev_end, begin = 0.0, 0, 0, 0
    while prev_end < len(ids):
        end = min(begin + window, len(ids))
        chunk = ([bos_id] if bos_id is not None else []) + ids[begin:end]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
        offset = 1 if bos_id is not None else 0
        for j in range(max(prev_end, begin), end):
            pos = offset + j - begin  # position of text token j inside chunk
            if pos == 0:
                continue  # nothing to predict it from
            total -= float(logp[pos - 1, chunk[pos]])
            count += 1
        prev_end, begin = end, begin + stride
    return math.exp(total / count), count


def test_builtin_text_is_deterministic_and_english():
    text = builtin_text()
    assert text == builtin_text()
    assert len(text) > 100_000
    assert "assert" in text and "\n\n" in text
    assert load_text() == text and load_text("builtin") == text


def test_load_text_reads_a_file(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("hello perplexity\n", encoding="utf-8")
    assert load_text(path) == "hello perplexity\n"
    assert load_text(str(path)) == "hello perplexity\n"
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="source"):
        load_text(42)


@pytest.mark.parametrize(
    "window,stride,add_bos",
    [(128, None, True), (128, None, False), (128, 48, True), (128, 48, False), (100, 100, True)],
)
def test_perplexity_matches_direct_computation(model, tokenizer, window, stride, add_bos):
    ids = tokenize_text(tokenizer, TEXT, max_tokens=700)
    expected, count = _reference(model, ids, window, stride or window, tokenizer.bos_token_id if add_bos else None)
    result = perplexity(model, tokenizer, TEXT, max_tokens=700, window=window, stride=stride, add_bos=add_bos,
                        batch_size=3)
    assert isinstance(result, PerplexityResult)
    assert result.n_tokens == count
    assert result.text_tokens == 700
    assert result.add_bos is add_bos
    assert float(result) == pytest.approx(expected, rel=1e-4)
    assert result.ppl == pytest.approx(math.exp(result.nll))


def test_token_counts(model, tokenizer):
    # Disjoint windows with BOS score every token; without BOS, the first token of each window is unscored.
    with_bos = perplexity(model, tokenizer, TEXT, max_tokens=500, window=128)
    assert (with_bos.n_tokens, with_bos.n_windows) == (500, 4)
    without = perplexity(model, tokenizer, TEXT, max_tokens=500, window=128, add_bos=False)
    assert without.n_tokens == 500 - 4
    # Overlapping windows: still every token once, more windows.
    strided = perplexity(model, tokenizer, TEXT, max_tokens=500, window=128, stride=32)
    assert strided.n_tokens == 500 and strided.n_windows == math.ceil((500 - 128) / 32) + 1
    # More context can only be scored differently, and the result is deterministic.
    assert strided.ppl != with_bos.ppl
    assert perplexity(model, tokenizer, TEXT, max_tokens=500, window=128, stride=32).ppl == strided.ppl


def test_batching_does_not_change_the_result(model, tokenizer):
    one = perplexity(model, tokenizer, TEXT, max_tokens=600, window=128, stride=100, batch_size=1)
    many = perplexity(model, tokenizer, TEXT, max_tokens=600, window=128, stride=100, batch_size=5)
    assert many.ppl == pytest.approx(one.ppl, rel=1e-5)
    assert many.n_tokens == one.n_tokens


def test_tokenizer_without_bos_uses_no_bos(model, tokenizer):
    class NoBos:
        bos_token_id = None

        def __call__(self, text, **kwargs):
            return tokenizer(text, **kwargs)

    result = perplexity(model, NoBos(), TEXT, max_tokens=300, window=100)
    assert result.add_bos is False and result.n_tokens == 300 - 3
    direct = perplexity(model, tokenizer, TEXT, max_tokens=300, window=100, add_bos=False)
    assert result.ppl == pytest.approx(direct.ppl, rel=1e-6)


def test_token_ids_and_progress(model, tokenizer):
    ids = tokenize_text(tokenizer, TEXT, max_tokens=None)
    a = perplexity(model, tokenizer, token_ids=ids, max_tokens=256, window=128)
    b = perplexity(model, tokenizer, TEXT, max_tokens=256, window=128, progress=True)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)
    assert set(a.to_dict()) >= {"ppl", "nll", "n_tokens", "n_windows", "window", "stride", "add_bos"}
    assert "perplexity" in str(a)


def test_zeroing_the_planted_super_weight_changes_perplexity(tokenizer):
    intact = build_tiny_model("llama", super_weights=[(1, 5, 7)], seed=0)
    broken = build_tiny_model("llama", super_weights=[(1, 5, 7)], seed=0)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[5, 7] = 0.0
    a = perplexity(intact, tokenizer, TEXT, max_tokens=256, window=128)
    b = perplexity(broken, tokenizer, TEXT, max_tokens=256, window=128)
    assert a.ppl != b.ppl


@pytest.mark.parametrize(
    "kwargs,field",
    [({"window": 0}, "window"), ({"stride": 200, "window": 100}, "stride"), ({"batch_size": 0}, "batch_size"),
     ({"max_tokens": -3}, "max_tokens"), ({"window": 1.5}, "window")],
)
def test_invalid_arguments_name_the_field(model, tokenizer, kwargs, field):
    with pytest.raises(ValueError, match=field):
        perplexity(model, tokenizer, TEXT, **kwargs)


def test_too_short_text(model, tokenizer):
    with pytest.raises(ValueError, match="too few"):
        perplexity(model, tokenizer, "", window=16)


def test_training_mode_is_restored(tokenizer):
    model = build_tiny_model("llama", super_weights=None)
    model.train()
    perplexity(model, tokenizer, TEXT, max_tokens=64, window=32)
    assert model.training


def _quantized_tiny():
    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.models.replace import quantize_model

    model = build_tiny_model("llama", super_weights=[(1, 5, 7)], seed=0)
    config = SuperWeightConfig(bits=4, group_size=32, super_weights=[{"module": "model.layers.1.mlp.down_proj", "row": 5, "col": 7}])
    return quantize_model(model, config)


def test_lm_eval_harness_scores_a_quantized_model_like_perplexity(tokenizer):
    """lm-evaluation-harness (optional, offline) wraps the loaded model object; its rolling log-likelihood of a
    document equals this package's perplexity computed on the same tokens."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = _quantized_tiny()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    document = TEXT[:400]
    (loglikelihood,) = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(document,), idx=0)]
    )
    ids = lm.tok_encode(document)
    # lm-eval predicts the first token from its prefix token, exactly as our windows predict it from BOS.
    assert lm.prefix_token_id == tokenizer.bos_token_id
    ours = perplexity(model, tokenizer, token_ids=ids, max_tokens=None, window=len(ids))
    assert -loglikelihood == pytest.approx(ours.nll * ours.n_tokens, rel=1e-5)


def test_lm_eval_local_tasks_run_offline(tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import sys
    from pathlib import Path

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    sys.modules.pop("lm_eval_harness", None)
    from lm_eval_harness import CHOICE_TASK, ROLLING_TASK, evaluate, write_local_tasks

    folder = write_local_tasks(tmp_path / "tasks", documents=2, questions=8)
    results = evaluate(_quantized_tiny(), tokenizer, [ROLLING_TASK, CHOICE_TASK], include_path=str(folder), limit=4)
    rolling, choice = results[ROLLING_TASK], results[CHOICE_TASK]
    assert math.isfinite(rolling["byte_perplexity,none"]) and rolling["byte_perplexity,none"] > 1
    assert 0.0 <= choice["acc,none"] <= 1.0
    assert choice["sample_len"] == 4
