"""The README written into an exported folder: what it holds, how it was made exactly or what was re-fitted.

>>> print(refit_section(RefitReport()))  # doctest: +ELLIPSIS
## How the weights were written
<BLANKLINE>
Every quantized layer holds the checkpoint's own codes, scales and zero-points: no value was changed.
"""

from __future__ import annotations

from typing import Any

from .refit import RefitReport

__all__ = ["refit_section", "super_weight_section", "awq_card", "packed_embeddings_section"]


def refit_section(report: RefitReport) -> str:
    """Which layers kept the checkpoint's codes, which were regrouped (exact) and which were re-fitted, and the
    measured effect of the re-fit."""
    lines = ["## How the weights were written", ""]
    if not report.refitted:
        lines.append("Every quantized layer holds the checkpoint's own codes, scales and zero-points: no value was changed.")
    else:
        lines.append(
            f"{len(report.refitted)} layer(s) could not be held as they are and were **re-fitted** on request "
            "(`--requantize`): fitted again from their dequantized weights with optimum-superweight's weighted optimizer "
            f"({report.method or 'HQQ grids'}; statistics: {report.importance}), super weights held out and "
            "exact. Their codes and scales are new; every other quantized layer holds the checkpoint's own."
        )
        effect = report.effect
        if effect:
            lines += ["", f"Measured effect on {effect['text']}: perplexity {effect['checkpoint_perplexity']} (checkpoint) "
                      f"-> {effect['export_perplexity']} (this export's weights), x{effect['ratio']}."]
        else:
            lines += ["", "Effect not measured (no tokenizer)."]
        lines += ["", "Re-fitted layers and why:", ""]
        lines += [f"- `{name}`: {report.reasons.get(name, '')}" for name in report.refitted]
    if report.regrouped:
        lines += ["", f"Regrouped without changing a value (each group split into the export's smaller groups, "
                  f"repeating its scale and zero): {len(report.regrouped)} layer(s): "
                  + ", ".join(f"`{n}`" for n in report.regrouped)]
    return "\n".join(lines)


def super_weight_section(records: list, dense: dict[str, str], where: str) -> str:
    lines = [f"## Super weights (kept exact: their layers are dense, listed in `{where}`)", ""]
    lines += [f"- `{sw.paper_notation()}` = {sw.value!r}" for sw in records] or ["- none recorded"]
    lines += ["", "Dense layers and why:", ""]
    lines += [f"- `{name}`: {why}" for name, why in sorted(dense.items())]
    return "\n".join(lines)


def awq_card(plan: Any, records: list, dtype: str, source: str | None, notes: list[str], rounded: dict[str, int]) -> str:
    """README of an AWQ export (``plan``: :class:`~.awq.AwqPlan`)."""
    group = "per output channel" if plan.group_size == -1 else f"group {plan.group_size}"
    lines = [
        "---", "library_name: transformers", "tags: [awq, superweight, int4]", "base_model_relation: quantized", "---", "",
        "# AWQ (GEMM layout) export of an optimum-superweight checkpoint", "",
        f"Weights: int4 with integer zero-points, {group}, AutoAWQ GEMM layout (`qweight`, `qzeros`, `scales` float16); "
        f"dense tensors in {dtype}. Made from the optimum-superweight checkpoint{f' `{source}`' if source else ''}.", "",
        refit_section(plan.report), "",
        "## Serve", "",
        "```bash",
        f"vllm serve THIS_FOLDER --dtype {'float16' if dtype == 'float32' else dtype}   # CPU: cpu_awq; GPU: awq_marlin or awq",
        "```", "",
        "Serve in float16 (the dtype of the AWQ scales): vLLM casts the scales to its model dtype, and bfloat16 would "
        "round them. (A float32 export keeps super weights that float16 would round exact in the file; a float16 "
        "server rounds them when it loads.) transformers 5.x reads `quant_method: awq` through `gptqmodel` (`pip install gptqmodel`); "
        "transformers 4.x through `autoawq`.", "",
        "## vLLM kernels for these shapes", "",
    ]
    lines += [f"- {note}" for note in notes]
    lines += ["", super_weight_section(records, plan.dense, "modules_to_not_convert")]
    changed = {n: k for n, k in rounded.items() if k}
    if changed:
        lines += ["", f"Dense layers stored in {dtype}, which rounds some of their (dequantized) values; super weights "
                  "are checked exact: " + ", ".join(f"`{n}`: {k} values" for n, k in sorted(changed.items()))]
    return "\n".join(lines) + "\n"


def packed_embeddings_section(model: Any) -> str | None:
    """What an export says about a checkpoint with ``embedding_bits=8`` (``None`` without it): the embeddings and head
    are written dequantized in the export's dense dtype, the super-activation channels at their exact values.

    >>> packed_embeddings_section(object()) is None
    True
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if getattr(config, "embedding_bits", None) is None:
        return None
    return (
        "## Embeddings and head\n\nThe checkpoint stores the input embeddings and the output head in 8 bits per row "
        f"(`embedding_bits=8`; hidden channels {list(config.super_activation_channels or [])} exact). This format has "
        "no such tensor: they are written dequantized in the dense dtype (the exact channels included), so this "
        "export is as large as one of a checkpoint without the option. Sizes and perplexity: benchmarks/RESULTS.md "
        "(\"8-bit embeddings and head\")."
    )
