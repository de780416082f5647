#!/usr/bin/env bash
# Create .venv and install fedscore with its pinned dependencies (CPU-only torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: this resolves to the local CPU wheel; an unpinned torch would pull
# several GB of CUDA packages.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
if .venv/bin/python -m pip list 2>/dev/null | grep -i '^nvidia'; then
  echo "error: nvidia-* packages were installed; torch must be the CPU build" >&2
  exit 1
fi
