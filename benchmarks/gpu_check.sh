#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the README's main job and generation at GPT-2 124M and the
# Llama 3.2 1B shape (bf16), batches 1, 8, 64; one JSON object at the end (see gpu_check.py).
# `benchmarks/gpu_check.sh --dry` checks the script on the CPU at toy shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
