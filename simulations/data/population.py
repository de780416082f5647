"""Synthetic population: one feature table per silo, the authority's labels, and the truth.

Who is in it
    The scoring authority knows `users` people and holds their default labels. Each silo
    holds `coverage[k]` of those people plus `outsiders * users` people the authority does not
    know (drawn from a shared pool of outsiders, so silos partly overlap outside the authority
    too). Every party writes phone numbers in its own format and shuffles its own rows.

Where the rest lives
    How features arise: simulations/data/features.py. The label model (why the oracle is
    achievable): simulations/data/label_model.py; it is fitted here, to the authority's
    people, by `_fit_label_model`. The same people later (drift monitoring):
    simulations/data/cohort.py.
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
from crypto.at_rest import Keystore, write_party_file
from server.metrics import auc
from simulations.data.features import (
    _PHONE_LOW,
    _PHONE_SPAN,
    LATENT_CORR,
    LATENTS,
    _draw_features,
    _format_phones,
)
from simulations.data.label_model import (
    LABEL_TERMS,
    LabelModel,
    LabelTerm,
    _sigmoid,
    _solve_intercept,
    _transform,
)

log = logging.getLogger(__name__)


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


# A separate random stream, so adding it changed no earlier draw for any seed.
ELIGIBILITY_STREAM = 0xE1161B
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
