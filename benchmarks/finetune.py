"""LoRA fine-tuning on a quantized SmolLM2, per setup, on the same data and steps (issue 22, item 5).

Setups (each in a fresh subprocess, so its peak RSS is its own):

- ``ours``: ``SuperWeightConfig()`` (4-bit, super weights exact), LoRA through ``optimum_superweight.peft``;
- ``ours-nf4``: ``SuperWeightConfig(weight_format="bnb-nf4")``, bitsandbytes' own NF4 layers with exact super
  weights, LoRA through PEFT's own QLoRA layer (plain ``LoraConfig``);
- ``bnb``: plain bitsandbytes QLoRA, ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``;
- ``ours-saved``: ``ours`` quantized and saved once by another process, then loaded with a plain
  ``from_pretrained(folder)`` (quantize once, fine-tune many times): the same model without the quantizing
  process's leftovers in the training process.

All load SmolLM2-135M-Instruct (``optimum_superweight.default_model_path()``) in bfloat16, put LoRA (r=8,
alpha=16, all linear layers) on it, train ``--steps`` AdamW steps (``--lr``, default 1e-3) on packed chunks of the
Debian ``fortunes-min`` text (fortune-mod's fortunes, literature quotes and riddles; BSD licence, see
/usr/share/doc/fortunes-min/copyright), and measure seconds per step (after a warm-up step), the final training
loss (mean of the last 5 steps), held-out perplexity (every 10th record, never trained on) before and after, and
memory by phase: the process's peak RSS, the peak while loading (quantizing), what is live before and after
training (after ``gc`` and glibc's ``malloc_trim``: freed heap that glibc keeps would count otherwise), the peak
during the training steps alone, and our kernels' prepared layouts. Writes ``benchmarks/results/finetune.json`` and prints a table.

    python3 benchmarks/finetune.py                       # ours, ours-nf4, bnb; 60 steps each
    python3 benchmarks/finetune.py --setups ours bnb --steps 40 --seq-len 128 --batch 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune.json"
FORTUNES = Path("/usr/share/games/fortunes")
SETUPS = ("ours", "ours-nf4", "bnb", "ours-saved")
CHECKPOINT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimum_superweight" / "finetune-checkpoint"


def fortune_records() -> list[str]:
    """The records of the Debian fortunes-min files (``%``-separated), in file order."""
    if not FORTUNES.is_dir():
        raise SystemExit("The data set is the Debian package fortunes-min: apt-get install fortunes-min")
    records = []
    for name in ("fortunes", "literature", "riddles"):
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        records += [r.strip() for r in text.split("\n%\n") if r.strip()]
    return records


def chunks(tokenizer, records: list[str], seq_len: int):
    import torch

    ids = []
    for record in records:
        ids += tokenizer(record + "\n\n")["input_ids"]
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable]).reshape(-1, seq_len)


def split(tokenizer, seq_len: int):
    records = fortune_records()
    held = [r for i, r in enumerate(records) if i % 10 == 9]
    train = [r for i, r in enumerate(records) if i % 10 != 9]
    return chunks(tokenizer, train, seq_len), chunks(tokenizer, held, seq_len)


def perplexity(model, data, batch: int) -> float:
    """Held-out perplexity, computed with the model in training mode (no dropout in any setup here: LoRA dropout
    0, SmolLM2's 0), under ``no_grad``.

    Not eval mode: bitsandbytes (0.50.2) converts a ``Linear4bit`` to its CPU inference layout at the first
    eval-mode forward and never back, and a later training forward then runs ``gemv_4bit``, which has no autograd
    kernel: no gradient flows through the frozen layers (torch only warns), so the adapters train on wrong
    gradients (held-out perplexity 65.34 -> 66.99 in the first run of this benchmark) and the steps look fast
    because the base layers' backward is skipped. Our NF4 layer undoes that layout when it trains; plain
    bitsandbytes does not."""
    import torch

    model.train()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            rows = data[start : start + batch]
            loss = model(input_ids=rows, labels=rows).loss
            total += loss.item() * rows.numel()
            count += rows.numel()
    return math.exp(total / count)


def load(setup: str, path: str):
    import torch
    from transformers import AutoModelForCausalLM

    if setup == "bnb":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config, device_map="cpu")
    from optimum_superweight import SuperWeightConfig

    if setup == "ours-saved":
        return AutoModelForCausalLM.from_pretrained(saved_checkpoint(path), dtype=torch.bfloat16)
    options = {}
    if setup == "ours-nf4":
        options = nf4_options()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=SuperWeightConfig(**options))


def saved_checkpoint(path: str) -> str:
    """The ``ours`` model saved once (by a separate process, so that quantizing leaves nothing in the caller)."""
    folder = CHECKPOINT
    if not (folder / "config.json").is_file():
        code = (
            "import sys, torch; from transformers import AutoModelForCausalLM; from optimum_superweight import SuperWeightConfig\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, quantization_config=SuperWeightConfig())\n"
            "m.save_pretrained(sys.argv[2])\n"
        )
        subprocess.run([sys.executable, "-c", code, path, str(folder)], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return str(folder)


def nf4_options() -> dict:
    """The NF4 form's config keywords (bitsandbytes' own 4-bit layers with exact super weights)."""
    return {"weight_format": "bnb-nf4"}


def lora(model, setup: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if setup in ("ours", "ours-saved"):  # bitsandbytes' Linear4bit (bnb and our NF4 form) is a layer PEFT already knows
        from optimum_superweight.peft import prepare_lora_config

        config = prepare_lora_config(config, model)
    return get_peft_model(model, config)


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since start or the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> float:
    """Collect garbage, give freed heap back to the system (glibc ``malloc_trim``) and reset the peak: the resident
    memory then is what is live, and the next peak is that phase's own."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    return _status_mib("VmRSS")


def kernel_state_mib(model) -> float:
    """MiB held by our kernels' prepared layouts (``_kernel_states``: repacked codes, float32 scales...), counting
    no tensor that shares the layer's own codes."""
    import dataclasses

    import torch

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif dataclasses.is_dataclass(obj):
            for field in dataclasses.fields(obj):
                yield from tensors(getattr(obj, field.name))
        elif isinstance(obj, (tuple, list)):
            for item in obj:
                yield from tensors(item)

    total = 0
    for module in model.modules():
        own = {t.untyped_storage().data_ptr() for t in module.parameters(recurse=False)}
        for _key, state in module.__dict__.get("_kernel_states", {}).values():
            total += sum(t.numel() * t.element_size() for t in tensors(state) if t.untyped_storage().data_ptr() not in own)
    return total / 2**20


def run_setup(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from optimum_superweight import default_model_path

    torch.manual_seed(0)
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held = split(tokenizer, args.seq_len)
    held = held[: args.eval_chunks]
    start = time.perf_counter()
    model = load(args.setup, path)
    load_s = time.perf_counter() - start
    load_peak = _status_mib("VmHWM")
    model = lora(model, args.setup)
    ppl_before = perplexity(model, held, args.batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times = [], []
    live_before = _settle()
    model.train()
    for step in range(args.steps):
        rows = train[(step * args.batch) % len(train) :][: args.batch]
        tick = time.perf_counter()
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
    train_peak = _status_mib("VmHWM")
    live_after = _settle()
    ppl_after = perplexity(model, held, args.batch)
    return {
        "setup": args.setup, "steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
        "load_s": load_s, "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        # ru_maxrss follows VmHWM's resets: the process's peak is the largest phase peak.
        "peak_rss_mib": max(load_peak, train_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_peak_mib": load_peak,
        "live_before_train_mib": live_before, "train_peak_mib": train_peak, "live_after_train_mib": live_after,
        "kernel_state_mib": kernel_state_mib(model),
        "first_loss": sum(losses[:5]) / len(losses[:5]), "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "ppl_before": ppl_before, "ppl_after": ppl_after, "train_chunks": len(train), "held_chunks": len(held),
        "threads": torch.get_num_threads(), "loadavg": os.getloadavg()[0],
    }


def backward_timing(tokens: int = 512, repeats: int = 5) -> list[dict]:
    """Seconds for ``grad_output @ W`` on SmolLM2's layer shapes (bfloat16, 4-bit default codes): our backward
    (:func:`optimum_superweight.nn.autograd.input_gradient`: fused dequantize per row block), the same through the
    reference dequantization of the whole matrix, and a dense matmul with a bfloat16 weight (the floor)."""
    import torch

    from optimum_superweight.nn.autograd import input_gradient
    from optimum_superweight.nn.linear import SuperWeightLinear

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
        return min(times)

    rows = []
    for out_features, in_features in ((576, 576), (1536, 576), (576, 1536)):
        torch.manual_seed(0)
        layer = SuperWeightLinear.from_linear(torch.nn.Linear(in_features, out_features), bits=4, group_size=64, symmetric=False)
        dense = layer.dequantize_weight(torch.bfloat16)
        g = torch.randn(tokens, out_features, dtype=torch.bfloat16)
        rows.append({
            "shape": f"{out_features}x{in_features}", "tokens": tokens,
            "ours_s": best(lambda: input_gradient(layer, g)),
            "reference_s": best(lambda: g @ layer.dequantize_weight(torch.bfloat16)),
            "dense_s": best(lambda: g @ dense),
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| setup | s/step | peak RSS MiB (process) | load peak | live before training | training peak | live after "
        "| kernel layouts | loss first5 -> last5 | held-out ppl before -> after | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['setup']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['setup']} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {r['load_peak_mib']:.0f} | "
            f"{r['live_before_train_mib']:.0f} | {r['train_peak_mib']:.0f} | {r['live_after_train_mib']:.0f} | "
            f"{r['kernel_state_mib']:.0f} | {r['first_loss']:.3f} -> {r['final_loss']:.3f} | "
            f"{r['ppl_before']:.2f} -> {r['ppl_after']:.2f} | {r['loadavg']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)  # one setup, in this process
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-chunks", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--backward", action="store_true", help="only time the backward's grad_output @ W paths")
    args = parser.parse_args()
    if args.backward:
        rows = backward_timing()
        print("| shape | tokens | ours (fused dequantize) ms | reference dequantize + matmul ms | dense bf16 matmul ms | ours / dense |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['tokens']} | {r['ours_s'] * 1e3:.2f} | {r['reference_s'] * 1e3:.2f} | "
                  f"{r['dense_s'] * 1e3:.2f} | x{r['ours_s'] / r['dense_s']:.2f} |")
        args.out.with_name("finetune_backward.json").write_text(json.dumps(rows, indent=1) + "\n")
        return
    if args.setup:
        print(json.dumps(run_setup(args)))
        return
    rows = []
    shutil.rmtree(CHECKPOINT, ignore_errors=True)  # ours-saved: saved by this run's code
    for setup in args.setups:
        command = [sys.executable, __file__, "--setup", setup, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                   "--batch", str(args.batch), "--lr", str(args.lr), "--eval-chunks", str(args.eval_chunks)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["failed"])[-1][:160]
            rows.append({"setup": setup, "skipped": reason})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
