"""Reading what a report describes: a run or sweep directory, its curves.json and ledger.

A required file that is missing or corrupt stops with a ReportError naming the fix; optional
inputs a run may lack come back as None for the sections to turn into a short note.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from server.metrics import ALL_TEST, FIGURES
from server.scores_file import read_split
from server.scoring import TIER_KEYS
from simulations.data import paths
from simulations.data.paths import resume_command

RUN_REQUIRED = ("config.json", "manifest.json", "metrics.json")
AUTHORITY_FILE = "authority.json"  # the federation's own results: the experiment's may lack
SWEEP_REQUIRED = ("sweep.json", "sweep.csv", "summary.csv")
SWEEP_COLUMNS = ("epsilon", "seed", "run", "status", "auc")
SUMMARY_COLUMNS = ("epsilon", "auc_mean", "auc_ci_low", "auc_ci_high")
# sweep.json names grid keys by their config key; sweep.csv and summary.csv call this one
# "epsilon" and every other by its dotted key.
# The representative run of a sweep: the default experiment's budget and first seed (and,
# in a grid sweep, the reference's value of every other grid key).
PREFERRED_RUN = {"epsilon": 1.0, "seed": 0}


class ReportError(ValueError):
    """A directory the report cannot describe; the message says what to do about it."""


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
    # The columns naming a grid point in sweep.csv and summary.csv: "epsilon" first, then
    # each other grid key in sweep.json's order. Never pool rows that differ in one of them.
    groups: tuple[str, ...] = ("epsilon",)


def detect_kind(directory: Path) -> str:
    """'run' or 'sweep'; a ReportError naming what was expected otherwise."""
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory; pass a run directory (from "
                          "`fedscore run --out DIR`) or a sweep directory")
    if any((directory / name).exists() for name in SWEEP_REQUIRED):
        return "sweep"
    if (directory / "metrics.json").exists() or (directory / "manifest.json").exists():
        return "run"
    unfinished = _unfinished(directory)
    if unfinished:
        raise ReportError(unfinished)
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
        scores = pd.read_parquet(path)
        if "split" not in scores.columns:
            # The published scores carry no split: the authority keeps it beside them.
            scores["split"] = read_split(run_dir, None)
        scores = scores[["split", "probability", "score", "tier"]]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ReportError(f"{path} cannot be read ({exc}); restore it from the run or re-run "
                          "`fedscore run`") from None
    return scores, ""


def _unfinished(run_dir: Path) -> str | None:
    """Why a directory holding the federation's results (authority.json) but not the
    experiment's (metrics.json) cannot be reported yet, with the command that completes it
    (simulations/data/paths.py `resume_command`, as every other message names it); None when
    it is no such directory."""
    if not (run_dir / AUTHORITY_FILE).exists():
        return None
    command = resume_command(run_dir)
    if command is None:
        return None
    if command.startswith("fedscore finish"):
        return (f"{run_dir} holds a federation's results (authority.json) without the "
                "experiment's (metrics.json: baselines, oracle, audit), as `flwr run .` leaves "
                f"them; complete it with `{command}`, then report it")
    return (f"{run_dir} holds an unfinished run (no metrics.json); continue it with "
            f"`{command}`, then report it")


def load_run(run_dir: Path) -> RunData:
    unfinished = _unfinished(run_dir)
    if unfinished:
        raise ReportError(unfinished)
    fix = f"{run_dir} is not a complete run; re-run `fedscore run --out DIR` to produce it"
    for name in RUN_REQUIRED:
        _require(run_dir / name, fix)
    metrics = _read_object(run_dir / "metrics.json", fix)
    if "auc" not in metrics:
        raise ReportError(f"{run_dir / 'metrics.json'} has no 'auc'; {fix}")
    metrics = with_populations(metrics)
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


def with_populations(metrics: dict) -> dict:
    """metrics.json in today's layout. Before issue 21 `auc`, `ks` ... covered every test
    person and `scored_test_auc` the scored ones: read so, no section shows an all-people
    figure as the score's (an old vertical run's scored KS, Brier ... are unknown: None)."""
    if ALL_TEST + "auc" in metrics:
        return metrics
    out = {**metrics, **{ALL_TEST + k: metrics.get(k) for k in FIGURES}}
    if metrics.get("topology") == "horizontal":
        return out  # every customer is scored: one population
    scored = out.pop("scored_test_auc", None)
    return {**out, **dict.fromkeys(FIGURES), "auc": scored,
            "gini": 2 * scored - 1 if scored is not None else None}


def grid_columns(config: dict) -> tuple[str, ...]:
    """The group columns of a sweep from its sweep.json: "epsilon" and every other grid key
    (a sweep from before grids, with "epsilons", has only "epsilon")."""
    grid = config.get("grid")
    return tuple(paths.grid_columns(grid if isinstance(grid, dict) else ()))


def _require_groups(frame: pd.DataFrame, groups: tuple[str, ...], path: Path, fix: str
                    ) -> pd.DataFrame:
    missing = [g for g in groups if g not in frame.columns]
    if missing and len(frame):
        raise ReportError(f"{path} lacks grid column(s) {', '.join(missing)} that sweep.json "
                          f"lists; {fix}")
    # An empty summary (no cell finished) may have been written without them.
    frame = frame.assign(**dict.fromkeys(missing, np.nan))
    # pandas reads a bool key's "true"/"false" as booleans: back to sweep.json's spelling.
    return frame.assign(**{g: frame[g].map({True: "true", False: "false"})
                           for g in groups if frame[g].dtype == bool})


def load_sweep(sweep_dir: Path) -> SweepData:
    fix = f"{sweep_dir} is not a complete sweep; re-run the sweep to produce it"
    config = _read_object(sweep_dir / "sweep.json", fix)
    groups = grid_columns(config)
    runs = _require_groups(_read_csv(sweep_dir / "sweep.csv", SWEEP_COLUMNS, fix), groups,
                           sweep_dir / "sweep.csv", fix)
    summary = _require_groups(_read_csv(sweep_dir / "summary.csv", SUMMARY_COLUMNS, fix),
                              groups, sweep_dir / "summary.csv", fix)
    seeds = [c for c in ("data_seed", "seed") if c in runs.columns]
    runs = runs.sort_values([*groups, *seeds], kind="stable", na_position="last")
    summary = summary.sort_values(list(groups), kind="stable", na_position="last")
    name = _representative(runs, _reference(config, groups))
    rep = None
    if name is not None:
        # Runs live in DIR/runs/<name> (simulations/run/sweep.py); DIR/<name> is accepted too.
        run_dir = (sweep_dir / "runs" / name).resolve()
        if not run_dir.is_dir():
            run_dir = (sweep_dir / name).resolve()
        if sweep_dir.resolve() not in run_dir.parents or not run_dir.is_dir():
            raise ReportError(f"sweep.csv lists run {name!r} as done but "
                              f"{sweep_dir / 'runs' / name} is not a directory inside the "
                              "sweep; restore it or re-run that point")
        rep = load_run(run_dir)
    return SweepData(sweep_dir, config, runs.reset_index(drop=True),
                     summary.reset_index(drop=True), rep, name, groups)


def _reference(config: dict, groups: tuple[str, ...]) -> dict[str, str]:
    """sweep.json's reference grid point by group column, without epsilon (the
    representative run keeps its preferred budget)."""
    reference = config.get("reference")
    if not isinstance(reference, dict):
        return {}
    return {k: str(v) for k, v in reference.items() if k in groups and k != "epsilon"}


def same_value(value: Any, text: str) -> bool:
    """A sweep.csv cell equals a grid value as sweep.json writes it ("0.003", "inf")."""
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value) == text


def _representative(runs: pd.DataFrame, reference: dict[str, str]) -> str | None:
    """The preferred run (epsilon 1, seed 0, the reference's other grid values) when it
    finished, else the first finished run in the sweep's order."""
    done = runs[runs["status"].astype(str) == "done"]
    if done.empty:
        return None
    preferred = done[(done["epsilon"] == PREFERRED_RUN["epsilon"])
                     & (pd.to_numeric(done["seed"], errors="coerce") == PREFERRED_RUN["seed"])]
    at_reference = preferred[np.array(
        [all(same_value(row[k], v) for k, v in reference.items())
         for _, row in preferred.iterrows()], dtype=bool)]
    for candidates in (at_reference, preferred, done):
        if len(candidates):
            return str(candidates.iloc[0]["run"])
    return None


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
