"""The synthetic population's features: latent traits, each silo's columns, phone numbers.

How features arise
    Four correlated latent traits per person (responsibility, wealth, sociability, security
    hygiene) drive the features, so the silos' columns are correlated the way real ones are
    (a responsible person repays on time, has reputable contacts and changes passwords).
    The latents only shape the features; the label never reads them.

Missing cells
    The columns in `MISSING_COLUMNS` get NaN at the config's `missing_rate`; the others are
    complete.

Phone numbers
    Every party writes the same 11-digit numbers in its own format (`PHONE_FORMATS`).
"""

from __future__ import annotations

import math

import numpy as np

from clients.protocol.schema import AUTHORITY, SILOS
from simulations.data.label_model import _sigmoid

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
