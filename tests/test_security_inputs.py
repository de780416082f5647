"""Input attacks of issue 18 (item 7), each replayed: on d5594de every one of them passed
silently, wrote where it should not, or ended in a traceback; now each is refused with a
message that names the input and the fix, before any engine starts.

path traversal in mapping.json and parties.json, float phone columns, `--out` under a file,
`--repeat 0`, non-finite settings, `privacy.delta=0.5` (refused fast, and the same --out takes
the corrected retry), a truncated key file, another run's scores swapped in, ca.key's mode.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.protocol.schema import PARTIES_FILE, federation_silos, silo_schema
from clients.protocol.tables import SiloDataError
from clients.silo.data import load_silo
from crypto.at_rest import AtRestError, Keystore, decrypt, encrypt
from crypto.identity import (
    IdentifierError,
    PartyNameError,
    check_party_name,
    normalize_ids,
    normalize_phones,
)
from crypto.tls import CredentialError, write_credentials
from server.config_checks import INFINITE_OK, ConfigError
from server.scores_file import SCORES_FILE, read_scores, write_scores
from simulations.data.paths import Parties, PathArgumentError, check_new_dir
from simulations.data.real_data import DataImportError, read_mapping
from simulations.run.config import check_delta, known_keys, make_config
from tests import background
from tests.conftest import run_cli

# ---- helpers -----------------------------------------------------------------------------


def _assert_user_error(proc, *needles: str) -> None:
    """Exit 2 with `error:` and every needle in the message, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error:" in proc.stderr
    flat = " ".join(proc.stderr.split())  # rich wraps long messages
    for needle in needles:
        assert needle in flat, (needle, flat[-2000:])


def _phones(n: int, start: int = 13_800_000_000) -> list[str]:
    return [str(start + 7919 * i) for i in range(n)]


def _party_csvs(tmp_path: Path, n: int = 1500, silos: tuple[str, str] = ("bank", "telco")
                ) -> Path:
    """A real-data directory: the authority's labels and two silos keyed by phone numbers."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(7)
    phones = _phones(n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(2.0 - 1.5 * x1 - x2))).astype(int)
    pd.DataFrame({"phone": phones, "bad": y}).to_csv(data / "auth.csv", index=False)
    pd.DataFrame({"phone": phones, "a": x1}).to_csv(data / "s1.csv", index=False)
    pd.DataFrame({"phone": phones, "b": x2}).to_csv(data / "s2.csv", index=False)
    mapping = {"identifier": "phone", "identifier_kind": "phone",
               "authority": {"file": "auth.csv", "label": "bad"},
               "silos": {silos[0]: {"file": "s1.csv", "columns": ["a"]},
                         silos[1]: {"file": "s2.csv", "columns": ["b"]}}}
    (data / "mapping.json").write_text(json.dumps(mapping))
    return data


# ---- party names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "..", "a/b", "Payments", "", "x" * 33,
                                  "1silo", "pay-ments", "pay.ments", "silo\n"])
def test_party_names_must_be_identifiers(name: str):
    with pytest.raises(PartyNameError, match="name"):
        check_party_name(name)
    with pytest.raises(PartyNameError):
        Parties(Path("/parties")).party(name)


def test_a_traversing_silo_in_mapping_json_is_refused(tmp_path: Path):
    data = _party_csvs(tmp_path, n=50, silos=("../../escaped", "telco"))
    with pytest.raises(DataImportError, match=r"silo name '\.\./\.\./escaped'"):
        read_mapping(data)


@pytest.mark.slow
def test_a_traversing_silo_writes_nothing_outside_the_parties_directory(tmp_path: Path):
    """The review's reproduction, through the CLI: nothing lands in ../../escaped, no
    traceback, and the --out is free for the corrected retry."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    data = _party_csvs(work, n=50, silos=("../../escaped", "telco"))
    out = work / "run"
    proc = run_cli("run", "--out", str(out), "--data", str(data), cwd=work, engine=False)
    _assert_user_error(proc, "silo name", "../../escaped")
    for where in (tmp_path, tmp_path / "a", work):
        assert not (where / "escaped").exists()
    assert not (out / "config.json").exists()


def test_traversing_names_in_parties_json_and_node_configs_are_refused(tmp_path: Path):
    (tmp_path / PARTIES_FILE).write_text(json.dumps({"silos": ["payments", "../x"]}))
    with pytest.raises(PartyNameError, match="silo name"):
        federation_silos(tmp_path)
    # A node config's `silo="..."` reaches the silo's schema first.
    with pytest.raises(PartyNameError):
        silo_schema(tmp_path / "x", "../x")


def test_credentials_refuse_a_traversing_silo(tmp_path: Path):
    with pytest.raises(CredentialError, match="silo name"):
        write_credentials(tmp_path / "c", ["127.0.0.1"], ["../nodes/x"])


# ---- phone columns read as floats ----------------------------------------------------------


def test_a_float_phone_column_is_read_exactly():
    floats = pd.Series([13812345678.0, 8613912345678.0, np.float64(15012345678)], name="phone")
    assert normalize_phones(floats).tolist() == ["+8613812345678", "+8613912345678",
                                                 "+8615012345678"]
    # Written out as text by a float column: the ".0" is not a digit.
    text = pd.Series(["13812345678.0", "+86 138 1234 5678", "138.1234.5678"])
    assert normalize_phones(text).tolist() == ["+8613812345678"] * 3
    mixed = pd.Series(["13812345678", 13812345678.0], dtype=object, name="phone")
    assert normalize_phones(mixed).tolist() == ["+8613812345678"] * 2
    assert normalize_ids(pd.Series([123456.0, 7.0], name="ID"), "plain").tolist() == \
        ["123456", "7"]


@pytest.mark.parametrize("value", [13812345678.5, 2.0**53 + 2, -13812345678.0, np.inf])
def test_a_float_phone_column_that_may_have_lost_digits_is_refused(value: float):
    raw = pd.Series([13812345678.0, value], name="mobile")
    with pytest.raises(IdentifierError) as caught:
        normalize_phones(raw)
    message = str(caught.value)
    assert "column 'mobile'" in message
    assert "as text" in message
    assert "13812345678" not in message  # never an identifier in a message


def test_a_silo_table_with_a_float64_phone_column_loads_as_the_text_one(tmp_path: Path):
    """Parquet keeps a float64 phone column as floats; the silo reads the same people."""
    rng = np.random.default_rng(0)
    phones = _phones(400)
    features = {c: rng.random(400) for c in ("a", "b")}
    for kind, column in (("text", phones), ("float", np.array(phones, dtype=np.float64))):
        folder = tmp_path / kind / "bank"
        folder.mkdir(parents=True)
        (folder / "schema.json").write_text(json.dumps({"features": ["a", "b"]}))
        pd.DataFrame({"phone": column, **features}).to_parquet(folder / "features.parquet")
    text = load_silo(tmp_path / "text" / "bank", "bank")
    floats = load_silo(tmp_path / "float" / "bank", "bank")
    assert floats.ids.tolist() == text.ids.tolist()
    assert floats.ids.iloc[0] == "+86" + phones[0]


def test_a_float_column_that_lost_digits_is_refused_when_a_silo_loads(tmp_path: Path):
    folder = tmp_path / "bank"
    folder.mkdir()
    (folder / "schema.json").write_text(json.dumps({"features": ["a"]}))
    pd.DataFrame({"phone": [13812345678.25, 13812345679.0], "a": [0.1, 0.2]}).to_parquet(
        folder / "features.parquet")
    with pytest.raises(SiloDataError, match="column 'phone'"):
        load_silo(folder, "bank")


@settings(max_examples=200, deadline=None)
@given(national=st.integers(min_value=10**10, max_value=2 * 10**10 - 1),
       with_cc=st.booleans())
def test_property_mobile_numbers_as_floats_normalise_like_text(national: int, with_cc: bool):
    digits = ("86" if with_cc else "") + str(national)
    want = "+86" + str(national)
    as_text = normalize_phones(pd.Series([digits]))
    as_float = normalize_phones(pd.Series([float(digits)], name="phone"))
    as_float_text = normalize_phones(pd.Series([digits + ".0"]))
    assert as_text.tolist() == as_float.tolist() == as_float_text.tolist() == [want]


@settings(max_examples=200, deadline=None)
@given(number=st.integers(min_value=10**5, max_value=2**53 - 1))
def test_property_every_whole_float_below_2_53_is_read_digit_for_digit(number: int):
    text = normalize_phones(pd.Series([str(number)]))
    assert normalize_phones(pd.Series([float(number)], name="p")).tolist() == text.tolist()
    assert normalize_ids(pd.Series([float(number)], name="p"), "plain").tolist() == \
        [str(number)]


@settings(max_examples=100, deadline=None)
@given(number=st.floats(min_value=1e5, max_value=1e15, allow_nan=False)
       .filter(lambda v: not float(v).is_integer()))
def test_property_a_fractional_float_is_never_read_as_a_phone(number: float):
    with pytest.raises(IdentifierError, match="as text"):
        normalize_phones(pd.Series([number], name="phone"))


# ---- command-line inputs -------------------------------------------------------------------


@pytest.mark.slow
def test_out_under_a_regular_file_is_refused_without_a_traceback(tmp_path: Path):
    (tmp_path / "afile").write_text("")
    proc = run_cli("run", "--out", str(tmp_path / "afile" / "r"), "--users", "1000",
                   "--parties", str(tmp_path / "parties"), cwd=tmp_path, engine=False)
    _assert_user_error(proc, "afile", "is a file", "--out")
    assert (tmp_path / "afile").is_file()
    with pytest.raises(PathArgumentError, match="is a file"):
        check_new_dir(tmp_path / "afile" / "r" / "deeper", "--out")
    with pytest.raises(PathArgumentError, match="not a directory"):
        check_new_dir(tmp_path / "afile", "--out")
    check_new_dir(tmp_path / "fresh" / "run", "--out")  # a place that can be made passes


@pytest.mark.slow
def test_repeat_zero_is_refused_without_a_traceback(tmp_path: Path):
    proc = run_cli("score", str(tmp_path / "run"), "--repeat", "0", cwd=tmp_path,
                   engine=False)
    _assert_user_error(proc, "--repeat 0", "1 or more")


@pytest.mark.slow
def test_max_grad_norm_inf_is_refused_at_config_validation(tmp_path: Path):
    proc = run_cli("run", "--out", str(tmp_path / "r"), "--users", "1000",
                   "--set", "privacy.max_grad_norm=inf", cwd=tmp_path, engine=False)
    _assert_user_error(proc, "privacy.max_grad_norm", "finite")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key", sorted(k for k, t in known_keys().items()
                                       if t is float or "float" in str(t)))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_settings_are_refused_where_they_mean_nothing(key: str, value: str):
    if key in INFINITE_OK and value == "inf":
        make_config({key: value})  # "off" or "no cap"
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_config({key: value})


def test_delta_against_the_declared_people():
    cfg = make_config({"privacy.delta": "0.001"})
    check_delta(cfg, 100, "population.users")  # 1/72: above 0.001
    with pytest.raises(ConfigError, match=r"privacy\.delta=0\.001 .*privacy\.delta=0"):
        check_delta(cfg, 5000, "population.users")
    check_delta(make_config({}), 10**9, "population.users")  # 0 = the default 1/(10 N)


@pytest.mark.slow
def test_delta_half_is_refused_fast_for_a_generated_population(tmp_path: Path):
    out = tmp_path / "run"
    t = time.perf_counter()
    proc = run_cli("run", "--out", str(out), "--users", "2000", "--set", "privacy.delta=0.5",
                   cwd=tmp_path, engine=False)
    assert time.perf_counter() - t < 60
    _assert_user_error(proc, "privacy.delta=0.5", "privacy.delta=0")
    assert "Start engine" not in proc.stderr
    assert "Align identities" not in proc.stderr
    assert not (out / "config.json").exists()


_FAST = ("--set", "train.epochs=1", "--set", "train.batch_size=256",
         "--set", "privacy.epsilon=inf", "--set", "privacy.label_epsilon=inf")


def _delta_retry_commands(work: Path) -> list[background.Command]:
    """The refused command, then the same with a fixed delta into the same --out."""
    data, out = work / "data", work / "run"

    def out_left_free(work: Path) -> None:
        if (out / "config.json").exists() or (out / "run.json").exists():
            raise AssertionError("the refused run left its --out taken")

    return [background.Command(("run", "--out", str(out), "--data", str(data), *_FAST,
                                "--set", "privacy.delta=0.5"),
                               expect=2, before=lambda work: _party_csvs(work) and None),
            background.Command(("run", "--out", str(out), "--data", str(data), *_FAST,
                                "--set", "privacy.delta=1e-5"), before=out_left_free)]


# The retry trains: in the background while the suite runs.
background.register("delta_retry", _delta_retry_commands)


@pytest.fixture
def delta_retry(background_runs) -> tuple[list, Path]:
    return background_runs("delta_retry")


@pytest.mark.slow
def test_delta_half_on_real_data_is_refused_before_the_engine(tmp_path: Path):
    """Real data: N is known only from the authority's table, after --out is claimed and the
    tables imported. The refusal still comes before the engine and PSI (the engine is barred
    here), and leaves the --out free."""
    data = _party_csvs(tmp_path)
    out = tmp_path / "run"
    t = time.perf_counter()
    proc = run_cli("run", "--out", str(out), "--data", str(data), *_FAST,
                   "--set", "privacy.delta=0.5", cwd=tmp_path, engine=False)
    seconds = time.perf_counter() - t
    _assert_user_error(proc, "privacy.delta=0.5", "privacy.delta=0", "authority's table")
    assert seconds < 90, seconds
    assert "Start engine" not in proc.stderr
    assert "Align identities" not in proc.stderr
    assert not (out / "config.json").exists()
    assert not (out / "run.json").exists()


@pytest.mark.slow
def test_after_the_delta_refusal_the_same_command_with_a_fixed_delta_runs(delta_retry):
    """The same refusal as a user's process meets it, then the retry into the same --out."""
    (refused, retry), work = delta_retry
    _assert_user_error(refused, "privacy.delta=0.5", "authority's table")
    assert "Start engine" not in refused.stderr
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert json.loads((work / "run" / "metrics.json").read_text())["delta"] == \
        pytest.approx(1e-5)


# ---- keys and the run's record -------------------------------------------------------------


@pytest.mark.parametrize(("suite", "cut"), [("aes-256-gcm", 16), ("aes-256-gcm", 24),
                                            ("sm4-gcm", 8)])
def test_a_truncated_key_file_is_refused_not_used_as_a_shorter_key(tmp_path: Path, suite: str,
                                                                   cut: int):
    store = Keystore.init(tmp_path / "keys", suite)
    blob = encrypt(store, b"person-level data", b"ctx")
    key_file = tmp_path / "keys" / f"key-{store.active().key_id.hex()}.bin"
    key_file.write_bytes(key_file.read_bytes()[:cut])
    with pytest.raises(AtRestError, match=f"holds {cut} bytes"):
        decrypt(Keystore(tmp_path / "keys"), blob, b"ctx")
    with pytest.raises(AtRestError, match=f"holds {cut} bytes"):
        encrypt(Keystore(tmp_path / "keys"), b"new data", b"ctx")


def test_a_lengthened_key_file_is_refused(tmp_path: Path):
    store = Keystore.init(tmp_path / "keys", "sm4-gcm")
    key_file = tmp_path / "keys" / f"key-{store.active().key_id.hex()}.bin"
    key_file.write_bytes(key_file.read_bytes() * 2)
    with pytest.raises(AtRestError, match="holds 32 bytes"):
        encrypt(Keystore(tmp_path / "keys"), b"x", b"ctx")


def _two_runs(tmp_path: Path) -> tuple[Keystore, Path, Path]:
    store = Keystore.init(tmp_path / "keys")
    runs = []
    for name, key, value in (("a", "1111aaaa", 0.1), ("b", "2222bbbb", 0.9)):
        out = tmp_path / "runs" / name
        out.mkdir(parents=True)
        write_scores(out, pd.DataFrame({"subject_ref": ["r1"], "probability": [value]}),
                     store, key)
        runs.append(out)
    return store, runs[0], runs[1]


def test_another_runs_scores_with_its_run_key_are_refused(tmp_path: Path):
    store, a, b = _two_runs(tmp_path)
    assert read_scores(a, store.path)["probability"].tolist() == [0.1]
    assert not (a / "run_key.txt").exists()  # nothing beside the ciphertext names the run
    # The review's swap: b's scores, with b's run key beside them, into a.
    shutil.copy(b / f"{SCORES_FILE}.enc", a / f"{SCORES_FILE}.enc")
    (a / "run_key.txt").write_text("2222bbbb\n")
    with pytest.raises(AtRestError, match="authentication failed"):
        read_scores(a, store.path)


def test_scores_in_a_directory_the_authority_never_wrote_are_refused(tmp_path: Path):
    store, _, b = _two_runs(tmp_path)
    planted = tmp_path / "runs" / "c"
    planted.mkdir()
    shutil.copy(b / f"{SCORES_FILE}.enc", planted / f"{SCORES_FILE}.enc")
    with pytest.raises(AtRestError, match="no record of a run"):
        read_scores(planted, store.path)


def test_a_run_copied_with_its_keystore_still_reads(tmp_path: Path):
    _two_runs(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    scores = read_scores(tmp_path / "copy" / "runs" / "b", tmp_path / "copy" / "keys")
    assert scores["probability"].tolist() == [0.9]
    # Moved alone, away from its keystore, it is no longer vouched for.
    shutil.move(tmp_path / "copy" / "runs" / "b", tmp_path / "moved")
    with pytest.raises(AtRestError, match="no record of a run"):
        read_scores(tmp_path / "moved", tmp_path / "copy" / "keys")


# ---- deployment credentials ----------------------------------------------------------------


def test_credentials_check_covers_the_ca_key(tmp_path: Path):
    creds = write_credentials(tmp_path / "c", ["127.0.0.1"], ["payments"])
    creds.check(["payments"])
    creds.ca_key.chmod(0o644)
    with pytest.raises(CredentialError, match=r"ca\.key is readable by other users"):
        creds.check(["payments"])
    creds.ca_key.chmod(0o600)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(creds.ca_key, 54321, -1)
        with pytest.raises(CredentialError, match=r"ca\.key belongs to another user"):
            creds.check(["payments"])
        os.chown(creds.ca_key, 0, -1)
    real = creds.ca_key.with_name("ca.key.real")
    creds.ca_key.rename(real)
    creds.ca_key.symlink_to(real)
    with pytest.raises(CredentialError, match="symbolic link"):
        creds.check(["payments"])
    creds.ca_key.unlink()
    real.unlink()
    creds.check(["payments"])  # a CA key kept offline is no fault


def test_credentials_directory_open_to_others_is_refused(tmp_path: Path):
    creds = write_credentials(tmp_path / "c", ["127.0.0.1"], ["payments"])
    creds.root.chmod(0o755)
    with pytest.raises(CredentialError, match="credentials directory"):
        creds.check(["payments"])
    assert stat.S_IMODE(creds.ca_key.stat().st_mode) == 0o600


@pytest.mark.slow
def test_delta_half_is_refused_before_a_sweep_starts(tmp_path: Path):
    proc = run_cli("sweep", "--out", str(tmp_path / "sweep"), "--users", "2000",
                   "--epsilons", "1", "--seeds", "0", "--set", "privacy.delta=0.5",
                   cwd=tmp_path, engine=False)
    _assert_user_error(proc, "privacy.delta=0.5", "privacy.delta=0")
    assert not (tmp_path / "sweep").exists()
