#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/browser-setup.sh  # Debian's Chromium and a Chinese font for the report's browser test
bash scripts/tex-setup.sh  # Debian's TeX Live: the test that compiles the report's tables.tex
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the dependency rules: [tool.importlinter] in pyproject.toml
.venv/bin/mypy  # types: [tool.mypy] in pyproject.toml
.venv/bin/python -m pytest "$@"
