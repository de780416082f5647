"""`fedscore compare`: one series per configuration, intervals over replicates, each series'
oracle and delta, and a training time that a run and a sweep cell measure alike.

Synthetic run and sweep directories (config.json, manifest.json, metrics.json; sweep.json,
sweep.csv, summary.csv in the format of issue 21) with AUCs chosen so that pooling two
configurations, or one oracle for all, would show in the numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.report.compare import (
    Compared,
    _auc_by_epsilon,
    build_comparison,
    comparison_rows,
    find_series,
    points,
)
from simulations.report.stats import interval_method, mean_ci

# t(0.975, 2 degrees of freedom): the half-width of a 95 % interval over 3 runs is
# T_2 * s / sqrt(3).
T_2 = 4.302652729911275
VERTICAL = {"seed": 0, "population.seed": 0, "topology": "vertical", "train.epochs": 4,
            "train.lr": 0.01, "model.hidden": [32, 16], "privacy.epsilon": 1.0,
            "privacy.guardrails": "refuse", "population.users": 2000,
            "storage.keystore": "auto", "psi.workers": 1, "join_timeout": 120.0,
            "reply_timeout": 600.0, "retries": 2}
HORIZONTAL = {**VERTICAL, "topology": "horizontal", "horizontal.dp": "user", "regions": 3}


def write_cell(path: Path, config: dict, *, all_test_auc: float, oracle: float = 0.9,
               delta: float = 1e-5, train: float = 2.0, total: float = 3.0,
               horizontal: bool = False) -> Path:
    """A finished run's config.json, manifest.json and metrics.json (nothing else: compare
    reads no curves or scores)."""
    path.mkdir(parents=True)
    private = math.isfinite(config["privacy.epsilon"])
    metrics: dict = {"auc": all_test_auc - 0.02, "all_test_auc": all_test_auc,
                     "oracle_auc": oracle, "gap_to_oracle": oracle - all_test_auc,
                     "delta": delta, "seconds": {"train": train, "total": total}}
    if horizontal:
        metrics |= {"topology": "horizontal", "dp_level": "user" if private else "off",
                    "epsilon": {"model": None, "user": config["privacy.epsilon"] * 0.98
                                if private else None}}
    else:
        metrics["epsilon"] = {"model": config["privacy.epsilon"] * 0.99 if private else None}
    (path / "config.json").write_text(json.dumps(config))
    (path / "manifest.json").write_text(json.dumps({"seed": config["seed"]}))
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


# AUC on all test people at each (epsilon, seed) of the sweep.
SWEEP_AUC = {(1.0, 0): 0.6, (1.0, 1): 0.7, (1.0, 2): 0.8,
             (math.inf, 0): 0.85, (math.inf, 1): 0.86, (math.inf, 2): 0.87}


def write_compare_sweep(path: Path, *, old_format: bool = False) -> Path:
    """A 4-epoch sweep over epsilon 1 and inf and seeds 0..2 (the first cell of each seed
    pays the engine start and PSI in its total), with one failed cell."""
    path.mkdir(parents=True)
    grid = {"privacy.epsilon": ["1", "inf"]}
    spec = ({"epsilons": grid["privacy.epsilon"], "seeds": [0, 1, 2], "users": 2000,
             "assignments": {"train.epochs": "4"}} if old_format else
            {"grid": grid, "seeds": [0, 1, 2], "data_seeds": None, "users": 2000,
             "assignments": {"train.epochs": "4"}, "reference": {"privacy.epsilon": "inf"}})
    (path / "sweep.json").write_text(json.dumps(spec))
    rows = []
    for (eps, seed), auc in SWEEP_AUC.items():
        name = f"eps={eps:g}_seed={seed}"
        config = {**VERTICAL, "privacy.epsilon": eps, "seed": seed, "population.seed": seed}
        write_cell(path / "runs" / name, config, all_test_auc=auc,
                   total=30.0 if eps == 1.0 else 3.0)
        rows.append({"epsilon": eps, "data_seed": seed, "seed": seed, "run": name,
                     "status": "done", "auc": auc - 0.02, "seconds": 3.0})
    rows.append({"epsilon": 1.0, "data_seed": 3, "seed": 3, "run": "eps=1_seed=3",
                 "status": "failed", "auc": None, "seconds": None})
    pd.DataFrame(rows).to_csv(path / "sweep.csv", index=False)
    pd.DataFrame({"epsilon": [1.0, math.inf], "auc_mean": [0.68, 0.84],
                  "auc_ci_low": [0.4, 0.8], "auc_ci_high": [0.9, 0.9]}).to_csv(
        path / "summary.csv", index=False)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep; an 8-epoch run at epsilon 1 (far below the sweep, were it averaged in); a
    4-epoch run at inf that differs from the sweep only in settings that change no result;
    a horizontal user-level run with its own oracle and delta. Compared, figures in the page
    only."""
    work = tmp_path_factory.mktemp("compare")
    sweep = write_compare_sweep(work / "sweep")
    eight = write_cell(work / "epochs8", {**VERTICAL, "train.epochs": 8}, all_test_auc=0.5,
                       train=5.0, total=60.0)
    same = write_cell(work / "elsewhere", {**VERTICAL, "privacy.epsilon": math.inf, "seed": 7,
                                           "population.seed": 7, "psi.workers": 4,
                                           "storage.keystore": "/srv/keys", "retries": 5,
                                           "join_timeout": 30.0, "privacy.guardrails": "warn"},
                      all_test_auc=0.86)
    horizontal = write_cell(work / "horizontal", HORIZONTAL, all_test_auc=0.75, oracle=0.95,
                            delta=4e-5, horizontal=True)
    build_comparison([sweep, eight, same, horizontal], work / "cmp", figure_formats=())
    return work / "cmp"


def _csv(report: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(report / "report" / f"{name}.csv")


SWEEP_SERIES = "vertical, sample-level DP, train.epochs=4"
EIGHT_SERIES = "vertical, sample-level DP, train.epochs=8"
HORIZONTAL_SERIES = "horizontal, user-level DP"


def test_student_t_interval_known_answer() -> None:
    mean, low, high = mean_ci(pd.Series([0.7, 0.8, 0.9]), bounds=(-math.inf, math.inf))
    half = T_2 * 0.1 / math.sqrt(3)  # = 0.248414
    assert mean == pytest.approx(0.8)
    assert (low, high) == pytest.approx((0.8 - half, 0.8 + half), abs=1e-9)
    # An AUC's interval stays within 0..1; one run has none; missing values are no runs.
    assert mean_ci(pd.Series([0.7, 0.8, 0.9]))[2] == 1.0
    assert math.isnan(mean_ci(pd.Series([0.7, None]))[1])
    assert interval_method(3) == "95 % Student t over 3 runs, clipped to the metric range"
    assert interval_method(1) == "one run: no interval"


def test_configurations_are_series_never_averaged(compared: Path) -> None:
    data = _csv(compared, "topologies_auc")
    assert list(dict.fromkeys(data["series"])) == [SWEEP_SERIES, EIGHT_SERIES, HORIZONTAL_SERIES]
    at = data.set_index(["series", "epsilon"])
    # The sweep's cells at epsilon 1 (0.6, 0.7, 0.8) alone: the 8-epoch run's 0.5 is not in.
    sweep_1 = at.loc[(SWEEP_SERIES, 1.0)]
    half = T_2 * 0.1 / math.sqrt(3)
    assert sweep_1["n"] == 3
    assert sweep_1["all_test_auc_mean"] == pytest.approx(0.7)
    assert sweep_1["all_test_auc_ci_low"] == pytest.approx(0.7 - half)
    assert sweep_1["all_test_auc_ci_high"] == pytest.approx(0.7 + half)
    assert sweep_1["interval"] == "95 % Student t over 3 runs, clipped to the metric range"
    eight = at.loc[(EIGHT_SERIES, 1.0)]
    assert eight["n"] == 1
    assert eight["all_test_auc_mean"] == 0.5
    assert math.isnan(eight["all_test_auc_ci_low"])
    assert eight["interval"] == "one run: no interval"
    # A run that differs from the sweep only in its seeds, keystore, PSI processes, timeouts,
    # retries and guardrails is one more replicate of the sweep's non-private point.
    sweep_inf = at.loc[(SWEEP_SERIES, math.inf)]
    assert sweep_inf["n"] == 4
    assert sweep_inf["all_test_auc_mean"] == pytest.approx(0.86)
    runs = _csv(compared, "compared_runs").set_index("source")
    assert runs.loc["elsewhere", "series"] == SWEEP_SERIES
    assert runs.loc["epochs8", "series"] == EIGHT_SERIES
    assert len(runs) == 9  # six cells (the failed one has no run), three runs
    series = _csv(compared, "compared_series").set_index("series")
    assert series.loc[EIGHT_SERIES, "train.epochs"] == 8
    assert series.loc[HORIZONTAL_SERIES, "topology"] == "horizontal"
    assert series.loc[SWEEP_SERIES, "runs"] == 7
    assert series.loc[SWEEP_SERIES, "epsilons"] == "1, ∞"


def test_each_series_has_its_own_oracle_gap_and_delta(compared: Path) -> None:
    series = _csv(compared, "compared_series").set_index("series")
    assert series.loc[SWEEP_SERIES, "oracle_auc"] == pytest.approx(0.9)
    assert series.loc[HORIZONTAL_SERIES, "oracle_auc"] == pytest.approx(0.95)
    assert series.loc[HORIZONTAL_SERIES, "gap_to_oracle"] == pytest.approx(0.2)
    assert series.loc[SWEEP_SERIES, "delta"] == pytest.approx(1e-5)
    assert series.loc[HORIZONTAL_SERIES, "delta"] == pytest.approx(4e-5)
    at = _csv(compared, "topologies_auc").set_index(["series", "epsilon"])
    assert at.loc[(HORIZONTAL_SERIES, 1.0), "oracle_auc"] == pytest.approx(0.95)
    assert at.loc[(SWEEP_SERIES, 1.0), "gap_to_oracle"] == pytest.approx(0.2)
    assert at.loc[(SWEEP_SERIES, 1.0), "delta"] == pytest.approx(1e-5)
    assert math.isnan(at.loc[(SWEEP_SERIES, math.inf), "delta"])  # no budget, no delta
    page = " ".join((compared / "report.html").read_text().split())
    assert "accounted at different δ" in page
    assert "not comparable as such" in page
    assert "Student t" in page


def test_figure_draws_each_series_oracle(compared: Path) -> None:
    work = compared.parent
    rows, series = comparison_rows([work / "sweep", work / "horizontal"])
    plot = _auc_by_epsilon(points(rows, series), series)
    _, labels = plot.fig.axes[0].get_legend_handles_labels()
    assert {"vertical, sample-level DP", "horizontal, user-level DP",
            "oracle, vertical, sample-level DP", "oracle, horizontal, user-level DP"} == set(labels)
    # Series on one population share their oracle: one line naming both.
    rows, series = comparison_rows([work / "sweep", work / "epochs8", work / "horizontal"])
    plot = _auc_by_epsilon(points(rows, series), series)
    _, labels = plot.fig.axes[0].get_legend_handles_labels()
    assert f"oracle, {SWEEP_SERIES}; {EIGHT_SERIES}" in labels
    assert f"oracle, {HORIZONTAL_SERIES}" in labels


def test_times_are_the_training_phase_in_both(compared: Path) -> None:
    runs = _csv(compared, "compared_runs").set_index("source")
    assert "seconds" not in runs.columns
    # The sweep's first cell of each seed paid 30 s in total for the engine and PSI; its
    # training took 2 s, as long as a single run's own.
    assert runs.loc["sweep/eps=1_seed=0", "train_seconds"] == 2.0
    assert runs.loc["epochs8", "train_seconds"] == 5.0
    at = _csv(compared, "topologies_auc").set_index(["series", "epsilon"])
    assert at.loc[(SWEEP_SERIES, 1.0), "train_seconds"] == 2.0
    assert "seconds.train" in (compared / "report.html").read_text()


def test_old_sweeps_and_lone_runs_are_compared(tmp_path: Path) -> None:
    """Nothing valid is refused: an old-format sweep, runs of its configuration (replicates;
    one repeats a cell's seeds, which a note says), and a run whose config lacks settings newer
    runs write (a series of its own: its missing settings are not assumed to be the
    defaults)."""
    sweep = write_compare_sweep(tmp_path / "sweep", old_format=True)
    twin = write_cell(tmp_path / "twin", {**VERTICAL, "seed": 9, "population.seed": 9},
                      all_test_auc=0.7)
    older = {k: v for k, v in VERTICAL.items() if k not in ("train.lr", "population.seed")}
    old = write_cell(tmp_path / "old", older, all_test_auc=0.7)
    rows, series = comparison_rows([sweep, twin, old])
    labels = [s.label for s in series]
    assert labels == ["vertical, sample-level DP, train.lr=0.01",
                      "vertical, sample-level DP, train.lr=unset"]
    data = points(rows, series).set_index(["series", "epsilon"])
    assert data.loc[(labels[0], 1.0), "n"] == 4
    assert data.loc[(labels[1], 1.0), "n"] == 1
    files = build_comparison([sweep, twin], tmp_path / "cmp", figure_formats=())
    page = " ".join(files.html.read_text().split())
    assert "7 run(s), 1 series" in page
    assert "share a seed and population seed" not in page
    alone = build_comparison([old], tmp_path / "alone", figure_formats=())  # one run alone
    assert "1 run(s), 1 series" in " ".join(alone.html.read_text().split())
    rerun = write_cell(tmp_path / "rerun", VERTICAL, all_test_auc=0.6)  # the cell's seeds
    files = build_comparison([sweep, rerun], tmp_path / "cmp2", figure_formats=())
    page = " ".join(files.html.read_text().split())
    assert f"share a seed and population seed ({labels[0].removesuffix(', train.lr=0.01')}, " \
           "ε = 1)" in page


def test_a_grid_sweeps_cells_are_named_by_their_grid_values() -> None:
    cells = [Compared(row={"topology": "vertical", "dp_level": "sample"},
                      settings={**VERTICAL, "train.lr": lr})
             for lr in (0.003, 0.01, 0.003)]
    series, index = find_series(cells)
    assert [s.label for s in series] == ["vertical, sample-level DP, train.lr=0.003",
                                         "vertical, sample-level DP, train.lr=0.01"]
    assert index == [0, 1, 0]


_SETTING = st.sampled_from(["train.epochs", "train.lr", "model.hidden", "population.users"])
_VALUE = st.one_of(st.integers(1, 3), st.sampled_from([0.01, 1.0, math.inf, "a", None]),
                   st.lists(st.integers(1, 3), max_size=2))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["vertical", "horizontal"]),
                          st.sampled_from(["sample", "user", "off"]),
                          st.dictionaries(_SETTING, _VALUE, max_size=3)),
                min_size=1, max_size=6))
def test_runs_share_a_series_only_with_equal_settings(runs: list) -> None:
    cells = [Compared(row={"topology": t, "dp_level": dp},
                      settings={"topology": t, **s}) for t, dp, s in runs]
    series, index = find_series(cells)
    assert len({s.label for s in series}) == len(series)  # every series its own name
    for i, a in enumerate(cells):
        for j, b in enumerate(cells):
            # Python's == holds 8 and 8.0 equal, as series do; a missing key equals nothing.
            assert (index[i] == index[j]) == (a.settings == b.settings)
