#!/usr/bin/env bash
# README command 1: install, then run the main job on the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m optimum_superweight.cli demo "$@"
