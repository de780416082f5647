"""The `scorecard.*` keys (server/config_scorecard.py): checked at the edge, carried into
server/scorecard.py `ScorecardParams` and server/scorecard_dp.py `DpScorecardParams`, in a
run's key only where they change what it computes, searchable by `fedscore tune`."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.secret_random import SecretRandom
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat, to_flat
from server.config_scorecard import ScorecardConfig
from server.run_keys import derive_run_key
from server.scorecard import ScorecardParams
from server.scorecard_dp import DpScorecardParams
from server.scorecard_dp_run import dp_params
from server.scorecard_run import card_params
from server.tune_privacy import RunsLaw
from simulations.run import tune
from simulations.run.config import make_config, warn_unused
from simulations.run.tune_spec import TuneSpec

CARD = {"model.kind": "scorecard", "privacy.epsilon": "inf"}
DP_CARD = {"model.kind": "scorecard", "privacy.epsilon": "1"}
SECRET = SecretRandom(bytes(range(32)))
# The run keys of these configurations before the scorecard keys existed (main at 61a9d90,
# the secret above): a run that sets no scorecard key keeps its key, its draws and its resume.
PINNED = [({}, "3f50d2d813cd10e0"), (CARD, "188373e5c761ea48"),
          (DP_CARD, "81e9168e5e33bd87"), ({"model.kind": "gbdt"}, "3af926a92a4af228")]


def run_key(values: dict) -> str:
    return derive_run_key(SECRET, to_flat(make_config(values).authority))


# ---- the defaults are the params' own --------------------------------------------------------


def test_the_defaults_are_the_scorecards_own() -> None:
    assert card_params(parse_flat(AuthorityConfig, CARD)) == ScorecardParams()
    for accountant in ("prv", "rdp"):
        cfg = parse_flat(AuthorityConfig, {**DP_CARD, "privacy.accountant": accountant})
        assert dp_params(cfg) == DpScorecardParams(accountant=accountant)


def test_the_values_reach_the_scorecards_params() -> None:
    cfg = parse_flat(AuthorityConfig, {**CARD, "scorecard.bins": "16",
                                       "scorecard.min_bin_share": "0.1",
                                       "scorecard.smoothing": "2", "scorecard.iterations": "7"})
    assert card_params(cfg) == ScorecardParams(bins=16, min_bin_share=0.1, smoothing=2.0,
                                               iterations=7)
    dp = parse_flat(AuthorityConfig, {**DP_CARD, "scorecard.bins": "8", "scorecard.steps": "3",
                                      "scorecard.count_share": "0.25",
                                      "scorecard.hessian_noise": "4", "scorecard.clip": "1.5"})
    assert dp_params(dp) == DpScorecardParams(
        card=ScorecardParams(bins=8), steps=3, count_share=0.25, hessian_noise=4.0, clip=1.5)


# ---- checked at the edge ---------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "words"), [
    ("scorecard.bins", "1", "scorecard.bins=1: use 2 to 256 pre-bins, e.g. 32"),
    ("scorecard.bins", "257", "use 2 to 256"),
    ("scorecard.bins", "8.5", "expected a whole number"),
    ("scorecard.min_bin_share", "0.5", r"use a share in \[0, 0.5\)"),
    ("scorecard.min_bin_share", "-0.1", "e.g. 0.05"),
    ("scorecard.smoothing", "0", "scorecard.smoothing=0.0: must be > 0, e.g. 0.5"),
    ("scorecard.iterations", "-1", "use 0 to 1000 regression steps"),
    ("scorecard.steps", "0", "use 1 to 100 noisy Newton steps, e.g. 6"),
    ("scorecard.count_share", "1", r"use a share in \(0, 1\) of the budget"),
    ("scorecard.hessian_noise", "-2", "must be > 0, e.g. 2"),
    ("scorecard.clip", "inf", "must be a finite number"),
    ("scorecard.clip", "nan", "expected a number"),
])
def test_a_bad_scorecard_value_is_refused_naming_the_key_and_a_fix(key: str, value: str,
                                                                   words: str) -> None:
    for base in (CARD, DP_CARD, {}):  # refused in any run: a typo is a typo
        with pytest.raises(ConfigError, match=words):
            make_config({**base, key: value})


def test_an_unknown_scorecard_key_is_refused_with_the_close_ones() -> None:
    with pytest.raises(ConfigError, match=r"did you mean scorecard\.bins"):
        make_config({**CARD, "scorecard.bin": "16"})


def parsed(values: dict) -> tuple[AuthorityConfig | None, str]:
    """The configuration, or the error's words."""
    try:
        return make_config(values).authority, ""
    except ConfigError as exc:
        return None, str(exc)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.integers(-1000, 1000).map(str), st.floats(allow_nan=True).map(str),
                 st.text(max_size=6)))
def test_the_bins_key_is_kept_exactly_or_refused_by_name(text: str) -> None:
    """Whatever is typed after scorecard.bins=: a whole number in [2, 256] reaches the
    scorecard as that number; anything else is a ConfigError naming the key."""
    cfg, error = parsed({**CARD, "scorecard.bins": text})
    if cfg is None:
        assert error.startswith("scorecard.bins=")
        return
    assert 2 <= cfg.scorecard.bins <= 256
    assert cfg.scorecard.bins == int(text.strip().replace("_", ""))
    assert card_params(cfg).bins == cfg.scorecard.bins


@settings(max_examples=30, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_the_count_share_is_kept_exactly_or_refused_by_name(share: float) -> None:
    cfg, error = parsed({**DP_CARD, "scorecard.count_share": repr(share)})
    assert (cfg is not None) == (0 < share < 1)
    if cfg is None:
        assert error.startswith("scorecard.count_share=")
    else:
        assert dp_params(cfg).count_share == share


# ---- the run key -----------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "key"), PINNED)
def test_a_run_without_scorecard_keys_keeps_its_key(values: dict, key: str) -> None:
    assert run_key(values) == key
    # Every key given at its default is the same run.
    defaults = {f"scorecard.{k}": str(v) for k, v in vars(ScorecardConfig()).items()}
    assert run_key({**values, **defaults}) == key


def test_a_scorecard_key_changes_the_key_only_where_it_changes_the_run() -> None:
    plain, dp = run_key(CARD), run_key(DP_CARD)
    assert run_key({**CARD, "scorecard.bins": "16"}) != plain
    assert run_key({**CARD, "scorecard.iterations": "20"}) != plain
    assert run_key({**DP_CARD, "scorecard.bins": "16"}) != dp
    assert run_key({**DP_CARD, "scorecard.steps": "4"}) != dp
    assert run_key({**CARD, "scorecard.bins": "16"}) != run_key({**CARD, "scorecard.bins": "8"})
    # The other mode's keys, and any scorecard key in another model's run, change nothing.
    assert run_key({**CARD, "scorecard.steps": "4", "scorecard.clip": "2"}) == plain
    assert run_key({**DP_CARD, "scorecard.iterations": "20"}) == dp
    for values, key in PINNED:
        if values.get("model.kind") != "scorecard":
            assert run_key({**values, "scorecard.bins": "16"}) == key


def test_a_key_that_changes_nothing_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    def unused(*values: dict) -> list[str]:
        return warn_unused([make_config(v) for v in values], "--set")

    with caplog.at_level(logging.WARNING):
        assert unused({**CARD, "scorecard.steps": "4", "scorecard.bins": "16"}) == [
            "scorecard.steps"]
    assert "--set scorecard.steps: changes nothing in this run" in caplog.text
    assert unused({"scorecard.bins": "16"}) == ["scorecard.bins"]  # an MLP run
    assert unused({**DP_CARD, "scorecard.iterations": "9"}) == ["scorecard.iterations"]
    assert unused({**CARD, "scorecard.bins": "16", "scorecard.iterations": "9"}) == []
    # A grid over both modes: a key used by one of its cells is no mistake.
    assert unused({**CARD, "scorecard.steps": "4"}, {**DP_CARD, "scorecard.steps": "4"}) == []


# ---- fedscore tune ---------------------------------------------------------------------------


def test_a_tune_searches_a_dp_scorecard_key_on_each_candidates_own_plan() -> None:
    """`--set model.kind=scorecard --grid scorecard.steps=4,10`: each candidate's run (at the
    tune's per-run epsilon, RDP) trains the DP scorecard with its own steps, and the plan is
    each candidate's own release (no sharing of a cached curve across scorecard settings)."""
    from clients.protocol.schema import SILOS
    from server import gbdt_dp_run

    spec = TuneSpec(grid={"scorecard.steps": ["4", "10"]}, epsilon=2.0,
                    law=RunsLaw("logarithmic", 3), users=4000,
                    assignments=(("model.kind", "scorecard"),))
    run_eps, total, delta, n_train, curves = tune.plan_budget(spec)
    assert 0 < run_eps < total <= 2.0
    assert set(curves) == {"scorecard.steps=4", "scorecard.steps=10"}
    for point in spec.points():
        steps = int(dict(point)["scorecard.steps"])
        cfg = spec.sweep(run_eps, delta).config(tune.Cell(point, 0, 0)).authority
        assert cfg.privacy.accountant == "rdp"
        assert cfg.scorecard.steps == steps
        budget = gbdt_dp_run.plan_budget(cfg, SILOS, n_train, dp_params(cfg))
        assert budget.release.steps == steps
        assert budget.release.epsilon <= run_eps * (1 + 1e-6)
