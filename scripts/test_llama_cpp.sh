#!/usr/bin/env bash
# Extra CI step (not in scripts/test.sh): build llama-cpp-python from source (~10+ minutes on 2 cores, cached by
# pip afterwards), fetch llama.cpp's converter from its source distribution, and run the llama.cpp export tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q gguf sentencepiece compressed-tensors
python3 -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" python3 -m pip install llama-cpp-python
if [ -z "${OPTIMUM_SUPERWEIGHT_LLAMA_CPP:-}" ]; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/optimum_superweight/llama-cpp-python-sdist"
  mkdir -p "$cache"
  ls "$cache"/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py >/dev/null 2>&1 || {
    python3 -m pip download -q --no-binary :all: --no-deps llama-cpp-python -d "$cache"
    tar xzf "$cache"/llama_cpp_python-*.tar.gz -C "$cache"
  }
  export OPTIMUM_SUPERWEIGHT_LLAMA_CPP="$(ls -d "$cache"/llama_cpp_python-*/vendor/llama.cpp | tail -1)"
fi
PYTHONPATH="$PWD" python3 -m pytest -q -s -m llama_cpp tests/export "$@"
