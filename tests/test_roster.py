"""The federation roster and identity keys (crypto/roster.py), enrolment and silo policy files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clients.silo.enrolment import enrol, policy_for
from clients.silo.policy import POLICY_FILE, PolicyRefusalError, SiloPolicy
from crypto.roster import (
    ROSTER_FILE,
    Roster,
    RosterError,
    authority_roster,
    hello_statement,
    identity_key,
    masking_statement,
    public_hex,
    sign,
)

SILOS = ("payments", "social", "device")


def test_enrolment_writes_the_same_roster_everywhere_and_keeps_keys(tmp_path: Path):
    keys = tmp_path / "keys"
    first = enrol(tmp_path / "parties", SILOS, keys)
    for place in [tmp_path / "parties", *(tmp_path / "parties" / s for s in SILOS)]:
        assert Roster.load(place / ROSTER_FILE) == first
        assert json.loads((place / ROSTER_FILE).read_text())["fingerprint"] == first.fingerprint
    for silo in SILOS:
        assert SiloPolicy.load(tmp_path / "parties" / silo) == SiloPolicy()  # strict default
        assert (keys / f"identity-{silo}.key").stat().st_mode & 0o777 == 0o600
    # Enrolling again (every run does) keeps the identity keys: the same roster.
    assert enrol(tmp_path / "parties", SILOS, keys, policy_for(
        explain=4, secure_sum=True, concat=False)) == first
    assert SiloPolicy.load(tmp_path / "parties" / "social").explain == 4
    assert authority_roster(tmp_path / "parties") == first


def test_a_missing_roster_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(RosterError, match="enrol the federation's silos first"):
        authority_roster(tmp_path)


def test_identity_keys_are_private_and_whole(tmp_path: Path):
    key = identity_key(tmp_path, "payments")
    assert public_hex(identity_key(tmp_path, "payments")) == public_hex(key)
    path = tmp_path / "identity-payments.key"
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="readable by other users"):
        identity_key(tmp_path, "payments")
    os.chmod(path, 0o600)
    path.write_bytes(path.read_bytes()[:16])  # a cut key must not become a weaker one
    with pytest.raises(ValueError, match="holds 16 bytes, expected 32"):
        identity_key(tmp_path, "payments")
    with pytest.raises(RosterError, match="not an identifier"):
        identity_key(tmp_path, "../escaped")


def test_signed_statements_are_separated_by_purpose_and_field(tmp_path: Path):
    roster = enrol(tmp_path, SILOS, tmp_path / "keys")
    key = identity_key(tmp_path / "keys", "social")
    fp = roster.fingerprint
    signature = sign(key, masking_statement(fp, "run1", "social", b"k" * 32))
    roster.verify("social", masking_statement(fp, "run1", "social", b"k" * 32), signature)
    for other in (masking_statement(fp, "run2", "social", b"k" * 32),
                  masking_statement(fp, "run1", "device", b"k" * 32),
                  masking_statement("0" * 64, "run1", "social", b"k" * 32),
                  hello_statement(fp, b"k" * 32, "social")):
        with pytest.raises(RosterError, match="does not verify"):
            roster.verify("social", other, signature)
    # Length prefixes: shifting bytes between fields gives another statement.
    assert masking_statement(fp, "run1s", "ocial", b"k" * 32) != \
        masking_statement(fp, "run1", "social", b"k" * 32)
    with pytest.raises(RosterError, match="not in the roster"):
        roster.verify("intruder", b"x", signature)


def test_an_empty_roster_or_bad_keys_are_refused():
    with pytest.raises(RosterError, match="at least one silo"):
        Roster({})
    with pytest.raises(RosterError, match="32 bytes of hex"):
        Roster({"payments": "a" * 64, "social": "zz"})
    with pytest.raises(RosterError, match="not JSON"):
        Roster.from_json("{")


def test_policy_refusals_name_the_key_and_the_file(tmp_path: Path):
    SiloPolicy(corrections=["income"]).write(tmp_path)
    policy = SiloPolicy.load(tmp_path)
    assert policy.corrections == ("income",)
    policy.check_correction("income")
    with pytest.raises(PolicyRefusalError) as info:
        policy.check_correction("age")
    assert info.value.key == "corrections"
    assert str(tmp_path / POLICY_FILE) in str(info.value)
    with pytest.raises(PolicyRefusalError, match=r"'min_group'.*99 distinct"):
        policy.check_group("a summary", 99)
    policy.check_group("a summary", 100)


def test_the_simulated_operator_allows_what_a_tree_or_scorecard_run_asks():
    """policy_for, openly: a tree or scorecard run answers in plaintext (no secure sum); the
    SecureBoost trees' nodes hold at least 4 x min_child_weight people, the least min_group
    is lowered to (never raised); a tree or scorecard run's reason codes are asked
    whatever explain.reasons says. An MLP run keeps the strict keys."""
    mlp = policy_for(explain=0, secure_sum=True, concat=False)
    assert (mlp.require_secure_sum, mlp.min_group, mlp.explain) == (True, 100, 0)
    trees = policy_for(explain=0, secure_sum=True, concat=False, kind="gbdt",
                       min_child_weight=20.0)
    assert (trees.require_secure_sum, trees.min_group, trees.explain) == (False, 80, 4)
    assert policy_for(explain=0, secure_sum=True, concat=False, kind="gbdt",
                      min_child_weight=50.0).min_group == 100
    assert policy_for(explain=0, secure_sum=True, concat=False, kind="gbdt").min_group == 100
    card = policy_for(explain=0, secure_sum=True, concat=False, kind="scorecard")
    assert (card.require_secure_sum, card.min_group, card.explain) == (False, 100, 4)
