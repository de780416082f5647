"""`fedscore tune`: the tuned epsilon (Papernot-Steinke) against its known answers, the secret
draw of the runs, the DP score and its ledger line, selection over fake runs, and the command's
refusals before any engine starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.protocol.accounting import add_steps, epsilon
from crypto.secret_random import SecretRandom
from server.ledger import Ledger
from server.ledger_lines import Block, GaussianRelease, JointRound
from server.ledger_lines import read as read_ledger
from server.tune_privacy import (
    ORDERS,
    RunsLaw,
    TuneBudgetError,
    per_run_target,
    rdp_curve,
    rdp_epsilon,
    repeat_and_select_rdp,
    tnb_mean,
    tuned_epsilon,
)
from server.tune_score import CLIP, clipped_log_loss_sum, noisy_score, score_line
from simulations.run import tune
from simulations.run.tune import draw_runs, plan_tune, select, summarise
from simulations.run.tune_spec import TuneError, TuneSpec
from tests.conftest import run_cli

LAWS = [RunsLaw("geometric", 3), RunsLaw("logarithmic", 3), RunsLaw("negbin", 5, 0.5),
        RunsLaw("poisson", 4)]


# ---- the formula -------------------------------------------------------------------------------


def test_theorem_2_known_answer_for_the_gaussian_with_a_geometric_k():
    """Gaussian of multiplier s: eps(l) = l / (2 s^2). Geometric K (eta = 1, E[K] = 1/gamma):
    eps'(l) = eps(l) + 2 min_lh [(lh - 1)/(2 s^2) + log(1/gamma)/lh] + log(1/gamma)/(l - 1).
    The minimum is at lh = s sqrt(2 L), L = log(1/gamma), worth sqrt(2 L)/s - 1/(2 s^2): with
    s = 2 and L = 8 it is at lh = 8 (an order of the grid), worth 1.875. At l = 9,
    eps' = 9/8 + 3.75 + 8/8 = 5.875, the curve's least value, so monotonicity keeps it."""
    lam = np.asarray(ORDERS)
    tuned = repeat_and_select_rdp(lam / 8, RunsLaw("geometric", math.exp(8)))
    assert tuned[ORDERS.index(9.0)] == pytest.approx(5.875, rel=1e-9)
    assert tuned[ORDERS.index(2.0)] == pytest.approx(5.875, rel=1e-9)  # from a larger order


@pytest.mark.parametrize("law", LAWS, ids=lambda law: law.distribution)
def test_the_tuned_epsilon_is_dp_accountings_repeat_and_select(law):
    """The same theorem as dp-accounting's RepeatAndSelectDpEvent (Theorems 2 and 6 of
    arXiv:2110.03620v2), at the same orders, on a subsampled Gaussian run."""
    sigma, q, steps, delta = 1.2, 0.05, 300, 1e-5
    mine = tuned_epsilon([rdp_curve([(sigma, q, steps)])], law, delta)
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)),
                                    steps)
    theirs = RdpAccountant(orders=list(ORDERS)).compose(RepeatAndSelectDpEvent(
        event, law.mean, math.inf if law.poisson else law.shape)).get_epsilon(delta)
    assert mine == pytest.approx(theirs, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.5, 20), steps=st.integers(1, 50),
       means=st.lists(st.floats(1.0, 50.0), min_size=2, max_size=2, unique=True),
       law=st.sampled_from(["logarithmic", "geometric", "negbin", "poisson"]))
def test_the_total_is_at_least_one_run_and_grows_with_the_mean_number_of_runs(
        sigma, steps, means, law):
    rdp = rdp_curve([(sigma, 1.0, steps)])
    base = rdp_epsilon(rdp, 1e-6)
    few, many = (RunsLaw(law, m, 0.5) for m in sorted(means))
    assert tuned_epsilon([rdp], few, 1e-6) >= base - 1e-12
    assert tuned_epsilon([rdp], many, 1e-6) >= tuned_epsilon([rdp], few, 1e-6) - 1e-12


def test_the_costliest_candidate_bounds_the_tune():
    cheap, dear = rdp_curve([(8.0, 1.0, 4)]), rdp_curve([(2.0, 1.0, 4)])
    law = RunsLaw("logarithmic", 3)
    assert tuned_epsilon([cheap, dear], law, 1e-6) == tuned_epsilon([dear], law, 1e-6)


def test_the_per_run_target_meets_the_total_and_is_the_largest_that_does():
    law = RunsLaw("logarithmic", 3)

    def curve_of(eps_run: float) -> np.ndarray:  # a Gaussian calibrated to eps_run
        return np.asarray(ORDERS) * eps_run**2 / 40

    target = per_run_target(2.0, 1e-5, law, curve_of)
    assert tuned_epsilon([curve_of(target)], law, 1e-5) <= 2.0
    assert tuned_epsilon([curve_of(target * 1.02)], law, 1e-5) > 2.0
    assert target < 2.0


def test_an_impossible_total_is_refused_with_what_to_change():
    def floor(eps_run: float) -> np.ndarray:
        if eps_run < 0.5:  # the run's fixed releases alone spend more
            raise TuneBudgetError("the mechanisms before training already spend 0.5")
        return np.asarray(ORDERS) * eps_run**2 / 40

    with pytest.raises(TuneBudgetError, match="raise --epsilon"):
        per_run_target(0.6, 1e-5, RunsLaw("geometric", 10), floor)


# ---- the number of runs -----------------------------------------------------------------------


@pytest.mark.parametrize("law", LAWS, ids=lambda law: law.distribution)
def test_k_has_the_laws_mean_and_support(law):
    rng = SecretRandom(bytes(32)).generator("tune", "runs", "test")
    ks = np.array([law.draw(rng) for _ in range(2000)])
    assert ks.mean() == pytest.approx(law.mean, rel=0.15)
    assert ks.min() >= (0 if law.poisson else 1)


def test_tnb_mean_inverts():
    for shape in (0.0, 0.5, 1.0, 3.0):
        law = RunsLaw("negbin", 7.5, shape)
        assert tnb_mean(law.gamma, shape) == pytest.approx(7.5, rel=1e-6)


@pytest.mark.parametrize(("args", "problem"), [
    (("poisson", 0.0), "> 0"), (("geometric", 0.5), ">= 1"), (("negbin", 3, -1), "shape"),
    (("uniform", 3), "one of"), (("logarithmic", math.nan), ">= 1"),
])
def test_bad_laws_are_refused(args, problem):
    with pytest.raises(ValueError, match=problem):
        RunsLaw(*args)


def _spec(**kw) -> TuneSpec:
    return TuneSpec(**{"grid": {"train.lr": ["0.01", "0.03", "0.1"]}, "epsilon": 2.0,
                       "law": RunsLaw("logarithmic", 6), "users": 2000, **kw})


def test_the_runs_come_from_the_authoritys_secret_not_the_seed(tmp_path: Path):
    """Two tunes with the same options (the same public seeds) but different authority
    secrets draw different runs; the same secret and nonce draw the same ones."""
    spec = _spec()

    def runs(secret: bytes, nonce: str) -> tuple[int, ...]:
        rng = SecretRandom(secret).generator("tune", "runs", nonce)
        return draw_runs(spec, rng)

    mine = [runs(b"a" * 32, str(i)) for i in range(8)]
    assert mine == [runs(b"a" * 32, str(i)) for i in range(8)]
    assert mine != [runs(b"b" * 32, str(i)) for i in range(8)]

    def fake_budget(spec):
        return 1.0, 1.9, 1e-5, 1400, {}

    a, b = (plan_tune(tmp_path / name, spec, budget=fake_budget) for name in ("a", "b"))
    assert (tmp_path / "a" / "parties" / "seed=0.keys").is_dir()  # the authority's keystore
    assert a.nonce != b.nonce
    again = plan_tune(tmp_path / "a", spec, budget=fake_budget)  # continued: the same plan
    assert (again.runs, again.nonce) == (a.runs, a.nonce)
    # Each run at the planned epsilon and delta, in RDP; a delta the user set is kept.
    privacy = a.config(a.cells()[0]).authority.privacy
    assert (privacy.epsilon, privacy.delta, privacy.accountant) == (1.0, 1e-5, "rdp")
    mine = _spec(assignments=(("privacy.delta", "1e-06"),))
    assert mine.sweep(1.0, 1e-5).config(a.cells()[0]).authority.privacy.delta == 1e-6


# ---- the score ----------------------------------------------------------------------------------


def test_the_score_is_a_clipped_sum_with_noise_of_the_stated_sensitivity():
    p = np.array([0.5, 1e-9, 0.9, 0.2])
    y = np.array([1.0, 1.0, 0.0, 0.0])
    # log 2, the clip (p held at P_MIN), -log 0.1 = log 10, -log 0.8
    assert clipped_log_loss_sum(p, y) == pytest.approx(
        math.log(2) + CLIP + math.log(10) + math.log(1.25))
    rng = np.random.default_rng(1)
    noise = [noisy_score(p, y, rng, 3.0).loss_sum - clipped_log_loss_sum(p, y)
             for _ in range(1000)]
    assert np.std(noise) == pytest.approx(3.0 * CLIP, rel=0.1)
    with pytest.raises(ValueError, match="needs noise"):
        noisy_score(p, y, rng, 0.0)


def test_the_scores_ledger_line_composes_after_the_validation_people(tmp_path: Path):
    ledger = Ledger(tmp_path)
    stats = GaussianRelease(party="payments", population="all", purpose="statistics",
                            noise_multiplier=20.0, sample_rate=1.0, steps=1, round=0,
                            epsilon=0.1, delta=1e-5, accountant="rdp")
    cal = GaussianRelease(party="authority", population="val", purpose="calibration",
                          noise_multiplier=6.0, sample_rate=1.0, steps=3, round=4,
                          epsilon=0.9, delta=1e-5, accountant="rdp")
    for line in (stats, cal):
        ledger.append(line)
    line = score_line(read_ledger(tmp_path), 5.0, "rdp", 1e-5, 1e-5, 4)
    expected = add_steps(add_steps([(20.0, 1.0, 1)], 6.0, 1.0, 3), 5.0, 1.0, 1)
    assert line.epsilon == pytest.approx(epsilon("rdp", expected, 1e-5))
    assert (line.population, line.purpose, line.round) == ("val", "tune_score", 4)


# ---- selection and the summary ----------------------------------------------------------------


def _fake_run(run_dir: Path, sigma: float, auc: float) -> None:
    run_dir.mkdir(parents=True)
    ledger = Ledger(run_dir)
    ledger.append(GaussianRelease(party="payments", population="all", purpose="statistics",
                                  noise_multiplier=30.0, sample_rate=1.0, steps=1, round=0,
                                  epsilon=0.1, delta=1e-5, accountant="rdp"))
    ledger.append(JointRound(blocks=tuple(Block(party=p, noise_multiplier=sigma * 2, clip=5.0)
                                          for p in ("a", "b", "c", "d")),
                             noise_multiplier=sigma, sample_rate=1.0, steps=12, round=1,
                             epsilon=1.0, delta=1e-5, accountant="rdp"))
    ledger.append(GaussianRelease(party="authority", population="val", purpose="tune_score",
                                  noise_multiplier=5.0, sample_rate=1.0, steps=1, round=1,
                                  epsilon=0.2, delta=1e-5, accountant="rdp"))
    (run_dir / "metrics.json").write_text(json.dumps(
        {"auc": auc, "epsilon": {"model": 1.0, "label": 2.0}}))


def test_the_lowest_noisy_loss_is_chosen_and_the_total_read_from_the_ledgers(tmp_path: Path):
    out = tmp_path / "t"
    spec = _spec(law=RunsLaw("geometric", 2))
    planned = {name: list(rdp_curve([(12.0, 1.0, 12)])) for name in
               ("train.lr=0.01", "train.lr=0.03", "train.lr=0.1")}
    plan = tune.TunePlan(spec, 1.0, 1.9, 1e-5, 1400, runs=(0, 2, 2), nonce="n", curves=planned)
    cells = plan.cells()
    scores = {c.name: tune.NoisyScore(100.0 + i, 300, 5.0) for i, c in enumerate(cells)}
    # Each run has its own split: the lowest mean wins, not the lowest sum.
    scores[cells[-1].name] = tune.NoisyScore(110.0, 400, 5.0)
    for cell in cells:
        _fake_run(tune.cell_dir(out, cell), 12.0, 0.7)
    # A run still to go: no release yet, only the authority's record.
    assert summarise(plan, out, dict(list(scores.items())[:-1]), {}) == {}
    assert (out / tune.RUNS_FILE).exists()
    assert not (out / tune.SUMMARY_FILE).exists()
    summary = summarise(plan, out, scores, {})
    assert summary["chosen"]["run"] == select(scores) == cells[-1].name
    assert summary["chosen"]["noisy_val_loss"] == pytest.approx(scores[cells[-1].name].mean_loss)
    # The ledgers' joint noise is 1/sqrt(sum 1/(2 sigma)^2) over 4 blocks = sigma: the runs
    # spend what was planned, plus the statistics and the score, so a little more.
    assert summary["epsilon"]["total"] >= tuned_epsilon([np.asarray(v) for v in planned.values()],
                                                        spec.law, 1e-5 - 1e-12) - 1e-9
    assert summary["epsilon"]["label_against_silos"] == 2.0 * plan.k
    assert "Theorem 2" in summary["epsilon"]["theorem"]
    assert json.loads((out / tune.SUMMARY_FILE).read_text()) == summary


# ---- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "problem"), [
    (["--epsilon", "inf"], "finite number"),
    (["--epsilon", "2", "--grid", "privacy.epsilon=1,2"], "TOTAL meets --epsilon"),
    (["--epsilon", "2", "--set", "privacy.accountant=prv"], "RDP"),
    (["--epsilon", "2", "--set", "privacy.selection_noise=1"], "--score-noise"),
    (["--epsilon", "2", "--set", "storage.keystore=none"], "secret in its keystore"),
    (["--epsilon", "2", "--set", "topology=horizontal"], "vertical runs only"),
    (["--epsilon", "2", "--distribution", "poisson", "--mean-runs", "0"], "> 0"),
    (["--epsilon", "2", "--score-noise", "0"], "--score-noise"),
    (["--epsilon", "2", "--grid", "train.lrr=1"], "train.lr"),
])
def test_the_command_refuses_before_any_engine(tmp_path: Path, extra, problem):
    grid = [] if "--grid" in extra else ["--grid", "train.lr=0.01,0.03"]
    done = run_cli("tune", "--out", str(tmp_path / "t"), "--users", "2000", *grid, *extra,
                   cwd=tmp_path, engine=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert problem in " ".join(done.stderr.split())
    assert not (tmp_path / "t" / tune.TUNE_FILE).exists()


def test_another_tune_in_the_same_directory_is_refused(tmp_path: Path):
    out = tmp_path / "t"
    plan_tune(out, _spec(), budget=lambda s: (1.0, 1.9, 1e-5, 1400, {}))
    with pytest.raises(TuneError, match="epsilon differ"):
        plan_tune(out, _spec(epsilon=3.0), budget=lambda s: (1.0, 1.9, 1e-5, 1400, {}))


def test_a_refused_candidate_leaves_no_tune_behind(tmp_path: Path):
    """The guardrails and delta are checked at the planned per-run epsilon, before the draw
    makes the authority's keystore or tune.json: the corrected command can reuse --out."""
    from server.config import ConfigError

    seen = []

    def refuse(cfg):
        seen.append(cfg.authority.privacy.epsilon)
        raise ConfigError("this DP configuration cannot learn")

    with pytest.raises(ConfigError, match="cannot learn"):
        plan_tune(tmp_path / "t", _spec(), budget=lambda s: (1.25, 1.9, 1e-5, 1400, {}),
                  check=refuse)
    assert seen == [1.25]
    assert not (tmp_path / "t").exists()


def test_each_run_leaves_room_for_its_score_on_validation_people():
    """privacy.selection_noise: the run's calibration is noisier, so that validation people,
    the tune's score included, stay within the run's own target (ledger verify's check)."""
    from clients.protocol.schema import SILOS
    from server.config import PrivacyConfig
    from server.privacy import CALIBRATION_STEPS, PrivacyPlan

    cfg = PrivacyConfig(epsilon=1.5, accountant="rdp", selection_noise=5.0)
    # Full batches (q = 1): Opacus computes that RDP in closed form, the test stays fast.
    plan = PrivacyPlan(cfg, SILOS, 2000, 4096, 2, None)
    val = add_steps(add_steps(plan.statistics, plan.calibration_sigma, 1.0, CALIBRATION_STEPS),
                    5.0, 1.0, 1)
    assert 0.97 * 1.5 <= epsilon("rdp", val, plan.accountant_delta) <= 1.5


# ---- trees and scorecards ----------------------------------------------------------------------

# Full batches (gbdt.sample_rate 1): the subsampled RDP of the trees takes seconds to
# calibrate; the tune's arithmetic is the same at any sample rate.
TREES = (("gbdt.sample_rate", "1"), ("model.kind", "gbdt"))


def test_a_tune_plans_dp_tree_runs_on_their_own_budget():
    """The DP trees tune as the MLP does: each candidate's curve is the
    lines its run will write (server/gbdt_dp_run.py: statistics, the model's release, the
    calibration) plus the score on validation people; the per-run target keeps the tuned total
    within --epsilon, and each run's calibration leaves the score room, so its validation
    people stay within the run's own target."""
    from clients.protocol.schema import SILOS
    from server import gbdt_dp_run
    from server.privacy import CALIBRATION_STEPS

    spec = TuneSpec(grid={"gbdt.trees": ["100", "300"]},
                    epsilon=2.0, law=RunsLaw("logarithmic", 3), users=4000, assignments=TREES)
    run_eps, total, delta, n_train, curves = tune.plan_budget(spec)
    assert 0.5 < run_eps < total <= 2.0
    assert len(curves) == len(spec.points())
    cfg = spec.sweep(run_eps, delta).config(spec.cells([0])[0]).authority
    assert gbdt_dp_run.accounts_itself(cfg)
    assert cfg.privacy.selection_noise == spec.score_noise
    params = gbdt_dp_run.dp_params(cfg)
    budget = gbdt_dp_run.plan_budget(cfg, SILOS, n_train, params)
    assert budget.release.epsilon <= run_eps * (1 + 1e-6)
    val = add_steps(add_steps(gbdt_dp_run.statistics_history(budget.statistics),
                              budget.calibration_sigma, 1.0, CALIBRATION_STEPS),
                    spec.score_noise, 1.0, 1)
    assert 0.9 * run_eps <= epsilon("rdp", val, budget.deltas.accountant) <= run_eps * 1.0001
    # The planned curve is the run's own: its lines, read as the tune reads a ledger.
    lines = [*gbdt_dp_run.statistics_lines(budget), *gbdt_dp_run.release_lines(budget, True)]
    planned = tune.planned_budget(spec.sweep(run_eps, delta).config(spec.cells([0])[0]),
                                  n_train, spec.score_noise)
    read = tune.lines_budget(lines)
    np.testing.assert_allclose(planned.curve(), np.maximum(
        rdp_curve(read.train), rdp_curve(add_steps(read.val, spec.score_noise, 1.0, 1))))


def test_a_horizontal_tune_is_refused_with_its_reason():
    with pytest.raises(TuneError, match="labels stay with the regions"):
        _spec(assignments=(("topology", "horizontal"),))
    assert _spec(assignments=(("model.kind", "scorecard"),)).points()


# ---- real data ----------------------------------------------------------------------------------


def _real_data(tmp_path: Path) -> Path:
    """1,000 people at the authority, one silo holding 900 of them: 900 can be aligned."""
    import pandas as pd

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(5)
    ids = [f"K{i}" for i in range(1000)]
    pd.DataFrame({"id": ids, "y": rng.integers(0, 2, 1000)}).to_csv(data / "a.csv", index=False)
    pd.DataFrame({"id": ids, "x1": rng.normal(size=1000)}).to_csv(data / "s1.csv", index=False)
    pd.DataFrame({"id": ids[100:], "x2": rng.normal(size=900)}).to_csv(data / "s2.csv",
                                                                       index=False)
    (data / "mapping.json").write_text(json.dumps({
        "identifier": "id", "authority": {"file": "a.csv", "label": "y"},
        "silos": {s: {"file": f"{s}.csv", "columns": [c]}
                  for s, c in (("s1", "x1"), ("s2", "x2"))}}))
    return data


def test_a_tune_on_real_data_plans_on_the_people_every_party_holds(tmp_path: Path):
    data = str(_real_data(tmp_path))
    spec = _spec(users=None, assignments=(("data", data),))
    assert spec.real_data
    cells = spec.cells([0, 1])
    assert {c.population for c in cells} == {"seed=0"}  # one population, every run
    cfg = spec.sweep(1.0).config(cells[0])
    assert cfg.data == data
    assert not cfg.generated
    assert tune.planned_people(cfg) == 900
    assert tune.planned_train_people(cfg) == 630  # split.train 0.7 of them
    # The delta is planned on 4 standard deviations more: 630 + 4 sqrt(900 x 0.21) = 684.97.
    assert tune.most_train_people(cfg) == 685
    with pytest.raises(TuneError, match="--data-seed"):
        _spec(users=None, data_seed=1, assignments=(("data", data),))


def test_the_report_of_a_tune_shows_its_release_not_the_other_runs(tmp_path: Path):
    """`fedscore report TUNE_DIR`: the candidates with their draws, the released run and the
    accounted total; the authority's record of the other runs stays out."""
    import pandas as pd

    from simulations.report.render import build_report

    out = tmp_path / "t"
    out.mkdir()
    plan = tune.TunePlan(_spec(), 1.25, 1.97, 1e-5, 1400, runs=(0, 2, 2), nonce="n")
    (out / tune.TUNE_FILE).write_text(json.dumps(plan.to_json()))
    pd.DataFrame({"run": ["a"], "noisy_val_loss": [0.123456789]}).to_csv(out / tune.RUNS_FILE)
    (out / tune.SUMMARY_FILE).write_text(json.dumps({
        "chosen": {"run": "train.lr=0.1_data=0_seed=2", "candidate": {"train.lr": "0.1"},
                   "noisy_val_loss": 0.2468, "score_noise_std": 0.005, "test_auc": 0.7712,
                   "directory": str(out / "runs" / "gone")},
        "epsilon": {"total": 1.9876, "asked": 2.0, "theorem": "Papernot & Steinke, Theorem 2",
                    "label_against_silos": 6.0},
        "within_budget": True}))
    files = build_report(out, figure_formats=())
    assert files.kind == "tune"
    candidates = pd.read_csv(out / "report" / "tune_candidates.csv", dtype=str)
    assert candidates["train.lr"].tolist() == ["0.01", "0.03", "0.1"]
    assert candidates["runs drawn"].tolist() == ["1", "0", "2"]
    assert candidates["released"].tolist() == ["False", "False", "True"]
    page = files.html.read_text()
    assert "1.9876" in page
    assert "train.lr=0.1_data=0_seed=2" in page
    assert "0.1234" not in page  # tune_runs.csv is not a release
