"""Stress datasets for issue 20's acceptance: `--data DIR` directories the project was not tuned
on, each a credit-like problem with a known signal split over silos plus the authority's labels.

  heavy_tails       Student-t (2.5 dof) columns, standardised (so half of every column is
                    negative), signal through a monotone, saturating logit; 20,000 people
  categories        text categories carrying signal ("region", 12 values; "employment", 5)
                    beside three numeric columns; 10,000 people
  categories_codes  the same people with the categories as integer codes declared `category`
                    (the fallback while text columns are refused)
  small             the integer-coded categories problem with 1,000 people
  mixed_ids         plain customer numbers written differently by each party (zero padding,
                    case, surrounding spaces), matched by `fold_case` and `strip_leading_zeros`;
                    10,000 people

Every generator draws from one numpy Generator seeded by its `seed`, so the same arguments write
byte-identical tables. Default rates of defaulters are those of credit data (6 % to 20 %).

    .venv/bin/python bench/stress_data.py OUT_ROOT          # writes OUT_ROOT/<name>/ for each
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

LABELS = "labels.csv"
ID = "customer_id"
REGIONS = ("north", "south", "east", "west", "capital", "coast", "lakes", "hills",
           "islands", "border", "valley", "plains")
# Employment status and its effect on the log-odds of default.
EMPLOYMENT = {"employed": -0.6, "self-employed": 0.2, "unemployed": 1.4, "retired": -0.3,
              "student": 0.8}


def _labels(rng: np.random.Generator, logit: np.ndarray, rate: float) -> np.ndarray:
    """0/1 defaults drawn from sigmoid(logit + b), b chosen so that the mean probability is
    `rate` (bisection: the mean is increasing in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < rate else (lo, mid)
    p = 1 / (1 + np.exp(-(logit + lo)))
    return (rng.random(len(p)) < p).astype(np.int8)


def _write(out: Path, tables: dict[str, pd.DataFrame], mapping: dict) -> Path:
    """One CSV per party (the authority's is LABELS) and mapping.json, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for party, frame in tables.items():
        frame.to_csv(out / (LABELS if party == "authority" else f"{party}.csv"), index=False)
    (out / "mapping.json").write_text(json.dumps(mapping, indent=1) + "\n")
    return out


def _mapping(silos: dict[str, list[str]], **extra: object) -> dict:
    return {"identifier": ID, "identifier_kind": "plain",
            "authority": {"file": LABELS, "label": "default"},
            "silos": {name: {"file": f"{name}.csv", "columns": cols}
                      for name, cols in silos.items()}, **extra}


def _ids(n: int) -> np.ndarray:
    return np.array([f"C{i:06d}" for i in range(1, n + 1)])


def heavy_tails(out: Path, *, rows: int = 20_000, seed: int = 0, rate: float = 0.08) -> Path:
    """Nine standardised Student-t columns over three silos; each column moves the log-odds by
    w * sign(x) log(1 + |x|) (monotone, saturating in the tails), the first also by a step."""
    rng = np.random.default_rng(seed)
    raw = rng.standard_t(2.5, size=(rows, 9))
    weights = np.array([0.9, -0.7, 0.5, 0.7, -0.5, 0.3, 0.6, 0.4, -0.3])
    logit = (np.sign(raw) * np.log1p(np.abs(raw))) @ weights + 0.8 * (raw[:, 0] > 1.5)
    y = _labels(rng, logit, rate)
    std = (raw - raw.mean(axis=0)) / raw.std(axis=0)
    cols = [f"v{j + 1}" for j in range(9)]
    silos = {"bank": cols[0:3], "bureau": cols[3:6], "telco": cols[6:9]}
    ids = _ids(rows)
    tables = {"authority": pd.DataFrame({ID: ids, "default": y})}
    for name, names in silos.items():
        idx = [cols.index(c) for c in names]
        tables[name] = pd.DataFrame({ID: ids, **{c: std[:, j].round(6) for c, j in
                                                 zip(names, idx, strict=True)}})
    return _write(out, tables, _mapping(silos))


def categories(out: Path, *, rows: int = 10_000, seed: int = 1, rate: float = 0.12,
               text: bool = True) -> Path:
    """"region" (12 values, uneven sizes) and "employment" (5) carry signal beside age, income
    and card utilisation. Silo "profile": region, employment, age; silo "bank": income,
    utilisation. `text=False` writes the categories as codes 1..k declared `category`."""
    rng = np.random.default_rng(seed)
    region = rng.choice(12, size=rows, p=rng.dirichlet(np.full(12, 3.0)))
    region_effect = rng.normal(0.0, 0.8, 12)
    jobs = list(EMPLOYMENT)
    job = rng.choice(5, size=rows, p=[0.6, 0.15, 0.07, 0.1, 0.08])
    age = rng.integers(18, 80, size=rows)
    income = np.round(rng.lognormal(10.3, 0.6, size=rows), 2)
    util = np.round(rng.beta(1.2, 2.5, size=rows), 4)
    logit = (region_effect[region] + np.array(list(EMPLOYMENT.values()))[job]
             - 0.8 * np.log(income / 30_000) + 2.5 * util - 0.025 * (age - 45))
    y = _labels(rng, logit, rate)
    ids = _ids(rows)
    silos = {"profile": ["region", "employment", "age"], "bank": ["income", "utilisation"]}
    extra: dict = {}
    if text:
        region_col, job_col = np.array(REGIONS)[region], np.array(jobs)[job]
    else:
        region_col, job_col = region + 1, job + 1
        extra = {"kinds": {"region": "category", "employment": "category"},
                 "categories": {"region": list(range(1, 13)), "employment": list(range(1, 6))}}
    mapping = _mapping(silos)
    mapping["silos"]["profile"].update(extra)
    return _write(out, {
        "authority": pd.DataFrame({ID: ids, "default": y}),
        "profile": pd.DataFrame({ID: ids, "region": region_col, "employment": job_col,
                                 "age": age}),
        "bank": pd.DataFrame({ID: ids, "income": income, "utilisation": util}),
    }, mapping)


def small(out: Path, *, rows: int = 1_000, seed: int = 2, rate: float = 0.2) -> Path:
    """The integer-coded categories problem with 1,000 people (the issue's small table)."""
    return categories(out, rows=rows, seed=seed, rate=rate, text=False)


def mixed_ids(out: Path, *, rows: int = 10_000, seed: int = 3, rate: float = 0.08) -> Path:
    """Customer number k with a check letter, written "000012345K" by the authority, "12345k"
    by silo "bank" and " 0012345K " (letter case varying) by silo "bureau"; the silos hold
    about 95 % and 92 % of the people, plus 5 % more the authority does not know."""
    rng = np.random.default_rng(seed)
    number = rng.choice(10_000_000, size=rows + rows // 20, replace=False) + 1
    letter = np.array(list("ABCDEFGHJK"))[number % 10]
    debt = np.round(rng.lognormal(8.0, 1.2, size=len(number)), 2)
    late = rng.poisson(0.4, size=len(number))
    util = np.round(rng.beta(1.5, 3.0, size=len(number)), 4)
    arrears = (rng.random(len(number)) < 0.05).astype(int)
    logit = 0.6 * np.log1p(debt / 1000) + 0.9 * late + 3.0 * util + 1.8 * arrears
    y = _labels(rng, logit[:rows], rate)
    auth = pd.DataFrame({"customer_id": [f"{k:09d}{c}" for k, c in
                                         zip(number[:rows], letter[:rows], strict=True)],
                         "default": y})

    def held(share: float) -> np.ndarray:  # the silo's people: most known ones, some outsiders
        known = np.flatnonzero(rng.random(rows) < share)
        return rng.permutation(np.concatenate([known, np.arange(rows, len(number))]))

    b = held(0.95)
    bank = pd.DataFrame({"cust_no": [f"{k}{c.lower()}" for k, c in
                                     zip(number[b], letter[b], strict=True)],
                         "debt": debt[b], "late_payments": late[b]})
    u = held(0.92)
    cases = rng.random(len(u)) < 0.5
    bureau = pd.DataFrame({"ID": [f" {k:07d}{c.lower() if low else c} " for k, c, low in
                                  zip(number[u], letter[u], cases, strict=True)],
                           "utilisation": util[u], "arrears": arrears[u]})
    mapping = _mapping({"bank": ["debt", "late_payments"], "bureau": ["utilisation", "arrears"]},
                       fold_case=True, strip_leading_zeros=True)
    mapping["silos"]["bank"]["identifier"] = "cust_no"
    mapping["silos"]["bureau"]["identifier"] = "ID"
    return _write(out, {"authority": auth, "bank": bank, "bureau": bureau}, mapping)


GENERATORS: dict[str, Callable[..., Path]] = {
    "heavy_tails": heavy_tails,
    "categories": categories,
    "categories_codes": lambda out, **kw: categories(out, text=False, **kw),
    "small": small,
    "mixed_ids": mixed_ids,
}


def write_all(root: Path, names: tuple[str, ...] = tuple(GENERATORS)) -> dict[str, Path]:
    """Each named dataset in root/<name>/, with its default size and seed."""
    return {name: GENERATORS[name](root / name) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory to write one dataset per folder in")
    parser.add_argument("--only", nargs="+", choices=list(GENERATORS), default=list(GENERATORS))
    args = parser.parse_args()
    for name, path in write_all(args.root, tuple(args.only)).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
