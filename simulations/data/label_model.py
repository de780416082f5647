"""The synthetic population's label model: how a default label follows from the features.

The label model (why the oracle is achievable)
    The true default logit is a known, additive function of the OBSERVED features:

        logit = intercept + sum_k f_k(x_k),   f_k(x_k) = scale_k * sum_j w_j * z_j(x_kj)
        z_j   = (t_j(x_kj) - mean_j) / std_j

    where t_j is a fixed monotone transform of column j (identity for rates, flags and the
    contacts' standing, log1p for amounts and counts, the step `overdue_max_days > 30`), mean_j
    and std_j are taken over the authority's people with the column present, and w_j is a fixed
    signed weight (see `LABEL_TERMS`: overdue, rebinding, abnormal logins, violation reports
    and high-risk merchants raise risk; on-time repayment, two-factor, stability lower it).
    A missing cell (NaN) contributes z_j = MISSING_BUMP * sign(w_j): the population-mean
    contribution (z = 0) plus a small push towards risk, because people who hide a field are
    riskier on average.
    scale_k makes Var(f_k) / sum_j Var(f_j) equal `signal_share[k]` and std(sum_k f_k) equal
    `signal_scale`; the intercept is then solved so that the mean of p_true = sigmoid(logit)
    over the authority's people equals `default_rate`. Labels are Bernoulli(p_true).
    The fitted constants live in `Population.label_model` and reproduce p_true from the silo
    tables alone, so a model that sees all three silos can in principle reach the oracle AUC.

    For an authority person missing from a silo, p_true still uses that silo's features
    (they exist, the silo just does not hold them); restrict `oracle_auc` to the intersection
    when comparing with a model trained on it.

    The model is fitted to a drawn population by `_fit_label_model` in
    simulations/data/population.py (it reads the population's config).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

# (column, transform, weight). Positive weight = more risk. Transforms: "id" (as is),
# "log1p", "gt30" (indicator of a value above 30).
LABEL_TERMS: dict[str, tuple[tuple[str, str, float], ...]] = {
    "payments": (
        ("on_time_repayment_rate", "id", -1.0),
        ("overdue_count", "log1p", 0.8),
        ("overdue_max_days", "gt30", 0.6),
        ("balance", "log1p", -0.3),
        ("spend_level", "log1p", -0.1),
        ("spend_stability", "id", -0.3),
        ("wealth_holdings", "log1p", -0.3),
        ("bill_payments", "log1p", -0.2),
        ("high_risk_merchant_share", "id", 0.5),
        ("complaints", "log1p", 0.3),
    ),
    "social": (
        ("interaction_freq", "log1p", -0.2),
        ("red_packet_exchange", "log1p", -0.2),
        ("group_activity", "id", -0.2),
        ("contacts_avg_standing", "id", -0.8),
        ("mini_program_use", "log1p", -0.1),
        ("donations", "log1p", -0.3),
        ("violation_reports", "log1p", 0.6),
    ),
    "device": (
        ("common_device_share", "id", -0.5),
        ("devices_90d", "log1p", 0.3),
        ("abnormal_location_logins", "log1p", 0.6),
        ("rebinding_count", "log1p", 0.6),
        ("two_factor_on", "id", -0.5),
        ("password_age_days", "log1p", 0.2),
        ("location_stability", "id", -0.4),
    ),
}
MISSING_BUMP = 0.25  # in standard deviations of the column's term, towards risk


@dataclass(frozen=True)
class LabelTerm:
    silo: str
    column: str
    transform: str
    weight: float
    mean: float
    std: float


@dataclass(frozen=True)
class LabelModel:
    """The fitted label model: logit = intercept + sum_k silo_scale[k] * sum_j w_j z_j."""

    terms: tuple[LabelTerm, ...]
    silo_scale: dict[str, float]
    intercept: float

    def silo_logit(self, silo: str, features: pd.DataFrame) -> np.ndarray:
        """Silo `silo`'s contribution f_k for each row of its feature table."""
        total = np.zeros(len(features))
        for term in self.terms:
            if term.silo != silo:
                continue
            x = features[term.column].to_numpy(dtype=np.float64)
            z = (_transform(x, term.transform) - term.mean) / term.std
            z = np.where(np.isnan(x), MISSING_BUMP * np.sign(term.weight), z)
            total += term.weight * z
        return self.silo_scale[silo] * total

    def to_dict(self) -> dict[str, object]:
        return {
            "intercept": self.intercept,
            "silo_scale": dict(self.silo_scale),
            "missing_bump": MISSING_BUMP,
            "terms": [asdict(t) for t in self.terms],
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "id":
        return x
    if kind == "log1p":
        return np.log1p(x)
    if kind == "gt30":
        return (x > 30).astype(np.float64)
    raise ValueError(f"unknown transform {kind!r}")


def _solve_intercept(logit: np.ndarray, rate: float) -> float:
    """b with mean(sigmoid(b + logit)) == rate: safeguarded Newton (the mean is monotone in b)."""
    lo, hi = -40.0, 40.0
    b = math.log(rate / (1.0 - rate)) - float(logit.mean())
    for _ in range(100):
        p = _sigmoid(b + logit)
        gap = float(p.mean()) - rate
        if abs(gap) < 1e-10:
            break
        if gap > 0:
            hi = b
        else:
            lo = b
        slope = float((p * (1.0 - p)).mean())
        step = b - gap / slope if slope > 0 else math.nan
        b = step if lo < step < hi else 0.5 * (lo + hi)
    return b
