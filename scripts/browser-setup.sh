#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test of `fedscore report` (tests/test_report.py).
# The Python driver (playwright, in the `dev` extra) never downloads a browser of its own: the
# test launches /usr/bin/chromium. Idempotent and non-interactive; needs root (or sudo) and apt.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# The package lists on a fresh machine are empty or stale, so update before installing.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

if [[ ! -x "$CHROMIUM" ]]; then
    echo "browser-setup: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "browser-setup: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
