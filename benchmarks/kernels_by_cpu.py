"""Every CPU kernel forced on the same layers, against bfloat16 dense ``F.linear``, per CPU model.

The same int8/int4 instruction can be fast on one x86 CPU and orders of magnitude slower on another, so each
row records the CPU it ran on, and runs on different CPUs accumulate in one result file (keyed by the CPU's
model name) instead of replacing each other. For each layer shape and token count the script also records the
kernel the dispatcher picks with the first-use speed check on (``optimum_superweight.kernels.guard``): the
check passes over a kernel more than 1.5x slower than dense, so the pick's ratio is the number users get.

Variants are interleaved on every repeat and the median is reported. The default clock is CPU time on one
thread (``time.process_time``): on a shared, loaded machine wall-clock time mostly measures the other
processes (a 2-thread GEMM can wait a whole time slice for a descheduled thread), while one thread's CPU time
counts only the work. ``--clock wall --threads 2`` measures what a user of an idle machine would see.
Compare ratios within one CPU's table, not absolute milliseconds across tables.

    python3 benchmarks/kernels_by_cpu.py            # updates benchmarks/results/kernels_by_cpu.json
    python3 benchmarks/kernels_by_cpu.py --quick    # 3 repeats, SmolLM2 shape only
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from optimum_superweight import kernels  # noqa: E402
from optimum_superweight.kernels import guard  # noqa: E402
from optimum_superweight.kernels import w8a8 as w8a8_kernels  # noqa: E402
from optimum_superweight.nn.linear import SuperWeightLinear  # noqa: E402
from optimum_superweight.nn.w8a8 import SuperWeightW8A8Linear  # noqa: E402

#: (name, out_features, in_features): SmolLM2's and a 1B-class (Llama-3.2-1B-like) down_proj and up_proj.
SHAPES = (
    ("SmolLM2 down_proj", 576, 1536),
    ("SmolLM2 up_proj", 1536, 576),
    ("1B down_proj", 2048, 8192),
    ("1B up_proj", 8192, 2048),
)
#: Tokens per call: decode, short prompts (16, 64: between the int kernels' and the GEMM kernels' ranges), prefill.
TOKENS = (1, 16, 64, 256, 512)


def _layers(out_features: int, in_features: int, formats: list[str] | None = None) -> tuple[dict[str, nn.Module], nn.Module]:
    """The layer formats the kernels serve (``formats``: only those), from one random dense layer with a planted
    super weight."""
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight[5, 7] = 2.0
    builders = _formats(dense)
    return {fmt: build() for fmt, build in builders.items() if not formats or fmt in formats}, dense.to(torch.bfloat16)


def _formats(dense: nn.Linear) -> dict:
    """Format name -> a function quantizing ``dense`` in that format (only the formats asked for are built)."""
    q, w8a8 = SuperWeightLinear.from_linear, SuperWeightW8A8Linear.from_linear
    return {
        "int4 g64": lambda: q(dense, bits=4, group_size=64, super_weights=[(5, 7)]),
        # The default checkpoint format: asymmetric with float offsets (w = s*q + m).
        "int4 g64 float offsets": lambda: q(
            dense, bits=4, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
        ),
        "int3 g64 float offsets": lambda: q(
            dense, bits=3, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
        ),
        # 5- to 7-bit codes: no int kernel takes them in groups; cpu-tiled runs them as byte codes.
        "int6 g64 float offsets": lambda: q(
            dense, bits=6, group_size=64, symmetric=False, zero_point="float", super_weights=[(5, 7)]
        ),
        "int6 g64 zero-points": lambda: q(
            dense, bits=6, group_size=64, symmetric=False, zero_point="uint8", super_weights=[(5, 7)]
        ),
        "int6 g64 symmetric": lambda: q(dense, bits=6, group_size=64, super_weights=[(5, 7)]),
        "int5 g32 float offsets": lambda: q(
            dense, bits=5, group_size=32, symmetric=False, zero_point="float", super_weights=[(5, 7)]
        ),
        "int7 g128 float offsets": lambda: q(
            dense, bits=7, group_size=128, symmetric=False, zero_point="float", super_weights=[(5, 7)]
        ),
        "int8 per row": lambda: q(dense, bits=8, group_size=-1, super_weights=[(5, 7)]),
        "W8A8 per tensor, held out": lambda: w8a8(
            dense, activation_scale="per_tensor", holdout_channels=[7], super_weights=[(5, 7)]
        ),
    }


def _candidates(fmt: str, module: nn.Module, tokens: int, dtype: torch.dtype = torch.bfloat16) -> list:
    registry = w8a8_kernels._W8A8_KERNELS if fmt.startswith("W8A8") else kernels._KERNELS
    device = torch.device("cpu")
    return [k for k in registry if k.unsupported(module, dtype, device, tokens) is None]


def _runner(kernel, module: nn.Module, x: torch.Tensor):
    if getattr(kernel, "is_reference", False) or kernel is kernels.REFERENCE:
        return lambda: kernel.run(module, None, x)
    state = kernel.prepare(module, x.device, x.dtype)
    return lambda: kernel.run(module, state, x)


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def _dispatcher_pick(module: nn.Module, x: torch.Tensor) -> str:
    """The kernel the dispatcher runs for this call with the speed check on and no earlier verdicts (timed here,
    neither read from nor written to the stored verdicts)."""
    guard.clear_speed_verdicts()
    choice = guard.kernel_choice()
    guard.set_kernel_choice("timed")
    module.__dict__.pop("_kernel_selections", None)
    try:
        with torch.inference_mode():
            module(x)
    finally:
        guard.set_kernel_choice(choice)
    return module.kernel


def bench_shape(
    name: str, out_features: int, in_features: int, repeats: int, clock, formats: list[str] | None = None,
    tokens_list: tuple[int, ...] = TOKENS, dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    layers, dense = _layers(out_features, in_features, formats)
    dense = dense.to(dtype)
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, in_features, dtype=dtype)
        for fmt, module in layers.items():
            if formats and fmt not in formats:
                continue
            variants = {"dense": lambda: dense(x)}
            for kernel in _candidates(fmt, module, tokens, dtype):
                variants[kernel.name] = _runner(kernel, module, x)
            samples: dict[str, list[float]] = {v: [] for v in variants}
            with torch.inference_mode():
                for run in variants.values():
                    run()  # warm-up: layouts, a one-off compilation
                for _ in range(repeats):
                    for variant, run in variants.items():
                        start = clock()
                        run()
                        samples[variant].append(clock() - start)
            dense_ms = _median_ms(samples["dense"])
            pick = _dispatcher_pick(module, x)
            for variant, values in samples.items():
                if variant == "dense":
                    continue
                ms = _median_ms(values)
                rows.append({
                    "shape": name, "out": out_features, "in": in_features, "tokens": tokens, "format": fmt,
                    "kernel": variant, "ms": ms, "dense_ms": dense_ms, "x_dense": ms / dense_ms, "picked": variant == pick,
                    "dtype": str(dtype).removeprefix("torch."),
                })
            logging.info("%s, %d tokens, %s: picked %s", name, tokens, fmt, pick)
    return rows


def merged_rows(previous: list[dict], new: list[dict]) -> list[dict]:
    """A partial run (some formats, shapes or token counts) replaces only the rows it measured, in table order.

    >>> old = [{"shape": "SmolLM2 down_proj", "tokens": 1, "format": "int4 g64", "kernel": "cpu-int4", "ms": 1.0}]
    >>> new = [{"shape": "SmolLM2 down_proj", "tokens": 1, "format": "int4 g64", "kernel": "cpu-int4", "ms": 2.0},
    ...        {"shape": "SmolLM2 down_proj", "tokens": 1, "format": "int3 g64 float offsets", "kernel": "cpu-int4", "ms": 3.0}]
    >>> [row["ms"] for row in merged_rows(old, new)]
    [2.0, 3.0]
    """
    key = lambda row: (row["shape"], row["tokens"], row["format"], row.get("dtype", "bfloat16"))  # noqa: E731
    measured = {key(row) for row in new}
    rows = [row for row in previous if key(row) not in measured] + new
    shapes = [name for name, _, _ in SHAPES]
    formats = list(_formats(None))
    order = lambda row: (  # noqa: E731
        row.get("dtype", "bfloat16") != "bfloat16",
        shapes.index(row["shape"]) if row["shape"] in shapes else len(shapes), row["tokens"],
        formats.index(row["format"]) if row["format"] in formats else len(formats),
    )
    return sorted(rows, key=order)  # stable: kernels keep their order within a format


def table(run: dict) -> str:
    """Rows of bfloat16 input compare with bfloat16 dense ``F.linear``, rows of float32 input (format marked
    "float32 input") with float32 dense."""
    lines = [
        f"| layer | tokens | format | kernel | ms | dense ms | time / dense | dispatcher's pick |",
        "|---|---:|---|---|---:|---:|---:|:---:|",
    ]
    for row in run["rows"]:
        dtype = row.get("dtype", "bfloat16")
        fmt = row["format"] + ("" if dtype == "bfloat16" else f", {dtype} input")
        lines.append(
            f"| {row['shape']} ({row['out']}x{row['in']}) | {row['tokens']} | {fmt} | `{row['kernel']}` | "
            f"{row['ms']:.3f} | {row['dense_ms']:.3f} | x{row['x_dense']:.2f} | {'yes' if row['picked'] else ''} |"
        )
    return "\n".join(lines)


def kernels_by_cpu_markdown(result: dict) -> str:
    """The per-CPU kernel section of ``benchmarks/RESULTS.md`` from ``results/kernels_by_cpu.json``."""
    parts = [
        "## Kernels by CPU",
        "",
        "`python3 benchmarks/kernels_by_cpu.py`: every CPU kernel forced on the same random layers (bfloat16 input, "
        "or float32 where the format says so: `--dtype float32`; median of interleaved repeats) against dense "
        "`F.linear` in the input's dtype; *dispatcher's pick* is the kernel a "
        "model runs with the first-use speed check on (a kernel more than 1.5x slower than dense on the CPU at hand "
        "steps aside with a log line). `cpu-tiled` is the compiled kernel (`optimum_superweight/kernels/tiled.py`, built "
        "once per machine at first use): from 12 tokens per call (17 for 5- to 8-bit codes) it decodes tiles of "
        "output rows in cache and multiplies each; below that it decodes each row in registers and multiplies every "
        "token there (no tile); 2- to 8-bit codes (5- to 7-bit ones as bytes). One table per CPU model the script "
        "ran on; a partial run (`--formats`, `--tokens`) replaces only its rows, and the header gives its date.",
    ]
    for cpu, run in sorted(result.get("cpus", {}).items()):
        parts += [
            "",
            f"### {cpu}",
            "",
            f"{run['date']}, torch {run['torch']}, {run['threads']} thread(s), "
            f"{'CPU time' if run.get('clock') == 'cpu' else 'wall time'}, {run['repeats']} repeats; CPU flags: "
            f"{', '.join(run.get('flags', [])) or 'not recorded'}.",
            "",
            table(run),
        ]
    return "\n".join(parts) + "\n"


def _cpu_flags() -> list[str]:
    wanted = ("amx_tile", "amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx_vnni", "avx512f", "avx2")
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in wanted if flag in flags]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time")
    parser.add_argument("--quick", action="store_true", help="3 repeats, SmolLM2 shape only")
    parser.add_argument("--formats", nargs="*", help="only these layer formats (e.g. 'int4 g64 float offsets')")
    parser.add_argument("--tokens", type=int, nargs="*", help=f"tokens per call (default {TOKENS})")
    parser.add_argument("--shapes", nargs="*", help="only layers whose name starts with one of these (e.g. SmolLM2)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="input dtype (dense F.linear runs in the same dtype)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "kernels_by_cpu.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(shape for shape in shapes if shape[0].startswith(tuple(args.shapes)))
    repeats = 3 if args.quick else args.repeats
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (process CPU time adds up every thread's time)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    tokens = tuple(args.tokens) if args.tokens else TOKENS
    dtype = getattr(torch, args.dtype)
    rows = [row for shape in shapes for row in bench_shape(*shape, repeats, clock, args.formats, tokens, dtype)]
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": args.threads, "clock": args.clock,
        "repeats": repeats, "flags": _cpu_flags(), "rows": rows,
    }
    result = json.loads(args.output.read_text()) if args.output.is_file() else {}
    previous = result.setdefault("cpus", {}).get(guard.cpu_name())
    if previous is not None and (args.formats or args.tokens or args.quick or args.shapes or args.dtype != "bfloat16"):
        run["rows"] = merged_rows(previous["rows"], rows)
    result["cpus"][guard.cpu_name()] = run
    print(f"\n{guard.cpu_name()}, this run's rows\n{table({'rows': rows})}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
