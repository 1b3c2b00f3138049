#!/usr/bin/env bash
# Only the llama.cpp checks (they also run in scripts/test.sh): install and build what they need, then run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHONPATH="$PWD" exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider -s -m llama_cpp tests/export "$@"
