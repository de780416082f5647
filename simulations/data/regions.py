"""The horizontal topology's parties: the generated population dealt out to regions.

Each region (a regional bank, say) holds every kind of fact about its own customers: the three
silos' features side by side, and whether the customer defaulted. Regions are disjoint.

Skew: a person's economic standing (log spend level plus log balance, standardised, with a
little noise) orders the population; with probability `region_skew` a person goes to the
region of their standing's quantile band, otherwise to a region drawn at random. So skew 0
deals people out at random (every region looks alike) and skew 1 makes the regions strata:
a rich region and a poor one differ in spending, balances and, through them, default rates.

    <parties>/region_1/customers.parquet(.enc)   phone, the 24 features, default
    <parties>/regions.json                       the region names, in partition-id order
    <parties>/simulation/truth.parquet(.enc)     the generator's truth (never a party's)
    <parties>/simulation/population.json         the population and the region count
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from clients.protocol.schema import ID_COLUMN, LABEL_COLUMN, SILOS, feature_names
from clients.region.data import REGION_TABLE, REGIONS_FILE, region_names
from crypto.at_rest import Keystore
from crypto.identity import normalize_ids
from simulations.data.paths import RunDirError
from simulations.data.population import Population, PopulationConfig, _write_parquet, generate

log = logging.getLogger(__name__)

STANDING_NOISE = 0.3  # keeps strata from being perfectly sharp at skew 1


def customers(pop: Population) -> pd.DataFrame:
    """One row per person the authority knows: every silo's features (empty where the person
    is absent from that silo) and the label."""
    frame = pop.authority[[ID_COLUMN, LABEL_COLUMN]].reset_index(drop=True)
    # Each party writes phone numbers its own way; regions hold them in E.164.
    frame[ID_COLUMN] = normalize_ids(frame[ID_COLUMN]).to_numpy()
    for silo in SILOS:
        table = pop.silos[silo][feature_names(silo)].copy()
        table.index = pd.Index(normalize_ids(pop.silos[silo][ID_COLUMN]).to_numpy())
        frame = frame.join(table, on=ID_COLUMN)
    return frame


def assign_regions(frame: pd.DataFrame, regions: int, skew: float, seed: int) -> np.ndarray:
    """Region index (0..regions-1) per row of `customers`; vectorised."""
    rng = np.random.default_rng([seed, 7_331, regions])
    n = len(frame)
    standing = np.zeros(n)
    for col in ("spend_level", "balance"):
        x = np.log1p(frame[col].to_numpy(dtype=np.float64))
        x = np.where(np.isnan(x), np.nanmedian(x), x)
        standing += (x - x.mean()) / (x.std() or 1.0)
    standing += STANDING_NOISE * rng.standard_normal(n)
    band = np.empty(n, dtype=np.int64)
    band[np.argsort(standing, kind="stable")] = np.arange(n) * regions // n
    random = rng.integers(0, regions, size=n)
    return np.where(rng.random(n) < skew, band, random)


def write_regions(pop: Population, regions: int, parties_dir: Path,
                  store: Keystore | None = None) -> dict[str, int]:
    """Write each region's customers and the truth; returns customers per region."""
    parties_dir = Path(parties_dir)
    frame = customers(pop)
    where = assign_regions(frame, regions, pop.config.region_skew, pop.config.seed)
    names = region_names(regions)
    sizes = {}
    for k, name in enumerate(names):
        rows = frame[where == k].reset_index(drop=True)
        _write_parquet(rows, parties_dir / name / REGION_TABLE, name, store)
        sizes[name] = len(rows)
    (parties_dir / REGIONS_FILE).write_text(json.dumps({"regions": names}) + "\n")
    sim = parties_dir / "simulation"
    _write_parquet(pop.truth, sim / "truth.parquet", "simulation", store)
    (sim / "population.json").write_text(pop.config.to_json() + "\n")
    (sim / "regions.json").write_text(json.dumps({"regions": regions}) + "\n")
    log.info("wrote %d regions to %s: %s", regions, parties_dir, sizes)
    return sizes


def prepare_regions(pop: PopulationConfig, regions: int, parties_dir: Path,
                    store: Keystore | None = None) -> bool:
    """Generate and write the regions unless the same population and region count are already
    there; returns True when existing tables were reused."""
    sim = parties_dir / "simulation"
    if (sim / "population.json").exists():
        same_pop = PopulationConfig.from_json((sim / "population.json").read_text()) == pop
        saved = sim / "regions.json"
        same_regions = saved.exists() and json.loads(saved.read_text())["regions"] == regions
        if same_pop and same_regions:
            return True
        raise RunDirError(
            f"{parties_dir} holds party tables of another population or topology; choose "
            "another --parties directory or delete that one"
        )
    write_regions(generate(pop), regions, parties_dir, store)
    return False
