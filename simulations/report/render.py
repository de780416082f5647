"""`fedscore report DIR`: a self-contained HTML report, LaTeX tables and CSVs for a run or sweep.

The report only reads the directory it describes and writes three things into it:
`report.html` (every figure embedded as a base64 PNG, no external URL), `tables.tex` (booktabs
tables for a paper) and `report/*.csv` (the data behind every table and figure, so figures can
be redrawn in the paper's own style). Optional inputs that a run may lack (curves.json, the
privacy audit, a ledger, readable scores) become a short "not available" note; a directory that
is neither a run nor a sweep, or a required file that is missing or corrupt, stops with a
ReportError whose message names the fix.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from simulations.report.blocks import (
    DPI,
    Block,
    Cards,
    Plot,
    ReportFiles,
    Section,
    Table,
    cells,
    png_size,
    tex_escape,
)
from simulations.report.load import detect_kind, load_run, load_sweep
from simulations.report.run_sections import headline_run, run_sections
from simulations.report.sweep_sections import sweep_sections

log = logging.getLogger(__name__)

HTML_FILE = "report.html"
TEX_FILE = "tables.tex"
CSV_DIR = "report"


# ---- rendering -------------------------------------------------------------------------------


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",
 sans-serif;color:#1d2733;background:#f6f7f9;margin:0;line-height:1.5}
header{background:#1f4e79;color:#fff;padding:1.2rem 2rem}
header h1{margin:0 0 .2rem;font-size:1.6rem}
header p{margin:0;opacity:.85;font-size:.9rem;word-break:break-all}
nav{background:#fff;border-bottom:1px solid #dde2e8;padding:.5rem 2rem;font-size:.9rem}
nav a{color:#1f4e79;margin-right:1rem;text-decoration:none;white-space:nowrap}
main{max-width:1100px;margin:0 auto;padding:1rem 2rem 3rem}
section{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:1rem 1.5rem;
 margin:1.2rem 0}
h2{font-size:1.25rem;margin:.2rem 0 .8rem;color:#1f4e79}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.8rem;
 margin-bottom:1rem}
.card{background:#eef3f8;border-radius:6px;padding:.6rem .9rem}
.card .v{font-size:1.5rem;font-weight:600}.card .k{font-size:.8rem;color:#4a5868}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;display:block}
figcaption,.caption{font-size:.9rem;color:#4a5868;margin-top:.3rem}
.wrap{overflow-x:auto;margin:.8rem 0}
table{border-collapse:collapse;font-size:.88rem;min-width:40%}
caption{text-align:left;font-weight:600;padding:.3rem 0;color:#1d2733}
th,td{padding:.3rem .7rem;border-bottom:1px solid #e3e7ec;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #1d2733;background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
.note{background:#fff8e6;border-left:4px solid #e6a700;padding:.4rem .8rem;font-size:.9rem}
details summary{cursor:pointer;color:#1f4e79;font-weight:600}
footer{text-align:center;font-size:.8rem;color:#6b7785;padding:1rem}
"""
# Belt and braces for "self-contained": the page may load nothing but inline data.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Counter:
    def __init__(self) -> None:
        self.figures = 0
        self.tables = 0


def _html_table(t: Table, n: int) -> str:
    numeric = [_is_numeric(t.frame[c]) for c in t.frame.columns]
    head = "".join(f'<th scope="col"{" class=num" if num else ""}>{html.escape(str(c))}</th>'
                   for c, num in zip(t.frame.columns, numeric, strict=True))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if num else ""}>{html.escape(v)}</td>'
                         for v, num in zip(row, numeric, strict=True)) + "</tr>"
        for row in cells(t.frame))
    note = f'<p class="caption">{html.escape(t.note)} ' if t.note else '<p class="caption">'
    note += f"Data: {CSV_DIR}/{html.escape(t.data_key or t.key)}.csv</p>"
    table = (f'<div class="wrap"><table><caption>Table {n}. {html.escape(t.title)}</caption>'
             f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}")
    if t.collapsed:
        return (f"<details><summary>Table {n}. {html.escape(t.title)} (click to expand)"
                f"</summary>{table}</details>")
    return table


def _is_numeric(column: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    values = [v for v in column if v is not None]
    return bool(values) and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                                for v in values)


def _html_plot(p: Plot, n: int) -> str:
    width, height = png_size(p.png)
    # Drawn at DPI; shown at 96 dpi-equivalent so text matches the page's size.
    w, h = round(width * 96 / DPI), round(height * 96 / DPI)
    src = "data:image/png;base64," + base64.b64encode(p.png).decode("ascii")
    note = f" {html.escape(p.note)}" if p.note else ""
    return (f'<figure id="fig-{html.escape(p.key)}"><img src="{src}" alt="{html.escape(p.alt)}" '
            f'width="{w}" height="{h}"><figcaption><strong>Figure {n}.</strong> '
            f"{html.escape(p.title)}.{note} Data: {CSV_DIR}/{html.escape(p.key)}.csv"
            "</figcaption></figure>")


def _html_block(block: Block, counter: _Counter) -> str:
    if isinstance(block, Table):
        counter.tables += 1
        return _html_table(block, counter.tables)
    if isinstance(block, Plot):
        counter.figures += 1
        return _html_plot(block, counter.figures)
    if isinstance(block, Cards):
        cards = "".join(f'<div class="card"><div class="v">{html.escape(v)}</div>'
                        f'<div class="k">{html.escape(k)}</div></div>' for k, v in block.items)
        return f'<div class="cards">{cards}</div>'
    return f'<p class="note">{html.escape(block.text)}</p>'


def render_html(title: str, source: Path, sections: list[Section]) -> str:
    counter = _Counter()
    # Newlines between links: the only break opportunities in a line of nowrap links.
    nav = "\n".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>'
        + "".join(_html_block(b, counter) for b in s.blocks) + "</section>"
        for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(source))}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main>"
        f"<footer>fedscore report · LaTeX tables: {TEX_FILE} · data behind every table and "
        f"figure: {CSV_DIR}/*.csv</footer></body></html>\n"
    )


def _tex_table(t: Table) -> str:
    numeric = [_is_numeric(t.frame[c]) for c in t.frame.columns]
    spec = "".join("r" if num else "l" for num in numeric)
    head = " & ".join(tex_escape(str(c)) for c in t.frame.columns)
    rows = "\n".join("    " + " & ".join(tex_escape(v) for v in row) + r" \\"
                     for row in cells(t.frame))
    caption = tex_escape(t.title + (f". {t.note}" if t.note else ""))
    size = "  \\small\n" if len(t.frame.columns) > 6 else ""
    return (
        f"% {t.key}: data in {CSV_DIR}/{t.data_key or t.key}.csv\n"
        "\\begin{table}[htbp]\n  \\centering\n" + size
        + f"  \\caption{{{caption}}}\n  \\label{{tab:fedscore-{t.key.replace('_', '-')}}}\n"
        f"  \\begin{{tabular}}{{{spec}}}\n    \\toprule\n    {head} \\\\\n    \\midrule\n"
        f"{rows}\n    \\bottomrule\n  \\end{{tabular}}\n\\end{{table}}\n"
    )


def render_tex(title: str, sections: list[Section]) -> str:
    tables = [b for s in sections for b in s.blocks if isinstance(b, Table)]
    preamble = (
        f"% {tex_escape(title)}: tables written by `fedscore report`.\n"
        "% Needs \\usepackage{booktabs}. Chinese tier names go through \\fedscorezh: with\n"
        "% xeCJK or ctex loaded they print as they are; otherwise define\n"
        "% \\newcommand{\\fedscorezh}[1]{} before \\input{tables.tex} to leave them out.\n"
        "\\providecommand{\\fedscorezh}[1]{#1}\n\n"
    )
    return preamble + "\n".join(_tex_table(t) for t in tables)


# ---- writing ---------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_frames(sections: list[Section]) -> dict[str, pd.DataFrame]:
    frames: dict[str, pd.DataFrame] = {}
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Table) and b.data_key:
                continue
            if isinstance(b, Table | Plot):
                if b.key in frames:
                    raise AssertionError(f"two report blocks share the key {b.key!r}")
                frames[b.key] = b.frame if isinstance(b, Table) else b.data
    return frames


def write_report(directory: Path, title: str, sections: list[Section]) -> tuple[Path, Path,
                                                                                 list[Path]]:
    csv_dir = directory / CSV_DIR
    csv_dir.mkdir(exist_ok=True)
    csvs = []
    for key, frame in _csv_frames(sections).items():
        path = csv_dir / f"{key}.csv"
        _write_atomic(path, frame.to_csv(index=False).encode("utf-8"))
        csvs.append(path)
    tex = directory / TEX_FILE
    _write_atomic(tex, render_tex(title, sections).encode("utf-8"))
    page = directory / HTML_FILE
    _write_atomic(page, render_html(title, directory, sections).encode("utf-8"))
    return page, tex, csvs


def build_report(directory: Path) -> ReportFiles:
    """Read a run or sweep directory and write report.html, tables.tex and report/*.csv."""
    directory = Path(directory)
    kind = detect_kind(directory)
    name = directory.resolve().name
    if kind == "run":
        run = load_run(directory)
        sections = [headline_run(run), *run_sections(run)]
        title = f"fedscore report: run {name}"
    else:
        sweep = load_sweep(directory)
        sections = sweep_sections(sweep)
        title = f"fedscore report: sweep {name}"
    log.info("writing the %s report for %s (%d sections)", kind, directory, len(sections))
    page, tex, csvs = write_report(directory.resolve(), title, sections)
    return ReportFiles(kind, page, tex, tuple(csvs))
