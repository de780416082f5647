"""The report's building blocks (tables, plots, notes, cards, sections), the number
formatting every table shares, and the figure helpers every plot is drawn with."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from server.privacy import model_epsilon

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
    # A credit analyst's central references (simulations/analysis/references.py).
    "central_gbdt": ("central gradient boosting (LightGBM)", "#7d3c98"),
    "central_scorecard": ("central WoE scorecard", "#16a085"),
    "best_silo": ("best single silo", "#e67e22"),
    "payments_only": ("payments silo only", "#e67e22"),
    "oracle": ("oracle", "#27ae60"),
}

# The populations a figure can be on (metrics.json, docs/architecture.md): the score's figures
# are on the scored test people; the model's comparison with the baselines and the oracle,
# which see no opening conditions, on every test person.
SCORED = "scored test people"
ALL = "all test people"

# The two topologies, when runs of both are compared.
TOPOLOGY_COLOURS = {"vertical": "#1f4e79", "horizontal": "#8e44ad"}


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
    fig: Figure  # drawn once; the report writes it as PNG (in the page), PDF and SVG
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
    figures: tuple[Path, ...] = ()  # every figure as PDF and SVG, beside the page


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


def column_formatter(column: pd.Series) -> Callable[[Any], str]:
    """How one table column is shown: one number of decimals for every row, so that it lines
    up on the decimal point. A column of round settings (ε 0.5, 1, 4) gets as many as its
    roundest value needs (0.5, 1.0, 4.0); a column of measurements as many as its largest
    value calls for (0.8630 above 0.0590). A column of mixed quantities (the value column of
    a key-value table) shows each value on its own."""
    floats = [float(v) for v in column if isinstance(v, float | np.floating) and math.isfinite(v)]
    if not floats:
        return fmt
    if not pd.api.types.is_float_dtype(column):
        return fmt
    decimals = [next((d for d in range(3) if round(v, d) == v), None) for v in floats]
    if None in decimals:
        spec = _column_spec(max(abs(v) for v in floats))
    else:
        spec = f",.{max(d for d in decimals if d is not None)}f"

    def show(v: Any) -> str:
        if not isinstance(v, float | np.floating) or not math.isfinite(v):
            return fmt(v)
        return "0" if v == 0 and spec.endswith("e") else format(float(v), spec)
    return show


def _column_spec(largest: float) -> str:
    if largest >= 1000:
        return ",.1f"
    if largest >= 10:
        return ".2f"
    if largest >= 0.01:
        return ".4f"
    return ".2e"  # a column of tiny numbers (delta): every row in the same scientific form


def is_numeric(column: pd.Series) -> bool:
    """A column of numbers (right-aligned in the page and in LaTeX), not of mixed values."""
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    values = [v for v in column if v is not None]
    return bool(values) and all(isinstance(v, int | float | np.number) and not isinstance(v, bool)
                                for v in values)


def cells(frame: pd.DataFrame) -> list[list[str]]:
    formatters = [column_formatter(frame[c]) for c in frame.columns]
    return [[f(v) for f, v in zip(formatters, row, strict=True)]
            for row in frame.itertuples(index=False, name=None)]


def fmt_interval(mean: float, low: float, high: float) -> str:
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def finite(value: Any) -> float | None:
    """A number that can be plotted, or None."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---- figures ---------------------------------------------------------------------------------


def figure(width: float = 7.0, height: float = 3.8) -> tuple[Figure, Axes]:
    # Figure without pyplot: no global state, always the Agg canvas, safe in any thread.
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def eps_axis(ax: Axes, eps: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
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


def dodge(i: int, n: int, spread: float) -> float:
    """How far series i of n moves sideways (in `spread` steps, centred on the true place) so
    that their bars do not hide each other: in decades on a log axis, widths on a category
    one."""
    return (i - (n - 1) / 2) * spread


def finite_model_epsilon(metrics: dict) -> float | None:
    """The combined model's epsilon (vertical), the largest region's (horizontal)."""
    value = model_epsilon(metrics)
    return finite(value) if value is not None else None


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, value)]


def key_values(key: str, title: str, pairs: list[tuple[str, Any]], **kw: Any) -> Table:
    frame = pd.DataFrame({"key": [k for k, _ in pairs], "value": pd.Series(
        [v for _, v in pairs], dtype=object)})
    return Table(key, title, frame, **kw)
