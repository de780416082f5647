"""`fedscore report`: HTML, LaTeX, figure and CSV outputs from synthetic run and sweep
directories.

The fixtures follow the run directory's files (metrics.json with its audit, curves.json,
ledger.jsonl, scores.parquet) and the sweep's (sweep.json, sweep.csv, summary.csv). The browser
test opens the page in Debian's Chromium (scripts/browser-setup.sh) through playwright; the
LaTeX test compiles tables.tex with Debian's pdflatex (scripts/tex-setup.sh).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure

from server.scoring import TIER_KEYS, TIERS
from simulations.cli.main import main
from simulations.report.blocks import cells, eps_axis, fmt_eps
from simulations.report.latex import (
    TEX_DOCUMENT,
    TEX_FILE,
    header_text,
    tex_escape,
    tex_number,
)
from simulations.report.load import ReportError, load_run, load_sweep, with_populations
from simulations.report.render import build_report, figure_bytes
from simulations.report.sweep_curves import privacy_utility

PARTIES = ("payments", "social", "device", "authority")
CHROMIUM = Path("/usr/bin/chromium")
# Tests that do not look at figures/ skip writing it (about 0.2 s a figure).
NO_FIGURE_FILES: tuple[str, ...] = ()
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]


# ---- fixtures: directories that follow the run and sweep schemas ----------------------------


def _history(start: float, rng: np.random.Generator) -> list[dict]:
    return [{"epoch": e, "val_auc": start + 0.01 * e + rng.normal(0, 0.002),
             "val_loss": 0.2 - 0.01 * e, "seconds": 1.5 * e} for e in range(1, 5)]


def _metrics(eps: float, seed: int, audit: bool) -> dict:
    rng = np.random.default_rng(seed)
    private = np.isfinite(eps)
    metrics = {
        # The score's figures on the scored test people, and the model's on all test people.
        "auc": 0.82, "ks": 0.52, "gini": 0.64, "brier": 0.041, "log_loss": 0.158,
        "all_test_auc": 0.84, "all_test_ks": 0.55, "all_test_gini": 0.68,
        "all_test_brier": 0.045, "all_test_log_loss": 0.168,
        "oracle_auc": 0.867, "baseline_central_auc": 0.863, "baseline_central_dp_auc": 0.856,
        "baseline_central_gbdt_auc": 0.866, "baseline_central_scorecard_auc": 0.861,
        "baseline_payments_only_auc": 0.818,
        "tiers": {"watch": 240, "fair": 1500, "good": 3200, "excellent": 5100,
                  "exceptional": 2600},
        "test_default_rate_by_tier": {"watch": 0.63, "fair": 0.21, "good": 0.059,
                                      "excellent": 0.018, "exceptional": 0.004},
        "seconds": {"train": 12.2, "total": 66.9},
        "people": {"authority": 1000, "aligned": 860, "train": 600, "val": 130, "test": 130,
                   "test_scored": 118, "ineligible": 90,
                   "ineligible_by_reason": {"no_card": 60, "no_card;severe_default": 30}},
        "epsilon": {"model": dict.fromkeys(PARTIES, eps * 0.99 if private else None),
                    "label": None, "transcript": dict.fromkeys(PARTIES[:3])},
        "delta": 1.67e-05, "accountant": "prv", "noise_multiplier": 1.02,
        "sample_rate": 0.0085, "max_grad_norm": 5.0, "training_steps": 468,
        "history": {"federated": _history(0.82, rng), "central": _history(0.85, rng),
                    "central_dp": _history(0.83, rng)},
        "baselines": {
            "central": {"auc": 0.863, "ks": 0.566, "gini": 0.726, "brier": 0.044,
                        "log_loss": 0.165},
            "central_dp": {"auc": 0.856, "ks": 0.557, "gini": 0.712, "brier": 0.045,
                           "log_loss": 0.167},
            "payments_only": {"auc": 0.818, "ks": 0.493, "gini": 0.635, "brier": 0.048,
                              "log_loss": 0.181},
            "central_gbdt": {"auc": 0.866, "ks": 0.571, "gini": 0.732, "brier": 0.044,
                             "log_loss": 0.164},
            "central_scorecard": {"auc": 0.861, "ks": 0.562, "gini": 0.722, "brier": 0.044,
                                  "log_loss": 0.166},
        },
    }
    if audit:
        metrics["audit"] = {"attack_auc": 0.52, "epsilon_lower": 0.21, "threshold": 0.4,
                            "tpr": 0.3, "fpr": 0.25, "n_members": 500, "n_nonmembers": 500,
                            "confidence": 0.95, "delta": 1.67e-05}
    return metrics


def _curves(contributions: bool) -> dict:
    scores = np.linspace(300, 850, 56)
    fpr = np.linspace(0, 1, 21)
    edges = list(range(300, 851, 10))
    counts = {t.key: [int(t.low <= lo <= t.high) * 7 for lo in edges[:-1]] for t in TIERS}
    curves = {
        "roc": {"fpr": fpr.tolist(), "tpr": np.sqrt(fpr).tolist()},
        "ks": {"score": scores.tolist(),
               "cdf_bad": np.clip((scores - 300) / 350, 0, 1).tolist(),
               "cdf_good": np.clip((scores - 450) / 400, 0, 1).tolist()},
        "score_histogram": {"bin_edges": edges, "counts": counts},
        "calibration_by_tier": [
            {"tier": k, "n": 100 + 10 * i, "mean_predicted": p, "observed_default_rate": p * 1.1,
             "ci_low": p * 0.8, "ci_high": min(1.0, p * 1.4)}
            for i, (k, p) in enumerate(zip(TIER_KEYS, (0.55, 0.2, 0.06, 0.02, 0.005),
                                           strict=True))],
    }
    if contributions:
        curves["contributions"] = {
            s: {"mean_abs_points": 12.3 - i, "p10": -20.1 + i, "p50": 1.2, "p90": 18.0 - i}
            for i, s in enumerate(("payments", "social", "device"))}
        curves["reasons"] = {
            "payments.overdue_count": {"first": 40, "listed": 90, "mean_points": -31.5},
            "device.two_factor_on": {"first": 25, "listed": 70, "mean_points": -12.0},
            "social.donations": {"first": 5, "listed": 30, "mean_points": -4.25}}
    return curves


def _ledger_lines(eps: float) -> list[dict]:
    lines = []
    for rnd in range(1, 6):
        for party in PARTIES:
            lines.append({"party": party, "budget": "model", "mechanism": "poisson_gaussian",
                          "noise_multiplier": 1.02, "sample_rate": 0.0085, "steps": 16,
                          "round": rnd, "epsilon": eps * rnd / 5, "delta": 1.67e-05,
                          "accountant": "prv"})
    lines.append({"party": "*", "budget": "model", "mechanism": "poisson_gaussian",
                  "event": "refused", "noise_multiplier": 1.02, "sample_rate": 0.0085,
                  "steps": 16, "round": 6, "epsilon": eps * 1.2, "delta": 1.67e-05,
                  "accountant": "prv", "cap": eps})
    return lines


def write_run(path: Path, *, eps: float = 1.0, seed: int = 0, curves: bool = True,
              audit: bool = True, contributions: bool = True, encrypted: bool = False,
              ledger: bool = True) -> Path:
    """A run directory with the files `fedscore run` writes (small and synthetic)."""
    path.mkdir(parents=True)
    config = {"seed": seed, "model.hidden": [32, 16], "privacy.epsilon": eps,
              "privacy.label_epsilon": float("inf"), "population.users": 1000,
              "storage.keystore": "keys/100%_ready"}
    manifest = {"started_at": "2026-11-23T02:07:30+00:00",
                "command": ["fedscore", "run", "--out", "runs/eps_1 100%", "--set",
                            "privacy.epsilon=1"],
                "python": "3.11.7", "platform": "Linux-x86_64", "git_commit": "abc123_dirty",
                "versions": {"fedscore": "0.1.0", "torch": "2.13.0+cpu"},
                "seed": seed, "population_seed": seed}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (path / "metrics.json").write_text(json.dumps(_metrics(eps, seed, audit), indent=2))
    (path / "authority.json").write_text(json.dumps({"auc": 0.84}))
    (path / "run.json").write_text(json.dumps({"parties": str(path) + ".parties"}))
    if ledger and np.isfinite(eps):
        (path / "ledger.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in _ledger_lines(eps)))
    if curves:
        (path / "curves.json").write_text(json.dumps(_curves(contributions)))
    if encrypted:
        (path / "scores.parquet.enc").write_bytes(os.urandom(256))
    else:
        rng = np.random.default_rng(seed)
        p = rng.beta(1, 12, 300)
        score = np.clip(np.rint(487 + 72 * np.log((1 - p) / p)), 300, 850).astype(np.int16)
        tier = [TIER_KEYS[int(np.searchsorted([t.low for t in TIERS[1:]], s, side="right"))]
                for s in score]
        pd.DataFrame({"subject_ref": [f"{i:032x}" for i in range(300)],
                      "split": rng.choice(["train", "val", "test"], 300),
                      "probability": p, "score": score, "tier": tier,
                      }).to_parquet(path / "scores.parquet")
    return path


SWEEP_EPS = (0.5, 1.0, 4.0, float("inf"))


def _sweep_rows() -> list[dict]:
    rows = []
    for eps in SWEEP_EPS:
        for seed in (0, 1):
            utility = 0.86 - 0.03 / (1 + (eps if np.isfinite(eps) else 1e9))
            private = np.isfinite(eps)
            rows.append({
                "epsilon": eps, "seed": seed, "run": f"eps={eps:g}_seed={seed}", "status": "done",
                "auc": utility + 0.002 * seed, "auc_all_test": utility + 0.02,
                "auc_central": 0.863 + 0.001 * seed,
                "auc_central_dp": utility + 0.004, "auc_best_silo": 0.81 + 0.002 * seed,
                "auc_central_gbdt": 0.866 + 0.001 * seed,
                "auc_oracle": 0.867, "eps_model": eps * 0.99 if private else None,
                "eps_label": None, "audit_epsilon_lower": 0.2 * min(eps, 5) + 0.01 * seed,
                "audit_attack_auc": 0.51, "seconds": 60.0})
    rows.append({**rows[0], "seed": 2, "run": "eps=0.5_seed=2", "status": "failed",
                 "auc": None})
    return rows


def _summary(runs: pd.DataFrame, only_federated: bool = False) -> pd.DataFrame:
    done = runs[runs["status"] == "done"]
    out = []
    for eps, part in done.groupby("epsilon"):
        row = {"epsilon": eps, "n": len(part)}
        for col in ("auc", "auc_all_test", "auc_central", "auc_central_dp", "auc_best_silo",
                    "auc_oracle", "auc_central_gbdt"):
            if only_federated and col != "auc":
                continue
            m, half = part[col].mean(), 1.96 * part[col].std() / np.sqrt(len(part))
            row |= {f"{col}_mean": m, f"{col}_ci_low": m - half, f"{col}_ci_high": m + half}
        row["audit_epsilon_lower_max"] = part["audit_epsilon_lower"].max()
        out.append(row)
    return pd.DataFrame(out)


def write_sweep(path: Path, *, representative: bool = True, only_federated: bool = False) -> Path:
    path.mkdir(parents=True)
    runs = pd.DataFrame(_sweep_rows())
    if not representative:
        runs = runs[~((runs["epsilon"] == 1.0) & (runs["seed"] == 0))]
    (path / "sweep.json").write_text(json.dumps(
        {"epsilons": ["0.5", "1", "4", "inf"], "seeds": [0, 1], "users": 1000}))
    runs.to_csv(path / "sweep.csv", index=False)
    _summary(runs, only_federated).to_csv(path / "summary.csv", index=False)
    for _, row in runs[runs["status"] == "done"].iterrows():
        if row["epsilon"] == 1.0 or not representative:
            write_run(path / row["run"], eps=row["epsilon"], seed=int(row["seed"]))
    return path


GRID_LR = (0.003, 0.01)
GRID_SEEDS = (0, 1, 2)
GRID_INTERVAL = ("95 % Student t over 3 runs, clipped to the metric range; difference paired "
                 "by (data seed, seed) over 3")


def _grid_rows(epsilons: tuple[float, ...]) -> list[dict]:
    """sweep.csv rows of a grid over privacy.epsilon x train.lr (the format of issue 21)."""
    rows = []
    for eps in epsilons:
        for lr in GRID_LR:
            for seed in GRID_SEEDS:
                utility = 0.84 + (0.01 if np.isfinite(eps) else 0.02) + (2.0 * lr if lr > 0.005
                                                                        else 0.0)
                part = ("eps=inf" if np.isinf(eps) else f"eps={eps:g}") + f"_train.lr={lr:g}"
                rows.append({
                    "epsilon": eps, "train.lr": lr, "data_seed": seed, "seed": seed,
                    "run": f"{part}_seed={seed}", "status": "done",
                    # Seeds differ by more at the larger rate: differences have a spread.
                    "auc": utility + (0.003 + lr) * seed - 0.001 * seed * seed,
                    "auc_all_test": utility + 0.02, "auc_central": 0.863 + 0.001 * seed,
                    "auc_oracle": 0.867,
                    "eps_model": eps * 0.99 if np.isfinite(eps) else None,
                    "audit_epsilon_lower": 0.1 + 0.01 * seed, "seconds": 30.0})
    return rows


def _grid_summary(runs: pd.DataFrame, reference: tuple[float, float]) -> pd.DataFrame:
    """summary.csv as a sweep writes it (simulations/run/sweep.py): the report is read against
    its real writer, intervals, differences and words."""
    from simulations.run.sweep import summarise

    ref = {"privacy.epsilon": "inf" if np.isinf(reference[0]) else f"{reference[0]:g}",
           "train.lr": f"{reference[1]:g}"}
    return summarise(runs, ["epsilon", "train.lr"], ref)


def write_grid_sweep(path: Path, *, epsilons: tuple[float, ...] = (1.0, float("inf"))
                     ) -> Path:
    """A sweep over a grid of privacy.epsilon x train.lr with 3 seeds, in the new format."""
    path.mkdir(parents=True)
    runs = pd.DataFrame(_grid_rows(epsilons))
    grid = {"privacy.epsilon": [fmt_eps(e).replace("∞", "inf") for e in epsilons],
            "train.lr": [f"{lr:g}" for lr in GRID_LR]}
    reference = (max(epsilons), GRID_LR[0])
    (path / "sweep.json").write_text(json.dumps(
        {"grid": grid, "seeds": list(GRID_SEEDS), "data_seeds": None, "users": 1000,
         "assignments": {}, "reference": {"privacy.epsilon": grid["privacy.epsilon"][-1],
                                          "train.lr": grid["train.lr"][0]}}))
    # Written out of order: the report sorts by the grid columns.
    runs.iloc[::-1].to_csv(path / "sweep.csv", index=False)
    _grid_summary(runs, reference).iloc[::-1].to_csv(path / "summary.csv", index=False)
    # Only the representative run's directory: epsilon 1, seed 0, the reference's rate.
    eps = 1.0 if 1.0 in epsilons else epsilons[0]
    first = runs[(runs["epsilon"] == eps) & (runs["train.lr"] == GRID_LR[0])
                 & (runs["seed"] == 0)].iloc[0]
    write_run(path / "runs" / first["run"], eps=eps)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_run(tmp_path_factory.mktemp("report") / "run")
    build_report(path, figure_formats=NO_FIGURE_FILES)
    return path


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_grid_sweep(tmp_path_factory.mktemp("report") / "grid")
    build_report(path, figure_formats=NO_FIGURE_FILES)
    return path


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_sweep(tmp_path_factory.mktemp("report") / "sweep")
    # Its figures go through the same writer as the run's, which run_dir's tests check.
    build_report(path, figure_formats=NO_FIGURE_FILES)
    return path


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _csv_columns(path: Path) -> list[str]:
    return list(pd.read_csv(path, nrows=0).columns)


# ---- outputs ---------------------------------------------------------------------------------


def test_run_report_writes_html_tex_and_csvs(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') >= 7
    for heading in ("Headline numbers", "Learning curves", "Calibration by tier", "KS curve",
                    "Tiers and seed benefits", "Per-silo contributions",
                    "Reason codes and eligibility", "存在逾期记录", "Privacy ledger",
                    "Privacy audit", "Reproducibility"):
        assert heading in page
    for tier in TIERS:  # names, Chinese names and seed benefits all come from server.scoring
        assert tier.name_zh in page
        assert tier.benefit in page
    assert "not available" not in page
    assert not re.search(r"(https?|ftp)://|\bsrc=\"(?!data:)", page)  # nothing to fetch
    expected = {
        "learning_curves": ["model", "epoch", "val_auc", "val_loss", "seconds"],
        "score_histogram": ["bin_low", "bin_high", *TIER_KEYS],
        "calibration_by_tier": ["tier", "n", "mean_predicted", "observed_default_rate",
                                "ci_low", "ci_high"],
        "ks_curve": ["score", "cdf_bad", "cdf_good"],
        "roc_curve": ["fpr", "tpr"],
        "tiers": ["tier", "name", "scores", "seed benefit", "people", "share",
                  "test default rate"],
        "contributions": ["silo", "mean_abs_points", "p10", "p50", "p90"],
        "reasons": ["reason", "label", "label_zh", "first_share", "listed_share",
                    "mean_points"],
        "ledger_final": ["party", "budget", "accountant", "rounds", "steps", "epsilon", "delta",
                         "metrics_epsilon"],
        "ledger_cumulative": ["party", "budget", "round", "epsilon"],
        "ledger_lines": ["round", "parties", "budget", "mechanism", "event", "steps",
                         "noise_multiplier", "sample_rate", "epsilon", "delta"],
        "audit": ["quantity", "value"],
        "reproducibility": ["key", "value"],
        "model_comparison": ["model", "auc", "ks", "gini", "brier", "log_loss"],
    }
    for name, columns in expected.items():
        assert _csv_columns(run_dir / "report" / f"{name}.csv") == columns, name
    # The credit analyst's references sit right after the central MLPs, before any silo.
    models = pd.read_csv(run_dir / "report" / "model_comparison.csv")["model"].tolist()
    assert models[:5] == ["federated", "central, non-private", "central, DP",
                          "central gradient boosting (LightGBM)", "central WoE scorecard"]


def test_ledger_tables_leave_refusals_out_of_the_spend(run_dir: Path) -> None:
    final = pd.read_csv(run_dir / "report" / "ledger_final.csv")
    assert set(final["party"]) == set(PARTIES)  # the refusal's "*" is not a party
    assert final["epsilon"].max() == pytest.approx(1.0)
    assert (final["steps"] == 80).all()
    lines = pd.read_csv(run_dir / "report" / "ledger_lines.csv")
    assert len(lines) == 6  # five rounds with four parties merged, plus the refusal
    assert lines["parties"].iloc[0] == ", ".join(PARTIES)
    assert lines["event"].iloc[-1] == "refused"


def test_tables_tex_uses_booktabs_and_escapes_specials(run_dir: Path) -> None:
    tex = (run_dir / "tables.tex").read_text(encoding="utf-8")
    n = len(re.findall(r"\\begin\{tabular\}\{", tex))  # not the headers' nested [b] ones
    assert n >= 8
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == n
    for escaped in (r"100\%", r"abc123\_dirty", r"\fedscorezh{待观察}", r"$\infty$",
                    r"& $-$20.1 &"):  # a p10 of the contributions: a minus sign, not a hyphen
        assert escaped in tex
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    for line in rows:  # '&' separates columns, '$' opens math: only these stay unescaped
        assert not re.search(r"(?<!\\)[%_#]", line), line
    # Headers are typeset, not the CSV's snake_case: no escaped underscore right after \toprule.
    headers = re.findall(r"\\toprule\n(.*)\n", tex)
    assert len(headers) == n
    assert not [h for h in headers if r"\_" in h]
    assert "log loss" in tex


def test_sweep_report_has_the_curve_tables_and_one_run(sweep_dir: Path) -> None:
    page = (sweep_dir / "report.html").read_text(encoding="utf-8")
    for text in ("Privacy–utility curve", "Privacy audit across ε",
                 "Representative run eps=1_seed=0", "Run eps=1_seed=0: Privacy ledger"):
        assert text in page
    curve = pd.read_csv(sweep_dir / "report" / "privacy_utility.csv")
    assert list(curve.columns) == ["series", "population", "epsilon", "mean", "ci_low",
                                   "ci_high"]
    assert set(curve["series"]) == {"federated, scored test people",
                                    "federated, all test people", "central, DP",
                                    "best single silo", "central, non-private", "oracle",
                                    "central gradient boosting (LightGBM)"}
    assert np.isinf(curve["epsilon"]).any()
    # Each series is the summary's figure for the population it names.
    population = dict(zip(curve["series"], curve["population"], strict=False))
    assert population.pop("federated, scored test people") == "scored test people"
    assert set(population.values()) == {"all test people"}
    summary = pd.read_csv(sweep_dir / "summary.csv")
    for series, column in (("federated, scored test people", "auc_mean"),
                           ("federated, all test people", "auc_all_test_mean")):
        shown = curve[curve["series"] == series]
        assert shown["mean"].tolist() == pytest.approx(summary[column].tolist())
    runs = pd.read_csv(sweep_dir / "report" / "sweep_runs.csv")
    assert len(runs) == 9
    assert (runs["status"] == "failed").sum() == 1
    assert _csv_columns(sweep_dir / "report" / "sweep_summary.csv")[:5] == [
        "epsilon", "n", "auc_mean", "auc_ci_low", "auc_ci_high"]
    audit = pd.read_csv(sweep_dir / "report" / "sweep_audit.csv")
    assert {"epsilon", "seed", "eps_model", "audit_epsilon_lower"} <= set(audit.columns)
    assert len(audit) == 8  # done runs only
    assert "Paired differences not available: summary.csv has no auc_diff_*" in page


def test_sweep_falls_back_to_first_done_run_and_sweep_csv(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "sweep", representative=False, only_federated=True)
    build_report(path, figure_formats=NO_FIGURE_FILES)
    page = (path / "report.html").read_text(encoding="utf-8")
    assert "Representative run eps=0.5_seed=0" in page
    # summary.csv lacks the baselines' columns: they come from sweep.csv's done runs.
    curve = pd.read_csv(path / "report" / "privacy_utility.csv")
    dp = curve[curve["series"] == "central, DP"]
    assert len(dp) == len(SWEEP_EPS)
    # Student t as summary.csv's own: one run has no interval, never a zero-width one.
    assert ((dp["ci_low"] <= dp["mean"]) | dp["ci_low"].isna()).all()


def test_grid_sweep_draws_one_series_per_value_and_never_pools_them(grid_dir: Path) -> None:
    page = (grid_dir / "report.html").read_text(encoding="utf-8")
    assert "Representative run eps=1_train.lr=0.003_seed=0" in page
    assert "federated AUC (scored test people) at ε=1, train.lr=0.01" in page
    summary = pd.read_csv(grid_dir / "summary.csv")
    curve = pd.read_csv(grid_dir / "report" / "privacy_utility.csv")
    assert list(curve.columns) == ["series", "population", "epsilon", "train.lr", "mean",
                                   "ci_low", "ci_high"]
    assert set(curve["series"]) == {"federated, scored test people", "oracle"}
    fed = curve[curve["series"] == "federated, scored test people"]
    # One row per grid point, each at one learning rate: no row averages the two.
    assert fed["train.lr"].notna().all()
    assert sorted(set(fed["train.lr"])) == list(GRID_LR)
    assert not fed.duplicated(["epsilon", "train.lr"]).any()
    expected = summary.set_index(["epsilon", "train.lr"])["auc_mean"]
    shown = fed.set_index(["epsilon", "train.lr"])["mean"]
    assert shown.sort_index().tolist() == pytest.approx(expected.sort_index().tolist())
    legend = privacy_utility(load_sweep(grid_dir)).fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "train.lr=0.003", "train.lr=0.01", "oracle"]
    # The tables lead with the grid columns (the CSV's order is the sort's).
    assert _csv_columns(grid_dir / "report" / "sweep_summary.csv")[:3] == [
        "epsilon", "train.lr", "n"]
    runs = pd.read_csv(grid_dir / "report" / "sweep_runs.csv")
    assert list(runs.columns[:5]) == ["epsilon", "train.lr", "data_seed", "seed", "run"]
    assert runs[["epsilon", "train.lr", "seed"]].apply(tuple, axis=1).is_monotonic_increasing
    audit = pd.read_csv(grid_dir / "report" / "sweep_audit.csv")
    assert {"epsilon", "train.lr", "data_seed", "seed"} <= set(audit.columns)
    assert len(audit) == len(GRID_LR) * 2 * len(GRID_SEEDS)


def test_paired_differences_are_summary_csvs_numbers(grid_dir: Path) -> None:
    page = (grid_dir / "report.html").read_text(encoding="utf-8")
    assert "Paired differences in federated AUC (scored test people) against ε=∞, " \
           "train.lr=0.003" in page
    assert GRID_INTERVAL in page
    summary = pd.read_csv(grid_dir / "summary.csv")
    diffs = pd.read_csv(grid_dir / "report" / "paired_differences.csv")
    assert list(diffs.columns) == ["epsilon", "train.lr", "n", "auc_diff_mean",
                                   "auc_diff_ci_low", "auc_diff_ci_high", "auc_diff_n"]
    assert len(diffs) == len(summary) - 1  # the reference itself has no difference
    expected = summary[~summary["is_reference"]].set_index(["epsilon", "train.lr"])
    got = diffs.set_index(["epsilon", "train.lr"])
    for column in ("auc_diff_mean", "auc_diff_ci_low", "auc_diff_ci_high", "auc_diff_n"):
        assert got[column].sort_index().tolist() == pytest.approx(
            expected[column].sort_index().tolist()), column
    assert (grid_dir / "report" / "sweep_paired_differences.csv").exists() is False
    tex = (grid_dir / "tables.tex").read_text(encoding="utf-8")
    assert "tab:grid:sweep-paired-differences}" in tex
    assert r"$-$0.0100 [$-$0.0100, $-$0.0100]" in tex  # minus signs inside the interval too


def test_a_grid_without_epsilon_is_drawn_against_its_key(tmp_path: Path) -> None:
    """A sweep over train.lr at one budget: AUC against train.lr, baselines as curves."""
    sweep = load_sweep(write_grid_sweep(tmp_path / "lr", epsilons=(1.0,)))
    assert sweep.groups == ("epsilon", "train.lr")
    plot = privacy_utility(sweep)
    assert plot.title == "Test AUC against train.lr"
    ax = plot.fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.003", "0.01"]
    assert "holds ε = 1 and varies train.lr" in plot.note
    fed = plot.data[plot.data["series"] == "federated, scored test people"]
    assert fed["train.lr"].tolist() == list(GRID_LR)
    assert fed["mean"].tolist() == pytest.approx(sweep.summary["auc_mean"].tolist())


def test_calibration_axes_are_linear_in_every_report() -> None:
    """One convention: linear axes whatever the rates (a tier without defaults included), so
    two reports' calibration figures read the same way."""
    from simulations.report import score_sections

    scales: list[tuple[str, str]] = []
    rows = [dict(row, mean_predicted=p, observed_default_rate=rate, ci_low=rate / 2,
                 ci_high=rate * 2) for row, p, rate in (
        ({"tier": "watch", "n": 50}, 0.4, 0.45), ({"tier": "good", "n": 900}, 0.01, 0.012))]
    spread = pd.DataFrame(rows)
    with_zero = spread.assign(observed_default_rate=[0.45, 0.0], ci_low=[0.3, 0.0])
    for frame in (spread, with_zero):
        axes = score_sections._calibration_plot(frame, "").fig.axes[0]
        scales.append((axes.get_xscale(), axes.get_yscale()))
    assert scales == [("linear", "linear")] * 2


def test_eligibility_and_privacy_rows_read_as_sentences_and_rows(tmp_path: Path) -> None:
    from simulations.report.privacy_sections import _privacy_parameters
    from simulations.report.run_sections import _eligibility_text

    assert _eligibility_text({"ineligible": 0, "aligned": 20000}) == (
        "Every aligned person met the opening conditions and got a score.")
    text = _eligibility_text({"ineligible": 90, "aligned": 860,
                              "ineligible_by_reason": {"no_card;severe_default": 30}})
    assert text.endswith("90 of 860 people failed the opening conditions and got no score "
                         "(no_card + severe_default 30).")
    run = load_run(write_run(tmp_path / "run"))
    run.metrics["noise_multiplier"] = {"region_2": 2.2, "region_1": 2.1}
    frame = _privacy_parameters(run).frame.set_index("parameter")
    assert frame.loc["noise_multiplier (region_1)", "value"] == 2.1
    assert not any("{" in str(v) for v in frame["value"])


def test_metrics_of_older_runs_are_read_with_their_populations() -> None:
    """Before issue 21 `auc` was every test person's: a report must not show it as the
    score's."""
    old = {"auc": 0.85, "ks": 0.5, "gini": 0.7, "brier": 0.04, "log_loss": 0.16,
           "scored_test_auc": 0.81}
    read = with_populations(old)
    assert read["all_test_auc"] == 0.85
    assert read["all_test_ks"] == 0.5
    assert read["auc"] == 0.81
    assert read["gini"] == pytest.approx(0.62)
    assert read["ks"] is None
    assert "scored_test_auc" not in read
    horizontal = with_populations({**old, "topology": "horizontal"})
    assert horizontal["auc"] == horizontal["all_test_auc"] == 0.85
    assert with_populations(read) is read


def test_infinity_sits_at_the_right_edge_of_the_epsilon_axis() -> None:
    ax = Figure().subplots()
    to_x = eps_axis(ax, np.array([0.5, 1.0, 4.0, np.inf]))
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["0.5", "1", "4", "∞"]
    assert ax.get_xscale() == "log"
    assert to_x(np.array([np.inf]))[0] > 4.0


def test_optional_pieces_become_notes(tmp_path: Path) -> None:
    path = write_run(tmp_path / "run", curves=False, audit=False, encrypted=True, ledger=False)
    build_report(path, figure_formats=NO_FIGURE_FILES)
    page = (path / "report.html").read_text(encoding="utf-8")
    for missing in ("Score histogram not available", "Calibration by tier not available",
                    "KS curve not available", "Per-silo contribution summary not available",
                    "Privacy ledger not available", "Privacy audit not available"):
        assert missing in page
    assert "scores.parquet.enc" in page


def test_minimal_run_and_unfinished_sweep_still_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name, text in (("config.json", "{}"), ("manifest.json", "{}"),
                       ("metrics.json", '{"auc": 0.8}')):
        (run / name).write_text(text)
    build_report(run, figure_formats=NO_FIGURE_FILES)
    assert "Learning curves not available" in (run / "report.html").read_text(encoding="utf-8")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    failed = pd.DataFrame(_sweep_rows()).assign(status="failed", auc=None)
    failed.to_csv(sweep / "sweep.csv", index=False)
    pd.DataFrame(columns=["epsilon", "auc_mean", "auc_ci_low", "auc_ci_high"]).to_csv(
        sweep / "summary.csv", index=False)
    build_report(sweep, figure_formats=NO_FIGURE_FILES)
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert "No run of the sweep finished" in page
    assert "Privacy–utility curve not available" in page


def test_old_runs_without_curves_use_scores(tmp_path: Path) -> None:
    path = write_run(tmp_path / "run", curves=False)
    build_report(path, figure_formats=NO_FIGURE_FILES)
    hist = pd.read_csv(path / "report" / "score_histogram.csv")
    assert int(hist[list(TIER_KEYS)].to_numpy().sum()) > 0
    calib = pd.read_csv(path / "report" / "calibration_by_tier.csv")
    assert (calib["ci_low"] <= calib["observed_default_rate"]).all()


@pytest.mark.slow
def test_report_never_modifies_existing_files(tmp_path: Path) -> None:
    path = write_sweep(tmp_path / "sweep")
    before = _hashes(path)
    build_report(path, figure_formats=NO_FIGURE_FILES)
    first = _hashes(path)
    # and again: a second report only replaces its own outputs
    build_report(path, figure_formats=NO_FIGURE_FILES)
    build_report(path / "eps=1_seed=0", figure_formats=NO_FIGURE_FILES)
    after = _hashes(path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert {k: v for k, v in after.items() if k in first} == first  # the same bytes each time
    ours = re.compile(r"^(eps=1_seed=0/)?(report\.html|tables(-document)?\.tex|"
                      r"report/\w+\.csv)$")
    assert all(ours.match(k) for k in set(after) - set(before))
    # A paper may \input both tables.tex files: no label is defined twice.
    labels = [re.findall(r"\\label\{([^}]*)\}", (d / TEX_FILE).read_text(encoding="utf-8"))
              for d in (path, path / "eps=1_seed=0")]
    assert all(labels)
    assert len(set(labels[0] + labels[1])) == len(labels[0]) + len(labels[1])


# ---- errors ----------------------------------------------------------------------------------


def _break(path: Path, name: str, text: str | None) -> None:
    if text is None:
        (path / name).unlink()
    else:
        (path / name).write_text(text)


@pytest.mark.parametrize(("kind", "name", "text", "message"), [
    ("run", "metrics.json", None, "holds an unfinished run (no metrics.json); continue it with "
                                  "`fedscore run --resume"),
    ("run", "metrics.json", '{"auc": 0.8', "metrics.json is corrupt"),
    ("run", "curves.json", '{"roc": {"fpr": [0, 1], "tpr": [0]}}', "part 'roc' is malformed"),
    ("run", "ledger.jsonl", "{not json\n", "ledger.jsonl:1 is not JSON"),
    ("run", "scores.parquet", "not parquet", "scores.parquet cannot be read"),
    ("sweep", "summary.csv", None, "summary.csv is missing"),
    ("sweep", "sweep.csv", "epsilon,seed\n1,0\n", "sweep.csv lacks column(s) run, status, auc"),
])
def test_bad_directories_name_the_problem(tmp_path: Path, kind: str, name: str,
                                          text: str | None, message: str) -> None:
    path = write_run(tmp_path / "d") if kind == "run" else write_sweep(tmp_path / "d")
    _break(path, name, text)
    with pytest.raises(ReportError, match=re.escape(message)):
        build_report(path, figure_formats=NO_FIGURE_FILES)
    assert not (path / "report.html").exists()


def test_cli_reports_a_directory_that_is_neither(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "neither a run directory" in err
    assert "fedscore run --out" in err
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in " ".join(capsys.readouterr().err.split())


def test_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_run(tmp_path / "run", curves=False, encrypted=True)
    assert main(["report", str(path)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (path / "report.html").exists()
    assert (path / "tables.tex").exists()


# ---- paper outputs: tables.tex under pdflatex, figures as PDF and SVG -------------------------

OVERFULL_PT = 10.0


def pdflatex_log(report: Path, work: Path) -> str:
    """Compile a report's tables-document.tex (which inputs tables.tex) in `work`; the log."""
    if shutil.which("pdflatex") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no pdflatex in CI: scripts/test.sh runs scripts/tex-setup.sh first")
        pytest.skip("no pdflatex: run `bash scripts/tex-setup.sh` (scripts/test.sh does)")
    for name in (TEX_FILE, TEX_DOCUMENT):
        shutil.copy(report / name, work / name)
    # \tracinglostchars=3: a character its font lacks (Chinese without a CJK font) stops the
    # run instead of leaving a silent gap.
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape",
         rf"\tracinglostchars=3\input{{{TEX_DOCUMENT}}}"],
        cwd=work, capture_output=True, text=True, timeout=120, check=False)
    log = (work / TEX_DOCUMENT.replace(".tex", ".log")).read_text(encoding="latin-1")
    assert proc.returncode == 0, log[-4000:]
    return log


def assert_clean_log(log: str) -> None:
    assert not [line for line in log.splitlines() if line.startswith("!")], log[-4000:]
    overfull = re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)[^\n]*\n([^\n]*)", log)
    assert [(w, where) for w, where in overfull if float(w) > OVERFULL_PT] == []
    for problem in ("Overfull \\vbox", "Float too large", "multiply defined",
                    "Chinese text left out"):
        assert problem not in log
    assert "c70gbsn.fd" in log  # the Chinese text was set, in AR PL SungtiL


@pytest.mark.parametrize("which", ["run", "sweep", "grid"])
def test_tables_tex_compiles_with_pdflatex(which: str, run_dir: Path, sweep_dir: Path,
                                           grid_dir: Path, tmp_path: Path) -> None:
    log = pdflatex_log({"run": run_dir, "sweep": sweep_dir, "grid": grid_dir}[which], tmp_path)
    assert_clean_log(log)
    assert (tmp_path / TEX_DOCUMENT.replace(".tex", ".pdf")).read_bytes().startswith(b"%PDF-")


@pytest.mark.slow
def test_a_real_runs_tables_compile_with_pdflatex(small_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(small_run, tmp_path / "run")  # the shared run stays as it was made
    build_report(run, figure_formats=NO_FIGURE_FILES)
    assert_clean_log(pdflatex_log(run, tmp_path))


@given(st.text())
def test_tex_escape_leaves_only_ascii_and_chinese_runs(text: str) -> None:
    tex = tex_escape(text)
    outside = re.sub(r"\\fedscorezh\{[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+\}",
                     "", tex)
    assert outside.isascii()
    unescaped = re.sub(r"\\\$", "", outside)
    assert unescaped.count("$") % 2 == 0  # every formula closes
    assert "$$" not in unescaped  # neighbouring symbols share one formula, never display math


def test_headers_and_numbers_are_typeset_for_a_paper() -> None:
    assert header_text("auc_central_dp") == "AUC central DP"
    assert header_text("audit_epsilon_lower") == "audit ε lower"
    assert header_text("seed benefit") == "seed benefit"
    assert tex_escape("−∞ ≤ε") == r"$- \infty$ $\le \varepsilon$"
    assert tex_number("-0.0120 [-0.0200, 0.0004]") == r"$-$0.0120 [$-$0.0200, 0.0004]"
    frame = pd.DataFrame({"auc": [0.863, 0.059, 12.5], "delta": [1.67e-05, 2e-06, 0.0],
                          "epsilon": [0.5, 1.0, float("inf")]})
    assert cells(frame) == [["0.86", "1.67e-05", "0.5"], ["0.06", "2.00e-06", "1.0"],
                            ["12.50", "0", "∞"]]


def test_every_figure_is_written_as_pdf_and_svg(tmp_path: Path) -> None:
    # A run without curves.json: five figures, each costs about 0.3 s in the two formats.
    path = write_run(tmp_path / "run", curves=False)
    build_report(path)
    page = (path / "report.html").read_text(encoding="utf-8")
    keys = re.findall(r'<figure id="fig-(\w+)"', page)
    assert len(keys) >= 4
    assert f"figures/{keys[0]}.pdf, figures/{keys[0]}.svg</figcaption>" in page
    figures = path / "figures"
    assert sorted(p.name for p in figures.iterdir()) == sorted(
        f"{key}.{fmt}" for key in keys for fmt in ("pdf", "svg"))
    for key in keys:
        pdf = (figures / f"{key}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-1."), key
        assert pdf.rstrip().endswith(b"%%EOF"), key
        svg = ET.parse(figures / f"{key}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg", key
        assert len(list(svg.iter("{http://www.w3.org/2000/svg}path"))) > 10, key  # drawn


def test_figure_files_carry_no_date_or_random_id() -> None:
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1], [1, 0], label="ε")
    for fmt in ("png", "pdf", "svg"):
        assert figure_bytes(fig, fmt) == figure_bytes(fig, fmt), fmt


# ---- the page in a real browser --------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory):
    """A headless Chromium context with a fresh profile (Debian's build, no download)."""
    if not CHROMIUM.exists():
        # scripts/test.sh installs it; a bare `pytest` on a fresh machine says how.
        pytest.fail("no /usr/bin/chromium: run `bash scripts/browser-setup.sh` (or "
                    "`bash scripts/test.sh`, which does)")
    from playwright import sync_api

    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 900})
        yield context
        context.close()


@pytest.mark.parametrize("which", ["run", "sweep"])
def test_report_renders_in_chromium_offline(chromium, which: str, run_dir: Path,
                                            sweep_dir: Path) -> None:
    page_path = (run_dir if which == "run" else sweep_dir) / "report.html"
    requests: list[str] = []
    problems: list[str] = []
    page = chromium.new_page()
    # Anything that would leave the file is recorded, then refused.
    page.route(re.compile(r"^(?!file:|data:)"), lambda route: route.abort())
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(page_path.as_uri(), wait_until="load")
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    page.close()
    assert len(images) >= 7
    assert all(done and width > 0 and alt for done, width, alt in images), images
    assert problems == []
    assert all(u.startswith(("file://", "data:")) for u in requests), requests


# Draws a text in the font of a table cell on a canvas: (pixels inked, a hash of the pixels).
_INK = """([cell, text]) => {
    const td = [...document.querySelectorAll("td")].find(e => e.textContent === cell);
    const canvas = document.createElement("canvas");
    canvas.width = 400;
    canvas.height = 80;
    const ctx = canvas.getContext("2d");
    ctx.font = getComputedStyle(td).font;
    ctx.textBaseline = "top";
    ctx.fillText(text, 4, 4);
    const alpha = ctx.getImageData(0, 0, 400, 80).data.filter((_, i) => i % 4 === 3);
    let ink = 0, hash = 0;
    alpha.forEach((a, i) => { if (a) { ink += 1; hash = (hash * 31 + i * 7 + a) >>> 0; } });
    return [ink, hash];
}"""


def test_chinese_tier_names_render_as_glyphs_not_boxes(chromium, run_dir: Path) -> None:
    """Without a CJK font, Chromium draws every Chinese character as the same empty box: two
    different names of equal length then leave the same pixels (scripts/browser-setup.sh
    installs WenQuanYi Micro Hei, which the page's font stack names)."""
    page = chromium.new_page()
    page.goto((run_dir / "report.html").as_uri(), wait_until="load")
    first, second = [t.name_zh for t in TIERS if len(t.name_zh) == 2][:2]
    drawn = [page.evaluate(_INK, [first, text]) for text in (first, second)]
    page.close()
    assert all(ink > 50 for ink, _ in drawn), drawn
    assert drawn[0] != drawn[1], "Chinese text renders as boxes: no CJK font (browser-setup.sh)"


def test_plaintext_scores_are_read_with_the_split_kept_beside_them(tmp_path: Path) -> None:
    """A run with storage.keystore=none publishes scores.parquet without the split, which the
    authority keeps in split.npy: the report reads both (it refused such runs before)."""
    path = write_run(tmp_path / "run")
    scores = pd.read_parquet(path / "scores.parquet")
    codes = pd.Categorical(scores.pop("split"), ("train", "val", "test")).codes
    scores.to_parquet(path / "scores.parquet")
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    (path / "split.npy").write_bytes(buf.getvalue())
    run = load_run(path)
    assert run.scores is not None
    assert list(run.scores["split"].astype(str)) == list(
        pd.Categorical.from_codes(codes, ("train", "val", "test")).astype(str))
    assert list(run.scores.columns) == ["split", "probability", "score", "tier"]
