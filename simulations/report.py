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
import io
import json
import logging
import math
import os
import re
import shlex
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from server.privacy import model_epsilon
from server.scoring import SCORE_MAX, SCORE_MIN, TIER_KEYS, TIERS

log = logging.getLogger(__name__)

HTML_FILE = "report.html"
TEX_FILE = "tables.tex"
CSV_DIR = "report"
RUN_REQUIRED = ("config.json", "manifest.json", "metrics.json")
SWEEP_REQUIRED = ("sweep.json", "sweep.csv", "summary.csv")
SWEEP_COLUMNS = ("epsilon", "seed", "run", "status", "auc")
SUMMARY_COLUMNS = ("epsilon", "auc_mean", "auc_ci_low", "auc_ci_high")
# The representative run of a sweep: the default experiment's budget and first seed.
PREFERRED_RUN = {"epsilon": 1.0, "seed": 0}
DPI = 130
Z95 = 1.959963984540054

# One colour per tier, from risky to safe; the tiers' names, ranges and benefits come from
# server.scoring.TIERS, the single place that defines them.
TIER_COLOURS = {
    "watch": "#c0392b",
    "fair": "#e67e22",
    "good": "#d4ac0d",
    "excellent": "#27ae60",
    "exceptional": "#2471a3",
}
# Models compared throughout, with one colour each so every figure reads the same way.
SERIES = {
    "federated": ("federated", "#1f4e79"),
    "central": ("central, non-private", "#555555"),
    "central_dp": ("central, DP", "#c0392b"),
    "best_silo": ("best single silo", "#e67e22"),
    "payments_only": ("payments silo only", "#e67e22"),
    "oracle": ("oracle", "#27ae60"),
}


class ReportError(ValueError):
    """A directory the report cannot describe; the message says what to do about it."""


# ---- the report's building blocks ------------------------------------------------------------


@dataclass
class Table:
    key: str  # file stem of the CSV and LaTeX label
    title: str
    frame: pd.DataFrame
    note: str = ""
    collapsed: bool = False  # long tables fold away in the HTML page
    data_key: str = ""  # set when a figure's CSV already holds this table's data


@dataclass
class Plot:
    key: str
    title: str
    alt: str
    png: bytes
    data: pd.DataFrame
    note: str = ""


@dataclass
class Note:
    text: str


@dataclass
class Cards:
    items: list[tuple[str, str]]


Block = Table | Plot | Note | Cards


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class ReportFiles:
    kind: str
    html: Path
    tex: Path
    csvs: tuple[Path, ...]


# ---- reading ---------------------------------------------------------------------------------


@dataclass
class Curves:
    roc: pd.DataFrame | None = None
    ks: pd.DataFrame | None = None
    histogram: pd.DataFrame | None = None
    calibration: pd.DataFrame | None = None
    contributions: pd.DataFrame | None = None
    reasons: pd.DataFrame | None = None


@dataclass
class RunData:
    path: Path
    config: dict
    manifest: dict
    metrics: dict
    ledger: list[dict] | None
    curves: Curves | None
    scores: pd.DataFrame | None
    scores_note: str


@dataclass
class SweepData:
    path: Path
    config: dict
    runs: pd.DataFrame
    summary: pd.DataFrame
    representative: RunData | None
    representative_name: str | None


def detect_kind(directory: Path) -> str:
    """'run' or 'sweep'; a ReportError naming what was expected otherwise."""
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory; pass a run directory (from "
                          "`fedscore run --out DIR`) or a sweep directory")
    if any((directory / name).exists() for name in SWEEP_REQUIRED):
        return "sweep"
    if (directory / "metrics.json").exists() or (directory / "manifest.json").exists():
        return "run"
    raise ReportError(
        f"{directory} is neither a run directory (config.json, manifest.json, metrics.json) "
        "nor a sweep directory (sweep.json, sweep.csv, summary.csv); pass the directory that "
        "`fedscore run --out` or the sweep wrote"
    )


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise ReportError(f"{path} is missing: {what}")


def _read_json(path: Path, what: str) -> Any:
    _require(path, what)
    try:
        # Python's json reads the Infinity that config.json uses for an unlimited budget.
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is corrupt ({exc}); {what}") from None


def _read_object(path: Path, what: str) -> dict:
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise ReportError(f"{path} should hold a JSON object; {what}")
    return data


def _read_csv(path: Path, columns: Iterable[str], what: str) -> pd.DataFrame:
    _require(path, what)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is corrupt ({exc}); {what}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"{path} lacks column(s) {', '.join(missing)}; {what}")
    # "inf" marks the non-private point; anything else unreadable is a corrupt sweep.
    frame["epsilon"] = pd.to_numeric(frame["epsilon"], errors="coerce")
    if frame["epsilon"].isna().any():
        raise ReportError(f"{path} has a non-numeric epsilon; {what}")
    return frame


def _read_ledger(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{number} is not JSON ({exc.msg}); the ledger is corrupt: "
                              "restore it from the run (`fedscore ledger verify` checks it)"
                              ) from None
        if not isinstance(entry, dict) or not {"party", "budget", "epsilon"} <= entry.keys():
            raise ReportError(f"{path}:{number} lacks party, budget or epsilon; the ledger is "
                              "corrupt: restore it from the run")
        entries.append(entry)
    return entries


def _read_scores(run_dir: Path) -> tuple[pd.DataFrame | None, str]:
    path = run_dir / "scores.parquet"
    if not path.exists():
        if (run_dir / "scores.parquet.enc").exists():
            return None, ("scores are encrypted at rest (scores.parquet.enc), so figures that "
                          "need individual scores come only from curves.json")
        return None, "the run has no scores.parquet"
    try:
        scores = pd.read_parquet(path, columns=["split", "probability", "score", "tier"])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ReportError(f"{path} cannot be read ({exc}); restore it from the run or re-run "
                          "`fedscore run`") from None
    return scores, ""


def load_run(run_dir: Path) -> RunData:
    fix = f"{run_dir} is not a complete run; re-run `fedscore run --out DIR` to produce it"
    for name in RUN_REQUIRED:
        _require(run_dir / name, fix)
    metrics = _read_object(run_dir / "metrics.json", fix)
    if "auc" not in metrics:
        raise ReportError(f"{run_dir / 'metrics.json'} has no 'auc'; {fix}")
    curves_path = run_dir / "curves.json"
    curves = None
    if curves_path.exists():
        curves = parse_curves(_read_object(curves_path, "re-run to rewrite it"), curves_path)
    scores, scores_note = _read_scores(run_dir)
    return RunData(
        path=run_dir,
        config=_read_object(run_dir / "config.json", fix),
        manifest=_read_object(run_dir / "manifest.json", fix),
        metrics=metrics,
        ledger=_read_ledger(run_dir / "ledger.jsonl"),
        curves=curves,
        scores=scores,
        scores_note=scores_note,
    )


def load_sweep(sweep_dir: Path) -> SweepData:
    fix = f"{sweep_dir} is not a complete sweep; re-run the sweep to produce it"
    config = _read_object(sweep_dir / "sweep.json", fix)
    runs = _read_csv(sweep_dir / "sweep.csv", SWEEP_COLUMNS, fix)
    summary = _read_csv(sweep_dir / "summary.csv", SUMMARY_COLUMNS, fix)
    name = _representative(runs)
    rep = None
    if name is not None:
        # Runs live in DIR/runs/<name> (simulations/sweep.py); DIR/<name> is accepted too.
        run_dir = (sweep_dir / "runs" / name).resolve()
        if not run_dir.is_dir():
            run_dir = (sweep_dir / name).resolve()
        if sweep_dir.resolve() not in run_dir.parents or not run_dir.is_dir():
            raise ReportError(f"sweep.csv lists run {name!r} as done but "
                              f"{sweep_dir / 'runs' / name} is not a directory inside the "
                              "sweep; restore it or re-run that point")
        rep = load_run(run_dir)
    return SweepData(sweep_dir, config, runs.sort_values(["epsilon", "seed"]),
                     summary.sort_values("epsilon"), rep, name)


def _representative(runs: pd.DataFrame) -> str | None:
    done = runs[runs["status"].astype(str) == "done"]
    if done.empty:
        return None
    preferred = done[(done["epsilon"] == PREFERRED_RUN["epsilon"])
                     & (pd.to_numeric(done["seed"], errors="coerce") == PREFERRED_RUN["seed"])]
    row = preferred.iloc[0] if len(preferred) else done.iloc[0]
    return str(row["run"])


# ---- curves.json -----------------------------------------------------------------------------


def parse_curves(raw: dict, path: Path) -> Curves:
    """Each part of curves.json as a frame; a malformed part is a corrupt file."""
    parsers: dict[str, Callable[[Any], pd.DataFrame]] = {
        "roc": _parse_roc, "ks": _parse_ks, "score_histogram": _parse_histogram,
        "calibration_by_tier": _parse_calibration, "contributions": _parse_contributions,
        "reasons": _parse_reasons,
    }
    parsed: dict[str, pd.DataFrame | None] = {}
    for key, parse in parsers.items():
        try:
            parsed[key] = parse(raw[key]) if raw.get(key) is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{path}: part {key!r} is malformed ({exc}); re-run to rewrite "
                              "curves.json, or move it aside to report without curves") from None
    return Curves(parsed["roc"], parsed["ks"], parsed["score_histogram"],
                  parsed["calibration_by_tier"], parsed["contributions"], parsed["reasons"])


def _columns(raw: dict, names: Iterable[str]) -> pd.DataFrame:
    data = {n: np.asarray(raw[n], dtype=np.float64) for n in names}
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"{', '.join(names)} differ in length")
    return pd.DataFrame(data)


def _parse_roc(raw: dict) -> pd.DataFrame:
    return _columns(raw, ("fpr", "tpr"))


def _parse_ks(raw: dict) -> pd.DataFrame:
    return _columns(raw, ("score", "cdf_bad", "cdf_good"))


def _parse_histogram(raw: dict) -> pd.DataFrame:
    edges = np.asarray(raw["bin_edges"], dtype=np.float64)
    frame = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:]})
    unknown = set(raw["counts"]) - set(TIER_KEYS)
    if unknown:
        raise ValueError(f"unknown tier(s) {', '.join(sorted(unknown))}")
    for key in TIER_KEYS:
        counts = np.asarray(raw["counts"].get(key, np.zeros(len(frame))), dtype=np.int64)
        if len(counts) != len(frame):
            raise ValueError(f"counts[{key!r}] has {len(counts)} bins, bin_edges {len(frame)}")
        frame[key] = counts
    return frame


def _parse_calibration(raw: list) -> pd.DataFrame:
    cols = ("tier", "n", "mean_predicted", "observed_default_rate", "ci_low", "ci_high")
    frame = pd.DataFrame([{c: row[c] for c in cols} for row in raw], columns=list(cols))
    for c in cols[1:]:
        frame[c] = pd.to_numeric(frame[c])
    return frame


def _parse_contributions(raw: dict) -> pd.DataFrame:
    cols = ("mean_abs_points", "p10", "p50", "p90")
    rows = [{"silo": silo, **{c: float(v[c]) for c in cols}} for silo, v in raw.items()]
    return pd.DataFrame(rows, columns=["silo", *cols])


def _parse_reasons(raw: dict) -> pd.DataFrame:
    rows = [{"reason": code, "first": int(v["first"]), "listed": int(v["listed"]),
             "mean_points": float(v["mean_points"])} for code, v in raw.items()]
    return pd.DataFrame(rows, columns=["reason", "first", "listed", "mean_points"])


# ---- formatting ------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A value as a person reads it in a table (CSVs keep full precision)."""
    if value is None:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return _fmt_float(float(value))
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _fmt_float(v: float) -> str:
    if math.isnan(v):
        return "–"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    # Fixed decimals within a range so a column of AUCs lines up (0.8630, not 0.863).
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    if abs(v) >= 0.01:
        return f"{v:.4f}"
    return f"{v:.3g}"


def fmt_eps(v: float) -> str:
    """A privacy budget as it was set: 0.5, 1, 8, ∞."""
    return "∞" if math.isinf(v) else f"{v:g}"


def column_formatter(values: Iterable[Any]) -> Callable[[Any], str]:
    """fmt, except that a column of round settings (ε 0.5, 1, 4) is shown without padding
    while a column of measurements keeps fixed decimals so it lines up."""
    floats = [float(v) for v in values if isinstance(v, float | np.floating) and math.isfinite(v)]
    if floats and all(round(v, 2) == v for v in floats):
        return lambda v: (f"{v:g}" if isinstance(v, float | np.floating) and math.isfinite(v)
                          else fmt(v))
    return fmt


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    formatters = [column_formatter(frame[c]) for c in frame.columns]
    return [[f(v) for f, v in zip(formatters, row, strict=True)]
            for row in frame.itertuples(index=False, name=None)]


def fmt_interval(mean: float, low: float, high: float) -> str:
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


_TEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "∞": r"$\infty$", "–": "--", "−": "$-$", "ε": r"$\varepsilon$", "…": r"\ldots{}",
}
_CJK = re.compile(r"[\u3400-\u9fff]+")


def tex_escape(text: str) -> str:
    """Plain text to LaTeX; Chinese runs go through \\fedscorezh so a paper without CJK fonts
    can drop or typeset them (see the preamble of tables.tex)."""
    escaped = "".join(_TEX_SPECIALS.get(ch, ch) for ch in text)
    return _CJK.sub(lambda m: rf"\fedscorezh{{{m.group()}}}", escaped)


def _finite(value: Any) -> float | None:
    """A number that can be plotted, or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---- figures ---------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.8) -> tuple[Figure, Axes]:
    # Figure without pyplot: no global state, always the Agg canvas, safe in any thread.
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software metadata: the PNG should not even carry matplotlib's URL.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _eps_axis(ax: Axes, eps: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Log x-axis over the finite epsilons with ∞ drawn at the right edge; returns the map
    from epsilon to x position."""
    finite = np.unique(eps[np.isfinite(eps) & (eps > 0)])
    top = float(finite.max()) if finite.size else 1.0
    inf_x = top * 4.0 if finite.size else 1.0
    ticks, labels = list(finite), [f"{v:g}" for v in finite]
    if np.isinf(eps).any():
        ticks.append(inf_x)
        labels.append("∞")
        if finite.size:
            # A dotted break: the gap between the last budget and ∞ is not to scale.
            ax.axvline(math.sqrt(top * inf_x), color="#999999", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("privacy budget ε (log scale; ∞ = non-private)")
    return lambda e: np.where(np.isinf(e), inf_x, e)


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])
    return width, height


# ---- run sections ----------------------------------------------------------------------------


def _model_epsilon(metrics: dict) -> float | None:
    """The combined model's epsilon (vertical), the largest region's (horizontal)."""
    value = model_epsilon(metrics)
    return _finite(value) if value is not None else None


def _headline_run(run: RunData) -> Section:
    m = run.metrics
    eps = _model_epsilon(m)
    audit = m.get("audit") or {}
    cards = Cards([
        ("test AUC", fmt(m.get("auc"))), ("KS", fmt(m.get("ks"))), ("Gini", fmt(m.get("gini"))),
        ("ε model (combined model)", fmt(eps) if eps is not None else "non-private"),
        ("oracle AUC", fmt(m.get("oracle_auc"))),
        ("audit ε lower bound (canaries)",
         fmt((audit.get("canary") or {}).get("epsilon_lower_bound"))),
    ])
    keys = ("auc", "ks", "gini", "brier", "log_loss", "oracle_auc", "baseline_central_auc",
            "baseline_central_dp_auc", "baseline_payments_only_auc")
    rows = [(k, m.get(k)) for k in keys]
    rows += [("epsilon_model", eps), ("epsilon_label", (m.get("epsilon") or {}).get("label")),
             ("delta", m.get("delta")),
             ("audit_canary_epsilon_lower", (audit.get("canary") or {}).get("epsilon_lower_bound")),
             ("audit_epsilon_lower", audit.get("epsilon_lower")),
             ("people_aligned", (m.get("people") or {}).get("aligned")),
             ("people_test", (m.get("people") or {}).get("test"))]
    headline = Table("headline", "Headline numbers (test split)",
                     pd.DataFrame(rows, columns=["metric", "value"]).astype({"value": object}))
    return Section("headline", "Headline numbers", [cards, headline, _comparison_table(m)])


def _comparison_table(m: dict) -> Table:
    cols = ("auc", "ks", "gini", "brier", "log_loss")
    rows = [{"model": SERIES["federated"][0], **{c: m.get(c) for c in cols}}]
    baselines = m.get("baselines") or {}
    order = ["central", "central_dp", "payments_only"]
    for key in sorted(baselines, key=lambda k: (order.index(k) if k in order else 99, k)):
        values = baselines[key]
        label = SERIES.get(key, (key, ""))[0]
        rows.append({"model": label, **{c: (values or {}).get(c) for c in cols}})
    if m.get("oracle_auc") is not None:
        rows.append({"model": SERIES["oracle"][0], "auc": m["oracle_auc"]})
    frame = pd.DataFrame(rows, columns=["model", *cols])
    return Table("model_comparison", "Federated model against the baselines (test split)", frame,
                 note="The oracle uses the generator's true default probabilities.")


def _learning_section(run: RunData) -> Section:
    section = Section("learning", "Learning curves")
    history = run.metrics.get("history") or {}
    rows = [{"model": model, "epoch": h.get("epoch"), "val_auc": h.get("val_auc"),
             "val_loss": h.get("val_loss"), "seconds": h.get("seconds")}
            for model, entries in history.items() for h in entries or []]
    if not rows:
        section.blocks.append(Note("Learning curves not available: metrics.json has no history."))
        return section
    data = pd.DataFrame(rows)
    fig, ax = _figure()
    for model, part in data.groupby("model", sort=False):
        label, colour = SERIES.get(str(model), (str(model), None))
        ax.plot(part["epoch"], part["val_auc"], marker="o", label=label, color=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    models = ", ".join(SERIES.get(str(k), (str(k), ""))[0] for k in data["model"].unique())
    section.blocks.append(Plot(
        "learning_curves", "Validation AUC by epoch", png=_png(fig), data=data,
        alt=f"Line chart of validation AUC against training epoch for {models}.",
    ))
    return section


def _histogram_data(run: RunData) -> tuple[pd.DataFrame | None, str]:
    if run.curves is not None and run.curves.histogram is not None:
        return run.curves.histogram, "Everyone scored, from curves.json."
    if run.scores is None:
        return None, run.scores_note
    # Older runs lack curves.json: count the published test scores directly.
    test = run.scores[run.scores["split"].astype(str) == "test"]
    edges = np.arange(SCORE_MIN, SCORE_MAX + 1, 10, dtype=np.float64)
    frame = pd.DataFrame({"bin_low": edges[:-1], "bin_high": edges[1:]})
    for key in TIER_KEYS:
        values = test.loc[test["tier"].astype(str) == key, "score"].to_numpy()
        frame[key] = np.histogram(values, bins=edges)[0]
    return frame, "Test split, counted from scores.parquet (the run has no curves.json)."


def _histogram_plot(data: pd.DataFrame, note: str) -> Plot:
    fig, ax = _figure()
    left = data["bin_low"].to_numpy()
    width = (data["bin_high"] - data["bin_low"]).to_numpy()
    bottom = np.zeros(len(data))
    for tier in TIERS:
        counts = data[tier.key].to_numpy()
        ax.bar(left, counts, width=width, bottom=bottom, align="edge", color=TIER_COLOURS[tier.key],
               label=f"{tier.key} ({tier.low}–{tier.high})", edgecolor="white", linewidth=0.3)
        bottom = bottom + counts
    ax.set_xlabel("score")
    ax.set_ylabel("people")
    ax.set_xlim(SCORE_MIN, SCORE_MAX)
    ax.legend(frameon=False, fontsize="small")
    return Plot("score_histogram", "Score distribution coloured by tier", png=_png(fig),
                data=data, note=note,
                alt="Stacked histogram of scores from 300 to 850, each bar coloured by tier "
                    "(watch, fair, good, excellent, exceptional).")


def _calibration_data(run: RunData) -> tuple[pd.DataFrame | None, str]:
    if run.curves is not None and run.curves.calibration is not None:
        return run.curves.calibration, "Test split, from curves.json; 95 % intervals."
    rates = run.metrics.get("test_default_rate_by_tier")
    if run.scores is None or not rates:
        return None, run.scores_note or "metrics.json has no default rate by tier"
    test = run.scores[run.scores["split"].astype(str) == "test"]
    rows = []
    for key in TIER_KEYS:
        part = test[test["tier"].astype(str) == key]
        n, rate = len(part), rates.get(key)
        if n == 0 or rate is None:
            continue
        low, high = wilson(rate, n)
        rows.append({"tier": key, "n": n, "mean_predicted": float(part["probability"].mean()),
                     "observed_default_rate": rate, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows), ("Test split: predictions from scores.parquet, observed rates "
                                "from metrics.json, Wilson 95 % intervals.")


def wilson(rate: float, n: int) -> tuple[float, float]:
    """Wilson score interval (95 %) for a binomial proportion."""
    denom = 1 + Z95**2 / n
    centre = (rate + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _calibration_plot(data: pd.DataFrame, note: str) -> Plot:
    fig, ax = _figure(5.6, 4.4)
    pred, obs = data["mean_predicted"].to_numpy(), data["observed_default_rate"].to_numpy()
    low, high = data["ci_low"].to_numpy(), data["ci_high"].to_numpy()
    for i, key in enumerate(data["tier"]):
        ax.errorbar(pred[i], obs[i], yerr=[[obs[i] - low[i]], [high[i] - obs[i]]], fmt="o",
                    color=TIER_COLOURS.get(str(key), "#333333"), capsize=3, label=str(key))
    values = np.concatenate([pred, low, high])
    positive = values[values > 0]
    if positive.size == len(values):
        # Default rates span two orders of magnitude across tiers: log axes show all five.
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
    lo, hi = (positive.min() / 1.5, min(1.0, positive.max() * 1.5)) if positive.size else (0, 1)
    ax.plot([lo, hi], [lo, hi], color="#999999", linestyle="--", linewidth=1,
            label="perfect calibration")
    ax.set_xlabel("mean predicted default probability")
    ax.set_ylabel("observed default rate")
    ax.legend(frameon=False, fontsize="small")
    return Plot("calibration_by_tier", "Calibration by tier", png=_png(fig), data=data,
                note=note, alt="Scatter plot of observed default rate against mean predicted "
                               "probability for each tier, with 95 % confidence intervals and "
                               "the diagonal of perfect calibration.")


def _ks_plot(data: pd.DataFrame) -> Plot:
    fig, ax = _figure()
    ax.plot(data["score"], data["cdf_bad"], label="defaulters", color="#c0392b")
    ax.plot(data["score"], data["cdf_good"], label="repayers", color="#27ae60")
    gap = (data["cdf_bad"] - data["cdf_good"]).abs()
    at = int(gap.to_numpy().argmax())
    s = float(data["score"].iloc[at])
    ax.vlines(s, data["cdf_good"].iloc[at], data["cdf_bad"].iloc[at], color="#333333",
              linestyle="--", label=f"KS = {gap.iloc[at]:.3f} at score {s:g}")
    ax.set_xlabel("score")
    ax.set_ylabel("cumulative share")
    ax.legend(frameon=False)
    return Plot("ks_curve", "KS curve: cumulative score distributions", png=_png(fig), data=data,
                alt=f"Cumulative distribution of scores for defaulters and repayers; the largest "
                    f"gap, KS {gap.iloc[at]:.3f}, is at score {s:g}.")


def _roc_plot(data: pd.DataFrame, auc: float | None) -> Plot:
    fig, ax = _figure(4.8, 4.4)
    ax.plot(data["fpr"], data["tpr"], color=SERIES["federated"][1],
            label=f"federated (AUC {fmt(auc)})")
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(frameon=False, loc="lower right")
    return Plot("roc_curve", "ROC curve (test split)", png=_png(fig), data=data,
                alt=f"ROC curve of the federated model, AUC {fmt(auc)}, above the chance line.")


def _scores_section(run: RunData) -> Section:
    section = Section("scores", "Scores: distribution, calibration, KS")
    hist, note = _histogram_data(run)
    section.blocks.append(_histogram_plot(hist, note) if hist is not None else
                          Note(f"Score histogram not available: {note}."))
    calib, note = _calibration_data(run)
    if calib is not None and not calib.empty:
        section.blocks.append(_calibration_plot(calib, note))
        section.blocks.append(Table("calibration", "Calibration by tier (test split)", calib,
                                    note=note, data_key="calibration_by_tier"))
    else:
        section.blocks.append(Note(f"Calibration by tier not available: {note}."))
    curves = run.curves or Curves()
    section.blocks.append(_ks_plot(curves.ks) if curves.ks is not None and len(curves.ks) else
                          Note(f"KS curve not available: {_curves_missing(run, 'ks')}."))
    section.blocks.append(_roc_plot(curves.roc, run.metrics.get("auc"))
                          if curves.roc is not None and len(curves.roc) else
                          Note(f"ROC curve not available: {_curves_missing(run, 'roc')}."))
    return section


def _curves_missing(run: RunData, part: str) -> str:
    if run.curves is None:
        if part in ("ks", "roc"):
            # Not recomputable here: these need the labels, which a run never publishes.
            return "the run has no curves.json (the curve needs labels the run does not publish)"
        return "the run has no curves.json"
    return f"curves.json has no {part!r}"


def _tiers_section(run: RunData) -> Section:
    counts = run.metrics.get("tiers") or {}
    rates = run.metrics.get("test_default_rate_by_tier") or {}
    total = sum(v for v in counts.values() if v) or None
    rows = [{"tier": tier.key, "name": tier.name_zh, "scores": f"{tier.low}–{tier.high}",
             "seed benefit": tier.benefit, "people": counts.get(tier.key),
             "share": (counts.get(tier.key) or 0) / total if total else None,
             "test default rate": rates.get(tier.key)} for tier in TIERS]
    table = Table("tiers", "Tiers, their seed benefits, and the people in each", pd.DataFrame(rows),
                  note="People: every scored person; default rate: test split.")
    return Section("tiers", "Tiers and seed benefits", [table])


def _contributions_section(run: RunData) -> Section:
    section = Section("contributions", "Per-silo contributions")
    data = run.curves.contributions if run.curves is not None else None
    if data is None or data.empty:
        section.blocks.append(Note("Per-silo contribution summary not available: "
                                   f"{_curves_missing(run, 'contributions')}."))
        return section
    fig, ax = _figure(6.4, 0.6 + 0.55 * len(data))
    y = np.arange(len(data))
    ax.hlines(y, data["p10"], data["p90"], color="#1f4e79", linewidth=4, alpha=0.45,
              label="p10–p90")
    ax.plot(data["p50"], y, "o", color="#1f4e79", label="median")
    ax.plot(data["mean_abs_points"], y, "D", color="#e67e22", label="mean |points|")
    ax.axvline(0, color="#999999", linewidth=1)
    ax.set_yticks(y, data["silo"].astype(str))
    ax.set_xlabel("score points contributed")
    ax.legend(frameon=False, fontsize="small", loc="best")
    section.blocks.append(Plot(
        "contributions", "Score points contributed per silo", png=_png(fig), data=data,
        alt="Range chart of the score points each silo contributes: 10th to 90th percentile, "
            "median and mean absolute points per silo."))
    section.blocks.append(Table("contributions_table", "Score points contributed per silo", data,
                                data_key="contributions"))
    return section


def _reported_epsilon(metrics: dict, party: str, budget: str) -> Any:
    eps = metrics.get("epsilon") or {}
    value = eps.get(budget)
    return value.get(party) if isinstance(value, dict) else value


def _ledger_final(run: RunData, spent: list[dict]) -> pd.DataFrame:
    rows = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in spent:
        groups.setdefault((str(e["party"]), str(e["budget"])), []).append(e)
    for (party, budget), lines in groups.items():
        rows.append({"party": party, "budget": budget, "accountant": lines[-1].get("accountant"),
                     "rounds": len({e.get("round") for e in lines}),
                     "steps": sum(int(e.get("steps") or 0) for e in lines),
                     "epsilon": lines[-1]["epsilon"], "delta": lines[-1].get("delta"),
                     "metrics_epsilon": _reported_epsilon(run.metrics, party, budget)})
    return pd.DataFrame(rows)


def _ledger_compact(entries: list[dict]) -> pd.DataFrame:
    """Ledger lines with the parties of one round and budget merged when they spent alike."""
    keys = ("round", "budget", "mechanism", "event", "steps", "noise_multiplier", "sample_rate",
            "epsilon", "delta")
    rows: list[dict] = []
    for e in entries:
        row = {k: e.get(k) for k in keys}
        row["event"] = row["event"] or "spent"
        if rows and all(rows[-1][k] == row[k] for k in keys):
            rows[-1]["parties"] += f", {e['party']}"
        else:
            rows.append({**row, "parties": str(e["party"])})
    return pd.DataFrame(rows, columns=["round", "parties", *keys[1:]])


def _ledger_plot(spent: list[dict], target: float | None) -> Plot:
    data = pd.DataFrame([{"party": e["party"], "budget": e["budget"], "round": e.get("round"),
                          "epsilon": e["epsilon"]} for e in spent])
    fig, ax = _figure()
    styles = ["-", "--", "-.", ":"]
    for i, ((party, budget), part) in enumerate(data.groupby(["party", "budget"], sort=False)):
        # Parties usually spend identically; distinct dashes keep overlapping lines visible.
        ax.step(part["round"], part["epsilon"], where="post", linestyle=styles[i % len(styles)],
                label=f"{party} ({budget})")
    if target is not None:
        ax.axhline(target, color="#c0392b", linewidth=1, alpha=0.7, label=f"target ε = {target:g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε")
    ax.legend(frameon=False, fontsize="small", ncol=2)
    return Plot("ledger_cumulative", "Cumulative ε by round, per party and budget", png=_png(fig),
                data=data, alt="Step chart of each party's cumulative privacy loss epsilon "
                               "against the training round, with the target budget as a line.")


def _privacy_parameters(run: RunData) -> Table:
    m = run.metrics
    keys = ("accountant", "delta", "noise_multiplier", "sample_rate", "max_grad_norm",
            "training_steps", "stopped_by_budget_cap")
    rows = [("target epsilon (config)", run.config.get("privacy.epsilon")),
            ("label epsilon (config)", run.config.get("privacy.label_epsilon"))]
    rows += [(k, m.get(k)) for k in keys]
    frame = pd.DataFrame(rows, columns=["parameter", "value"]).astype({"value": object})
    return Table("privacy_parameters", "Privacy parameters", frame)


def _ledger_section(run: RunData) -> Section:
    section = Section("ledger", "Privacy ledger", [_privacy_parameters(run)])
    if not run.ledger:
        section.blocks.append(Note("Privacy ledger not available: the run has no ledger.jsonl "
                                   "(runs without differential privacy write none)."))
        return section
    # A refused line carries the epsilon the refused steps would have reached, not a spend.
    spent = [e for e in run.ledger if e.get("event") != "refused" and e.get("party") != "*"]
    if spent:
        section.blocks.append(Table(
            "ledger_final", "Final ε per party and budget", _ledger_final(run, spent),
            note="epsilon: the ledger's last line; metrics_epsilon: what metrics.json reports."))
        section.blocks.append(_ledger_plot(spent, _finite(run.config.get("privacy.epsilon"))))
    compact = _ledger_compact(run.ledger)
    section.blocks.append(Table(
        "ledger_lines", f"Ledger lines ({len(run.ledger)} lines, {len(compact)} rows)", compact,
        note="Parties that spent alike in a round share one row; 'refused' rows carry the ε the "
             "refused steps would have reached.", collapsed=len(compact) > 12))
    return section


def _audit_section(run: RunData) -> Section:
    section = Section("audit", "Privacy audit")
    audit = run.metrics.get("audit")
    if not audit:
        section.blocks.append(Note("Privacy audit not available: metrics.json has no 'audit'."))
        return section
    accounted = _model_epsilon(run.metrics)
    canary = audit.get("canary")
    lower = None
    if canary:
        keys = ("epsilon_lower_bound", "confidence", "canaries", "guesses", "correct",
                "blocks", "noise_multiplier", "sample_rate", "steps", "seconds")
        rows = [("accounted epsilon (combined model)", accounted)]
        rows += [(k, canary.get(k)) for k in keys]
        frame = pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": object})
        lower = _finite(canary.get("epsilon_lower_bound"))
        section.blocks.append(Table(
            "audit_canary", "One-run canary audit of the joint DP-SGD", frame,
            note=f"{canary.get('method', 'one-run canary audit')}. Result: "
                 f"{_verdict(lower, accounted)}."))
    membership = audit.get("membership") or audit
    keys = ("epsilon_lower", "attack_auc", "threshold", "tpr", "fpr", "n_members",
            "n_nonmembers", "confidence", "delta")
    rows = [(k, membership.get(k)) for k in keys]
    frame = pd.DataFrame(rows, columns=["quantity", "value"]).astype({"value": object})
    weak = _finite(membership.get("epsilon_lower"))
    section.blocks.append(Table("audit", "Loss-threshold membership attack on released scores",
                                frame, note=f"Result: {_verdict(weak, accounted)}. A weaker "
                                "attack than the canary audit: a black-box view of the scores."))
    section.blocks.append(_audit_bar(accounted, lower if lower is not None else weak))
    return section


def _verdict(lower: float | None, accounted: float | None) -> str:
    if lower is None or accounted is None or lower <= accounted:
        return "consistent with the accountant (lower bound ≤ accounted ε)"
    return "the empirical lower bound EXCEEDS the accounted ε: check the accounting"


def _audit_bar(accounted: float | None, lower: float | None) -> Plot:
    labels = ["accounted ε", "empirical ε lower bound"]
    values = [accounted if accounted is not None else np.nan, lower if lower is not None else 0]
    data = pd.DataFrame({"quantity": ["accounted_epsilon", "empirical_epsilon_lower"],
                         "epsilon": values})
    fig, ax = _figure(6.0, 2.0)
    ax.barh(labels, np.nan_to_num(values), color=["#1f4e79", "#e67e22"])
    for y, v in enumerate(values):
        ax.text(np.nan_to_num(v), y, f" {fmt(v) if not np.isnan(v) else 'non-private'}",
                va="center")
    ax.invert_yaxis()  # accounted first, read top-down like the table
    ax.set_xlabel("ε")
    ax.margins(x=0.2)
    return Plot("audit_bounds", "Empirical lower bound against accounted ε", png=_png(fig),
                data=data, alt=f"Bar chart: accounted epsilon {fmt(accounted)} and the audit's "
                               f"empirical lower bound {fmt(lower)}.")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, value)]


def _key_values(key: str, title: str, pairs: list[tuple[str, Any]], **kw: Any) -> Table:
    frame = pd.DataFrame({"key": [k for k, _ in pairs], "value": pd.Series(
        [v for _, v in pairs], dtype=object)})
    return Table(key, title, frame, **kw)


def _repro_section(run: RunData) -> Section:
    man = run.manifest
    command = man.get("command")
    pairs: list[tuple[str, Any]] = [
        ("command", shlex.join(map(str, command)) if isinstance(command, list) else command),
        ("started_at", man.get("started_at")), ("git_commit", man.get("git_commit")),
        ("seed", man.get("seed")), ("population_seed", man.get("population_seed")),
        ("python", man.get("python")), ("platform", man.get("platform")),
    ]
    pairs += [(f"version {k}", v) for k, v in (man.get("versions") or {}).items()]
    return Section("reproducibility", "Reproducibility", [
        _key_values("reproducibility", "Reproducibility: command, seeds, versions", pairs),
        _key_values("config", "Resolved configuration (config.json)", _flatten(run.config),
                    collapsed=True),
    ])


def _reasons_section(run: RunData) -> Section:
    section = Section("reasons", "Reason codes and eligibility")
    people = run.metrics.get("people", {})
    if people.get("ineligible") is not None:
        by = ", ".join(f"{k.replace(';', ' + ')} {v:,}" for k, v in
                       people.get("ineligible_by_reason", {}).items())
        section.blocks.append(Note(f"{people['ineligible']:,} of {people.get('aligned', 0):,} "
                                   f"people failed the opening conditions and got no score "
                                   f"({by})."))
    data = run.curves.reasons if run.curves is not None else None
    if data is None or data.empty:
        section.blocks.append(Note(f"Reason codes not available: {_curves_missing(run, 'reasons')}"
                                   " (runs with explain.reasons=0 or in concat mode have none)."))
        return section
    from clients.reasons import reason_text

    top = data.sort_values("first", ascending=False).head(12).reset_index(drop=True)
    scored = sum(run.metrics.get("tiers", {}).values()) or 1
    texts = [reason_text(*code.split(".", 1)) for code in top["reason"]]
    table = pd.DataFrame({
        "reason": top["reason"], "label": [t.label_en for t in texts],
        "label_zh": [t.label_zh for t in texts], "first_share": top["first"] / scored,
        "listed_share": top["listed"] / scored, "mean_points": top["mean_points"]})
    fig, ax = _figure(6.4, 0.6 + 0.32 * len(table))
    y = np.arange(len(table))[::-1]
    ax.barh(y, table["first_share"], color="#1f4e79")
    ax.set_yticks(y, table["label"])
    ax.set_xlabel("share of scored people with it as their first reason")
    section.blocks.append(Plot(
        "reasons", "The most common first reason codes", png=_png(fig), data=table,
        alt="Bar chart of the share of scored people whose first reason code is each feature."))
    section.blocks.append(Table(
        "reasons_table", "Reason codes: how often first and listed, mean points lost", table,
        note="Points are lost against each silo's typical person; shares of scored people.",
        data_key="reasons"))
    return section


def run_sections(run: RunData, prefix: str = "") -> list[Section]:
    from simulations.report_topology import regions_section

    sections = [_learning_section(run), _scores_section(run), _tiers_section(run),
                _contributions_section(run), _reasons_section(run), _ledger_section(run),
                _audit_section(run), _repro_section(run)]
    regions = regions_section(run)
    if regions is not None:
        sections.insert(1, regions)
    if prefix:
        # In a sweep's report these tables and figures must say which run they describe.
        for s in sections:
            s.title = f"{prefix}{s.title}"
            for b in s.blocks:
                if isinstance(b, Table | Plot):
                    b.title = f"{prefix}{b.title}"
    return sections


# ---- sweep sections --------------------------------------------------------------------------


def summary_series(sweep: SweepData, name: str) -> pd.DataFrame | None:
    """(epsilon, mean, ci_low, ci_high) of one model's AUC across the sweep's budgets.

    Read from summary.csv; when it lacks that model's columns, computed from sweep.csv's done
    runs (normal 95 % interval)."""
    prefixes = ["auc"] if name == "auc" else [f"auc_{name}", name, f"{name}_auc"]
    s = sweep.summary
    for p in prefixes:
        cols = [f"{p}_mean", f"{p}_ci_low", f"{p}_ci_high"]
        if all(c in s.columns for c in cols):
            frame = s[["epsilon", *cols]].set_axis(["epsilon", "mean", "ci_low", "ci_high"],
                                                   axis=1)
            frame = frame.apply(pd.to_numeric, errors="coerce").dropna(subset=["mean"])
            return frame if len(frame) else None
    column = "auc" if name == "auc" else f"auc_{name}"
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    if column not in done.columns:
        return None
    values = pd.to_numeric(done[column], errors="coerce")
    grouped = values.groupby(done["epsilon"]).agg(["mean", "std", "count"]).dropna(
        subset=["mean"])
    if grouped.empty:
        return None
    half = Z95 * grouped["std"].fillna(0) / np.sqrt(grouped["count"])
    return pd.DataFrame({"epsilon": grouped.index, "mean": grouped["mean"],
                         "ci_low": grouped["mean"] - half, "ci_high": grouped["mean"] + half}
                        ).reset_index(drop=True)


def _privacy_utility(sweep: SweepData) -> Plot | Note:
    curves = {"auc": "federated", "central_dp": "central_dp", "best_silo": "best_silo"}
    lines = {"central": "central", "oracle": "oracle"}
    series = {n: summary_series(sweep, n) for n in (*curves, *lines)}
    if series["auc"] is None:
        return Note("Privacy–utility curve not available: no federated AUC in the sweep.")
    fig, ax = _figure(7.2, 4.4)
    all_eps = np.concatenate([f["epsilon"].to_numpy() for f in series.values() if f is not None])
    to_x = _eps_axis(ax, all_eps)
    for name, style in curves.items():
        if series[name] is not None:
            _draw_curve(ax, series[name], to_x, *SERIES[style])
    for name, style in lines.items():
        frame = series[name]
        if frame is not None:
            label, colour = SERIES[style]
            ax.axhline(float(frame["mean"].mean()), color=colour, linestyle="--", linewidth=1.3,
                       label=label)
    ax.set_ylabel("test AUC")
    # Outside the axes: inside, it would cover the non-private points at the right edge.
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    rows = [frame.assign(series=SERIES[{**curves, **lines}[name]][0])
            for name, frame in series.items() if frame is not None]
    data = pd.concat(rows, ignore_index=True)[["series", "epsilon", "mean", "ci_low", "ci_high"]]
    absent = [SERIES[{**curves, **lines}[n]][0] for n, f in series.items() if f is None]
    note = "Bands and bars: 95 % confidence intervals over seeds; ∞ is the non-private run."
    if absent:
        note += f" Not in this sweep: {', '.join(absent)}."
    return Plot("privacy_utility", "Privacy–utility: test AUC against ε", png=_png(fig),
                data=data, note=note,
                alt="Line chart of test AUC against the privacy budget epsilon on a log axis, "
                    "with 95 % confidence bands for the federated model and its baselines; the "
                    "non-private point sits at the right edge, labelled infinity.")


def _draw_curve(ax: Axes, frame: pd.DataFrame, to_x: Callable, label: str, colour: str) -> None:
    eps = frame["epsilon"].to_numpy(dtype=np.float64)
    finite = np.isfinite(eps)
    f = frame[finite]
    if len(f):
        ax.plot(f["epsilon"], f["mean"], marker="o", color=colour, label=label)
        ax.fill_between(f["epsilon"], f["ci_low"], f["ci_high"], color=colour, alpha=0.15)
    inf = frame[~finite]
    if len(inf):
        # The non-private point stands alone: joining it to the curve would invent a slope.
        mean, low, high = (float(inf[c].iloc[0]) for c in ("mean", "ci_low", "ci_high"))
        ax.errorbar(to_x(np.array([np.inf])), [mean], yerr=[[mean - low], [high - mean]],
                    fmt="s", color=colour, capsize=3, label=None if len(f) else label)


def _sweep_audit(sweep: SweepData) -> Plot | Note:
    done = sweep.runs[sweep.runs["status"].astype(str) == "done"]
    cols = [c for c in ("eps_model", "audit_epsilon_lower", "audit_attack_auc") if c in done]
    lower = pd.to_numeric(done.get("audit_epsilon_lower", pd.Series(dtype=float)),
                          errors="coerce")
    if lower.isna().all():
        return Note("Audit against ε not available: sweep.csv has no audit_epsilon_lower.")
    data = done[["epsilon", "seed", *cols]].copy()
    fig, ax = _figure(7.2, 4.2)
    to_x = _eps_axis(ax, data["epsilon"].to_numpy(dtype=np.float64))
    x = to_x(data["epsilon"].to_numpy(dtype=np.float64))
    if "eps_model" in data:
        ax.plot(x, pd.to_numeric(data["eps_model"], errors="coerce"), "o", color="#1f4e79",
                label="accounted ε (combined model)")
    ax.plot(x, lower, "D", color="#e67e22", label="empirical ε lower bound (audit)")
    finite = np.unique(data["epsilon"][np.isfinite(data["epsilon"])])
    if finite.size:
        ax.plot(finite, finite, color="#999999", linestyle="--", linewidth=1, label="ε = target")
    ax.set_ylabel("ε")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return Plot("sweep_audit", "Audit: empirical lower bound and accounted ε against target ε",
                png=_png(fig), data=data,
                note="One marker per run; non-private runs have no accounted ε.",
                alt="Scatter plot against the target epsilon (log axis, infinity at the right): "
                    "the accounted epsilon per run and the audit's empirical lower bound, with "
                    "the diagonal epsilon equals target.")


def _headline_sweep(sweep: SweepData) -> Section:
    runs = sweep.runs
    status = runs["status"].astype(str)
    auc = summary_series(sweep, "auc")
    done = int((status == "done").sum())
    items = [("runs done", f"{done} of {len(runs)}"),
             ("budgets ε", ", ".join(fmt_eps(e) for e in sorted(runs["epsilon"].unique()))),
             ("seeds", ", ".join(fmt(s) for s in sorted(runs["seed"].unique())))]
    cards = [("runs done", f"{done} / {len(runs)}")]
    for _, row in (auc if auc is not None else pd.DataFrame()).iterrows():
        items.append((f"federated AUC at ε = {fmt_eps(row['epsilon'])}",
                      fmt_interval(row["mean"], row["ci_low"], row["ci_high"])))
        # Cards only for the headline budgets: the default (1) and the non-private point.
        if row["epsilon"] in (1.0, math.inf):
            cards.append((f"AUC at ε = {fmt_eps(row['epsilon'])}", fmt(row["mean"])))
    frame = pd.DataFrame(items, columns=["quantity", "value"])
    return Section("headline", "Headline numbers", [
        Cards(cards),
        Table("sweep_headline", "Sweep at a glance (95 % intervals over seeds)", frame),
    ])


def _sweep_tables(sweep: SweepData) -> Section:
    failed = int((sweep.runs["status"].astype(str) != "done").sum())
    return Section("sweep-tables", "Sweep table and summary", [
        Table("sweep_summary", "Summary per ε (mean and 95 % interval over seeds)",
              sweep.summary),
        Table("sweep_runs", "Every run of the sweep", sweep.runs, collapsed=len(sweep.runs) > 20,
              note=f"{failed} run(s) failed and are left out of the figures." if failed else ""),
    ])


def sweep_sections(sweep: SweepData) -> list[Section]:
    sections = [
        _headline_sweep(sweep),
        Section("privacy-utility", "Privacy–utility curve", [_privacy_utility(sweep)]),
        Section("sweep-audit", "Privacy audit across ε", [_sweep_audit(sweep)]),
        _sweep_tables(sweep),
        _key_section(sweep),
    ]
    if sweep.representative is None:
        sections.append(Section("run", "Representative run",
                                [Note("No run of the sweep finished: no per-run sections.")]))
        return sections
    prefix = f"Run {sweep.representative_name}: "
    sections.append(Section("run", f"Representative run {sweep.representative_name}", [
        Note(f"The sections below describe run {sweep.representative_name} (preferred: ε = 1, "
             "seed 0; else the first finished run).")]))
    run_parts = run_sections(sweep.representative, prefix)
    for s in run_parts:
        s.id = f"run-{s.id}"
    return sections + run_parts


def _key_section(sweep: SweepData) -> Section:
    return Section("sweep-config", "Sweep configuration", [
        _key_values("sweep_config", "Sweep configuration (sweep.json)", _flatten(sweep.config))])


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
        for row in _cells(t.frame))
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
    width, height = _png_size(p.png)
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
                     for row in _cells(t.frame))
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
        sections = [_headline_run(run), *run_sections(run)]
        title = f"fedscore report: run {name}"
    else:
        sweep = load_sweep(directory)
        sections = sweep_sections(sweep)
        title = f"fedscore report: sweep {name}"
    log.info("writing the %s report for %s (%d sections)", kind, directory, len(sections))
    page, tex, csvs = write_report(directory.resolve(), title, sections)
    return ReportFiles(kind, page, tex, tuple(csvs))
