"""Property suite: a corrupted compressed checkpoint ends in a clear error or in the exact model, never in garbage.

Tiny checkpoints (Llama and GPT-2 with planted super weights; symmetric and asymmetric; 2, 3, 4 and 8 bits;
with and without super weights; sharded; tied embeddings) are saved once, then every tensor of two quantized
layers and every config field is corrupted systematically (dtype, shape, range, presence, swaps between layers,
scaled values, edited fields, removed full-precision tensors, extra tensors). Each case must either raise an
error whose message names the module, the tensor or the config field concerned, or load a model whose logits
equal the untouched checkpoint's exactly.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_superweight import SuperWeightConfig
from optimum_superweight.format import TENSORS
from optimum_superweight.testing import build_tiny_model

INPUT = torch.arange(2, 26).reshape(2, 12)


@dataclass(frozen=True)
class Base:
    name: str
    model_type: str
    bits: int
    symmetric: bool
    group_size: int
    super_weight: bool = True
    shard: str | None = None
    tied: bool = False
    method: str | None = None  # None: the default (HQQ, float offsets when asymmetric)

    @property
    def sw_module(self) -> str:
        return "transformer.h.1.mlp.c_proj" if self.model_type == "gpt2" else "model.layers.1.mlp.down_proj"

    @property
    def plain_module(self) -> str:  # a quantized layer without super weights
        return "transformer.h.0.attn.c_attn" if self.model_type == "gpt2" else "model.layers.0.mlp.up_proj"

    @property
    def twin_module(self) -> str:  # another layer whose tensors have plain_module's shapes
        return "transformer.h.1.attn.c_attn" if self.model_type == "gpt2" else "model.layers.0.mlp.gate_proj"


BASES = [
    Base("llama-int4-sym-g32", "llama", 4, True, 32),
    Base("llama-int3-asym-g48-sharded", "llama", 3, False, 48, shard="40KB", method="rtn"),  # uint8 zero-points
    Base("gpt2-int2-asym-g64-bias", "gpt2", 2, False, 64),
    Base("llama-int8-sym-row-nosw-tied", "llama", 8, True, -1, super_weight=False, tied=True),
]


@dataclass
class Saved:
    base: Base
    files: dict[str, dict[str, torch.Tensor]]  # file name -> tensors
    config: dict[str, Any]
    extra_files: dict[str, str]  # other json files (index) by name
    logits: torch.Tensor
    where: dict[str, str] = field(default_factory=dict)  # tensor -> file name
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # file name -> safetensors header metadata


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Saved]:
    root = tmp_path_factory.mktemp("fuzz-bases")
    out = {}
    for base in BASES:
        overrides = {"num_hidden_layers": 2} if base.model_type == "llama" else {"n_layer": 2}
        if base.tied:
            overrides["tie_word_embeddings"] = True
        model = build_tiny_model(base.model_type, super_weights=[(1, 5, 7)], **overrides)
        model.save_pretrained(root / f"{base.name}-fp")
        config = SuperWeightConfig(
            bits=base.bits, symmetric=base.symmetric, group_size=base.group_size, detect=False, method=base.method,
            super_weights=[{"module": base.sw_module, "row": 5, "col": 7}] if base.super_weight else None,
        )
        quantized = AutoModelForCausalLM.from_pretrained(root / f"{base.name}-fp", quantization_config=config)
        folder = root / base.name
        quantized.save_pretrained(folder, **({"max_shard_size": base.shard} if base.shard else {}))
        files = {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}
        assert not base.shard or len(files) > 1
        extra = {p.name: p.read_text() for p in folder.glob("*.json") if p.name != "config.json"}
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            logits = reloaded(INPUT).logits
        where = {key: name for name, tensors in files.items() for key in tensors}
        metadata = {name: meta for name, meta in zip(files, _metadata(folder, files))}
        config = json.loads((folder / "config.json").read_text())
        out[base.name] = Saved(base, files, config, extra, logits, where, metadata)
    return out


def _metadata(folder: Path, files) -> list[dict[str, str]]:
    from optimum_superweight.format import read_safetensors_metadata

    return [read_safetensors_metadata([folder / name])[str(folder / name)] for name in files]


# -- corruptions: each edits (tensors by key, config) in place and returns the names an error must mention ----------
Corruption = Callable[[dict[str, torch.Tensor], dict[str, Any], Base], list[str]]


def _tensor_cases(module: str, twin: str, present: list[str]) -> dict[str, Corruption]:
    cases: dict[str, Corruption] = {}
    for name in present:
        key = f"{module}.{name}"

        def edit(fn, key=key):
            def corrupt(t, c, b):
                t[key] = fn(t[key])
                return [key, module]

            return corrupt

        cases[f"{name}:as-float32"] = edit(lambda x: x.to(torch.float32) if x.dtype != torch.float32 else x.double())
        cases[f"{name}:as-int8"] = edit(lambda x: x.to(torch.int8))
        cases[f"{name}:as-int32"] = edit(lambda x: x.to(torch.int32) if x.dtype != torch.int32 else x.to(torch.int64))
        cases[f"{name}:truncated"] = edit(lambda x: x[..., :-1].contiguous() if x.shape[-1] > 1 else x[:0].contiguous())
        cases[f"{name}:extra-row"] = edit(lambda x: torch.cat([x, x[:1]]).contiguous())
        cases[f"{name}:flattened"] = edit(lambda x: x.reshape(-1).contiguous())

        def remove(t, c, b, key=key):
            del t[key]
            return [key, module]

        cases[f"{name}:removed"] = remove
        if name in ("weight_scale", "weight_offset", "super_weight_values", "bias"):
            cases[f"{name}:x2+0.5"] = edit(lambda x: x * 2 + 0.5)  # + 0.5: GPT-2's biases start at 0
            cases[f"{name}:negated"] = edit(lambda x: -x)
            cases[f"{name}:nan"] = edit(lambda x: x.flatten().index_fill(0, torch.tensor([0]), float("nan")).reshape(x.shape))
            cases[f"{name}:inf"] = edit(lambda x: x.flatten().index_fill(0, torch.tensor([0]), float("inf")).reshape(x.shape))
            cases[f"{name}:zeros"] = edit(torch.zeros_like)
        else:
            cases[f"{name}:max-value"] = edit(lambda x: torch.full_like(x, torch.iinfo(x.dtype).max))
            cases[f"{name}:plus-one"] = edit(
                lambda x: (x.to(torch.int64) + 1).clamp(max=torch.iinfo(x.dtype).max).to(x.dtype)
            )
            cases[f"{name}:reversed"] = edit(lambda x: x.flip(0).contiguous())
        if name not in ("super_weight_indices", "super_weight_values"):

            def swap(t, c, b, name=name, key=key):
                other = f"{twin}.{name}"
                t[key], t[other] = t[other], t[key]
                return [key, other, module, twin]

            cases[f"{name}:swapped-with-twin"] = swap
    return cases


def _config_cases(base: Base) -> dict[str, Corruption]:
    q = "quantization_config"

    def setq(field_name, value):
        def corrupt(t, c, b):
            c[q][field_name] = value
            return [field_name]

        return corrupt

    def delq(field_name):
        def corrupt(t, c, b):
            del c[q][field_name]
            return [field_name]

        return corrupt

    cases: dict[str, Corruption] = {}
    for bits in (2, 3, 4, 8, 5, 4.0, True, "4"):
        if bits != base.bits or type(bits) is not int:
            cases[f"bits={bits!r}"] = setq("bits", bits)
    for size in (16, 64, 128, -1, 0, 10**12, 32.0):
        if size != base.group_size or type(size) is not int:
            cases[f"group_size={size!r}"] = setq("group_size", size)
    cases["symmetric-flipped"] = setq("symmetric", not base.symmetric)
    cases["symmetric=None"] = setq("symmetric", None)
    cases["symmetric-removed"] = delq("symmetric")
    for dtype in ("float16", "bfloat16", "float32", "float64", 16):
        if dtype != "float16":
            cases[f"scale_dtype={dtype}"] = setq("scale_dtype", dtype)
    cases["super_weights=[]"] = setq("super_weights", [])
    cases["super_weights-removed"] = delq("super_weights")
    cases["super_weights=null"] = setq("super_weights", None)
    cases["super_weights=string"] = setq("super_weights", "model.layers.1.mlp.down_proj")

    def edit_sw(fn, label):
        def corrupt(t, c, b):
            entries = c[q]["super_weights"]
            fn(entries, b)
            return ["super_weights", b.sw_module]

        cases[label] = corrupt

    if base.super_weight:
        edit_sw(lambda e, b: e[0].update(row=e[0]["row"] + 1), "super_weight-row+1")
        edit_sw(lambda e, b: e[0].update(col=e[0]["col"] + 1), "super_weight-col+1")
        edit_sw(lambda e, b: e[0].update(value=e[0]["value"] * 2), "super_weight-value-x2")
        edit_sw(lambda e, b: e[0].pop("value"), "super_weight-value-removed")
        edit_sw(lambda e, b: e[0].update(module=b.plain_module), "super_weight-moved-to-other-layer")
        edit_sw(lambda e, b: e[0].update(row=10**6), "super_weight-row-out-of-range")
        edit_sw(lambda e, b: e[0].update(row=True), "super_weight-row=True")
        edit_sw(lambda e, b: e.append(dict(e[0])), "super_weight-duplicated")
    edit_sw(lambda e, b: e.append({"module": b.plain_module, "row": 1, "col": 2, "value": 0.5}), "super_weight-added")
    edit_sw(lambda e, b: e.append({"module": "model.nope", "row": 1, "col": 2, "value": 0.5}), "super_weight-unknown-module")
    cases["modules_to_not_convert+layer"] = lambda t, c, b: (
        c[q]["modules_to_not_convert"].append(b.plain_module) or ["modules_to_not_convert", b.plain_module]
    )
    cases["modules_to_not_convert=[]"] = setq("modules_to_not_convert", [])
    cases["modules_to_not_convert=string"] = setq("modules_to_not_convert", "lm_head")
    cases["modules_to_not_convert-removed"] = delq("modules_to_not_convert")
    cases["digests-removed"] = delq("digests")
    cases["digests=string"] = setq("digests", "crc32:0")

    def edit_digests(fn, label):
        def corrupt(t, c, b):
            fn(c[q]["digests"], b)
            return ["digests", b.plain_module]

        cases[label] = corrupt

    edit_digests(lambda d, b: d.pop(b.plain_module), "digest-of-a-layer-removed")
    edit_digests(lambda d, b: d.update({b.plain_module: d[b.plain_module][:-1] + ("1" if d[b.plain_module][-1] == "0" else "0")}), "digest-altered")
    edit_digests(lambda d, b: d.update({b.plain_module: d[b.twin_module]}), "digests-swapped")
    edit_digests(lambda d, b: d.update({"lm_head": d[b.plain_module]}), "digest-for-dense-module")
    edit_digests(lambda d, b: d.update({b.plain_module: "md5:00"}), "digest-unknown-algorithm")
    cases["format_version=3"] = setq("format_version", 3)
    cases["format_version=2"] = setq("format_version", 2)
    cases["format_version='1'"] = setq("format_version", "1")
    cases["format_version=0"] = setq("format_version", 0)
    # The model's own config.json fields: they decide the shapes and the tying of the full-precision tensors.
    layers_key = "n_layer" if base.model_type == "gpt2" else "num_hidden_layers"
    cases["model:layers-1"] = lambda t, c, b: (c.__setitem__(layers_key, c[layers_key] - 1) or ["layers.1", "h.1"])
    cases["model:layers+1"] = lambda t, c, b: (c.__setitem__(layers_key, c[layers_key] + 1) or ["layers.2", "h.2"])
    cases["model:vocab+1"] = lambda t, c, b: (c.__setitem__("vocab_size", c["vocab_size"] + 1) or ["wte", "embed_tokens", "lm_head", "vocab_size"])
    cases["model:tie-flipped"] = lambda t, c, b: (
        c.__setitem__("tie_word_embeddings", not c.get("tie_word_embeddings", False)) or ["lm_head", "tie"]
    )
    # (activation_bits=8 on an 8-bit per-row checkpoint is a valid W8A8 config of the same tensors: it changes the
    # forward on purpose, so it is no corruption.)
    cases["activation_bits=8-on-4-bit"] = setq("activation_bits", 8) if base.bits != 8 else setq("activation_bits", 4)
    return cases


def _fp_cases(base: Base, keys: list[str]) -> dict[str, Corruption]:
    """Full-precision tensors removed, and tensors no module explains added."""
    cases: dict[str, Corruption] = {}
    quantized = {k.rpartition(".")[0] for k in keys if k.endswith(".weight_scale")}
    dense = [k for k in keys if k.rpartition(".")[0] not in quantized]
    for key in dense:

        def remove(t, c, b, key=key):
            del t[key]
            return [key]

        cases[f"removed:{key}"] = remove
    cases["extra:garbage"] = lambda t, c, b: (t.__setitem__("garbage", torch.zeros(3)) or ["garbage"])
    cases["extra:layer.foo"] = lambda t, c, b: (
        t.__setitem__(f"{b.plain_module}.foo", torch.zeros(3)) or [f"{b.plain_module}.foo"]
    )
    if base.symmetric:
        cases["extra:zero_point-on-symmetric"] = lambda t, c, b: (
            t.__setitem__(f"{b.plain_module}.weight_zero_point", torch.zeros_like(t[f"{b.plain_module}.weight_scale"], dtype=torch.uint8))
            or [f"{b.plain_module}.weight_zero_point", "symmetric"]
        )
    if not base.super_weight:
        cases["extra:super-weight-tensors-without-config"] = lambda t, c, b: (
            t.update({f"{b.plain_module}.super_weight_indices": torch.tensor([[1, 2]], dtype=torch.int32),
                      f"{b.plain_module}.super_weight_values": torch.tensor([0.5])})
            or [b.plain_module, "super_weights"]
        )
    return cases


#: Outcomes that must load (the model is exactly what was written): nothing the format needs was changed.
HARMLESS = {"unknown-key", "old-format-1", "format_version-1-explicit", "extra-super-weight-field"}


def _harmless_cases() -> dict[str, Corruption]:
    q = "quantization_config"

    def old_format(t, c, b):  # what optimum-superweight wrote before digests existed: no digests, no header metadata
        del c[q]["digests"]
        c["_strip_metadata"] = True
        return []

    return {
        "unknown-key": lambda t, c, b: (c[q].__setitem__("future_option", 1) or []),
        "old-format-1": old_format,
        "format_version-1-explicit": lambda t, c, b: (c[q].__setitem__("format_version", 1) or []),
        "extra-super-weight-field": lambda t, c, b: (
            [e.__setitem__("note", "x") for e in c[q]["super_weights"]] and []
        ),
    }


def _all_cases(saved: dict[str, Saved]) -> list[tuple[str, str]]:
    ids = []
    for base in BASES:
        keys = [k for tensors in saved[base.name].files.values() for k in tensors]
        for module in (base.sw_module if base.super_weight else None, base.plain_module):
            if module is None:
                continue
            present = [s.name for s in TENSORS if f"{module}.{s.name}" in keys]
            ids += [(base.name, f"{module}|{case}") for case in _tensor_cases(module, base.twin_module, present)]
        ids += [(base.name, f"config|{case}") for case in _config_cases(base)]
        ids += [(base.name, f"fp|{case}") for case in _fp_cases(base, keys)]
        ids += [(base.name, f"ok|{case}") for case in _harmless_cases()]
    return ids


def _corruption(entry: Saved, case_id: str) -> Corruption:
    kind, _, case = case_id.partition("|")
    base = entry.base
    keys = list(entry.where)
    if kind == "config":
        return _config_cases(base)[case]
    if kind == "fp":
        return _fp_cases(base, keys)[case]
    if kind == "ok":
        return _harmless_cases()[case]
    present = [s.name for s in TENSORS if f"{kind}.{s.name}" in keys]
    return _tensor_cases(kind, base.twin_module, present)[case]


def _write(entry: Saved, tensors: dict[str, torch.Tensor], config: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True)
    strip = config.pop("_strip_metadata", False) if isinstance(config, dict) else False
    (folder / "config.json").write_text(json.dumps(config))
    by_file: dict[str, dict[str, torch.Tensor]] = {name: {} for name in entry.files}
    first = next(iter(entry.files))
    for key, tensor in tensors.items():
        by_file[entry.where.get(key, first)][key] = tensor
    weight_map = {}
    for name, shard in by_file.items():
        save_file(shard, folder / name, metadata={"format": "pt"} if strip else entry.metadata[name])
        weight_map.update({key: name for key in shard})
    for name, text in entry.extra_files.items():
        if name.endswith(".index.json"):
            index = json.loads(text)
            index["weight_map"] = weight_map
            text = json.dumps(index)
        (folder / name).write_text(text)


def test_every_corruption_is_an_error_naming_it_or_the_exact_model(saved, tmp_path):
    garbage, unnamed, outcomes = [], [], {"error": 0, "exact": 0}
    for base_name, case_id in _all_cases(saved):
        entry = saved[base_name]
        tensors = {k: v.clone() for shard in entry.files.values() for k, v in shard.items()}
        config = copy.deepcopy(entry.config)
        names = _corruption(entry, case_id)(tensors, config, entry.base)
        folder = tmp_path / f"{base_name}-{len(outcomes) + sum(outcomes.values())}"
        _write(entry, tensors, config, folder)
        label = f"{base_name} {case_id}"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder)
        except Exception as error:  # noqa: BLE001 - every outcome is classified below
            outcomes["error"] += 1
            message = str(error)
            if not isinstance(error, (ValueError, TypeError, RuntimeError, OSError)):
                unnamed.append(f"{label}: {type(error).__name__} (a crash, not an error message): {message[:300]}")
            elif case_id.startswith("ok|"):
                garbage.append(f"{label}: a harmless change was refused: {message[:300]}")
            elif names and not any(n in message for n in names):
                unnamed.append(f"{label}: {type(error).__name__} names none of {names}: {message[:300]}")
        else:
            with torch.no_grad():
                logits = model(INPUT).logits
            if torch.equal(logits, entry.logits):
                outcomes["exact"] += 1
            else:
                garbage.append(f"{label}: loaded, logits differ by {(logits - entry.logits).abs().max().item():.3g}")
        shutil.rmtree(folder)
    assert not garbage, "\n".join(garbage)
    assert not unnamed, "\n".join(unnamed)
    assert outcomes["error"] > 200 and outcomes["exact"] >= len(BASES) * len(HARMLESS)
