#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (fast unit tests + slow SmolLM2 checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
