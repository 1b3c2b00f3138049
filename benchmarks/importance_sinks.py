"""How much the attention sink decides the calibration statistic: per layer, the largest channel importance over
the median one, for the plain mean of squares over every calibration token, without each window's first position,
and with the package's token-norm clip (``collect_input_energy``'s default), with and without a BOS token first.

    python3 benchmarks/importance_sinks.py --models smollm2,gemma3
    flock /work/notes/big.lock python3 benchmarks/importance_sinks.py --models qwen_coder --tokens 2048

Writes ``benchmarks/results/importance_sinks.json`` (``--output``; models already in the file are kept) and prints
the layers where the first position changes the largest importance by more than 1.5x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_OUTPUT = HERE / "results" / "importance_sinks.json"


def _model_path(key: str) -> Path:
    from optimum_superweight import default_model_path
    from suite.models import gemma_model_path, qwen_coder_model_path

    return {"smollm2": default_model_path, "gemma3": gemma_model_path, "qwen_coder": qwen_coder_model_path}[key]()


def _spread(energy: torch.Tensor) -> float:
    return float(energy.max() / energy.median().clamp_min(torch.finfo(energy.dtype).tiny))


def measure(model, names: list[str], ids: list[int], bos_id: int | None, window: int) -> list[dict[str, Any]]:
    """Per layer: max/median channel importance of the three statistics, and the first position's token norm over
    the median token norm."""
    from optimum_superweight.models.calibration import (
        DEFAULT_TOKEN_NORM_CLIP,
        _run_with_input_hooks,
        clip_token_norms,
        fitting_window,
    )

    sums: dict[str, dict[str, Any]] = {}
    # The windows the calibration runs (shortened where the model's positions or sliding window are fewer).
    length = fitting_window(model, window, bos_id) + (bos_id is not None)

    def accumulate(name: str, flat: torch.Tensor) -> None:
        x = flat.reshape(-1, length, flat.shape[-1])
        norms = x.norm(dim=-1)
        entry = sums.setdefault(name, {"plain": 0.0, "rest": 0.0, "clipped": 0.0, "tokens": 0, "first_norm": []})
        entry["plain"] = entry["plain"] + x.square().sum((0, 1))
        entry["rest"] = entry["rest"] + x[:, 1:].square().sum((0, 1))
        entry["clipped"] = entry["clipped"] + clip_token_norms(flat, DEFAULT_TOKEN_NORM_CLIP).square().sum(0)
        entry["tokens"] += x.shape[0] * length
        entry["first_norm"].append(float(norms[:, 0].mean() / norms.median()))

    _run_with_input_hooks(model, names, ids, window=window, batch_size=2, bos_id=bos_id, accumulate=accumulate,
                          caller="importance_sinks")
    rows = []
    for name, entry in sums.items():
        rows.append({"module": name, "plain_max_over_median": _spread(entry["plain"]),
                     "without_first_position": _spread(entry["rest"]), "clipped": _spread(entry["clipped"]),
                     "first_position_norm_over_median": sum(entry["first_norm"]) / len(entry["first_norm"])})
    return rows


def run_model(key: str, tokens: int, window: int) -> dict[str, Any]:
    from optimum_superweight.models.calibration import calibration_token_ids, tokenizer_adds_bos
    from suite.common import load_model, load_tokenizer
    from suite.quality import target_modules

    path = _model_path(key)
    model, tokenizer = load_model(str(path), dtype=torch.float32), load_tokenizer(str(path))
    names = list(target_modules(model))
    ids = calibration_token_ids(tokenizer, tokens, vocab_size=getattr(model.config, "vocab_size", None))
    out: dict[str, Any] = {"tokens": tokens, "window": window, "bos_token": tokenizer.bos_token,
                           "tokenizer_adds_bos": tokenizer_adds_bos(tokenizer), "runs": {}}
    for label, bos in (("bos_first", tokenizer.bos_token_id), ("no_bos", None)):
        start = time.perf_counter()
        rows = measure(model, names, ids, bos, window)
        out["runs"][label] = {"bos_id": bos, "seconds": time.perf_counter() - start, "layers": rows}
        print(f"[{key}] {label}: {len(rows)} layers ({time.perf_counter() - start:.0f} s)", flush=True)
        for row in rows:
            if row["plain_max_over_median"] > 1.5 * row["without_first_position"]:
                print(f"  {row['module']:<40} max/median plain {row['plain_max_over_median']:>10.0f}  without the first "
                      f"position {row['without_first_position']:>8.0f}  clipped {row['clipped']:>8.0f}  first token "
                      f"{row['first_position_norm_over_median']:.1f}x the median norm", flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens (the default's calibration_tokens)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    output = Path(args.output)
    result = json.loads(output.read_text(encoding="utf-8")) if output.is_file() else {"models": {}}
    for key in args.models.split(","):
        result["models"][key] = run_model(key, args.tokens, args.window)
        output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
