"""`fedscore report DIR`: a self-contained HTML report, LaTeX tables, figures and CSVs for a run
or sweep.

The report only reads the directory it describes and writes these into it: `report.html`
(every figure embedded as a base64 PNG, no external URL), `tables.tex` (booktabs tables for a
paper, see latex.py) with `tables-document.tex` (a document that compiles them),
`figures/*.pdf` and `figures/*.svg` (every figure, for a paper) and `report/*.csv` (the data
behind every table and figure, so figures can be redrawn in the paper's own style).

Optional inputs that a run may lack (curves.json, the privacy audit, a ledger, readable
scores) become a short "not available" note; a directory that is neither a run nor a sweep,
or a required file that is missing or corrupt, stops with a ReportError whose message names
the fix.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import struct
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from crypto.private_files import write_atomic
from simulations.report.blocks import (
    DPI,
    Block,
    Cards,
    Plot,
    ReportFiles,
    Section,
    Table,
    cells,
    is_numeric,
)
from simulations.report.latex import TEX_DOCUMENT, TEX_FILE, render_document, render_tex
from simulations.report.load import detect_kind, load_run, load_sweep
from simulations.report.run_sections import headline_run, run_sections
from simulations.report.sweep_sections import sweep_sections
from simulations.report.tune_sections import is_tune, load_tune, tune_sections

log = logging.getLogger(__name__)

HTML_FILE = "report.html"
CSV_DIR = "report"
FIGURE_DIR = "figures"
FIGURE_FORMATS = ("pdf", "svg")


# ---- rendering -------------------------------------------------------------------------------


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",
 "WenQuanYi Micro Hei","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
 color:#1d2733;background:#f6f7f9;margin:0;line-height:1.5}
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
    numeric = [is_numeric(t.frame[c]) for c in t.frame.columns]
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


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure in one format, with no date or software in it: a report written twice from
    the same run is the same bytes."""
    metadata = {"png": {"Software": None}, "pdf": {"Creator": None, "Producer": None,
                                                   "CreationDate": None},
                "svg": {"Creator": None, "Date": None}}[fmt]
    buf = io.BytesIO()
    # svg.hashsalt: SVG element ids are otherwise drawn at random on each save. pdf.fonttype
    # 42: TrueType fonts, which publishers accept (some refuse matplotlib's default Type 3).
    with mpl.rc_context({"svg.hashsalt": "fedscore", "pdf.fonttype": 42}):
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _html_plot(p: Plot, n: int, formats: tuple[str, ...]) -> str:
    png = figure_bytes(p.fig, "png")
    width, height = _png_size(png)
    # Drawn at DPI; shown at 96 dpi-equivalent so text matches the page's size.
    w, h = round(width * 96 / DPI), round(height * 96 / DPI)
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    note = f" {html.escape(p.note)}" if p.note else ""
    files = ", ".join(f"{FIGURE_DIR}/{html.escape(p.key)}.{f}" for f in formats)
    files = f"; figure for a paper: {files}" if files else ""
    return (f'<figure id="fig-{html.escape(p.key)}"><img src="{src}" alt="{html.escape(p.alt)}" '
            f'width="{w}" height="{h}"><figcaption><strong>Figure {n}.</strong> '
            f"{html.escape(p.title)}.{note} Data: {CSV_DIR}/{html.escape(p.key)}.csv{files}"
            "</figcaption></figure>")


def _html_block(block: Block, counter: _Counter, formats: tuple[str, ...]) -> str:
    if isinstance(block, Table):
        counter.tables += 1
        return _html_table(block, counter.tables)
    if isinstance(block, Plot):
        counter.figures += 1
        return _html_plot(block, counter.figures, formats)
    if isinstance(block, Cards):
        cards = "".join(f'<div class="card"><div class="v">{html.escape(v)}</div>'
                        f'<div class="k">{html.escape(k)}</div></div>' for k, v in block.items)
        return f'<div class="cards">{cards}</div>'
    return f'<p class="note">{html.escape(block.text)}</p>'


def render_html(title: str, source: Path, sections: list[Section],
                figure_formats: tuple[str, ...] = FIGURE_FORMATS) -> str:
    counter = _Counter()
    # Newlines between links: the only break opportunities in a line of nowrap links.
    nav = "\n".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>'
        + "".join(_html_block(b, counter, figure_formats) for b in s.blocks) + "</section>"
        for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(str(source))}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main>"
        f"<footer>fedscore report · LaTeX tables: {TEX_FILE} (compile {TEX_DOCUMENT}) · "
        + (f"figures as {' and '.join(f.upper() for f in figure_formats)}: {FIGURE_DIR}/ · "
           if figure_formats else "")
        + f"data behind every table and figure: {CSV_DIR}/*.csv</footer></body></html>\n"
    )


# ---- writing ---------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Whole or not at all, so a reader never sees half a report; readable by all (0644) like
    any report. Not fsynced: a report can be rebuilt from its run."""
    write_atomic(path, data, public=True, sync=False)


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


def _write_figures(directory: Path, sections: list[Section],
                   formats: tuple[str, ...]) -> list[Path]:
    """Every figure in each of `formats` in figures/, for a paper (the page embeds PNGs)."""
    plots = [b for s in sections for b in s.blocks if isinstance(b, Plot)]
    if not plots or not formats:
        return []
    figure_dir = directory / FIGURE_DIR
    figure_dir.mkdir(exist_ok=True)
    paths = []
    for plot in plots:
        for fmt in formats:
            path = figure_dir / f"{plot.key}.{fmt}"
            _write_atomic(path, figure_bytes(plot.fig, fmt))
            paths.append(path)
    return paths


def write_report(directory: Path, kind: str, title: str, sections: list[Section], *,
                 figure_formats: tuple[str, ...] = FIGURE_FORMATS) -> ReportFiles:
    """Write the page, the LaTeX tables and their document, the figures and the CSVs."""
    csv_dir = directory / CSV_DIR
    csv_dir.mkdir(exist_ok=True)
    csvs = []
    for key, frame in _csv_frames(sections).items():
        path = csv_dir / f"{key}.csv"
        _write_atomic(path, frame.to_csv(index=False).encode("utf-8"))
        csvs.append(path)
    figures = _write_figures(directory, sections, figure_formats)
    tex = directory / TEX_FILE
    _write_atomic(tex, render_tex(title, sections, directory.name).encode("utf-8"))
    _write_atomic(directory / TEX_DOCUMENT, render_document(title).encode("utf-8"))
    page = directory / HTML_FILE
    _write_atomic(page, render_html(title, directory, sections, figure_formats).encode("utf-8"))
    return ReportFiles(kind, page, tex, tuple(csvs), tuple(figures))


def build_report(directory: Path, *,
                 figure_formats: tuple[str, ...] = FIGURE_FORMATS) -> ReportFiles:
    """Read a run or sweep directory and write report.html, tables.tex (with
    tables-document.tex), every figure in figures/ (PDF and SVG unless `figure_formats` says
    otherwise; each format costs about 0.1 s a figure) and report/*.csv."""
    directory = Path(directory)
    name = directory.resolve().name
    if is_tune(directory):  # a `fedscore tune` directory: its release, then the chosen run
        sections = tune_sections(load_tune(directory))
        return write_report(directory.resolve(), "tune", f"fedscore report: tune {name}",
                            sections, figure_formats=figure_formats)
    kind = detect_kind(directory)
    if kind == "run":
        run = load_run(directory)
        sections = [headline_run(run), *run_sections(run)]
        title = f"fedscore report: run {name}"
    else:
        sweep = load_sweep(directory)
        sections = sweep_sections(sweep)
        title = f"fedscore report: sweep {name}"
    log.info("writing the %s report for %s (%d sections)", kind, directory, len(sections))
    return write_report(directory.resolve(), kind, title, sections,
                        figure_formats=figure_formats)
