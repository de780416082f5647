"""A later cohort of a generated population: the same people some time on, for drift monitoring.

Each silo gets the same people as in its table, in its table's order, with features re-drawn
from drifted latent traits (simulations/data/features.py), so a silo's model can be scored on
them and the drift measured (clients/silo/drift.py, simulations/service/drift_run.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clients.protocol.schema import ID_COLUMN, SILOS, feature_names
from clients.protocol.tables import read_table
from clients.silo.cohorts import COHORT_INFO, COHORT_TABLE, cohort_context, cohort_dir
from clients.silo.data import find_table
from crypto.at_rest import Keystore, write_encrypted
from simulations.data.features import LATENT_CORR, LATENTS, _draw_features
from simulations.data.population import PopulationConfig, _generate

log = logging.getLogger(__name__)

# A separate random stream, so adding it changed no earlier draw for any seed.
COHORT_STREAM = 0xC0407

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
