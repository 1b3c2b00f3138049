#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (unit tests, doctests, SmolLM2 checks, llama.cpp,
# lm-eval). Skips print their reason (-rs in pyproject.toml): only hardware may cause one.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
echo "test.sh: setup took $(($(date +%s) - start)) s" >&2
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider --durations=10 "$@"
