"""Sweeps: parsing, grids, extension, the summary statistics, resumption and refusal."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.config import ConfigError
from server.run_keys import PEOPLE_KEYS
from simulations.run import experiment
from simulations.run.grid import (
    Cell,
    SweepError,
    SweepSpec,
    canonical,
    parse_epsilons,
    parse_grid,
    parse_seeds,
    split_values,
)
from simulations.run.sweep import (
    cell_dir,
    cell_row,
    claim_sweep,
    plan_sweep,
    run_sweep,
    summarise,
)
from tests import background
from tests.conftest import fix_secrets, run_cli
from tests.test_interrupt import aligned, assert_stopped_cleanly, interrupt

EPS = "privacy.epsilon"


def test_epsilons_parse_sorted_with_inf():
    assert parse_epsilons("8, 0.5,inf,1") == ("0.5", "1", "8", "inf")


@pytest.mark.parametrize(("text", "problem"), [
    ("1,-2", "must be > 0"), ("0,1", "must be > 0"), ("1,abc", "expected"),
    ("1,nan", "expected a number"), ("1,1.0", "twice"),
])
def test_bad_epsilons_are_refused_by_name(text, problem):
    with pytest.raises(SweepError, match=problem):
        parse_epsilons(text)


def test_bad_seeds_are_refused():
    with pytest.raises(SweepError, match="whole numbers"):
        parse_seeds("0,x")
    with pytest.raises(SweepError, match="distinct"):
        parse_seeds("1,1")


def test_grid_values_are_typed_and_spelt_one_way():
    grid = parse_grid(["train.lr=0.003, 1e-2", "model.hidden=[32,16],[64]",
                       "privacy.accountant=prv,rdp", "train.chunk_warmup=true,no"])
    assert grid == {"train.lr": ("0.003", "0.01"), "model.hidden": ("32,16", "64"),
                    "privacy.accountant": ("prv", "rdp"),
                    "train.chunk_warmup": ("true", "false")}


@pytest.mark.parametrize(("items", "problem"), [
    (["train.lrr=1"], "train.lr"),                       # an unknown key names the near one
    (["seed=1,2"], "--seeds"), (["population.seed=1"], "--data-seeds"),
    (["topology=vertical,horizontal"], "fedscore compare"),
    (["storage.keystore=a,b"], "where files live"),
    (["train.lr=0.1,0.10"], "twice"), (["train.lr=0.1", "train.lr=0.2"], "given twice"),
    (["train.epochs=2.5"], "expected"), (["train.lr"], "key=value"),
    (["model.hidden=[32,16"], "without its ']'"),
    (["aggregation.mode=sum,concat"], "silos admit one aggregation"),
    (["explain.reasons=0,3"], "reason-code"), (["aggregation.secure=true,false"], "secure-sum"),
])
def test_bad_grids_are_refused_by_name(items, problem):
    with pytest.raises((SweepError, ConfigError), match=problem):
        parse_grid(items)


@given(st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=5, unique=True))
def test_canonical_floats_read_back_exactly(values):
    texts = split_values(",".join(canonical(v) for v in values))
    assert [float(t) for t in texts] == values


def test_the_swept_keys_cannot_be_set():
    with pytest.raises(SweepError, match=r"--grid privacy\.epsilon"):
        SweepSpec(grid={EPS: [1.0]}, seeds=(0,), assignments=((EPS, "2"),))
    with pytest.raises(SweepError, match="--data-seeds"):
        SweepSpec(grid={}, seeds=(0,), assignments=(("population.seed", "2"),))
    # Not swept: epsilon is one more fixed setting.
    assert SweepSpec(grid={"train.lr": [0.01]}, seeds=(0,),
                     assignments=((EPS, "2"),)).config(
        Cell((("train.lr", "0.01"),), 0)).authority.privacy.epsilon == 2.0


def test_cells_are_named_by_grid_point_and_seeds():
    old = SweepSpec(grid={EPS: [2, "inf"]}, seeds=(3,))
    assert [c.name for c in old.cells()] == ["eps=2_seed=3", "eps=inf_seed=3"]
    assert {c.population for c in old.cells()} == {"seed=3"}
    cfg = old.config(old.cells()[0])  # seed sets both seeds, as `fedscore run --seed 3`
    assert (cfg.authority.seed, cfg.population.seed, cfg.authority.privacy.epsilon) == (3, 3, 2.0)
    grid = SweepSpec(grid={"train.lr": [0.01], "population.signal_scale": [1, 2]}, seeds=(0, 1),
                     data_seeds=(7,))
    names = [c.name for c in grid.cells()]
    assert "population.signal_scale=2_train.lr=0.01_data=7_seed=1" in names
    assert len(names) == 4
    # A population per (data seed, population key): the cells of one share a federation.
    assert {c.population for c in grid.cells()} == {"seed=7_population.signal_scale=1",
                                                    "seed=7_population.signal_scale=2"}
    cfg = grid.config(grid.cells()[-1])
    assert (cfg.authority.seed, cfg.population.seed) == (1, 7)


def test_data_seeds_on_real_data_are_refused():
    with pytest.raises(SweepError, match="one population"):
        SweepSpec(grid={}, seeds=(0,), data_seeds=(0, 1), assignments=(("data", "uci"),))


def test_regions_get_a_population_each():
    spec = SweepSpec(grid={"regions": [2, 4]}, seeds=(0,),
                     assignments=(("topology", "horizontal"),))
    assert {c.population for c in spec.cells()} == {"seed=0_regions=2", "seed=0_regions=4"}


def test_the_reference_defaults_to_the_least_private_point_and_can_be_named():
    spec = SweepSpec(grid={EPS: [1, "inf", 4], "train.lr": [0.01, 0.003]}, seeds=(0,))
    assert spec.reference_point == {EPS: "inf", "train.lr": "0.01"}
    named = SweepSpec(grid=spec.grid, seeds=(0,), reference={"train.lr": "0.003"})
    assert named.reference_point == {EPS: "inf", "train.lr": "0.003"}
    # Only what was asked for is kept: the default follows the grid as it grows.
    assert named.to_json()["reference"] == {"train.lr": "0.003"}
    grown = SweepSpec(grid={EPS: [1, 2]}, seeds=(0,)).extended_by(
        SweepSpec(grid={EPS: ["inf"]}, seeds=(0,)), given={"grid"})
    assert grown.reference_point == {EPS: "inf"}
    with pytest.raises(SweepError, match="not a point of the grid"):
        SweepSpec(grid=spec.grid, seeds=(0,), reference={"train.lr": 0.1})


def test_summary_groups_done_runs_by_epsilon():
    table = pd.DataFrame({
        "epsilon": [1.0, 1.0, math.inf, 1.0], "seed": [0, 1, 0, 2],
        "status": ["done", "done", "done", "failed"],
        "auc": [0.80, 0.82, 0.86, None], "auc_all_test": [0.83, 0.85, 0.88, None],
        "auc_central": [0.86] * 3 + [None],
        "auc_central_dp": [0.84, 0.85, None, None], "auc_best_silo": [0.8] * 3 + [None],
        "auc_oracle": [0.87] * 3 + [None], "eps_model": [0.99, 0.98, math.inf, None],
        "audit_epsilon_lower": [0.0, 0.1, 0.3, None],
    })
    summary = summarise(table).set_index("epsilon")
    assert summary.loc[1.0, "n"] == 2
    assert summary.loc[1.0, "auc_mean"] == pytest.approx(0.81)
    assert summary.loc[1.0, "all_test_mean"] == pytest.approx(0.84)
    assert summary.loc[1.0, "audit_epsilon_lower_max"] == pytest.approx(0.1)
    assert math.isnan(summary.loc[math.inf, "central_dp_mean"])


def test_paired_differences_known_answer():
    """Seeds that move both points alike cancel: the paired interval is narrow where the two
    points' own intervals overlap."""
    seeds = [0, 1, 2]
    ref = [0.70, 0.80, 0.90]
    other = [0.72, 0.821, 0.919]  # differences 0.02, 0.021, 0.019: mean 0.02, sd 0.001
    table = pd.DataFrame({
        "epsilon": [math.inf] * 3 + [1.0] * 3 + [1.0], "data_seed": seeds + seeds + [5],
        "seed": seeds + seeds + [5], "status": ["done"] * 7, "auc": ref + other + [0.5],
        "eps_model": 1.0, "audit_epsilon_lower": 0.0})
    summary = summarise(table, ["epsilon"], {EPS: "inf"}).set_index("epsilon")
    row = summary.loc[1.0]
    half = 4.302653 * 0.001 / math.sqrt(3)
    assert row["auc_diff_mean"] == pytest.approx(0.02)
    assert (row["auc_diff_ci_low"], row["auc_diff_ci_high"]) == pytest.approx(
        (0.02 - half, 0.02 + half))
    assert row["auc_diff_n"] == 3  # seed 5 has no reference run to pair with
    assert row["auc_ci_low"] < summary.loc[math.inf, "auc_ci_high"]  # the bands overlap
    assert row["auc_diff_ci_low"] > 0  # the paired difference does not
    assert "paired by (data seed, seed) over 3" in row["interval"]
    assert summary.loc[math.inf, "is_reference"]
    assert math.isnan(summary.loc[math.inf, "auc_diff_mean"])
    assert set(summary["reference"]) == {"eps=inf"}


def test_a_cells_row_keeps_each_auc_with_its_population(tmp_path: Path):
    """sweep.csv's `auc` is metrics.json's (scored test people), `auc_all_test` and the
    references' columns are every test person's."""
    spec = SweepSpec(grid={EPS: [1]}, seeds=(0,))
    (cell,) = spec.cells()
    cell_dir(tmp_path, cell).mkdir(parents=True)
    metrics = {"auc": 0.81, "all_test_auc": 0.85, "oracle_auc": 0.87,
               "baseline_central_auc": 0.86, "epsilon": {"model": 0.99, "label": None},
               "seconds": {"total": 1.0}}
    (cell_dir(tmp_path, cell) / "metrics.json").write_text(json.dumps(metrics))
    row = cell_row(tmp_path, spec, cell)
    assert (row["auc"], row["auc_all_test"]) == (0.81, 0.85)
    assert (row["auc_oracle"], row["auc_central"]) == (0.87, 0.86)


def test_another_config_in_the_same_directory_is_refused(tmp_path: Path):
    out = tmp_path / "s"
    claim_sweep(out, SweepSpec(grid={EPS: [1, "inf"]}, seeds=(0,), users=2000))
    before = (out / "sweep.json").read_bytes()
    for other, problem in [
        (SweepSpec(grid={EPS: [1]}, seeds=(0,), users=3000), "--users"),
        (SweepSpec(grid={EPS: [1]}, seeds=(0,), users=2000,
                   assignments=(("train.epochs", "8"),)), "--set"),
        (SweepSpec(grid={"train.lr": [0.1]}, seeds=(0,), users=2000), "train.lr not among"),
        (SweepSpec(grid={EPS: [1]}, seeds=(0,), data_seeds=(1,), users=2000), "--data-seeds"),
    ]:
        with pytest.raises(SweepError, match=problem):
            plan_sweep(out, other)
    assert (out / "sweep.json").read_bytes() == before


def test_a_cell_directory_of_another_configuration_is_refused(tmp_path: Path):
    out = tmp_path / "s"
    spec = SweepSpec(grid={EPS: [1]}, seeds=(0,), users=2000)
    claim_sweep(out, spec)
    (cell,) = spec.cells()
    cell_dir(out, cell).mkdir(parents=True)
    wrong = spec.config(Cell(cell.point, 1))  # seed 1's run under seed 0's name
    (cell_dir(out, cell) / "config.json").write_text(json.dumps(wrong.flat()))
    with pytest.raises(SweepError, match="another configuration than the sweep's cell"):
        plan_sweep(out, spec)


def test_a_sweep_of_the_old_format_continues(tmp_path: Path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps(
        {"epsilons": ["2", "inf"], "seeds": [3], "users": 2000, "assignments": {}}))
    spec = plan_sweep(out, SweepSpec(grid={}, seeds=(4,)), given={"seeds"})
    assert spec.grid == {EPS: ("2", "inf")}
    assert [c.name for c in spec.cells()] == ["eps=2_seed=3", "eps=inf_seed=3",
                                              "eps=2_seed=4", "eps=inf_seed=4"]


class FakeEngine:
    """run_cells's stand-in: writes each cell's config.json, a manifest.json and a metrics.json
    whose AUC is a known function of its configuration and seeds, and records which cells ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.federations: list[str] = []

    def __call__(self, cells, parties_dir: Path, progress=None, on_done=None) -> list[str]:
        self.federations.append(parties_dir.name)
        for i, (cfg, out, _resume) in enumerate(cells):
            out.mkdir(parents=True)
            (out / "config.json").write_text(json.dumps(cfg.flat()))
            (out / "manifest.json").write_text("{}")
            (out / "authority.json").write_text(json.dumps({"split_from": list(PEOPLE_KEYS)}))
            auc = (0.7 + 0.01 * cfg.authority.seed + 0.001 * cfg.population.seed
                   + 2 * cfg.authority.train.lr)
            metrics = {"auc": auc, "epsilon": {"model": cfg.authority.privacy.epsilon,
                                               "label": None}, "seconds": {"total": 1.0}}
            (out / "metrics.json").write_text(json.dumps(metrics))
            self.ran.append(out.name)
            if on_done:
                on_done(i, "")
        return [""] * len(cells)


def test_a_grid_sweep_extended_by_a_seed_runs_only_the_new_cells(tmp_path: Path, monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(experiment, "run_cells", engine)
    out = tmp_path / "s"
    grid = {EPS: [1, "inf"], "train.lr": [0.01, 0.02]}
    table = run_sweep(out, SweepSpec(grid=grid, seeds=(0, 1), data_seeds=(5,)))
    assert len(table) == len(engine.ran) == 8
    assert engine.federations == ["seed=5"]  # one population: one federation
    first = {p: p.read_bytes() for p in (out / "runs").rglob("*.json")}

    engine.ran.clear()
    table = run_sweep(out, SweepSpec(grid={}, seeds=(2,)), given={"seeds"})
    assert sorted(engine.ran) == sorted(f"eps={e}_train.lr={lr}_data=5_seed=2"
                                        for e in ("1", "inf") for lr in ("0.01", "0.02"))
    assert all(p.read_bytes() == b for p, b in first.items())  # nothing finished was rerun
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [0, 1, 2]
    assert len(table) == 12
    assert set(table["seed"]) == {0, 1, 2}

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4
    assert set(summary["n"]) == {3}
    assert list(summary.columns[:2]) == ["epsilon", "train.lr"]
    # AUC = 0.7 + 0.01 seed + 0.005 + 2 lr: the difference to the reference (eps inf,
    # lr 0.01) is exactly 2 * (lr - 0.01) for every seed, so its interval has no width.
    lr02 = summary[summary["train.lr"] == 0.02]
    assert lr02["auc_diff_mean"].to_numpy() == pytest.approx([0.02, 0.02])
    assert lr02["auc_diff_ci_high"].to_numpy() == pytest.approx([0.02, 0.02])
    assert (lr02["auc_ci_high"] - lr02["auc_ci_low"] > 0.02).all()  # seeds widen the mean's
    assert set(summary["reference"]) == {"eps=inf_train.lr=0.01"}


def _sweep_args(work: Path) -> tuple[str, ...]:
    return ("sweep", "--out", str(work / "sweep"), "--users", "2000", "--epsilons", "2,inf",
            "--seeds", "3", "--set", "train.epochs=3",
            # Label DP off: 2,000 people and three epochs learn too little under eps_label 2
            # for the AUC check below to say anything about the sweep's plumbing.
            "--set", "privacy.label_epsilon=inf",
            # Three full-batch DP steps cannot learn (server/privacy.py guardrails); the
            # sweep's plumbing is what is tested.
            "--set", "privacy.guardrails=warn",
            "--set", f"storage.keystore={work / 'keys'}")


# The sweep's first pass runs in the background while the suite runs; the test then reruns,
# interrupts and resumes it. Not `early`: its Ctrl-C must stop the sweep within 5 s, and in the
# middle of the suite, beside both lanes, the stop took 5.09 s (the CI of 078f6a9).
background.register("sweep_run", lambda work: [background.Command(
    _sweep_args(work),
    before=lambda work: fix_secrets(work / "keys", "sweep"))])  # the same cells everywhere


@pytest.fixture
def sweep_run(background_runs):
    (first,), work = background_runs("sweep_run")
    return first, work


@pytest.mark.slow
def test_sweep_runs_every_cell_once_and_resumes(sweep_run):
    first, tmp_path = sweep_run
    args, out = _sweep_args(tmp_path), tmp_path / "sweep"
    assert first.returncode == 0, first.stderr[-3000:]
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["status"]) == ["done", "done"]
    assert table["auc"].between(0, 1).all()
    # Only the non-private cell must have learnt: 2,000 people at eps 2 are mostly noise.
    assert table.loc[table["epsilon"] == math.inf, "auc"].item() > 0.65
    private = table[table["epsilon"] == 2].iloc[0]
    assert 0 <= private["audit_epsilon_lower"] <= private["eps_model"] <= 2.0
    assert 0 <= private["audit_canary_epsilon_lower"] <= private["eps_model"]
    verified = run_cli("ledger", "verify", str(out), cwd=tmp_path)  # every cell's ledger
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "NO" not in verified.stdout
    assert (table["auc_oracle"] >= table["auc"] - 0.05).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["epsilon"]) == [2.0, math.inf]
    runs = out / "runs"
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in runs.rglob("*.json")}

    again = run_cli(*args, cwd=tmp_path, engine=False)  # nothing to run: no engine may start
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 of 2 cells to run" in again.stderr
    assert digests == {p: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in runs.rglob("*.json")}

    other = run_cli("sweep", "--out", str(out), "--users", "2000", "--epsilons", "1",
                    "--seeds", "3", "--set", "train.epochs=4", cwd=tmp_path, engine=False)
    assert other.returncode == 2
    assert "another configuration" in other.stderr
    assert json.loads((out / "sweep.json").read_text())["grid"] == {EPS: ["2", "inf"]}

    # One Ctrl-C while a cell starts training (no round ended): the sweep stops at once with
    # nothing left running; the same command starts that cell again, to the same results.
    cell = runs / "eps=2_seed=3"
    cell.rename(tmp_path / "uninterrupted")
    stopped = interrupt(*args, cwd=tmp_path, when=lambda: aligned(cell))
    assert_stopped_cleanly(stopped)
    assert "fedscore sweep --out" in stopped.output
    resumed = run_cli(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 2 cells to run" in resumed.stderr
    assert (out / "unfinished" / "eps=2_seed=3-1" / "config.json").exists()  # kept aside
    # The auditor's canary coins are fresh in every run; everything else is the run's own.
    fresh = ["seconds", "audit_canary_epsilon_lower"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv").drop(columns=fresh),
                                  table.drop(columns=fresh))


def test_a_sweep_loads_into_pandas(tmp_path: Path, monkeypatch):
    import fedscore

    monkeypatch.setattr(experiment, "run_cells", FakeEngine())
    out = tmp_path / "s"
    table = run_sweep(out, SweepSpec(grid={"train.lr": [0.01, 0.02]}, seeds=(0, 1)))
    sweep = fedscore.load_sweep(out)
    assert sweep.config["grid"] == {"train.lr": ["0.01", "0.02"]}
    assert sorted(sweep.runs["run"]) == sorted(table["run"])
    assert sweep.summary.loc[sweep.summary["train.lr"] == 0.02, "auc_diff_mean"].item() == \
        pytest.approx(0.02)
    with pytest.raises(fedscore.ReportError, match="has no cell"):
        sweep.run("eps=3_seed=0")
    with pytest.raises(fedscore.ReportError, match="load it with load_run"):
        fedscore.load_sweep(out / "runs" / "train.lr=0.01_seed=0")


def test_the_command_extends_a_sweep_with_what_it_names(tmp_path: Path, monkeypatch, capsys):
    from simulations.cli import main as cli

    engine = FakeEngine()
    monkeypatch.setattr(experiment, "run_cells", engine)
    out = str(tmp_path / "s")
    assert cli.main(["sweep", "--out", out, "--users", "2000", "--epsilons", "2,inf",
                     "--seeds", "0,1", "--set", "train.epochs=3"]) == 0
    assert len(engine.ran) == 4
    engine.ran.clear()
    # Left out, --users, --set and --epsilons keep the sweep's; --seeds 2 adds one seed.
    assert cli.main(["sweep", "--out", out, "--seeds", "2"]) == 0
    assert sorted(engine.ran) == ["eps=2_seed=2", "eps=inf_seed=2"]
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert (saved["seeds"], saved["users"], saved["assignments"]) == (
        [0, 1, 2], 2000, {"train.epochs": "3"})
    engine.ran.clear()
    assert cli.main(["sweep", "--out", out, "--epsilons", "1", "--reference",
                     "privacy.epsilon=2"]) == 0  # one more epsilon, for every seed
    assert sorted(engine.ran) == ["eps=1_seed=0", "eps=1_seed=1", "eps=1_seed=2"]
    summary = pd.read_csv(tmp_path / "s" / "summary.csv")
    assert list(summary.loc[summary["is_reference"], "epsilon"]) == [2.0]
    before = (tmp_path / "s" / "sweep.json").read_bytes()
    engine.ran.clear()
    for args, problem in [(["--set", "train.epochs=8"], "--set"),
                          (["--grid", "train.lr=0.1"], "train.lr not among"),
                          (["--users", "3000"], "--users")]:
        capsys.readouterr()
        assert cli.main(["sweep", "--out", out, *args]) == 2
        assert problem in capsys.readouterr().err.replace("\n", " ")
    assert engine.ran == []
    assert (tmp_path / "s" / "sweep.json").read_bytes() == before


def test_cells_split_the_old_way_are_not_extended(tmp_path: Path, monkeypatch):
    """Cells made before the split was keyed by the seed tested on other people than new
    cells would: extending (or continuing) such a sweep is refused; reading it is not."""
    monkeypatch.setattr(experiment, "run_cells", FakeEngine())
    out = tmp_path / "s"
    spec = SweepSpec(grid={EPS: [1, "inf"]}, seeds=(0,))
    run_sweep(out, spec)
    for cell in spec.cells():
        (cell_dir(out, cell) / "authority.json").write_text("{}")  # as before the record
    assert plan_sweep(out, spec) == spec  # finished: nothing new to pair
    with pytest.raises(SweepError, match="split by an earlier fedscore"):
        plan_sweep(out, SweepSpec(grid={}, seeds=(1,)), given={"seeds"})


def test_grid_values_read_back_as_sweep_json_spells_them(tmp_path: Path, monkeypatch):
    """Numbers stay numbers; a bool key's values read back as "true"/"false", so the report
    finds the reference and the order sweep.json gives."""
    import fedscore

    monkeypatch.setattr(experiment, "run_cells", FakeEngine())
    out = tmp_path / "s"
    run_sweep(out, SweepSpec(grid={"train.chunk_warmup": ["false", "true"],
                                   "train.epochs": [3, 5]}, seeds=(0,)))
    sweep = fedscore.load_sweep(out)
    assert list(sweep.runs["train.chunk_warmup"].unique()) == ["false", "true"]
    assert sweep.runs["train.epochs"].dtype.kind == "i"
    reference = sweep.summary[sweep.summary["is_reference"]]
    assert (reference["train.chunk_warmup"].item(), reference["train.epochs"].item()) == (
        "false", 3)
