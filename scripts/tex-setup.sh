#!/usr/bin/env bash
# Installs Debian's TeX Live for the test that compiles the report's tables.tex with pdflatex
# (tests/test_report.py): LaTeX with booktabs, and CJKutf8 with the AR PL SungtiL font for the
# Chinese tier names and reason labels. About 157 MB installed (54 MB downloaded); the Chinese
# part is 13 MB of it. Idempotent and non-interactive; needs root (or sudo) and apt.
set -euo pipefail
cd "$(dirname "$0")"

bash apt-ensure.sh texlive-latex-base texlive-latex-recommended latex-cjk-chinese \
    latex-cjk-chinese-arphic-gbsn00lp

for file in booktabs.sty array.sty graphicx.sty CJKutf8.sty c70gbsn.fd; do
    if ! kpsewhich "$file" >/dev/null; then
        echo "tex-setup: TeX Live is installed but $file is missing" >&2
        exit 1
    fi
done
