#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test of `fedscore report` (tests/test_report.py),
# and a font for the report's Chinese tier names and reason labels: WenQuanYi Micro Hei (5 MB
# installed; Noto Sans CJK would be 89 MB). The Python driver (playwright, in the `dev` extra)
# never downloads a browser of its own: the test launches /usr/bin/chromium. Idempotent and
# non-interactive; needs root (or sudo) and apt.
set -euo pipefail
cd "$(dirname "$0")"

bash apt-ensure.sh chromium fonts-dejavu-core fonts-wqy-microhei

if [[ ! -x /usr/bin/chromium ]]; then
    echo "browser-setup: apt-get finished but /usr/bin/chromium is missing" >&2
    exit 1
fi
