"""LoRA fine-tuning on a quantized SmolLM2, per setup, on the same data and steps (issue 22, item 5).

Setups (each in a fresh subprocess, so its peak RSS is its own):

- ``ours``: ``SuperWeightConfig()`` (4-bit, super weights exact), LoRA through ``optimum_superweight.peft``;
- ``ours-nf4``: our bitsandbytes NF4 form with exact super weights (built on another branch: this row is
  skipped with a note until ``SuperWeightConfig`` has the option);
- ``bnb``: plain bitsandbytes QLoRA, ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``.

All load SmolLM2-135M-Instruct (``optimum_superweight.default_model_path()``) in bfloat16, put LoRA (r=8,
alpha=16, all linear layers) on it, train ``--steps`` AdamW steps (``--lr``, default 1e-3) on packed chunks of the
Debian ``fortunes-min`` text (fortune-mod's fortunes, literature quotes and riddles; BSD licence, see
/usr/share/doc/fortunes-min/copyright), and measure seconds per step (after a warm-up step), peak RSS, the
final training loss (mean of the last 5 steps) and held-out perplexity (every 10th record, never trained on)
before and after. Writes ``benchmarks/results/finetune.json`` and prints a table.

    python3 benchmarks/finetune.py                       # ours, ours-nf4, bnb; 60 steps each
    python3 benchmarks/finetune.py --setups ours bnb --steps 40 --seq-len 128 --batch 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "finetune.json"
FORTUNES = Path("/usr/share/games/fortunes")
SETUPS = ("ours", "ours-nf4", "bnb")


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
    import torch

    model.eval()
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

    options = {}
    if setup == "ours-nf4":
        options = nf4_options()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=SuperWeightConfig(**options))


def nf4_options() -> dict:
    """The NF4 form's config keywords (bitsandbytes' own 4-bit layers with exact super weights)."""
    return {"weight_format": "bnb-nf4"}


def lora(model, setup: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    if setup == "ours":  # bitsandbytes' Linear4bit (bnb and our NF4 form) is a layer PEFT already knows
        from optimum_superweight.peft import prepare_lora_config

        config = prepare_lora_config(config, model)
    return get_peft_model(model, config)


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
    model = lora(model, args.setup)
    ppl_before = perplexity(model, held, args.batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times = [], []
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
    ppl_after = perplexity(model, held, args.batch)
    return {
        "setup": args.setup, "steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr,
        "load_s": load_s, "s_per_step": sum(times[1:]) / max(1, len(times) - 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
    lines = ["| setup | s/step | peak RSS MiB | loss first5 -> last5 | held-out ppl before -> after |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['setup']} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(
            f"| {r['setup']} | {r['s_per_step']:.2f} | {r['peak_rss_mib']:.0f} | {r['first_loss']:.3f} -> "
            f"{r['final_loss']:.3f} | {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} |"
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
