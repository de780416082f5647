"""The horizontal topology: regions, the fixed input map, local DP training with FedProx, the
user-level accountant, and small runs on Flower's simulation engine."""

from __future__ import annotations

import itertools
import json
import math
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.protocol.accounting import epsilon
from clients.protocol.region import LocalSpec, feature_columns, global_model, input_columns
from clients.region.app import make_region_app
from clients.region.data import LOG_SCALE, RegionDataError, load_region, region_inputs, region_split
from clients.region.trainer import Plan, round_stream, train_round
from crypto.secret_random import SecretRandom
from server import ledger
from server.config import ConfigError
from simulations.analysis.ledger_verify import verify
from simulations.data.population import PopulationConfig, generate
from simulations.data.regions import assign_regions, customers, write_regions
from simulations.run.config import make_config
from tests import background
from tests.conftest import (
    HORIZONTAL_SECRET_PARTIES,
    assert_no_identifiers,
    fix_secrets,
    run_cli,
)

SECRET = SecretRandom(bytes(range(32)))


@pytest.fixture(scope="module")
def people() -> pd.DataFrame:
    return customers(generate(PopulationConfig(users=6000, seed=3)))


def _table(n: int = 40, **overrides) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({c: rng.random(n) for c, _ in feature_columns()})
    frame["phone"] = [f"+86138{i:08d}" for i in range(n)]
    frame["default"] = (rng.random(n) < 0.2).astype(int)
    for k, v in overrides.items():
        frame[k] = v
    return frame


# ---- regions and their data ---------------------------------------------------------------------


def test_skew_spreads_default_rates_and_keeps_sizes(people: pd.DataFrame):
    y = people["default"].to_numpy()
    spread = {}
    for skew in (0.0, 1.0):
        where = assign_regions(people, 5, skew, seed=3)
        sizes = np.bincount(where, minlength=5)
        assert sizes.min() > 0.8 * len(y) / 5
        rates = [y[where == k].mean() for k in range(5)]
        spread[skew] = max(rates) - min(rates)
    assert spread[1.0] > 2 * spread[0.0]
    assert spread[1.0] > 0.04


def test_every_person_is_in_exactly_one_region(tmp_path: Path):
    pop = generate(PopulationConfig(users=2000, seed=1))
    sizes = write_regions(pop, 3, tmp_path)
    assert sum(sizes.values()) == len(pop.authority)
    phones = pd.concat([load_region(tmp_path / r, r).ids for r in sizes])
    assert phones.is_unique
    assert len(phones) == len(pop.authority)
    assert all(p.startswith("+") for p in phones)  # E.164, joined across the silos' formats


def test_fixed_input_map_known_values():
    frame = _table(3)
    frame["overdue_count"] = [0.0, 100.0, np.nan]
    frame["contacts_avg_standing"] = [575.0, 850.0, 300.0]
    frame["on_time_repayment_rate"] = [0.25, 0.5, 1.0]
    x = region_inputs(frame)
    cols = input_columns()
    assert x.shape == (3, 2 * len(feature_columns()))
    j = cols.index("overdue_count")
    assert x[:, j].tolist() == pytest.approx([0.0, np.log1p(100) / LOG_SCALE["count"], 0.0])
    assert x[:, cols.index("overdue_count__missing")].tolist() == [0.0, 0.0, 1.0]
    assert x[:, cols.index("contacts_avg_standing")].tolist() == pytest.approx([0, 1, -1])
    assert x[:, cols.index("on_time_repayment_rate")].tolist() == pytest.approx([.25, .5, 1])


def test_input_map_does_not_depend_on_other_rows():
    frame = _table(50)
    assert np.array_equal(region_inputs(frame)[:10], region_inputs(frame.iloc[:10]))


def test_bad_region_tables_are_named(tmp_path: Path):
    d = tmp_path / "region_1"
    d.mkdir()
    _table(40).drop(columns=["balance"]).to_parquet(d / "customers.parquet")
    with pytest.raises(RegionDataError, match=r"missing column.*balance"):
        load_region(d, "region_1")
    _table(40, default=[2] + [0] * 39).to_parquet(d / "customers.parquet")
    with pytest.raises(RegionDataError, match=r"1 label.*not 0 or 1"):
        load_region(d, "region_1")
    bad = _table(40)
    bad.loc[0, "balance"] = np.inf
    bad.to_parquet(d / "customers.parquet")
    with pytest.raises(RegionDataError, match="infinite"):
        load_region(d, "region_1")


def test_split_is_reproducible_and_has_the_asked_shares():
    """A region's split comes from its secret: the same secret and seed give the same split,
    the public seed alone (another secret) does not."""
    mine, other = SecretRandom(b"\x01" * 32), SecretRandom(b"\x02" * 32)
    a = region_split(1000, mine, 4, 0.7, 0.15)
    assert np.array_equal(a, region_split(1000, SecretRandom(b"\x01" * 32), 4, 0.7, 0.15))
    guessed = region_split(1000, other, 4, 0.7, 0.15)
    assert not np.array_equal(a, guessed)
    # Knowing the seed, someone without the secret guesses training membership at chance.
    assert abs(((a == 0) == (guessed == 0)).mean() - (0.7 ** 2 + 0.3 ** 2)) < 0.05
    assert np.bincount(a).tolist() == [700, 150, 150]


# ---- local training ------------------------------------------------------------------------------


def _local(spec: LocalSpec, mu: float) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 48)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.float32)
    spec = replace(spec, proximal_mu=mu)
    model = global_model(48, spec)
    start = [p.detach().clone() for p in model.parameters()]
    train_round(model, x, y, spec, Plan.make(len(y), spec), [], SECRET, ("r", 1))
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in
                     zip(model.parameters(), start, strict=True)))


@pytest.mark.slow
@pytest.mark.parametrize("eps", [math.inf, 2.0])
def test_fedprox_term_keeps_the_local_model_near_the_global_one(eps: float):
    spec = LocalSpec(lr=0.03, batch_size=64, local_epochs=2, rounds=2, epsilon=eps)
    assert _local(spec, 10.0) < 0.5 * _local(spec, 0.0)


def test_plan_calibrates_to_the_target_over_the_whole_run():
    spec = LocalSpec(batch_size=100, local_epochs=1, rounds=5, epsilon=1.0)
    plan = Plan.make(2000, spec)
    total = plan.steps_per_round * spec.rounds
    assert plan.steps_per_round == 20
    assert plan.delta == 1 / 20_000  # 1/(10 N)
    spent = epsilon("prv", [(plan.noise_multiplier, plan.sample_rate, total)], plan.delta)
    assert 0.97 < spent <= 1.0


def test_the_cap_stops_local_training_and_the_history_covers_every_step():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 48)).astype(np.float32)
    y = (rng.random(500) < 0.3).astype(np.float32)
    spec = LocalSpec(batch_size=50, local_epochs=1, rounds=2, epsilon=1.0, cap=0.5,
                     accountant="rdp")
    plan = Plan.make(500, spec)
    history: list = []
    for round_ in (1, 2):
        out = train_round(global_model(48, spec), x, y, spec, plan, history, SECRET,
                          ("r", round_))
        history = out.history
    assert out.stopped
    assert epsilon("rdp", history, plan.delta) <= 0.5
    assert sum(h[2] for h in history) < 2 * plan.steps_per_round


def _trained(spec: LocalSpec, random: SecretRandom, stream: tuple) -> list[torch.Tensor]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 48)).astype(np.float32)
    y = (x[:, 0] > 0.3).astype(np.float32)
    model = global_model(48, spec)
    train_round(model, x, y, spec, Plan.make(len(y), spec), [], random, stream)
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("eps", [math.inf, 2.0])
def test_local_samples_and_noise_come_from_the_regions_secret(eps: float):
    """The run seed chooses the start only: the Poisson samples and the DP-SGD noise follow
    the region's secret and the round's stream, so the same secret replays the round exactly
    and another secret (or another round) draws others."""
    spec = LocalSpec(lr=0.03, batch_size=50, local_epochs=1, rounds=2, epsilon=eps, seed=4,
                     accountant="rdp")
    first = _trained(spec, SECRET, ("r", 1))
    assert _same(first, _trained(spec, SECRET, ("r", 1)))
    assert not _same(first, _trained(spec, SecretRandom(bytes(32)), ("r", 1)))
    assert not _same(first, _trained(spec, SECRET, ("r", 2)))


def test_a_rounds_stream_is_bound_to_plan_model_and_data():
    model = global_model(48, LocalSpec())
    x = np.zeros((5, 48), np.float32)
    y = np.zeros(5, np.float32)
    base = round_stream({"seed": 1, "server-round": 1}, model, x, y)
    assert base == round_stream({"server-round": 1, "seed": 1}, model, x, y)
    assert base != round_stream({"seed": 1, "server-round": 2}, model, x, y)
    assert base != round_stream({"seed": 1, "server-round": 1}, model, x, y + 1)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1
    assert base != round_stream({"seed": 1, "server-round": 1}, model, x, y)


def test_user_level_noise_comes_from_the_servers_secret():
    """Flower's wrapper draws from numpy's global generator; ours from the server's secret,
    bound to the round and the aggregate, with Flower's std sigma * C / R."""
    from flwr.app import Array

    from server.horizontal_strategy import SecretClientSideClipping, build_strategy

    cfg = make_config({"topology": "horizontal", "regions": 4, "horizontal.dp": "user",
                       "horizontal.clipping": "client",
                       "horizontal.update_clip": 0.5}).authority
    aggregate = ArrayRecord({"w": Array(np.zeros((200, 100), np.float32))})

    def noise(random: SecretRandom, round_: int = 1) -> np.ndarray:
        strategy = build_strategy(cfg, 3.0, random, ("run",))
        assert isinstance(strategy, SecretClientSideClipping)
        strategy._round = round_
        return strategy._add_noise_to_aggregated_arrays(aggregate)["w"].numpy()

    first = noise(SECRET)
    assert np.array_equal(first, noise(SECRET))
    np.random.seed(0)  # the global generator plays no part
    assert np.array_equal(first, noise(SECRET))
    assert not np.array_equal(first, noise(SecretRandom(bytes(32))))
    assert not np.array_equal(first, noise(SECRET, round_=2))
    assert first.std() == pytest.approx(3.0 * 0.5 / 4, rel=0.02)
    with pytest.raises(ValueError, match="secret"):
        build_strategy(cfg, 3.0)


# ---- what a region sends ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def region_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("regions")
    write_regions(generate(PopulationConfig(users=2000, seed=1)), 2, root)
    return root


_ids = itertools.count(1)


def _ask(app, context: Context, kind: str, spec: LocalSpec, model: bool = True,
         **config) -> Message:
    content = RecordDict({"config": ConfigRecord({**spec.to_config(), "split.train": 0.7,
                                                  "split.val": 0.15, **config})})
    if model:
        content["arrays"] = ArrayRecord(global_model(len(input_columns()), spec).state_dict())
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    msg = Message(content, dst_node_id=1, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{next(_ids):064x}"
    return app(msg, context)


def _region_context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={})


def test_under_user_level_dp_a_region_sends_its_model_and_nothing_else(region_root: Path):
    """No loss, AUC, size, step count, plan or history: each would be an exact release about
    the whole region outside the user-level guarantee. The handlers themselves refuse."""
    app = make_region_app(region_root, None, plaintext=True)
    context = _region_context()
    spec = LocalSpec(batch_size=128, rounds=2, user_level=True)
    reply = _ask(app, context, "train", spec, **{"server-round": 1})
    assert not reply.has_error(), reply.error
    assert set(reply.content) == {"arrays", "metrics"}
    assert dict(reply.content["metrics"]) == {"weight": 1.0}
    refused = _ask(app, context, "evaluate", spec)
    assert refused.has_error()
    assert "no validation metrics" in refused.error.reason
    privacy = _ask(app, context, "query.privacy", spec, model=False)
    assert dict(privacy.content["config"]) == {"region": "region_1"}
    predict = _ask(app, context, "query.predict", spec, run_key="abc123")
    assert dict(predict.content["config"]) == {"region": "region_1"}
    # The region's secret is in its own folder when it has no keystore, readable by it only.
    secret = region_root / "region_1" / "randomness-region_1.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_under_sample_level_dp_a_region_sends_no_loss(region_root: Path):
    app = make_region_app(region_root, None, plaintext=True)
    spec = LocalSpec(batch_size=128, rounds=2, epsilon=2.0, accountant="rdp")
    reply = _ask(app, _region_context(), "train", spec, **{"server-round": 1})
    assert not reply.has_error(), reply.error
    assert set(dict(reply.content["metrics"])) == {"weight", "num-examples", "steps", "stopped"}


def test_user_level_epsilon_matches_flowers_own_accountant():
    """Our Opacus RDP over R full-participation rounds against Flower 1.42's RdpAccountant
    (which wraps Google's dp-accounting) for the same Gaussian releases."""
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    for sigma, rounds in ((10.5, 10), (3.0, 4), (1.2, 20)):
        flower = RdpAccountant(PrivacyConfig(
            target_delta=1e-5, population_size=5,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        flower.compose(GaussianPrivacyEvent(sigma, 5, 5), count=rounds)
        ours = epsilon("rdp", [(sigma, 1.0, rounds)], 1e-5)
        assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=0.02)


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"topology=.diagonal.*vertical, horizontal"):
        make_config({"topology": "diagonal"})
    with pytest.raises(ConfigError, match="regions=1"):
        make_config({"regions": 1})
    with pytest.raises(ConfigError, match=r"horizontal\.strategy=.fedsgd."):
        make_config({"horizontal.strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="region_skew"):
        make_config({"population.region_skew": 1.5})


# ---- on the simulation engine ------------------------------------------------------------------


def _horizontal_commands(work: Path) -> list[tuple[str, ...] | background.Command]:
    """Small runs on one population of 3 regions: sample-level DP (FedProx) and user-level DP
    with client-side clipping (Flower's fixedclipping_mod); then the user-level run again,
    once with the same keystores (it must come out identical) and once with fresh ones (the
    same seed and data, other noise: another model). The repeats are user-level runs, a
    third of a sample-level run's time: the regions' own Poisson samples come from their
    secrets in both, the server's noise only here; the DP-SGD noise of sample-level rounds is
    checked without the engine (test_local_samples_and_noise_come_from_the_regions_secret)."""
    common = ("--users", "3000", "--seed", "2", "--set", "topology=horizontal",
              "--set", "regions=3", "--set", "horizontal.rounds=3",
              "--set", "train.batch_size=256")
    parties = ("--parties", str(work / "parties"))
    sample = ("--set", "horizontal.strategy=fedprox", "--set", "privacy.epsilon=2")
    user = ("--set", "horizontal.dp=user", "--set", "horizontal.clipping=client",
            "--set", "privacy.accountant=rdp")
    # The parties' randomness secrets fixed (tests/conftest.py `fix_secrets`): the same runs
    # on every machine, so the AUCs asserted below cannot fail by the luck of a fresh draw (at
    # 3,000 people, 3 rounds and eps 2, one fresh draw in CI gave the sample run 0.478).
    fixed = background.Command(("run", "--out", str(work / "sample"), *parties, *common,
                                *sample),
                               before=lambda work: fix_secrets(
                                   work / "parties.keys", "horizontal",
                                   HORIZONTAL_SECRET_PARTIES))
    return [fixed,
            ("run", "--out", str(work / "user"), *parties, *common, *user),
            ("run", "--out", str(work / "user_again"), *parties, *common, *user),
            ("run", "--out", str(work / "user_fresh"), "--parties", str(work / "fresh"),
             *common, *user)]


background.register("horizontal_runs", _horizontal_commands)


@pytest.fixture(scope="module")
def horizontal_runs(background_runs) -> dict[str, Path]:
    procs, work = background_runs("horizontal_runs")
    for proc in procs:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(procs) == 4
    return {"sample": work / "sample", "user": work / "user"}


@pytest.fixture(scope="module")
def repeated_runs(horizontal_runs: dict[str, Path]) -> dict[str, Path]:
    work = horizontal_runs["sample"].parent
    return {"again": work / "user_again", "fresh": work / "user_fresh",
            "fresh_parties": work / "fresh", "parties": work / "parties"}


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "global_model.pt", weights_only=True)


@pytest.mark.slow
def test_the_same_keystores_reproduce_a_run_and_fresh_ones_do_not(horizontal_runs,
                                                                   repeated_runs):
    """The run seed chooses data and initialisation only: with the same keystores the regions
    draw the same samples and the server the same noise, and the run comes out bit for bit the
    same; with fresh keystores (same seed, same data) the draws are others and so is the
    model."""
    first, again = _model(horizontal_runs["user"]), _model(repeated_runs["again"])
    assert all(torch.equal(first[k], again[k]) for k in first)
    m1, m2 = (json.loads((r / "metrics.json").read_text())
              for r in (horizontal_runs["user"], repeated_runs["again"]))
    for key in ("auc", "baseline_central_auc", "baseline_central_dp_auc",
                "baseline_central_gbdt_auc", "baseline_central_scorecard_auc", "epsilon"):
        assert m1[key] == m2[key], key
    fresh = _model(repeated_runs["fresh"])
    assert not any(torch.equal(first[k], fresh[k]) for k in first if first[k].numel() > 1)
    m3 = json.loads((repeated_runs["fresh"] / "metrics.json").read_text())
    assert [r["customers"] for r in m3["regions"]] == [r["customers"] for r in m1["regions"]]
    assert m3["epsilon"] == m1["epsilon"]  # the same plan: the same budgets
    # Each party's secret is in the keystore, one file per party, readable by its owner only.
    keys = Path(str(repeated_runs["parties"]) + ".keys")
    secrets_ = sorted(p.name for p in keys.glob("randomness-*.key"))
    assert secrets_ == ["randomness-region_1.key", "randomness-region_2.key",
                        "randomness-region_3.key", "randomness-server.key",
                        "randomness-simulation.key"]
    assert all(stat.S_IMODE((keys / n).stat().st_mode) == 0o600 for n in secrets_)


@pytest.mark.slow
def test_user_level_run_reports_no_region_metric_and_evaluates_centrally(horizontal_runs):
    run = horizontal_runs["user"]
    authority = json.loads((run / "authority.json").read_text())
    assert set(authority["n_train"].values()) == {None}
    assert set(authority["training_steps"].values()) == {None}
    m = json.loads((run / "metrics.json").read_text())
    assert m["history_evaluated_by"] == "experiment"
    rows = m["history"]["federated"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:  # only what the experiment measured on the released global models
        assert set(row) == {"round", "epoch", "val_loss", "val_auc"}
    assert "region" in m["epsilon_scope"]["user"]
    assert m["epsilon_scope"]["model"] is None
    assert m["adjacency"].startswith("add/remove")
    (line,) = ledger.read(run)
    assert line["adjacency"] == "add/remove"
    assert line["sensitivity"] == 1.0


@pytest.mark.slow
def test_sample_level_run_reports_one_budget_per_region(horizontal_runs: dict[str, Path]):
    m = json.loads((horizontal_runs["sample"] / "metrics.json").read_text())
    assert m["topology"] == "horizontal"
    assert m["aggregation_mode"] == "fedprox"
    assert set(m["epsilon"]["model"]) == {"region_1", "region_2", "region_3"}
    assert all(0.5 < e <= 2.0 for e in m["epsilon"]["model"].values())
    assert m["epsilon"]["user"] is None
    assert m["epsilon_scope"]["model"].startswith("per region")
    assert m["history_evaluated_by"] == "regions"
    assert all("train_loss" not in r for r in m["history"]["federated"])
    assert 0.55 < m["auc"] <= 1
    assert 0.55 < m["oracle_auc"] <= 1
    assert len(m["history"]["federated"]) == 3
    assert [r["region"] for r in m["regions"]] == ["region_1", "region_2", "region_3"]
    assert sum(r["customers"] for r in m["regions"]) == m["people"]["aligned"]
    assert sum(m["tiers"].values()) == m["people"]["aligned"]
    # The released model is on disk and scores like the regions' predictions.
    state = torch.load(horizontal_runs["sample"] / "global_model.pt", weights_only=True)
    assert state["net.0.weight"].shape[1] == len(input_columns())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sample", "user"])
def test_ledger_of_a_horizontal_run_verifies_independently(horizontal_runs, name: str):
    checks = verify(horizontal_runs[name])
    expected = 3 if name == "sample" else 1
    assert len(checks) == expected
    assert all(c.ok for c in checks), [(c.party, c.reported, c.independent) for c in checks]
    m = json.loads((horizontal_runs[name] / "metrics.json").read_text())
    for entry in ledger.read(horizontal_runs[name]):
        key = entry["party"]
        reported = m["epsilon"]["user"] if key == "regions" else m["epsilon"]["model"][key]
        assert entry["epsilon"] == pytest.approx(reported)


@pytest.mark.slow
def test_user_level_run_spends_one_budget_for_all_regions(horizontal_runs):
    m = json.loads((horizontal_runs["user"] / "metrics.json").read_text())
    assert m["dp_level"] == "user"
    assert all(v is None for v in m["epsilon"]["model"].values())
    assert 0.9 < m["epsilon"]["user"] <= 1.0
    (line,) = ledger.read(horizontal_runs["user"])
    assert line["budget"] == "user"
    assert line["sample_rate"] == 1.0
    assert line["steps"] == 3


@pytest.mark.slow
def test_horizontal_run_leaks_no_identifier(horizontal_runs):
    for run in horizontal_runs.values():
        assert_no_identifiers(run)


@pytest.mark.slow
def test_horizontal_refuses_real_data_and_the_deployment_engine(tmp_path: Path):
    proc = run_cli("run", "--out", str(tmp_path / "r"), "--data", "uci", "--set",
                   "topology=horizontal", cwd=tmp_path, engine=False)
    assert proc.returncode != 0
    assert "needs a generated population" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_report_shows_the_regions_and_compare_puts_topologies_side_by_side(
        horizontal_runs, private_run: Path, tmp_path: Path, background_runs):
    from simulations.report.compare import build_comparison
    from simulations.report.render import build_report

    files = build_report(horizontal_runs["sample"])
    page = files.html.read_text()
    assert "Regions (horizontal topology)" in page
    regions = pd.read_csv(files.html.parent / "report" / "regions.csv")
    assert set(regions["region"]) == {"region_1", "region_2", "region_3"}
    assert regions["median_spend_level"].is_monotonic_increasing
    _assert_no_vertical_leftovers(files.html.parent, page, horizontal_runs["sample"])
    # The run's closing line lists what it wrote: no scores file in a horizontal run.
    procs, _ = background_runs("horizontal_runs")
    closing = [line for p in procs for line in p.stdout.splitlines() if "results:" in line]
    assert len(closing) == len(procs)
    assert not any("scores.parquet" in line for line in closing)

    out = build_comparison([private_run, *horizontal_runs.values()], tmp_path / "cmp",
                           figure_formats=())
    rows = pd.read_csv(out.html.parent / "report" / "compared_runs.csv")
    assert set(rows["topology"]) == {"vertical", "horizontal"}
    assert set(rows["dp_level"]) == {"sample", "user"}
    # Three configurations, three series, each at its own budgets, oracle and delta.
    by_eps = pd.read_csv(out.html.parent / "report" / "topologies_auc.csv")
    assert set(by_eps["series"]) == {"vertical, sample-level DP", "horizontal, sample-level DP",
                                     "horizontal, user-level DP"}
    by_eps = by_eps.set_index(["series", "epsilon"])
    assert 0.5 < by_eps.loc[("horizontal, sample-level DP", 2.0), "all_test_auc_mean"] <= 1
    # The shared private vertical run has its own target (combined eps 8, tests/conftest.py).
    target = json.loads((private_run / "config.json").read_text())["privacy.epsilon"]
    assert 0.5 < by_eps.loc[("vertical, sample-level DP", float(target)),
                            "all_test_auc_mean"] <= 1
    series = pd.read_csv(out.html.parent / "report" / "compared_series.csv").set_index("series")
    for run, label in ((private_run, "vertical, sample-level DP"),
                       (horizontal_runs["user"], "horizontal, user-level DP")):
        m = json.loads((run / "metrics.json").read_text())
        assert series.loc[label, "oracle_auc"] == pytest.approx(m["oracle_auc"])
        assert series.loc[label, "delta"] == pytest.approx(m["delta"])
    assert "Topologies at equal ε" in out.html.read_text()


def _assert_no_vertical_leftovers(report_dir: Path, page: str, run: Path) -> None:
    """A horizontal run's report: no opening conditions, silo points or reason codes, one row
    per region instead of a JSON object, and its history on rounds."""
    for leftover in ("got no score", "opening conditions", "Per-silo contributions",
                     "Reason codes", "combined model", "{&quot;", '{"'):
        assert leftover not in page, leftover
    csvs = report_dir / "report"
    params = pd.read_csv(csvs / "privacy_parameters.csv")
    assert not params["value"].astype(str).str.contains("{", regex=False).any()
    assert "noise_multiplier (region_1)" in set(params["parameter"])
    learning = pd.read_csv(csvs / "learning_curves.csv")
    assert "round" in learning.columns
    assert "epoch" not in learning.columns
    m = json.loads((run / "metrics.json").read_text())
    assert learning["round"].tolist() == [h["round"] for h in m["history"]["federated"]]
    # Every customer is scored: both populations are one.
    assert m["auc"] == m["all_test_auc"]
    assert m["people"]["test_scored"] == m["people"]["test"]
