"""Synthetic population: one feature table per silo, the authority's labels, and the truth.

Who is in it
    The scoring authority knows `users` people and holds their default labels. Each silo
    holds `coverage[k]` of those people plus `outsiders * users` people the authority does not
    know (drawn from a shared pool of outsiders, so silos partly overlap outside the authority
    too). Every party writes phone numbers in its own format and shuffles its own rows.

How features arise
    Four correlated latent traits per person (responsibility, wealth, sociability, security
    hygiene) drive the features, so the silos' columns are correlated the way real ones are
    (a responsible person repays on time, has reputable contacts and changes passwords).
    The latents only shape the features; the label never reads them.

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
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clients.protocol.schema import AUTHORITY, ID_COLUMN, LABEL_COLUMN, SILOS, feature_names
from clients.protocol.tables import read_table
from clients.silo.data import COHORT_INFO, COHORT_TABLE, cohort_context, cohort_dir, find_table
from crypto.at_rest import Keystore, write_encrypted, write_party_file
from server.metrics import auc

log = logging.getLogger(__name__)

# Latent traits and their correlations: responsibility goes with wealth and security hygiene,
# wealth with sociability. Moderate values keep each silo's information partly its own.
LATENTS = ("responsibility", "wealth", "sociability", "hygiene")
LATENT_CORR = np.array(
    [
        [1.00, 0.30, 0.10, 0.15],
        [0.30, 1.00, 0.20, 0.10],
        [0.10, 0.20, 1.00, 0.05],
        [0.15, 0.10, 0.05, 1.00],
    ]
)

# Columns that get NaN at `missing_rate`; all other columns are complete.
MISSING_COLUMNS: dict[str, tuple[str, ...]] = {
    "payments": ("balance", "wealth_holdings"),
    "social": ("contacts_avg_standing",),
    "device": ("password_age_days", "location_stability"),
}

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

# Phone formats, one per party, as (prefix, digit groups, separator) over the 11 digits.
PHONE_FORMATS: dict[str, tuple[str, tuple[int, ...], str]] = {
    AUTHORITY: ("+86", (11,), ""),  # +8613812345678 (E.164 already)
    "payments": ("", (3, 4, 4), " "),  # 138 1234 5678
    "social": ("86-", (3, 4, 4), "-"),  # 86-138-1234-5678
    "device": ("(+86) ", (11,), ""),  # (+86) 13812345678
}
# Chinese mobile numbers: 1, then 3..9, then nine digits.
_PHONE_LOW = 13_000_000_000
_PHONE_SPAN = 7_000_000_000


def _is_rate(x: float, low: float, high: float, low_open: bool) -> bool:
    return (low < x if low_open else low <= x) and x <= high


@dataclass(frozen=True)
class PopulationConfig:
    users: int = 100_000
    seed: int = 0
    default_rate: float = 0.06
    coverage: tuple[float, float, float] = (0.97, 0.93, 0.95)
    outsiders: float = 0.03
    missing_rate: float = 0.02
    signal_share: tuple[float, float, float] = (0.60, 0.25, 0.15)
    # Tuned so the oracle AUC of the default population is about 0.86.
    signal_scale: float = 1.44
    # Account status at the authority (the bureau), for the opening conditions
    # (server/eligibility.py): shares of the authority's people without real-name verification,
    # without a bound bank card, and with a severe default in the last 365 days (more likely
    # for riskier people and for defaulters; as many again had one 1 to 10 years ago).
    unverified_rate: float = 0.02
    unbound_card_rate: float = 0.04
    severe_default_rate: float = 0.03
    # Horizontal topology only (simulations/data/regions.py): how far regions differ. 0 = people
    # are dealt to regions at random; 1 = regions are strata of an economic trait (spend and
    # balance), so their feature distributions and default rates differ most.
    region_skew: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.users, bool) or not isinstance(self.users, int) or self.users < 1000:
            raise ValueError(
                f"users={self.users!r}: must be an integer >= 1000 (smaller populations make "
                "coverage and default-rate estimates too noisy); set users to 1000 or more"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be a non-negative integer")
        if not _is_rate(float(self.default_rate), 0.0, 0.5, low_open=True):
            raise ValueError(
                f"default_rate={self.default_rate!r}: must be in (0, 0.5]; "
                "pass e.g. default_rate=0.06"
            )
        for name in ("outsiders", "missing_rate", "unverified_rate", "unbound_card_rate",
                     "severe_default_rate"):
            value = getattr(self, name)
            if not _is_rate(float(value), 0.0, 0.5, low_open=False):
                raise ValueError(f"{name}={value!r}: must be in [0, 0.5]; pass e.g. {name}=0.02")
        for name in ("coverage", "signal_share"):
            value = getattr(self, name)
            if len(value) != len(SILOS):
                raise ValueError(
                    f"{name}={value!r}: needs one value per silo, in the order {SILOS}"
                )
        if not all(0.5 <= c <= 1.0 for c in self.coverage):
            raise ValueError(
                f"coverage={self.coverage!r}: each silo's share must be in [0.5, 1]; "
                "pass e.g. coverage=(0.97, 0.93, 0.95)"
            )
        if not all(0.0 <= s <= 1.0 for s in self.signal_share) or not math.isclose(
            sum(self.signal_share), 1.0, rel_tol=0.0, abs_tol=1e-6
        ):
            raise ValueError(
                f"signal_share={self.signal_share!r}: shares must be in [0, 1] and sum to 1 "
                f"(they sum to {sum(self.signal_share):.6g}); rescale them"
            )
        if not 0.0 <= float(self.region_skew) <= 1.0:
            raise ValueError(f"region_skew={self.region_skew!r}: must be in [0, 1] "
                             "(0 = regions alike, 1 = regions as different as possible)")
        if not 0.0 < float(self.signal_scale) <= 10.0:
            raise ValueError(
                f"signal_scale={self.signal_scale!r}: must be in (0, 10]; the default 1.44 "
                "gives an oracle AUC of about 0.86"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PopulationConfig:
        """Fields absent from older files (e.g. the eligibility rates) take their defaults."""
        data = json.loads(text)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items()}
        return cls(**fields)


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


@dataclass
class Population:
    config: PopulationConfig
    authority: pd.DataFrame
    silos: dict[str, pd.DataFrame]
    truth: pd.DataFrame
    label_model: LabelModel
    timings: dict[str, float] = field(default_factory=dict)

    def oracle_auc(self, phones_e164: Iterable[str] | None = None) -> float:
        """AUC of p_true against the labels, optionally over a subset of E.164 phones."""
        truth = self.truth
        if phones_e164 is not None:
            if not isinstance(phones_e164, pd.Series | pd.Index | np.ndarray):
                phones_e164 = list(phones_e164)
            truth = truth[truth[ID_COLUMN].isin(phones_e164)]
        return auc(truth[LABEL_COLUMN].to_numpy(), truth["p_true"].to_numpy())

    def variance_shares(self) -> dict[str, float]:
        """Share of sum_k Var(f_k) carried by each silo, over the authority's people."""
        var = {s: float(self.truth[f"logit_{s}"].var()) for s in SILOS}
        total = sum(var.values())
        return {s: v / total for s, v in var.items()}


# ---- generation ------------------------------------------------------------------------------


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


def _beta(rng: np.random.Generator, mean: np.ndarray, concentration: float) -> np.ndarray:
    # Mean/concentration parametrisation: the latent moves the mean, the spread stays realistic.
    return rng.beta(mean * concentration, (1.0 - mean) * concentration)


def _negbin(rng: np.random.Generator, mean: np.ndarray, shape: float) -> np.ndarray:
    # Gamma-Poisson mixture: over-dispersed counts with the given mean.
    return rng.poisson(rng.gamma(shape, mean / shape)).astype(np.float64)


def _lognormal(
    rng: np.random.Generator, median: float, log_shift: np.ndarray, sigma: float
) -> np.ndarray:
    noise = sigma * rng.standard_normal(len(log_shift))
    return np.round(np.exp(np.log(median) + log_shift + noise), 2)


def _payments(rng: np.random.Generator, R, W, S, H) -> dict[str, np.ndarray]:
    n = len(R)
    overdue_count = _negbin(rng, np.exp(-0.9 - 0.9 * R), 1.2)
    # Spell length grows with the number of overdue events; no events -> no spell.
    spell = np.ceil(
        np.exp(np.log(9.0) + 0.5 * np.log1p(overdue_count) - 0.3 * R + 0.9 * rng.standard_normal(n))
    )
    overdue_max_days = np.where(overdue_count > 0, np.clip(spell, 1, 720), 0.0)
    holds_wealth = rng.random(n) < _sigmoid(-0.4 + 1.2 * W)
    wealth = _lognormal(rng, 20_000.0, 1.1 * W, 1.2)
    return {
        "on_time_repayment_rate": _beta(rng, _sigmoid(2.3 + 0.9 * R), 18.0),
        "overdue_count": overdue_count,
        "overdue_max_days": overdue_max_days,
        "balance": _lognormal(rng, 3_000.0, 1.0 * W + 0.2 * R, 1.0),
        "spend_level": _lognormal(rng, 2_500.0, 0.6 * W + 0.2 * S, 0.6),
        "spend_stability": _beta(rng, _sigmoid(0.8 + 0.5 * R + 0.3 * W), 12.0),
        "wealth_holdings": np.where(holds_wealth, wealth, 0.0),
        "bill_payments": rng.poisson(np.exp(np.log(10.0) + 0.3 * R + 0.2 * W)).astype(np.float64),
        "high_risk_merchant_share": _beta(rng, _sigmoid(-3.3 - 0.7 * R), 8.0),
        "complaints": _negbin(rng, np.exp(-2.4 - 0.8 * R), 1.0),
    }


def _social(rng: np.random.Generator, R, W, S, H) -> dict[str, np.ndarray]:
    n = len(R)
    # Contacts' standing: people know people like them; about 600 +- 60 on 300..850.
    standing_signal = (0.6 * R + 0.4 * W) / math.sqrt(0.36 + 0.16 + 2 * 0.24 * LATENT_CORR[0, 1])
    standing = 600.0 + 60.0 * (0.25 * standing_signal + 0.968 * rng.standard_normal(n))
    return {
        "interaction_freq": _lognormal(rng, 80.0, 0.8 * S, 0.7),
        "red_packet_exchange": _negbin(rng, np.exp(np.log(30.0) + 0.7 * S + 0.3 * W), 2.0),
        "group_activity": _beta(rng, _sigmoid(-0.5 + 0.8 * S), 6.0),
        "contacts_avg_standing": np.round(np.clip(standing, 300.0, 850.0), 1),
        "mini_program_use": _negbin(rng, np.exp(np.log(20.0) + 0.5 * S + 0.2 * W), 1.5),
        "donations": rng.poisson(np.exp(-0.5 + 0.1 * R + 0.4 * S + 0.1 * W)).astype(np.float64),
        "violation_reports": _negbin(rng, np.exp(-2.8 - 0.3 * R - 0.2 * S), 0.8),
    }


def _device(rng: np.random.Generator, R, W, S, H) -> dict[str, np.ndarray]:
    return {
        "common_device_share": _beta(rng, _sigmoid(1.8 + 0.6 * H + 0.1 * R), 10.0),
        "devices_90d": 1.0 + rng.poisson(np.exp(np.log(0.8) - 0.3 * H + 0.1 * W)),
        "abnormal_location_logins": _negbin(rng, np.exp(-1.3 - 0.7 * H - 0.1 * R), 1.0),
        "rebinding_count": _negbin(rng, np.exp(-1.6 - 0.6 * H - 0.1 * R), 1.0),
        "two_factor_on": (rng.random(len(H)) < _sigmoid(-0.2 + 1.2 * H)).astype(np.float64),
        "password_age_days": np.minimum(np.round(_lognormal(rng, 180.0, -0.5 * H, 0.8)), 3650.0),
        "location_stability": _beta(rng, _sigmoid(1.2 + 0.2 * R + 0.4 * H), 8.0),
    }


_GENERATORS = {"payments": _payments, "social": _social, "device": _device}


def _format_phones(numbers: np.ndarray, party: str) -> np.ndarray:
    """Format 11-digit numbers the way `party` writes them, as a numpy unicode array."""
    prefix, groups, sep = PHONE_FORMATS[party]
    powers = 10 ** np.arange(10, -1, -1, dtype=np.int64)
    digits = ((numbers[:, None] // powers) % 10).astype(np.uint8) + ord("0")
    pieces: list[np.ndarray] = []
    if prefix:
        pieces.append(np.frombuffer(prefix.encode(), dtype=np.uint8))
    start = 0
    for i, width in enumerate(groups):
        if i:
            pieces.append(np.frombuffer(sep.encode(), dtype=np.uint8))
        pieces.append(digits[:, start : start + width])
        start += width
    n = len(numbers)
    cols = [p if p.ndim == 2 else np.broadcast_to(p, (n, len(p))) for p in pieces]
    buf = np.ascontiguousarray(np.hstack(cols))
    return buf.view(f"S{buf.shape[1]}").ravel().astype(f"U{buf.shape[1]}")


def _fit_label_model(
    features: dict[str, dict[str, np.ndarray]], config: PopulationConfig
) -> tuple[LabelModel, dict[str, np.ndarray]]:
    """Standardise the terms, scale silos to their variance shares, solve the intercept."""
    terms: list[LabelTerm] = []
    raw: dict[str, np.ndarray] = {}
    for silo in SILOS:
        for column, kind, weight in LABEL_TERMS[silo]:
            t = _transform(features[silo][column], kind)
            present = t[~np.isnan(t)]
            std = float(present.std())
            if std == 0.0:
                raise RuntimeError(f"label term {silo}.{column} is constant; cannot scale it")
            terms.append(LabelTerm(silo, column, kind, weight, float(present.mean()), std))
    unit = LabelModel(tuple(terms), dict.fromkeys(SILOS, 1.0), 0.0)
    frames = {s: pd.DataFrame(features[s], copy=False) for s in SILOS}
    for silo in SILOS:
        raw[silo] = unit.silo_logit(silo, frames[silo])
    shares = dict(zip(SILOS, config.signal_share, strict=True))
    share_scale = {s: math.sqrt(shares[s]) / float(raw[s].std()) for s in SILOS}
    # sum() starts from 0, which the typing keeps; SILOS is never empty, so it is an array.
    total = cast(np.ndarray, sum(share_scale[s] * raw[s] for s in SILOS))
    overall = config.signal_scale / float(total.std())
    scales = {s: share_scale[s] * overall for s in SILOS}
    parts = {s: scales[s] * raw[s] for s in SILOS}
    intercept = _solve_intercept(overall * total, config.default_rate)
    return LabelModel(tuple(terms), scales, intercept), parts


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


# Separate random streams, so adding them changed no earlier draw for any seed.
ELIGIBILITY_STREAM = 0xE1161B
COHORT_STREAM = 0xC0407
# A recent (last-year) severe default: log-odds = b + true logit + this * label, b solved for
# severe_default_rate. Older severe defaults (1 to 10 years ago) are as common again.
SEVERE_DEFAULT_LABEL_WEIGHT = 1.5
OLDER_DEFAULT_DAYS = (365, 3650)


@dataclass(frozen=True)
class _Layout:
    """What a later cohort reuses: everyone's latents and phone numbers, and which of them
    (rows of `latents`) each silo's table holds, in the table's order."""

    latents: np.ndarray  # (people + outsider pool, len(LATENTS))
    numbers: np.ndarray  # 11-digit phone numbers, same rows
    rows: dict[str, np.ndarray]


def generate(config: PopulationConfig) -> Population:
    """Generate the parties' tables and the truth for `config` (deterministic per seed)."""
    return _generate(config)[0]


def _eligibility(config: PopulationConfig, logit: np.ndarray, label: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """The authority's account-status columns (server/eligibility.py), from their own stream."""
    rng = np.random.default_rng([config.seed, ELIGIBILITY_STREAM])
    n = len(label)
    verified = (rng.random(n) >= config.unverified_rate).astype(np.int8)
    bound = (rng.random(n) >= config.unbound_card_rate).astype(np.int8)
    days = np.full(n, np.nan)
    if config.severe_default_rate > 0:
        propensity = logit + SEVERE_DEFAULT_LABEL_WEIGHT * label
        p = _sigmoid(_solve_intercept(propensity, config.severe_default_rate) + propensity)
        recent = rng.random(n) < p
        older = ~recent & (rng.random(n) < p)
        low, high = OLDER_DEFAULT_DAYS
        days = np.where(recent, rng.integers(0, low, n), days)
        days = np.where(older, rng.integers(low, high + 1, n), days).astype(np.float64)
    return {"real_name_verified": verified, "card_bound": bound,
            "days_since_severe_default": days}


def _draw_features(rng: np.random.Generator, latents: np.ndarray, missing_rate: float
                   ) -> dict[str, dict[str, np.ndarray]]:
    """Every silo's features for the rows of `latents`, then the missing cells."""
    R, W, S, H = latents.T
    features = {s: _GENERATORS[s](rng, R, W, S, H) for s in SILOS}
    for silo in SILOS:
        for column in MISSING_COLUMNS[silo]:
            hide = rng.random(len(latents)) < missing_rate
            features[silo][column] = np.where(hide, np.nan, features[silo][column])
    return features


def _generate(config: PopulationConfig) -> tuple[Population, _Layout]:
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    n_users = config.users
    n_out = round(config.outsiders * n_users)
    # Outsiders come from a pool twice the per-silo count, so silos share some of them.
    n_total = n_users + 2 * n_out

    latents = rng.standard_normal((n_total, len(LATENTS))) @ np.linalg.cholesky(LATENT_CORR).T
    features = _draw_features(rng, latents, config.missing_rate)
    numbers = _PHONE_LOW + rng.choice(_PHONE_SPAN, size=n_total, replace=False)
    t_features = time.perf_counter()

    known = {s: {c: v[:n_users] for c, v in features[s].items()} for s in SILOS}
    model, parts = _fit_label_model(known, config)
    # cast: as in _fit_label_model, sum() over the non-empty SILOS is an array
    logit = model.intercept + cast(np.ndarray, sum(parts[s] for s in SILOS))
    p_true = _sigmoid(logit)
    label = (rng.random(n_users) < p_true).astype(np.int8)
    t_label = time.perf_counter()

    authority_phones = _format_phones(numbers[:n_users], AUTHORITY)
    authority = pd.DataFrame({ID_COLUMN: authority_phones, LABEL_COLUMN: label}
                             | _eligibility(config, logit, label))
    truth = pd.DataFrame(
        {ID_COLUMN: authority_phones, "p_true": p_true, LABEL_COLUMN: label, "logit": logit}
        | {f"logit_{s}": parts[s] for s in SILOS}
    )
    silos: dict[str, pd.DataFrame] = {}
    silo_rows: dict[str, np.ndarray] = {}
    for silo, cover in zip(SILOS, config.coverage, strict=True):
        insiders = rng.choice(n_users, size=round(cover * n_users), replace=False)
        outsiders = n_users + rng.choice(2 * n_out, size=n_out, replace=False)
        rows = rng.permutation(np.concatenate([insiders, outsiders]))
        silo_rows[silo] = rows
        table = {ID_COLUMN: _format_phones(numbers[rows], silo)}
        table |= {c: features[silo][c][rows].astype(np.float64) for c in feature_names(silo)}
        silos[silo] = pd.DataFrame(table)
    done = time.perf_counter()

    timings = {
        "features": t_features - started,
        "label": t_label - t_features,
        "tables": done - t_label,
        "total": done - started,
    }
    log.info(
        "generated %d people (+%d outsiders) in %.2f s (features %.2f, label %.2f, tables %.2f)",
        n_users,
        2 * n_out,
        timings["total"],
        timings["features"],
        timings["label"],
        timings["tables"],
    )
    return (Population(config, authority, silos, truth, model, timings),
            _Layout(latents, numbers, silo_rows))


# ---- writing ---------------------------------------------------------------------------------


def _write_parquet(frame: pd.DataFrame, path: Path, party: str, store: Keystore | None = None
                   ) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    return write_party_file(path, party, buf.getvalue().to_pybytes(), store)


def write_parties(pop: Population, parties_dir: Path, overwrite: bool = False,
                  store: Keystore | None = None) -> dict[str, Path]:
    """Write each party's table into its own folder and the truth into `simulation/`;
    encrypted (`*.parquet.enc`, bound to the party) when a keystore is given.

    Returns paths keyed by "authority", each silo name, "truth" and "config". With
    overwrite=True the files written here are replaced; other files in the folder are kept.
    """
    parties_dir = Path(parties_dir)
    if parties_dir.exists() and not parties_dir.is_dir():
        raise NotADirectoryError(f"{parties_dir} exists and is not a directory")
    if not overwrite and parties_dir.exists() and any(parties_dir.iterdir()):
        raise FileExistsError(
            f"{parties_dir} is not empty; refusing to overwrite party tables. Choose a new "
            "folder, or pass overwrite=True (--overwrite) to replace them"
        )
    started = time.perf_counter()
    paths = {AUTHORITY: _write_parquet(pop.authority, parties_dir / AUTHORITY / "labels.parquet",
                                       AUTHORITY, store)}
    for silo, table in pop.silos.items():
        paths[silo] = _write_parquet(table, parties_dir / silo / "features.parquet", silo, store)
    # The truth belongs to the experiment, never inside a party's folder.
    sim = parties_dir / "simulation"
    paths["truth"] = _write_parquet(pop.truth, sim / "truth.parquet", "simulation", store)
    paths["config"] = sim / "population.json"
    paths["config"].write_text(pop.config.to_json() + "\n")
    log.info("wrote parties to %s in %.2f s", parties_dir, time.perf_counter() - started)
    return paths


# ---- a later cohort (drift monitoring) ---------------------------------------------------------
# The same people some time later: each latent trait keeps a share rho of its old value and
# refreshes the rest (L' = rho L + sqrt(1 - rho^2) eps, eps with the same correlations, so the
# latents keep their N(0, LATENT_CORR) distribution), then moves by -drift * COHORT_RISK_SHIFT
# standard deviations: less responsible, a little poorer and less careful with security, i.e.
# riskier. drift=0 keeps the distribution (only the refresh). Measured on 20,000 people (seed 2),
# PSI of the true logit over the three silos against the training table (clients/silo/drift.py):
# drift 0 about 0.001, 0.3 about 0.14 ("moderate"), 0.5 about 0.38, 1 about 1.5 ("shift").
COHORT_RHO = 0.9
COHORT_RISK_SHIFT = np.array([1.5, 0.75, 0.0, 0.75])  # per LATENTS
MAX_DRIFT = 5.0


def write_later_cohort(parties_dir: Path, name: str = "later", drift: float = 0.3,
                       seed: int | None = None, store: Keystore | None = None,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write `<silo>/cohorts/<name>/features.parquet` (`.parquet.enc` bound to the silo and the
    cohort's name when `store` is given) plus `cohort.json` for every silo of a generated
    parties directory: the silo's people, in its table's order, with features re-drawn from
    drifted latents. Deterministic per (population.json, drift, seed); `seed` defaults to the
    population's. Returns the cohort tables' paths by silo."""
    parties_dir = Path(parties_dir)
    folders = {silo: cohort_dir(parties_dir / silo, name) for silo in SILOS}  # checks the name
    if isinstance(drift, bool) or not isinstance(drift, int | float) or not (
            0.0 <= drift <= MAX_DRIFT):
        raise ValueError(f"drift={drift!r}: must be a number in [0, {MAX_DRIFT:g}] (0 = the same "
                         "distribution, 0.3 noticeable, 1 large)")
    config_path = parties_dir / "simulation" / "population.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} does not exist: a later cohort is regenerated "
                                "from the population's config; use a parties directory made "
                                "by `fedscore generate`")
    config = PopulationConfig.from_json(config_path.read_text())
    seed = config.seed if seed is None else seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer")
    taken = [str(f) for f in folders.values()
             if any((f / n).exists() for n in (COHORT_TABLE, COHORT_TABLE + ".enc", COHORT_INFO))]
    if taken and not overwrite:
        raise FileExistsError(f"cohort {name!r} exists ({', '.join(taken)}); choose another "
                              "name, or pass overwrite=True to replace it")
    started = time.perf_counter()
    pop, layout = _generate(config)
    for silo in SILOS:
        _check_same_people(parties_dir / silo, silo, pop.silos[silo][ID_COLUMN], store)

    rng = np.random.default_rng([seed, COHORT_STREAM])
    latents = layout.latents
    eps = rng.standard_normal(latents.shape) @ np.linalg.cholesky(LATENT_CORR).T
    moved = (COHORT_RHO * latents + math.sqrt(1.0 - COHORT_RHO**2) * eps
             - drift * COHORT_RISK_SHIFT)
    features = _draw_features(rng, moved, config.missing_rate)
    info = {"name": name, "drift": float(drift), "seed": seed, "rho": COHORT_RHO,
            "risk_shift": dict(zip(LATENTS, COHORT_RISK_SHIFT.tolist(), strict=True)),
            "population_seed": config.seed}
    paths: dict[str, Path] = {}
    for silo in SILOS:
        rows = layout.rows[silo]
        table = pd.DataFrame({ID_COLUMN: pop.silos[silo][ID_COLUMN]}
                             | {c: features[silo][c][rows].astype(np.float64)
                                for c in feature_names(silo)})
        folder = folders[silo]
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (folder / COHORT_TABLE, folder / (COHORT_TABLE + ".enc")):
            stale.unlink(missing_ok=True)  # a replaced cohort may change plaintext/encrypted
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf)
        data = buf.getvalue().to_pybytes()
        if store is None:
            path = folder / COHORT_TABLE
            path.write_bytes(data)
        else:
            path = folder / (COHORT_TABLE + ".enc")
            write_encrypted(store, path, data, cohort_context(silo, name))
        (folder / COHORT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        paths[silo] = path
    log.info("wrote cohort %r (drift %.2f) for %d silos in %.2f s", name, drift, len(SILOS),
             time.perf_counter() - started)
    return paths


def _check_same_people(silo_dir: Path, silo: str, expected: pd.Series,
                       store: Keystore | None) -> None:
    """The silo's table holds the regenerated people in the regenerated order (compared as
    written, without showing any identifier)."""
    actual = read_table(find_table(silo_dir), silo, store)[ID_COLUMN]
    if len(actual) != len(expected):
        differ = f"it has {len(actual)} rows, the population {len(expected)}"
    else:
        n = int((actual.to_numpy(dtype=object) != expected.to_numpy(dtype=object)).sum())
        if not n:
            return
        differ = f"{n} of {len(actual)} rows hold another person"
    raise ValueError(f"silo {silo!r}: its table in {silo_dir} was not generated from this "
                     f"population.json ({differ}); regenerate the parties with `fedscore "
                     "generate`, or write cohorts only for parties that were generated")
