"""tables.tex: the report's tables as booktabs LaTeX that pdflatex compiles and that fits a page.

Every table is typeset for the narrowest common text block (LaTeX's article class, 345 pt at
\\small). A table too wide for it first wraps its long text columns, then splits its columns
into parts that each repeat the columns naming a row; a long table splits its rows; whatever
still overflows is scaled down to the line width by \\fedscorefit. Headers are typeset from
the CSV's column names (`auc_central_dp` becomes "AUC central DP"), columns of means with
`_ci_low`/`_ci_high` become one "mean [low, high]" column, and every label carries the
report's directory name, so the tables of several reports can share one paper.

Text goes through `tex_escape`, whose output is plain ASCII apart from Chinese runs, and those
sit in \\fedscorezh (CJKutf8 under pdflatex, see PREAMBLE). `tables-document.tex`, written
beside tables.tex, is the smallest document that compiles it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import pandas as pd

from simulations.report.blocks import Section, Table, cells, is_numeric

TEX_FILE = "tables.tex"
TEX_DOCUMENT = "tables-document.tex"

# What tables.tex needs from the document that inputs it.
PACKAGES = ("booktabs", "array", "graphicx", "CJKutf8")

# The layout budget, in characters of \small Computer Modern (about 4.5 pt each) on a 345 pt
# line, with each column's padding counted as 3 characters.
LINE_CHARS = 74
PAD_CHARS = 3
MIN_WRAP = 12  # a text column wraps no narrower than this
SCALE_LIMIT = 1.12  # a table this much too wide is scaled down rather than split
ROW_LINES = 34  # rows per table part: a part and its caption stay on one page
MAX_KEYS = 3  # at most this many leading columns are repeated in each column part

# ---- escaping --------------------------------------------------------------------------------

_ASCII_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    # In LaTeX's default OT1 encoding these three print as other glyphs (¡, ¿, an em dash).
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
    '"': r"{\ttfamily\char34}",
    "-": "-{}",  # two hyphens would print as an en dash: a command's --out must stay --out
    "\u200b": r"\allowbreak{}",  # the break opportunities _breakable inserts
}
_TEXT = {
    "–": "--", "—": "---", "…": r"\ldots{}", "‘": "`", "’": "'", "“": "``", "”": "''",
    "\u00a0": "~", "§": r"\S{}", "·": r"\textperiodcentered{}",
}
# Typeset in math mode; neighbours merge into one formula ("−∞" is $-\infty$, not $-$$\infty$).
_MATH = {
    "−": "-", "∞": r"\infty", "ε": r"\varepsilon", "δ": r"\delta", "σ": r"\sigma",
    "μ": r"\mu", "α": r"\alpha", "β": r"\beta", "λ": r"\lambda", "Δ": r"\Delta",
    "≤": r"\le", "≥": r"\ge", "≠": r"\ne", "≈": r"\approx", "±": r"\pm", "×": r"\times",
    "→": r"\to", "←": r"\leftarrow", "°": r"^\circ", "√": r"\surd",
}
# Chinese (and the full-width punctuation it comes with) goes to \fedscorezh as one run.
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+")


def _plain(ch: str) -> str:
    """One character of ordinary text as ASCII LaTeX."""
    if ch in _ASCII_SPECIALS:
        return _ASCII_SPECIALS[ch]
    if ch in _TEXT:
        return _TEXT[ch]
    if ch.isascii():
        return ch if ch.isprintable() else " "
    # Accented letters lose their accent rather than stop pdflatex; anything else is marked.
    ascii_form = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode("ascii")
    return "".join(_plain(c) for c in ascii_form) if ascii_form else "?"


def tex_escape(text: str) -> str:
    """Plain text to LaTeX that any engine reads: ASCII, except Chinese runs, which go
    through \\fedscorezh (see PREAMBLE)."""
    out: list[str] = []
    math_run: list[str] = []
    position = 0
    for match in [*_CJK.finditer(text), None]:
        end = match.start() if match else len(text)
        for ch in text[position:end]:
            if ch in _MATH:
                math_run.append(_MATH[ch])
                continue
            if math_run:
                out.append("$" + " ".join(math_run) + "$")
                math_run = []
            out.append(_plain(ch))
        if match:
            if math_run:
                out.append("$" + " ".join(math_run) + "$")
                math_run = []
            out.append(rf"\fedscorezh{{{match.group()}}}")
            position = match.end()
    if math_run:
        out.append("$" + " ".join(math_run) + "$")
    return "".join(out)


_SCIENTIFIC = re.compile(r"^(-?\d(?:\.\d+)?)e([+-])0*(\d+)$")
_MINUS = re.compile(r"(^|\[|, )-(?=\d)")  # a hyphen that is a number's sign


def tex_number(cell: str) -> str:
    """A formatted number: a true minus sign, and 1.67e-05 as 1.67 x 10^-5. In a
    "mean [low, high]" cell every number gets its minus sign (a paired difference's interval
    is often below zero)."""
    m = _SCIENTIFIC.match(cell)
    if m:
        sign = "-" if m.group(2) == "-" else ""
        mantissa = m.group(1).replace("-", "$-$")
        return rf"{mantissa}$\times 10^{{{sign}{m.group(3)}}}$"
    return tex_escape(_MINUS.sub("\\1−", cell))


def _breakable(text: str) -> str:
    """Break opportunities in long words of a wrapped column (paths, keys, hashes)."""
    def split(word: str) -> str:
        if len(word) <= 10:
            return word
        word = re.sub(r"([/_=,:.])(?=\w)", "\\1\u200b", word)
        # English words hyphenate; hashes, numbers and very long runs are cut every 10.
        return re.sub(r"\w{11,}", lambda m: re.sub(r"(\w{10})(?=\w{3})", "\\1\u200b", m.group())
                      if len(m.group()) > 16 or re.search(r"\d", m.group()) else m.group(),
                      word)
    return re.sub(r"\S+", lambda m: split(m.group()), text)


# ---- headers ---------------------------------------------------------------------------------

_WORDS = {
    "auc": "AUC", "ks": "KS", "dp": "DP", "gbdt": "GBDT", "woe": "WoE", "ci": "CI",
    "tpr": "TPR", "fpr": "FPR", "roc": "ROC", "mlp": "MLP", "eps": "ε", "epsilon": "ε",
    "delta": "δ", "n": "n", "zh": "(Chinese)", "val": "validation", "abs": "absolute",
    "p10": "P10", "p50": "median", "p90": "P90", "sgd": "SGD", "id": "ID",
}


def header_text(name: str) -> str:
    """A CSV column name as a person reads it: auc_central_dp -> AUC central DP."""
    if "_" not in name and name.lower() not in _WORDS:
        return name  # already words ("seed benefit") or a config key ("train.lr")
    words = [_WORDS.get(w.lower(), w) for w in name.split("_") if w]
    return " ".join(words)


def _header_lines(text: str, width: int) -> list[str]:
    """A header wider than its column breaks once, at the space nearest its middle."""
    if len(text) <= max(width, 10) or " " not in text:
        return [text]
    spaces = [i for i, ch in enumerate(text) if ch == " "]
    cut = min(spaces, key=lambda i: abs(i - len(text) / 2))
    return [text[:cut], text[cut + 1:]]


# ---- columns ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Column:
    header: str  # plain text
    cells: tuple[str, ...]  # plain text, as the page shows them
    numeric: bool

    @property
    def cell_width(self) -> int:
        return max((_width(c) for c in self.cells), default=0)

    @property
    def width(self) -> int:
        return max(self.cell_width, *(_width(h) for h in
                                      _header_lines(self.header, self.cell_width)))


def _width(text: str) -> int:
    # A Chinese character is about as wide as two Latin ones.
    return len(text) + sum(len(m.group()) for m in _CJK.finditer(text))


def _intervals(frame: pd.DataFrame) -> tuple[list[tuple[str, list[str]]], bool]:
    """Column groups of the table: X_mean with X_ci_low and X_ci_high become one group."""
    names = [str(c) for c in frame.columns]
    groups: list[tuple[str, list[str]]] = []
    merged = False
    for name in names:
        if name.endswith(("_ci_low", "_ci_high")) and \
                f"{name.rsplit('_ci_', 1)[0]}_mean" in names:
            continue
        stem = name.removesuffix("_mean")
        bounds = [f"{stem}_ci_low", f"{stem}_ci_high"]
        if name.endswith("_mean") and all(b in names for b in bounds):
            groups.append((stem, [name, *bounds]))
            merged = True
        else:
            groups.append((name, [name]))
    return groups, merged


def table_columns(t: Table) -> tuple[list[Column], bool]:
    """The table's columns as typeset, and whether any holds "mean [low, high]" cells."""
    frame = t.frame
    shown = dict(zip(map(str, frame.columns), zip(*cells(frame), strict=True), strict=True)) \
        if len(frame) else {str(c): () for c in frame.columns}
    groups, merged = _intervals(frame)
    columns = []
    for stem, members in groups:
        parts = [shown[m] for m in members]
        values = tuple(p[0] if len(members) == 1 else f"{p[0]} [{p[1]}, {p[2]}]"
                       for p in zip(*parts, strict=True)) if len(frame) else ()
        columns.append(Column(header=header_text(stem), cells=values,
                              numeric=is_numeric(frame[members[0]])))
    return columns, merged


def key_count(frame: pd.DataFrame) -> int:
    """How many leading columns name a row: the fewest whose values are unique (at most 3)."""
    for k in range(1, min(MAX_KEYS, len(frame.columns)) + 1):
        if not frame.iloc[:, :k].astype(str).duplicated().any():
            return k
    return 1


# ---- layout ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Layout:
    columns: list[Column]
    wrap: dict[int, float]  # wrapped column index -> its width as a share of the line


def _total(widths: list[int]) -> int:
    return sum(w + PAD_CHARS for w in widths)


def _fits(columns: list[Column], wrap: dict[int, int]) -> int:
    """The table's width in characters with the columns of `wrap` wrapped at those widths."""
    return _total([wrap.get(i, c.width) for i, c in enumerate(columns)])


def _layout(columns: list[Column], wrap: dict[int, int]) -> Layout:
    return Layout(columns=columns,
                  wrap={i: round(w / (LINE_CHARS + 2), 3) for i, w in wrap.items()})


def _wrapped(columns: list[Column]) -> Layout | None:
    """The table as it fits the line, its widest text columns wrapped if need be, or None
    when no wrapping makes it fit."""
    if _fits(columns, {}) <= LINE_CHARS * SCALE_LIMIT:
        return _layout(columns, {})
    text = sorted((i for i, c in enumerate(columns) if not c.numeric and c.width > MIN_WRAP),
                  key=lambda i: -columns[i].width)
    # The fewest wrapped columns that fit; failing that, the narrowest that fits once scaled.
    options = []
    for k in range(1, len(text) + 1):
        chosen = text[:k]
        room = LINE_CHARS - _fits(columns, dict.fromkeys(chosen, 0))
        natural = sum(columns[i].width for i in chosen)
        wrap = {i: max(MIN_WRAP, room * columns[i].width // natural) for i in chosen}
        if _fits(columns, wrap) <= LINE_CHARS:
            return _layout(columns, wrap)
        options.append(wrap)
    best = min(options, key=lambda wrap: _fits(columns, wrap), default=None)
    if best is None or _fits(columns, best) > LINE_CHARS * SCALE_LIMIT:
        return None
    return _layout(columns, best)


def column_parts(columns: list[Column], keys: int) -> list[Layout]:
    """The table as one layout, or as several that each repeat the first `keys` columns; a
    part still too wide is scaled down by \\fedscorefit."""
    whole = _wrapped(columns)
    if whole is not None or len(columns) <= keys + 1:
        return [whole or _layout(columns, {})]
    head, tail = columns[:keys], columns[keys:]
    budget = LINE_CHARS - _total([c.width for c in head])
    count = max(1, math.ceil(_total([c.width for c in tail]) / max(budget, 1)))
    share = _total([c.width for c in tail]) / count  # parts of about equal width
    parts: list[list[Column]] = [[]]
    used = 0
    for column in tail:
        if parts[-1] and used + column.width + PAD_CHARS > share * len(parts) + PAD_CHARS:
            parts.append([])
        parts[-1].append(column)
        used += column.width + PAD_CHARS
    return [_wrapped(head + part) or _layout(head + part, {}) for part in parts]


def row_parts(layout: Layout, rows: int) -> list[range]:
    """Row ranges of at most ROW_LINES lines, counting the lines wrapped cells take."""
    parts: list[range] = []
    start, lines = 0, 0
    for r in range(rows):
        height = max([1] + [math.ceil(_width(c.cells[r]) / max(1.0, share * LINE_CHARS))
                            for i, share in layout.wrap.items()
                            for c in [layout.columns[i]]])
        if lines and lines + height > ROW_LINES:
            parts.append(range(start, r))
            start, lines = r, 0
        lines += height
    parts.append(range(start, rows))
    return parts


# ---- output ----------------------------------------------------------------------------------


def _spec(layout: Layout) -> str:
    specs = []
    for i, column in enumerate(layout.columns):
        if i in layout.wrap:
            specs.append(rf">{{\raggedright\arraybackslash}}p{{{layout.wrap[i]:g}\linewidth}}")
        else:
            specs.append("r" if column.numeric else "l")
    return "".join(specs)


def _head(layout: Layout) -> str:
    heads = []
    for i, column in enumerate(layout.columns):
        if i in layout.wrap:  # a wrapped column wraps its header too
            heads.append(tex_escape(column.header))
            continue
        lines = [tex_escape(line) for line in _header_lines(column.header, column.cell_width)]
        align = "r" if column.numeric else "l"
        heads.append(lines[0] if len(lines) == 1 else
                     rf"\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}{lines[0]}\\{lines[1]}"
                     r"\end{tabular}")
    return " & ".join(heads)


_NUMBER = re.compile(r"^-?\d[\d,]*(\.\d+)?(e[+-]\d+)?$")


def _cell(column: Column, row: int, wrapped: bool) -> str:
    text = column.cells[row]
    if column.numeric or _NUMBER.match(text):
        return tex_number(text)
    # \hspace{0pt}: TeX hyphenates no word that starts a paragraph, not even in a narrow cell.
    return r"\hspace{0pt}" + tex_escape(_breakable(text)) if wrapped else tex_escape(text)


def _tabular(layout: Layout, rows: range) -> str:
    body = "\n".join(
        "      " + " & ".join(_cell(c, r, i in layout.wrap)
                              for i, c in enumerate(layout.columns)) + r" \\"
        for r in rows)
    return (f"  \\fedscorefit{{%\n    \\begin{{tabular}}{{{_spec(layout)}}}\n"
            f"      \\toprule\n      {_head(layout)} \\\\\n      \\midrule\n"
            + (body + "\n" if body else "")
            + "      \\bottomrule\n    \\end{tabular}}\n")


def label_prefix(name: str) -> str:
    """The directory name as a label part: letters, digits and hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "report"


def _caption(t: Table, merged: bool, part: int, parts: int) -> str:
    text = t.title
    if parts > 1:
        text += f" (part {part} of {parts})"
    notes = [t.note] if t.note else []
    if merged:
        notes.append("x [a, b]: the mean and its interval (ci_low, ci_high in the CSV)")
    caption = tex_escape(text + "".join(f". {n.rstrip('.')}" for n in notes) + ".")
    return tex_escape(text) if part > 1 else caption


def tex_table(t: Table, prefix: str) -> tuple[str, list[str]]:
    """One report table as LaTeX (one float per part) and the labels it defines."""
    if not len(t.frame.columns):
        return f"% {t.key}: an empty table, left out\n", []
    columns, merged = table_columns(t)
    layouts = column_parts(columns, key_count(t.frame))
    pieces = [(layout, rows) for layout in layouts
              for rows in row_parts(layout, len(t.frame))]
    label = f"tab:{prefix}:{t.key.replace('_', '-')}"
    out = [f"% {t.key}: data in report/{t.data_key or t.key}.csv\n"]
    labels = []
    for n, (layout, rows) in enumerate(pieces, start=1):
        labels.append(label if n == 1 else f"{label}-{n}")
        out.append(
            "\\begin{table}[htbp]\n  \\centering\n  \\small\n"
            f"  \\caption{{{_caption(t, merged, n, len(pieces))}}}\n"
            f"  \\label{{{labels[-1]}}}\n{_tabular(layout, rows)}\\end{{table}}\n")
    return "".join(out), labels


PREAMBLE = r"""% Needs \usepackage{booktabs,array,graphicx,CJKutf8} in the preamble (Debian:
% texlive-latex-base, texlive-latex-recommended, latex-cjk-chinese and
% latex-cjk-chinese-arphic-gbsn00lp, which scripts/tex-setup.sh installs);
% tables-document.tex beside this file is the smallest document that compiles it.
% Chinese tier names and reason labels go through \fedscorezh: under pdflatex with CJKutf8
% they are set in AR PL SungtiL (gbsn); under XeLaTeX or LuaLaTeX (with xeCJK, ctex or
% luatexja for a font) as they are; otherwise they are left out with a warning. Define
% \fedscorezh before \input{tables.tex} to choose otherwise. \fedscorefit scales a table
% down to the line width only when it would not fit.
\ifdefined\fedscorezh\else
  \DeclareRobustCommand{\fedscorezh}[1]{%
    \ifdefined\CJK\begin{CJK}{UTF8}{gbsn}#1\end{CJK}%
    \else\ifdefined\XeTeXversion#1%
    \else\ifdefined\directlua#1%
    \else --\PackageWarning{fedscore}{Chinese text left out: load CJKutf8}%
    \fi\fi\fi}
\fi
\ifdefined\fedscorefit\else
  \newsavebox{\fedscorebox}
  \newcommand{\fedscorefit}[1]{\sbox{\fedscorebox}{#1}%
    \ifdim\wd\fedscorebox>\linewidth\resizebox{\linewidth}{!}{\usebox{\fedscorebox}}%
    \else\usebox{\fedscorebox}\fi}
\fi
"""


def render_tex(title: str, sections: list[Section], name: str) -> str:
    """tables.tex for the report of the directory called `name`."""
    prefix = label_prefix(name)
    tables, labels = [], []
    for t in (b for s in sections for b in s.blocks if isinstance(b, Table)):
        text, defined = tex_table(t, prefix)
        tables.append(text)
        labels += defined
    if len(set(labels)) != len(labels):
        raise AssertionError(f"two report tables share a LaTeX label: {sorted(labels)}")
    return f"% {tex_escape(title)}: tables written by `fedscore report`.\n{PREAMBLE}\n" + \
        "\n".join(tables)


def render_document(title: str) -> str:
    """The smallest document that compiles tables.tex: pdflatex tables-document.tex."""
    return (f"% {tex_escape(title)}: compile with `pdflatex {TEX_DOCUMENT}` beside {TEX_FILE}.\n"
            "\\documentclass{article}\n"
            f"\\usepackage{{{','.join(PACKAGES)}}}\n"
            "\\begin{document}\n"
            f"\\input{{{TEX_FILE}}}\n"
            "\\end{document}\n")
