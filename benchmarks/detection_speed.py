"""How long super-weight detection (search + confirmation) takes, against one plain forward pass.

The reference is one forward pass of the same model over the confirmation text (the built-in
``pydoc_data.topics`` excerpt, ``confirm_tokens`` tokens, batch 1): the unit that confirmation spends
per candidate. Runs are interleaved (forward, detection, forward, detection, ...) so that load from
other processes hits both alike; the ratio uses medians. Target on SmolLM2-135M: under 10x.

    python3 benchmarks/detection_speed.py                 # embedded SmolLM2-135M-Instruct
    python3 benchmarks/detection_speed.py --model DIR --threads 2 --repeats 3

Writes ``benchmarks/results/detection_speed.json`` (and the report's table, JSON and plot next to it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved detection runs (default: 3)")
    parser.add_argument("--output", default=str(RESULTS / "detection_speed.json"), help="result JSON path")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_superweight import default_model_path, detect_super_weights
    from optimum_superweight.detection import DEFAULT_CONFIRM_TOKENS, confirmation_ids

    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids, _ = confirmation_ids(model, tokenizer, DEFAULT_CONFIRM_TOKENS)
    input_ids = torch.tensor([ids])

    def forward_seconds() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=input_ids, use_cache=False)
            return time.perf_counter() - start

    forward_seconds()  # warm-up (allocator, kernels)
    forwards: list[float] = []
    detections: list[float] = []
    report = None
    for repeat in range(args.repeats):
        forwards += [forward_seconds() for _ in range(2)]
        start = time.perf_counter()
        report = detect_super_weights(model, tokenizer)
        detections.append(time.perf_counter() - start)
        print(f"run {repeat + 1}: detection {detections[-1]:.2f} s, forward {statistics.median(forwards):.3f} s", file=sys.stderr)
    forwards += [forward_seconds() for _ in range(2)]

    forward = statistics.median(forwards)
    detection = statistics.median(detections)
    result = {
        "model": str(path),
        "threads": args.threads,
        "confirm_tokens": len(ids),
        "forward_seconds": forward,
        "forward_runs": forwards,
        "detection_seconds": detection,
        "detection_runs": detections,
        "ratio": detection / forward,
        "target_ratio": 10.0,
        "candidates": len(report.candidates),
        "super_weights": [sw.to_dict() for sw in report.super_weights],
        "timings_last_run": report.timings,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    stem = output.with_suffix("")
    report.to_json(f"{stem}_report.json")
    Path(f"{stem}_report.txt").write_text(report.to_text() + "\n")
    report.plot(f"{stem}_report.png")
    print(report.to_text())
    print(
        f"\none forward pass ({len(ids)} tokens): {forward:.3f} s; detection + confirmation: {detection:.2f} s "
        f"= {detection / forward:.1f}x (target < 10x); {len(report.candidates)} candidates confirmed"
    )
    print(f"results: {output}, {stem}_report.txt/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
