"""Evaluate a superweight-quantized model with EleutherAI's lm-evaluation-harness.

lm-evaluation-harness is not a dependency of this package: ``pip install lm-eval``. Its ``HFLM`` wrapper
accepts an already loaded model object, so a model quantized on load (or reloaded from a compressed
checkpoint) is evaluated exactly as it runs, with the package's layers in place.

    # online: standard tasks from the Hub (WikiText-2 perplexity, ARC-easy, ...)
    python3 examples/lm_eval_harness.py --tasks wikitext,arc_easy --limit 200

    # offline: two small tasks built from the built-in text (pydoc_data.topics), no download
    python3 examples/lm_eval_harness.py --local

    # a saved superweight checkpoint, or another full-precision model to quantize on load
    python3 examples/lm_eval_harness.py --model out/superweight-demo --local
    python3 examples/lm_eval_harness.py --model path/to/fp16-model --bits 4 --group-size 64 --local

The local tasks (:func:`write_local_tasks`):

- ``superweight_pydoc_rolling``: ``loglikelihood_rolling`` over pydoc documents (word/byte perplexity,
  bits per byte), the harness's analogue of WikiText;
- ``superweight_pydoc_continuation``: ``multiple_choice``: given the start of a paragraph, pick its true
  continuation among four (the other three are continuations of other paragraphs); metric ``acc``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROLLING_TASK = "superweight_pydoc_rolling"
CHOICE_TASK = "superweight_pydoc_continuation"


def _paragraphs(text: str, min_words: int = 24, max_words: int = 80) -> list[str]:
    """Prose paragraphs of the built-in text (code blocks and tables excluded), whitespace-normalised."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        if block.startswith((" ", "\t")) or ">>>" in block or "+--" in block or "====" in block:
            continue
        words = block.split()
        if min_words <= len(words) <= max_words and block.strip()[-1:] == ".":
            paragraphs.append(" ".join(words))
    return paragraphs


def write_local_tasks(folder: str | os.PathLike[str], *, documents: int = 6, questions: int = 40, seed: int = 0) -> Path:
    """Write two offline lm-eval tasks (YAML + JSONL) built from ``pydoc_data.topics`` into ``folder``.

    Pass the folder to ``lm_eval.tasks.TaskManager(include_path=folder)``. Deterministic for a given seed.
    """
    from pydoc_data.topics import topics

    from optimum_superweight.evaluation import builtin_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Rolling perplexity: the shortest documents (each is scored whole, in windows of the model's max length).
    docs = sorted((topics[k] for k in sorted(topics)), key=len)[:documents]
    with open(folder / "rolling.jsonl", "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    # Multiple choice: split paragraphs in two; the true second half against three others.
    paragraphs = _paragraphs(builtin_text())
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    pairs = []
    for paragraph in paragraphs:
        words = paragraph.split()
        cut = len(words) // 2
        pairs.append((" ".join(words[:cut]), " ".join(words[cut:])))
    records = []
    for i, (context, ending) in enumerate(pairs[:questions]):
        others = [pairs[(i + k) % len(pairs)][1] for k in (7, 13, 29)]
        choices = others + [ending]
        rng.shuffle(choices)
        records.append({"context": context, "choices": choices, "gold": choices.index(ending)})
    with open(folder / "continuation.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")

    (folder / f"{ROLLING_TASK}.yaml").write_text(
        f"""task: {ROLLING_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'rolling.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"""task: {CHOICE_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'continuation.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return folder


def evaluate(model: Any, tokenizer: Any, tasks: list[str], *, include_path: str | None = None,
             limit: int | None = None, batch_size: int = 4, max_length: int | None = None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on a loaded model object; returns ``{task: {metric: value}}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device="cpu")
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in output["results"].items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--bits", type=int, default=4, help="quantize a full-precision model on load (default 4)")
    parser.add_argument("--group-size", type=int, default=64, help="group size when quantizing (default 64)")
    parser.add_argument("--full-precision", action="store_true", help="evaluate without quantizing (baseline)")
    parser.add_argument("--tasks", default="wikitext,arc_easy", help="comma-separated lm-eval tasks (online)")
    parser.add_argument("--local", action="store_true", help="run the two offline tasks built from the built-in text")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (lm-eval --limit)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import optimum_superweight
    from optimum_superweight import SuperWeightConfig

    source = args.model or str(optimum_superweight.default_model_path())
    already_quantized = getattr(AutoConfig.from_pretrained(source), "quantization_config", None) is not None
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if not (already_quantized or args.full_precision):
        kwargs["quantization_config"] = SuperWeightConfig(bits=args.bits, group_size=args.group_size)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)

    if args.local:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        folder = write_local_tasks(tempfile.mkdtemp(prefix="superweight-lm-eval-"))
        results = evaluate(model, tokenizer, [ROLLING_TASK, CHOICE_TASK], include_path=str(folder),
                           limit=args.limit, batch_size=args.batch_size)
    else:
        results = evaluate(model, tokenizer, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
