"""The score as people meet it, end to end on the real engine: reason codes that add up,
eligibility, and one served federation answering `score`, `dispute` and `drift`, then the audit
log. (Without `serve`, each command opens the same session itself: bench/people.py times both.)"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clients.protocol.reasons import CATALOGUE
from crypto.at_rest import Keystore, read_party_file
from crypto.identity import keyed_refs, load_or_create_pepper
from tests.conftest import ENGINE_ENV, assert_no_identifiers, run_cli, run_cli_for, scores_of
from tests.machine_watch import Watch, check_ray, probe_gcs, wait

pytestmark = pytest.mark.slow


def _copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a finished run with its parties and keystore: disputes change them."""
    for suffix in ("", ".parties", ".parties.keys"):
        shutil.copytree(run.with_name(run.name + suffix), dest / f"run{suffix}")
    how = json.loads((dest / "run" / "run.json").read_text())
    how["parties"] = str(dest / "run.parties")
    (dest / "run" / "run.json").write_text(json.dumps(how))
    return dest / "run"


def _phones(run: Path) -> pd.DataFrame:
    """Phone and subject reference of every scored person, from the simulation's truth."""
    parties = run.with_name(run.name + ".parties")
    store = Keystore(parties.with_name(parties.name + ".keys"))
    truth = pd.read_parquet(io.BytesIO(read_party_file(
        parties / "simulation" / "truth.parquet.enc", "simulation", store)))
    pepper = load_or_create_pepper(parties / "authority" / "pepper.key")
    refs = keyed_refs(truth["phone"].to_numpy(), pepper, "sha256")
    scores = scores_of(run)
    return scores.merge(pd.DataFrame({"subject_ref": refs, "phone": truth["phone"]}),
                        on="subject_ref")


def test_reason_points_add_up_to_every_score(small_run: Path):
    scores = scores_of(small_run)
    scored = scores[scores["status"] == "scored"]
    parts = scored[["points_base", "points_payments", "points_social", "points_device",
                    "points_limit"]].sum(axis=1)
    assert (parts - scored["score"].astype(float)).abs().max() <= 0.5 + 1e-3
    # Up to four reasons, each a catalogued silo feature, costliest first, all losses.
    names = {f"{s}.{f}" for s, fs in CATALOGUE.items() for f in fs}
    for j in range(1, 5):
        assert set(scored[f"reason_{j}"].dropna().astype(str)) <= names
        assert (scored[f"reason_{j}_points"].dropna() < 0).all()
    costs = scored[[f"reason_{j}_points" for j in range(1, 5)]].to_numpy()
    assert (np.diff(np.nan_to_num(costs, nan=0.0), axis=1) >= -1e-9).all()
    assert scored["reason_1"].notna().mean() > 0.9


def test_ineligible_people_get_reasons_not_scores(small_run: Path):
    scores = scores_of(small_run)
    metrics = json.loads((small_run / "metrics.json").read_text())
    out = scores[scores["status"] == "ineligible"]
    assert len(out) == metrics["people"]["ineligible"] > 0
    assert out["score"].isna().all()
    assert out["tier"].isna().all()
    assert out["reason_1"].isna().all()
    assert (out["ineligible_reason"].astype(str) != "").all()
    assert sum(metrics["tiers"].values()) == len(scores) - len(out)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} did not appear in {seconds:.0f} s"
        time.sleep(0.5)


def test_served_score_dispute_drift_and_audit(small_run: Path, tmp_path: Path):
    """One served federation answers `score`, `dispute` and `drift`; the audit log chains what
    it changed. Watched from /proc while it serves (tests/machine_watch.py): its Ray listens
    on loopback only and refuses a client without its token, and no command line on the
    machine, nor Ray's job table, ever holds the phone number."""
    run = _copy_run(small_run, tmp_path)
    people = _phones(run)
    person = people[(people["status"] == "scored")].iloc[0]
    phone = str(person["phone"])
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(tmp_path / ".flwr"), "COLUMNS": "200"}
    server = subprocess.Popen([sys.executable, "-m", "simulations.cli", "serve", str(run)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    watch = Watch(server.pid, phone)
    sampler = threading.Thread(target=watch.run, daemon=True)
    sampler.start()
    try:
        _wait_for(run / "serve.json", server, 120)
        wait(lambda: watch.gcs_port is not None and watch.token is not None, 60, "Ray GCS",
             server)
        probe_gcs(watch)
        looked = run_cli_for(phone, "score", str(run), "--repeat", "5", cwd=tmp_path,
                             engine=False)
        assert looked.returncode == 0, looked.stderr
        assert f"score {int(person['score'])}," in looked.stdout
        assert "p50" in looked.stdout

        def settle(value: int) -> int:
            proc = run_cli_for(phone, "dispute", str(run), "--silo", "payments",
                           "--field", "overdue_count", "--value", str(value),
                           "--category", "transaction", cwd=tmp_path, engine=False)
            assert proc.returncode == 0, proc.stderr
            assert "served federation" in proc.stdout
            new = int(proc.stdout.split(" -> ")[1].split(",")[0])
            now = scores_of(run)
            assert now.loc[now["subject_ref"] == person["subject_ref"], "score"].item() == new
            return new

        many, none = settle(12), settle(0)
        assert none > many  # twelve overdue events cost points; clearing them gives them back
        # Drift through the same server: a later cohort of the same people, behaviour worse.
        drifted = run_cli("drift", str(run), "--cohort", "later", "--drift", "1",
                          cwd=tmp_path, engine=False)
        assert drifted.returncode == 0, drifted.stderr
        report = json.loads((run / "drift" / "later" / "drift.json").read_text())
        assert report["psi"]["score"]["status"] == "shift"
        assert report["mean_score"]["after"] < report["mean_score"]["before"]
        assert set(report["psi"]) == {"score", "points_payments", "points_social",
                                      "points_device"}
        assert (run / "drift" / "later" / "drift.png").stat().st_size > 10_000
        bad = run_cli_for(phone, "dispute", str(run), "--silo", "payments",
                      "--field", "overdue_count", "--value", "-1", "--category",
                      "transaction", cwd=tmp_path, engine=False)
        assert bad.returncode == 2
        assert "cannot be negative" in bad.stderr
    finally:
        watch.stop.set()
        sampler.join()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=90)
    check_ray(watch)
    assert watch.phone_in == set(), "the phone number was on a command line"
    assert watch.jobs_seen >= 1, "the sampler never read Ray's job table"
    assert not watch.phone_in_jobs
    assert not (run / "serve.json").exists()
    assert "stopped after" in server.stderr.read()

    audit = run_cli("audit", str(run), cwd=tmp_path)
    assert audit.returncode == 0, audit.stderr
    assert "2 entries, chain verified" in audit.stdout
    assert "-> " in audit.stdout
    # The silo keeps the correction, encrypted; the run directory never sees the phone.
    assert (run.with_name("run.parties") / "payments" / "corrections.json.enc").exists()
    assert_no_identifiers(run)
    log = run / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    flipped = bytearray(lines[0])
    flipped[20] ^= 1
    log.write_bytes(bytes(flipped) + b"".join(lines[1:]))
    tampered = run_cli("audit", str(run), cwd=tmp_path)
    assert tampered.returncode == 1
    assert "does not verify" in tampered.stdout
    assert "entry 0" in tampered.stdout
