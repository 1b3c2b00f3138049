"""Fine-tune LoRA adapters on a 4-bit SmolLM2 whose super weights stay exact, with PEFT and the Trainer.

Data: the Debian package ``fortunes-min`` (``apt-get install fortunes-min``): fortune-mod's fortunes, literature
quotes and riddles, BSD licence (/usr/share/doc/fortunes-min/copyright). Every 10th record is held out.

Steps: quantize SmolLM2-135M-Instruct on load (``SuperWeightConfig()``: detection, 4-bit, super weights exact),
put LoRA on every linear layer, train ``--steps`` steps with the transformers ``Trainer`` on CPU, report the
training loss and the held-out perplexity before and after, save the adapter, reload it with PEFT's own call
on a reloaded quantized checkpoint (same outputs), and merge it into a dense model (super weights exact).

    python3 examples/finetune_lora.py --steps 60
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_superweight import SuperWeightConfig, default_model_path
from optimum_superweight.peft import prepare_lora_config

FORTUNES = Path("/usr/share/games/fortunes")


def token_chunks(tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    records = []
    for name in ("fortunes", "literature", "riddles"):
        text = (FORTUNES / name).read_text(encoding="utf-8", errors="replace")
        records += [r.strip() for r in text.split("\n%\n") if r.strip()]
    parts = []
    for keep in (lambda i: i % 10 != 9, lambda i: i % 10 == 9):
        ids = [t for i, r in enumerate(records) if keep(i) for t in tokenizer(r + "\n\n")["input_ids"]]
        parts.append(torch.tensor(ids[: len(ids) // seq_len * seq_len]).reshape(-1, seq_len))
    return parts[0], parts[1]


class Chunks(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def perplexity(model, rows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=rows[i : i + 4], labels=rows[i : i + 4]).loss.item() for i in range(0, len(rows), 4)]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-chunks", type=int, default=16)
    args = parser.parse_args()
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held = token_chunks(tokenizer, args.seq_len)
    held = held[: args.eval_chunks]
    work = Path(tempfile.mkdtemp(prefix="finetune-lora-"))

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=SuperWeightConfig())
    model.save_pretrained(work / "quantized")
    records = model.config.quantization_config.super_weights
    print(f"quantized: {len(records)} super weight(s) kept exact: {[(r['module'], r['row'], r['col']) for r in records]}")
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, prepare_lora_config(config, model))
    peft_model.print_trainable_parameters()
    before = perplexity(peft_model, held)

    training = TrainingArguments(
        output_dir=str(work / "run"), max_steps=args.steps, per_device_train_batch_size=4, learning_rate=args.lr,
        lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
    )
    trainer = Trainer(model=peft_model, args=training, train_dataset=Chunks(train))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = perplexity(peft_model, held)
    print(f"training loss (every 5 steps): {' '.join(f'{x:.3f}' for x in losses)}")
    print(f"held-out perplexity: {before:.2f} -> {after:.2f}")

    peft_model.save_pretrained(work / "adapter")
    base = AutoModelForCausalLM.from_pretrained(work / "quantized")
    adapter_config = prepare_lora_config(LoraConfig.from_pretrained(work / "adapter"), base)
    reloaded = PeftModel.from_pretrained(base, work / "adapter", config=adapter_config)
    probe = held[:2]
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=probe).logits, peft_model(input_ids=probe).logits)
    print(f"adapter reloaded on the reloaded quantized checkpoint: identical logits = {same}")

    merged = peft_model.merge_and_unload()
    merged.dequantize()
    exact = all(
        merged.get_submodule(r["module"]).weight[r["row"], r["col"]].item() == r["value"] for r in records
    )
    print(f"merged dense model: super weights exact = {exact}; held-out perplexity {perplexity(merged, held):.2f}")


if __name__ == "__main__":
    main()
