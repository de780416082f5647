"""The intervals the reports show, in one place: a mean over replicate runs (seeds, population
seeds) with a Student t interval, and the words that name the method beside every table that
shows one."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
AUC_BOUNDS = (0.0, 1.0)


def mean_ci(values: pd.Series, level: float = LEVEL,
            bounds: tuple[float, float] = AUC_BOUNDS) -> tuple[float, float, float]:
    """Mean and a Student t confidence interval over replicates (NaN interval for one run,
    NaN everything for none), clipped to the metric range (AUC: 0..1). Missing values are
    left out: a run that did not measure the figure is not a replicate of it."""
    x = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return (mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return (mean, max(bounds[0], mean - half), min(bounds[1], mean + half))


def replicates(values: pd.Series) -> int:
    """How many replicates `mean_ci` averages over."""
    return int(pd.to_numeric(values, errors="coerce").notna().sum())


def interval_method(n: int, level: float = LEVEL) -> str:
    """What an interval over `n` runs is, in words, for a table's `interval` column."""
    if n < 2:
        return "one run: no interval"
    return f"{level:.0%} Student t over {n} runs, clipped to the metric range".replace(
        "%", " %")
