"""One command for every benchmark, side by side: quality, speed and memory of this package against plain
RTN and bitsandbytes, on one model (the embedded SmolLM2-135M-Instruct by default).

    python3 benchmarks/run.py                       # full run (~15 min on 2 CPU cores), writes benchmarks/RESULTS.md
    python3 benchmarks/run.py --model PATH_OR_ID    # another model
    python3 benchmarks/run.py --quick               # tiny random model, smoke test (~1-2 min), writes to a temp folder
    python3 benchmarks/run.py --only quality        # one section (quality, speed, memory)

Writes ``RESULTS.md``, ``results/results.json`` and ``results/*.png`` under ``--out`` (default: ``benchmarks/``
for a full run, a new temporary folder for ``--quick``). Loads whose peak memory is measured run in fresh
subprocesses (``--child``, internal).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

SECTIONS = ("quality", "speed", "memory")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="tiny random model and short settings (smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/, or a temp folder with --quick)")
    parser.add_argument("--only", action="append", choices=SECTIONS, default=None, help="run only this section (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=None, help="perplexity tokens (default 4096; quick 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="perplexity windows per forward (default 4)")
    parser.add_argument(
        "--variants", action="append", choices=("clip", "output-clip", "gptq"), default=None,
        help="package rows with clip search / GPTQ at int4/int3 g64/g128 (repeatable; default: both)",
    )
    parser.add_argument("--no-variants", action="store_true", help="only the package's default configuration")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads in every process (default: torch's default). On a shared, oversubscribed machine 1 thread "
        "avoids OpenMP barrier stalls that make multi-threaded timings meaningless",
    )
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes rows")
    parser.add_argument(
        "--update", action="store_true",
        help="keep the other sections of an existing OUT/results/results.json (rerun only the --only sections)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the saved checkpoints (in OUT/checkpoints)")
    parser.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md and plots from OUT/results/results.json")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        from suite.memory import child_main, print_child_result

        print_child_result(child_main(json.loads(args.child)))
        return 0

    if args.report_only:
        from suite.report import markdown, plots, standalone_sections

        out = Path(args.out) if args.out else HERE
        results = json.loads((out / "results" / "results.json").read_text(encoding="utf-8"))
        text = markdown(results, plots(results, out / "results")) + "\n" + standalone_sections(out / "results")
        (out / "RESULTS.md").write_text(text, encoding="utf-8")
        print(f"wrote {out / 'RESULTS.md'}")
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["BENCHMARK_TORCH_THREADS"] = str(args.threads)  # read by the subprocess loads
    from suite.common import build_quick_model, folder_size, load_model, load_tokenizer, machine_info
    from suite.memory import run_memory
    from suite.quality import run_quality
    from suite.report import markdown, plots, standalone_sections
    from suite.speed import detection_vs_forward, run_speed

    started = time.perf_counter()
    sections = tuple(args.only) if args.only else SECTIONS
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="superweight-bench-")) if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="superweight-bench-work-"))
    log = lambda message: print(message, flush=True)  # noqa: E731

    if args.quick:
        source = str(build_quick_model(work / "tiny-llama"))
        settings = dict(max_tokens=args.max_tokens or 256, window=64, new_tokens=8, prefill=(2, 64), forward_tokens=64)
    else:
        if args.model:
            source = args.model
        else:
            from optimum_superweight import default_model_path

            source = str(default_model_path())
        settings = dict(max_tokens=args.max_tokens or 4096, window=512, new_tokens=32, prefill=(8, 512), forward_tokens=256)

    results: dict = {"meta": {
        "command": "python3 benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "model": args.model or ("tiny random Llama (--quick)" if args.quick else "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)"),
        "machine": machine_info(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "sections": list(sections),
    }}
    log(f"model: {source}\noutput: {out}")
    try:
        model = load_model(source, dtype=torch.float32)
        tokenizer = load_tokenizer(source)

        detection, super_weights = None, []
        if "quality" in sections or "speed" in sections:
            log("[detection] super weights and detection time")
            detection = detection_vs_forward(model, tokenizer, forward_tokens=settings["forward_tokens"])
            report = detection.pop("report")
            super_weights = list(report.super_weights)
            log(f"  found {[sw.paper_notation() for sw in super_weights]} in {detection['detection_seconds']:.1f} s "
                f"({detection['detection_over_forward']:.1f}x a {detection['forward_tokens']}-token forward)")

        compressed = None
        if "memory" in sections:
            log("[memory] subprocess loads")
            memory = run_memory(source, work, super_weights=None, log=log)
            compressed = memory.pop("compressed_path")
            bf16_dir = work / "bfloat16"
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16_dir)
            memory["checkpoint_bytes"]["bfloat16"] = folder_size(bf16_dir)
            shutil.rmtree(bf16_dir, ignore_errors=True)
            if not Path(source).is_dir():
                memory["checkpoint_bytes"]["float32"] = None
            results["memory"] = memory

        if "quality" in sections:
            log("[quality] perplexity per method")
            results["quality"] = run_quality(
                model, tokenizer, super_weights, quick=args.quick, max_tokens=settings["max_tokens"],
                window=settings["window"], batch_size=args.batch_size, variants=() if args.no_variants else tuple(args.variants or ("clip", "output-clip", "gptq")), log=log,
            )
            if args.no_bnb:
                results["quality"]["rows"] = [r for r in results["quality"]["rows"] if r["method"] != "bnb"]

        if "speed" in sections:
            if compressed is None and super_weights:
                from optimum_superweight import SuperWeightConfig
                from optimum_superweight.models.replace import quantize_model

                config = SuperWeightConfig(bits=4, group_size=64, super_weights=[sw.to_dict() for sw in super_weights])
                quantized = quantize_model(copy.deepcopy(model), config)
                compressed = str(work / "superweight-int4-g64")
                quantized.save_pretrained(compressed)
                tokenizer.save_pretrained(compressed)
                del quantized
            log("[speed] generation and prefill")
            speed = run_speed(
                model, tokenizer, compressed_path=compressed, model_source=source, new_tokens=settings["new_tokens"],
                prefill_batch=settings["prefill"][0], prefill_length=settings["prefill"][1], include_bnb=not args.no_bnb,
                save_dir=work, log=log,
            )
            speed["detection"] = detection
            results["speed"] = speed
            if "memory" in results and speed.get("bnb_checkpoint_bytes") is not None:
                results["memory"]["checkpoint_bytes"]["bitsandbytes NF4"] = speed["bnb_checkpoint_bytes"]
        elif detection is not None:
            results["detection"] = detection
    finally:
        if args.keep_checkpoints and work.exists():
            shutil.copytree(work, out / "checkpoints", dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)

    results["meta"]["total_seconds"] = time.perf_counter() - started
    results["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    data_dir = out / "results"
    data_dir.mkdir(parents=True, exist_ok=True)
    previous_file = data_dir / "results.json"
    if args.update and previous_file.is_file():
        previous = json.loads(previous_file.read_text(encoding="utf-8"))
        for section in SECTIONS:
            if section not in sections and section in previous:
                results[section] = previous[section]
        # The bitsandbytes checkpoint is saved by the speed section: keep its size when only memory reran.
        old_sizes = (previous.get("memory") or {}).get("checkpoint_bytes", {})
        if "memory" in results and "speed" not in sections and "bitsandbytes NF4" in old_sizes:
            results["memory"]["checkpoint_bytes"].setdefault("bitsandbytes NF4", old_sizes["bitsandbytes NF4"])
        results["meta"]["updated_sections"] = list(sections)
        results["meta"]["previous_run"] = {k: previous["meta"].get(k) for k in ("command", "date", "total_seconds", "machine")}
    (data_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    made = plots(results, data_dir)
    (out / "RESULTS.md").write_text(markdown(results, made) + "\n" + standalone_sections(data_dir), encoding="utf-8")
    log(f"wrote {out / 'RESULTS.md'} ({results['meta']['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
