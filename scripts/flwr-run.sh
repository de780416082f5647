#!/usr/bin/env bash
# Run the app the Flower way, `flwr run .`, on a private local SuperLink, then stop every
# process that run started (flwr leaves its SuperLink running in the background).
#   bash scripts/flwr-run.sh [--run-config 'data-dir="parties/x" out-dir="runs/y"']
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 \
       RAY_USAGE_STATS_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
mkdir -p "$FLWR_HOME"

descendants() { # every process below PID $1
  local child
  for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done
}
stop_superlink() {
  # The local SuperLink that flwr starts keeps its log under our private FLWR_HOME.
  local pid pids=""
  for pid in $(pgrep -f -- "--log-file $FLWR_HOME/local-superlink" || true); do
    pids="$pids $pid $(descendants "$pid")"
  done
  # flwr-simulation is started with the SuperLink's launcher as --parent-pid, not as a child.
  for pid in $(pgrep -f -- "flwr-simulation .*--runtime-api-address" || true); do
    if tr '\0' ' ' < "/proc/$pid/environ" 2>/dev/null | grep -q "FLWR_HOME=$FLWR_HOME"; then
      pids="$pids $pid $(descendants "$pid")"
    fi
  done
  [ -n "${pids// /}" ] || return 0
  echo "stopping local SuperLink processes:$pids" >&2
  kill $pids 2>/dev/null || true
  for _ in $(seq 50); do  # up to 10 s to exit cleanly, then force
    alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && return 0
    sleep 0.2
  done
  kill -9 $alive 2>/dev/null || true
}
trap stop_superlink EXIT

if [ "$*" = "" ] && [ ! -d parties/default ]; then
  .venv/bin/fedscore generate --parties parties/default
fi
log="$FLWR_HOME/last-run.log"
flwr run . local --federation-config "num-supernodes=3" --stream "$@" 2>&1 | tee "$log"
# `flwr run --stream` exits 0 even when the ServerApp fails; Flower prints an exit code then.
if grep -q "Exit Code:" "$log"; then
  echo "error: the Flower run failed (see above)" >&2
  exit 1
fi
