#!/usr/bin/env bash
# Set up (if needed) and run the default experiment: 100,000 generated people, 3 silos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-runs/default-$(date +%Y%m%d-%H%M%S)}
exec .venv/bin/fedscore run --out "$out"
