#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet (no recommends).
# Idempotent and non-interactive: with every package present it does nothing, not even
# `apt-get update`. Needs root (or sudo) and apt. Used by browser-setup.sh and tex-setup.sh.
set -euo pipefail

missing=()
for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$package")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

SUDO=""
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists on a fresh machine are empty or stale, so update before installing.
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "apt-ensure: installed ${missing[*]}"
