"""Speed: detection against one forward pass, generation tokens/s at batch 1, prefill tokens/s at batch 8."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from optimum_superweight.evaluation import builtin_text, tokenize_text

GENERATION_PROMPT = "The history of the Python programming language"


def _sync_time() -> float:
    return time.perf_counter()


@torch.no_grad()
def detection_vs_forward(model, tokenizer, *, forward_tokens: int) -> dict[str, Any]:
    """Time ``detect_super_weights`` (search + confirmation) and one forward pass of ``forward_tokens`` tokens."""
    from optimum_superweight.detection import detect_super_weights

    ids = torch.tensor([tokenize_text(tokenizer, builtin_text(), forward_tokens)])
    model(input_ids=ids[:, :8])  # warm-up
    start = _sync_time()
    model(input_ids=ids)
    forward = _sync_time() - start
    start = _sync_time()
    report = detect_super_weights(model, tokenizer)
    detection = _sync_time() - start
    return {
        "forward_tokens": int(ids.shape[1]),
        "forward_seconds": forward,
        "detection_seconds": detection,
        "detection_over_forward": detection / forward,
        "detection_timings": dict(report.timings),
        "super_weights": [sw.to_dict() for sw in report.super_weights],
        "candidates": [sw.to_dict() for sw in report.candidates],
        "report": report,
    }


@torch.no_grad()
def generation_speed(model, tokenizer, new_tokens: int) -> dict[str, float]:
    """Greedy decoding at batch 1 from a short prompt; tokens/s over ``new_tokens`` forced new tokens."""
    inputs = tokenizer(GENERATION_PROMPT, return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(do_sample=False, pad_token_id=pad)
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up (kernel layouts, caches)
    start = _sync_time()
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    seconds = _sync_time() - start
    produced = int(out.shape[1] - inputs["input_ids"].shape[1])
    return {"new_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


@torch.no_grad()
def prefill_speed(model, tokenizer, batch: int, length: int) -> dict[str, float]:
    """One prefill forward (KV cache built, logits of the last position only) on ``batch x length`` real tokens."""
    ids = tokenize_text(tokenizer, builtin_text(), batch * length)
    input_ids = torch.tensor(ids).reshape(batch, length)
    mask = torch.ones_like(input_ids)

    def forward(x: torch.Tensor, m: torch.Tensor) -> None:
        try:
            model(input_ids=x, attention_mask=m, logits_to_keep=1)
        except TypeError:  # models without logits_to_keep
            model(input_ids=x, attention_mask=m)

    forward(input_ids[:1, :16], mask[:1, :16])  # warm-up
    start = _sync_time()
    forward(input_ids, mask)
    seconds = _sync_time() - start
    return {"batch": batch, "length": length, "seconds": seconds, "tokens_per_s": batch * length / seconds}


def _kernels(model) -> dict[str, int] | None:
    try:
        from optimum_superweight.kernels import kernel_summary
    except ImportError:
        return None
    try:
        summary = kernel_summary(model)
    except Exception:
        return None
    return summary or None


def run_speed(
    fp32_model,
    tokenizer,
    *,
    compressed_path: str | None,
    model_source: str,
    new_tokens: int,
    prefill_batch: int,
    prefill_length: int,
    include_bnb: bool,
    save_dir=None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Generation and prefill speed of float32, bfloat16, this package (reloaded checkpoint) and bnb NF4.

    All models run in this one process, one after the other, on the same inputs. The package's checkpoint
    is reloaded with bfloat16 activations (its fast CPU kernels need them) and with float32 activations.
    """
    from .common import load_model

    results: list[dict[str, Any]] = []

    def measure(name: str, model, note: str, load_seconds: float | None = None) -> None:
        gen = generation_speed(model, tokenizer, new_tokens)
        pre = prefill_speed(model, tokenizer, prefill_batch, prefill_length)
        row = {"model": name, "note": note, "generation": gen, "prefill": pre, "kernels": _kernels(model)}
        if load_seconds is not None:
            row["load_seconds_in_process"] = load_seconds
        results.append(row)
        log(f"  {name:<34} generate {gen['tokens_per_s']:8.2f} tok/s   prefill {pre['tokens_per_s']:9.1f} tok/s")

    measure("float32", fp32_model, "dense, transformers")
    bf16 = copy.deepcopy(fp32_model).to(torch.bfloat16)
    measure("bfloat16", bf16, "dense, transformers")
    del bf16
    if compressed_path is not None:
        for dtype, label in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
            start = time.perf_counter()
            model = load_model(compressed_path, dtype=dtype)
            seconds = time.perf_counter() - start
            measure(f"superweight int4 g64 ({label} act.)", model, f"reloaded checkpoint, dtype={label}", seconds)
            del model
    if include_bnb:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_source, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map="cpu")
        model.eval()
        seconds = time.perf_counter() - start
        measure("bitsandbytes NF4 (bf16 compute)", model, "Linear4bit, blocksize 64, quantized on load", seconds)
        if save_dir is not None:
            from pathlib import Path

            from .common import folder_size

            target = Path(save_dir) / "bnb-nf4"
            try:
                model.save_pretrained(target)
                bnb_bytes = folder_size(target)
            except Exception as error:  # report, do not fail the suite
                log(f"  bitsandbytes save_pretrained failed: {error}")
                bnb_bytes = None
        del model
    return {
        "bnb_checkpoint_bytes": bnb_bytes if include_bnb and save_dir is not None else None,
        "generation_new_tokens": new_tokens,
        "generation_prompt": GENERATION_PROMPT,
        "prefill_shape": [prefill_batch, prefill_length],
        "rows": results,
    }
