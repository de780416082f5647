"""The typed ledger lines: their JSON form, their parsing and their dp-accounting events."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld
from hypothesis import given
from hypothesis import strategies as st

from clients.protocol.accounting import epsilon
from server.config import PrivacyConfig
from server.ledger import Ledger, LedgerError
from server.ledger_lines import (
    KINDS,
    Block,
    GaussianRelease,
    JointRound,
    LabelRelease,
    LedgerLine,
    Refusal,
    RegionLine,
    TranscriptLine,
    UserLevelLine,
    budget_event,
    read,
)
from server.privacy import PrivacyPlan
from simulations.analysis.ledger_verify import independent_epsilon, pure_epsilon

DELTA = 1e-5

# JSON holds finite numbers only (the ledger dumps with allow_nan=False).
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive = st.floats(min_value=1e-3, max_value=1e3)
rates = st.floats(min_value=1e-4, max_value=1.0)
counts = st.integers(min_value=0, max_value=10**6)
names = st.text(max_size=12)
histories = st.lists(st.tuples(positive, rates, counts), max_size=4).map(tuple)
common = {"steps": counts, "round": counts, "epsilon": numbers, "delta": numbers,
          "accountant": names}

LINES = {
    GaussianRelease: st.builds(GaussianRelease, party=names, budget=names, population=names,
                               purpose=names, noise_multiplier=positive, sample_rate=rates,
                               extra_delta=st.none() | numbers, **common),
    JointRound: st.builds(
        JointRound, party=names, budget=names, population=names,
        blocks=st.lists(st.builds(Block, party=names, noise_multiplier=positive,
                                  clip=positive), min_size=1, max_size=4).map(tuple),
        noise_multiplier=positive, sample_rate=rates, **common),
    LabelRelease: st.builds(LabelRelease, party=names, budget=names, epsilon_rr=positive,
                            **common),
    TranscriptLine: st.builds(TranscriptLine, party=names, budget=names, history=histories,
                              clip=positive,
                              **{**common, "epsilon": st.none() | numbers}),
    Refusal: st.builds(Refusal, party=names, budget=names, cap=numbers,
                       population=st.none() | names,
                       **{**common, "epsilon": st.none() | numbers}),
    RegionLine: st.builds(RegionLine, party=names, budget=names, population=names,
                          noise_multiplier=positive, sample_rate=rates, adjacency=names,
                          scope=names, history=histories, **common),
    UserLevelLine: st.builds(UserLevelLine, party=names, budget=names,
                             noise_multiplier=positive, sample_rate=rates, adjacency=names,
                             sensitivity=positive, scope=names, history=histories, **common),
}


def test_every_kind_has_a_strategy():
    assert set(LINES) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_a_line_survives_json(kind):
    @given(LINES[kind])
    def round_trip(line: LedgerLine):
        text = json.dumps({"seq": 7, **line.to_json()}, allow_nan=False)
        again = LedgerLine.from_json(json.loads(text))
        assert again == line
        assert type(again) is kind
        # The same object, keys in the same order: a re-written ledger is byte-identical.
        assert json.dumps(again.to_json()) == json.dumps(line.to_json())

    round_trip()


def _joint(round_: int = 1, steps: int = 300, sigma: float = 2.0) -> JointRound:
    return JointRound(blocks=tuple(Block(party=p, noise_multiplier=sigma, clip=5.0)
                                   for p in ("payments", "social", "device", "authority")),
                      noise_multiplier=sigma / 2, sample_rate=0.01, steps=steps, round=round_,
                      epsilon=1.0, delta=DELTA, accountant="rdp")


def test_the_json_is_what_the_writers_wrote():
    """Key order and values of today's lines (tests/test_privacy_run.py reproduces whole
    ledgers byte for byte; this pins the two kinds with nested values)."""
    assert list(_joint().to_json()) == [
        "party", "budget", "population", "mechanism", "blocks", "noise_multiplier",
        "sample_rate", "steps", "round", "epsilon", "delta", "accountant"]
    assert _joint().to_json()["blocks"][0] == {"party": "payments", "noise_multiplier": 2.0,
                                                "clip": 5.0}
    transcript = Refusal(budget="transcript", steps=2, round=3, delta=DELTA, accountant="prv",
                         epsilon=None, cap=2.0)
    assert list(transcript.to_json().items()) == [
        ("party", "*"), ("budget", "transcript"), ("mechanism", "refusal"),
        ("event", "refused"), ("steps", 2), ("round", 3), ("delta", DELTA),
        ("accountant", "prv"), ("epsilon", None), ("cap", 2.0)]


def test_an_unknown_mechanism_is_refused_by_name():
    entry = {**_joint().to_json(), "mechanism": "laplace"}
    with pytest.raises(LedgerError, match=r"run/ledger.jsonl:4: unknown mechanism 'laplace'"):
        LedgerLine.from_json(entry, "run/ledger.jsonl:4")
    with pytest.raises(LedgerError, match="unknown mechanism None"):
        LedgerLine.from_json({"party": "*"})


def test_a_line_with_keys_of_no_kind_is_refused():
    entry = _joint().to_json()
    del entry["blocks"]  # a joint line must say whose noise it stacks
    with pytest.raises(LedgerError, match=r"'joint_poisson_gaussian' line with keys .* fits no"):
        LedgerLine.from_json(entry)
    with pytest.raises(LedgerError, match="a JointRound line, not a RegionLine"):
        RegionLine.from_json(_joint().to_json())
    with pytest.raises(LedgerError, match="blocks is malformed"):
        LedgerLine.from_json({**_joint().to_json(), "blocks": [{"party": "a"}]})


@pytest.mark.parametrize(("q", "steps"), [(0.01, 500), (0.05, 40)])
def test_a_subsampled_gaussian_line_is_its_history(q, steps):
    history = [(1.1, q, steps), (1.3, q, 100)]
    line = RegionLine(party="north", population="north", noise_multiplier=1.3, sample_rate=q,
                      steps=100, round=5, epsilon=1.0, delta=DELTA, accountant="rdp",
                      adjacency="add/remove", scope="", history=tuple(history))
    theirs = independent_epsilon(line.dp_event(), DELTA, "rdp")
    assert theirs == pytest.approx(epsilon("rdp", history, DELTA), rel=0.01)


def test_a_joint_line_noises_at_the_multiplier_of_its_blocks():
    # Four blocks at sigma 2: one stacked Gaussian of multiplier 1 (not the line's own field).
    line = _joint(steps=300, sigma=2.0)
    theirs = independent_epsilon(line.dp_event(), DELTA, "rdp")
    assert theirs == pytest.approx(epsilon("rdp", [(1.0, 0.01, 300)], DELTA), rel=0.01)
    doctored = JointRound(**{**vars(line), "noise_multiplier": 50.0})
    assert doctored.dp_event() == line.dp_event()


def test_randomized_response_is_pure_epsilon_rr():
    line = LabelRelease(party="authority", epsilon_rr=2.0, epsilon=2.0)
    assert pure_epsilon(line.dp_event()) == pytest.approx(2.0, rel=1e-12)
    # Google's PLD accountant reads the same event to the same epsilon (within its grid).
    acc = pld.PLDAccountant(dpa.NeighboringRelation.REPLACE_ONE,
                            value_discretization_interval=1e-4)
    assert acc.compose(line.dp_event()).get_epsilon(0.0) == pytest.approx(2.0, abs=2e-4)
    assert pure_epsilon(budget_event([line, line])) == pytest.approx(4.0)


def test_a_budget_composes_its_lines_and_a_history_stands_for_all_before_it():
    first, second = _joint(1, steps=100), _joint(2, steps=200)
    assert budget_event([first, second]) == budget_event([_joint(3, steps=300)])
    releases = [TranscriptLine(party="payments", history=((4.0, 1.0, n),), round=n, steps=n,
                               epsilon=1.0, delta=DELTA, accountant="rdp", clip=4.0)
                for n in (1, 3, 6)]
    assert budget_event(releases) == budget_event(releases[-1:])
    assert math.isclose(independent_epsilon(budget_event(releases), DELTA, "rdp"),
                        epsilon("rdp", [(4.0, 1.0, 6)], DELTA), rel_tol=0.01)


def test_a_run_ledger_parses_back_to_what_was_written(tmp_path: Path):
    """Every kind PrivacyPlan writes, through the ledger file and back, byte for byte."""
    cfg = PrivacyConfig(epsilon=4.0, transcript_sigma=4.0, accountant="rdp", cap=3.0)
    plan = PrivacyPlan(cfg, ("a", "b"), 1000, 100, 2, ledger=Ledger(tmp_path))
    plan.record_start()
    plan.spend(5)
    plan.record_round(1, {"a": plan.party_history, "b": plan.party_history})
    plan.record_releases(1, 10, np.array([0, 1]), np.array([1]))
    plan.refuse(3, 5, 2)
    plan.record_calibration(2)
    plan.close()
    text = (tmp_path / "ledger.jsonl").read_text()
    lines = read(tmp_path)
    assert {type(x) for x in lines} == {GaussianRelease, LabelRelease, JointRound,
                                        TranscriptLine, Refusal}
    again = [json.dumps({"seq": i, **x.to_json()}, allow_nan=False)
             for i, x in enumerate(lines)]
    assert "\n".join(again) + "\n" == text
