"""Two Python threads serving one quantized model: do their kernel calls overlap?

The compiled kernel (``cpu-tiled``) releases the GIL while it computes, so two Python threads calling one model
run their products at the same time. The model is a stack of SmolLM2-shaped MLP projections (576 -> 1536 -> 576,
the default format: 4-bit, groups of 64, float offsets, a super weight per layer); each call multiplies a batch
of ``tokens`` rows through it. One round runs ``2 * calls`` forward passes in one thread, then the same passes
split over two threads (wall time, one torch thread per Python thread); rounds alternate, the median is
reported. *overlap* is one thread's time over two threads' time: 2.0 when the two threads run fully in
parallel on two idle cores, 1.0 when they take turns (a GIL held through the kernel). Outputs of the two
threads are compared with one thread's (bit for bit).

    python3 benchmarks/kernel_threads.py            # writes benchmarks/results/kernel_threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from optimum_superweight import kernels  # noqa: E402
from optimum_superweight.kernels import guard  # noqa: E402
from optimum_superweight.nn.linear import SuperWeightLinear  # noqa: E402


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        for out_features, in_features in ((1536, 576), (576, 1536)):
            dense = nn.Linear(in_features, out_features, bias=False)
            blocks.append(SuperWeightLinear.from_linear(
                dense, bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
            ))
    return nn.Sequential(*blocks).eval()


def _serve(model: nn.Module, inputs: list[torch.Tensor], out: dict[int, torch.Tensor], indices: range) -> None:
    with torch.inference_mode():
        for i in indices:
            out[i] = model(inputs[i])


def _timed(model: nn.Module, inputs: list[torch.Tensor], threads: int) -> tuple[float, dict[int, torch.Tensor]]:
    out: dict[int, torch.Tensor] = {}
    share = len(inputs) // threads
    workers = [
        threading.Thread(target=_serve, args=(model, inputs, out, range(t * share, (t + 1) * share)))
        for t in range(threads)
    ]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start, out


def measure(model: nn.Module, tokens: int, dtype: torch.dtype, calls: int, rounds: int) -> dict:
    torch.manual_seed(tokens)
    inputs = [torch.randn(tokens, 576, dtype=dtype) for _ in range(2 * calls)]
    _timed(model, inputs[:2], 1)  # warm-up: kernel states, the tile buffers
    one, two, identical = [], [], True
    for _ in range(rounds):
        seconds, expected = _timed(model, inputs, 1)
        one.append(seconds)
        seconds, got = _timed(model, inputs, 2)
        two.append(seconds)
        identical &= all(torch.equal(expected[i], got[i]) for i in expected)
    with torch.inference_mode():
        kernel = kernels.kernel_summary(model, dtype, tokens)
    one_s, two_s = statistics.median(one), statistics.median(two)
    return {
        "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "kernels": kernel, "calls": 2 * calls,
        "one_thread_s": one_s, "two_threads_s": two_s, "overlap": one_s / two_s, "identical": identical,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="MLP blocks (two quantized layers each)")
    parser.add_argument("--calls", type=int, default=20, help="forward passes per thread per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "kernel_threads.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per Python thread: the overlap comes from the threads, not from OpenMP
    guard.set_kernel_choice("fixed")  # the same kernels in both modes, whatever the timing
    model = _model(args.layers)
    rows = [
        measure(model, tokens, dtype, args.calls, args.rounds)
        for dtype in (torch.float32, torch.bfloat16)
        for tokens in (1, 16, 128)
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{guard.cpu_name()}, {os.cpu_count()} cores, load average {load:.1f} at the end; torch threads 1 per Python thread")
    print("| input | tokens | kernels | calls | one thread s | two threads s | overlap | outputs identical |")
    print("|---|---:|---|---:|---:|---:|---:|:---:|")
    for row in rows:
        kernel = ", ".join(f"{k} x{n}" for k, n in row["kernels"].items())
        print(
            f"| {row['dtype']} | {row['tokens']} | {kernel} | {row['calls']} | {row['one_thread_s']:.3f} | "
            f"{row['two_threads_s']:.3f} | x{row['overlap']:.2f} | {'yes' if row['identical'] else 'NO'} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"cpu": guard.cpu_name(), "cores": os.cpu_count(), "load_average": load, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
