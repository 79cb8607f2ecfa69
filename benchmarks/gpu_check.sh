#!/usr/bin/env bash
# GPU readiness check of TELL (issue 14): trains 30 TELL steps of a random-weight ~1.1B Llama built locally
# (or the model directory given first), then 64 greedy answers with the transformers backend and, where vLLM
# imports, with vLLM. Prints one JSON object on stdout; downloads nothing. < 10 min on one H100-class GPU.
#   benchmarks/gpu_check.sh [MODEL_DIR] [--device cpu] [--steps 30] [--answers 64] [--peak-tflops N] [--tokenizer DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
