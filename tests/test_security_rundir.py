"""Run directories under attack (issue 18, item 5), each replayed as it was reproduced:

- two `fedscore run --resume` at once: the second is refused while the first holds the run, and
  the ledger never holds a step twice;
- `fedscore ledger verify` on a doctored ledger (a step twice) and on an epsilon above the
  target: it fails, where it printed "ok";
- a kill as the baselines start (and as the audit starts): `--resume` finishes the run, with the
  outputs of an uninterrupted one;
- a deleted, cut or rolled-back audit log, rolled-back scores or corrections: `fedscore audit`
  reports them against the anchor in the keystore, where it said "no disputes yet".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crypto.at_rest import Keystore
from server import ledger as ledger_mod
from server import run_phases
from server.audit_log import AuditLog, check_anchor, genesis_hash
from server.ledger import DuplicateStepError, Ledger
from server.ledger_lines import Block, JointRound
from server.run_lock import RunLockedError, claim, holder
from tests.conftest import run_cli
from tests.resumed_run import federated_digests

# ---- the lock ------------------------------------------------------------------------------


def _hold(run_dir: Path, purpose: str = "fedscore run --resume",
          token_file: Path | None = None) -> subprocess.Popen:
    """Another process holding `run_dir` until its stdin closes."""
    code = (
        "import sys\n"
        "from server.run_lock import claim\n"
        f"with claim({str(run_dir)!r}, {purpose!r}) as lock:\n"
        + (f"    open({str(token_file)!r}, 'w').write(lock.token)\n" if token_file else "")
        + "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_claimant_is_refused_naming_the_holder(tmp_path: Path):
    run = tmp_path / "run"
    other = _hold(run)
    try:
        with pytest.raises(RunLockedError) as refused, claim(run, "fedscore run --resume"):
            pytest.fail("the second claimant got the run directory")
        message = str(refused.value)
        assert f"process {other.pid}" in message
        assert "fedscore run --resume" in message
        assert "nothing was changed" in message
        assert holder(run)["pid"] == other.pid
        assert "token" not in holder(run)  # only the holder hands it out
    finally:
        _release(other)
    assert holder(run) is None
    with claim(run, "fedscore run --resume"), claim(run, "nested, same process"):
        assert holder(run)["pid"] == os.getpid()  # re-entered, not refused by itself


def test_a_killed_holder_frees_the_run_directory(tmp_path: Path):
    run = tmp_path / "run"
    other = _hold(run)
    os.kill(other.pid, signal.SIGKILL)
    other.wait(timeout=30)
    with claim(run, "fedscore run --resume"):
        pass  # the kernel dropped the dead process's lock; its .lock file alone blocks nothing


def test_the_flwr_run_server_app_joins_only_with_its_launchers_token(tmp_path: Path):
    """`fedscore deploy` holds the run and hands its ServerApp (another process) the token;
    a `flwr run` without it is refused like any second claimant."""
    run, token_file = tmp_path / "run", tmp_path / "token"
    other = _hold(run, "fedscore deploy", token_file)
    try:
        with claim(run, "flwr run (ServerApp)", join_token=token_file.read_text()):
            pass
        with pytest.raises(RunLockedError), claim(run, "flwr run (ServerApp)",
                                                  join_token="not-the-token"):
            pass
    finally:
        _release(other)


# ---- the ledger ----------------------------------------------------------------------------


def _line(round_: int, epsilon: float | None = None) -> JointRound:
    return JointRound(blocks=(Block(party="a", noise_multiplier=2.0, clip=1.0),),
                      noise_multiplier=2.0, sample_rate=0.1, steps=3, round=round_,
                      epsilon=0.1 * round_ if epsilon is None else epsilon, delta=1e-5,
                      accountant="rdp")


def test_appending_a_step_already_recorded_is_refused(tmp_path: Path):
    book = Ledger(tmp_path)
    assert [book.append(_line(r)) for r in (1, 2, 3)] == [0, 1, 2]
    # Another writer (a second resumed run) replaying round 2, even with an epsilon computed
    # at another precision, is refused: the step is the same step.
    with pytest.raises(DuplicateStepError, match="round 2 is already recorded"):
        Ledger(tmp_path).append(_line(2, epsilon=0.2000001))
    entries = ledger_mod.read(tmp_path)
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert ledger_mod.duplicates(entries) == []
    # A resume truncates to its checkpoint and replays: the replayed round is new again.
    book.truncate(len((tmp_path / "ledger.jsonl").read_text().splitlines()[0]) + 1)
    assert book.append(_line(2)) == 1


# ---- concurrent resume, ledger verify (one crashed run, resumed twice at once) -------------


@pytest.fixture(scope="module")
def resumed(resumed_run) -> dict:
    """The shared run (tests/resumed_run.py): crashed after round 2, then two `--resume` at
    once: the first holds the run, the second must be refused while it does."""
    return {"work": resumed_run["work"], "run": resumed_run["run"],
            "first_pid": resumed_run["pids"][2], "second": resumed_run["second"],
            "at_baselines": resumed_run["at_baselines"], "at_audit": resumed_run["at_audit"],
            "procs": resumed_run["procs"]}


slow = pytest.mark.slow


@slow
def test_a_second_resume_is_refused_while_the_first_runs(resumed):
    second = resumed["second"]
    assert second["holder_pid"] == resumed["first_pid"]
    assert second["returncode"] == 2, second["stdout"] + second["stderr"]
    text = " ".join((second["stdout"] + second["stderr"]).split())
    assert "is in use" in text
    assert f"process {resumed['first_pid']}" in text
    assert "Traceback" not in second["stderr"]


@slow
def test_the_ledger_holds_every_step_once_and_verifies(resumed):
    run = resumed["run"]
    entries = ledger_mod.read(run)
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    assert ledger_mod.duplicates(entries) == []
    joint = [e for e in entries if e["mechanism"] == "joint_poisson_gaussian"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert sum(e["steps"] for e in joint) == metrics["training_steps"]
    proc = run_cli("ledger", "verify", str(run), cwd=resumed["work"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ledger problem" not in proc.stdout


def _doctored(resumed: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "doctored"
    shutil.copytree(resumed["run"], copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


@slow
def test_ledger_verify_fails_on_a_step_recorded_twice(resumed, tmp_path: Path):
    """What two resumes did: the last rounds appended again (the seq numbers too)."""
    run = _doctored(resumed, tmp_path)
    lines = (run / "ledger.jsonl").read_text().splitlines()
    last_joint = max(i for i, x in enumerate(lines) if "joint_poisson_gaussian" in x)
    (run / "ledger.jsonl").write_text("\n".join([*lines, lines[last_joint]]) + "\n")
    proc = run_cli("ledger", "verify", str(run), cwd=tmp_path)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, out
    assert "counted twice" in out
    assert "does not verify" in out


@slow
def test_ledger_verify_fails_on_an_epsilon_above_the_target(resumed, tmp_path: Path):
    run = _doctored(resumed, tmp_path)
    config = json.loads((run / "config.json").read_text())
    spent = json.loads((run / "metrics.json").read_text())["epsilon"]["model"]
    config["privacy.epsilon"] = round(spent * 0.9, 4)  # the target this ledger now exceeds
    (run / "config.json").write_text(json.dumps(config))
    proc = run_cli("ledger", "verify", str(run), cwd=tmp_path)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, out
    assert "above the run's target" in out


@slow
def test_serve_and_drift_are_refused_on_a_run_someone_holds(resumed):
    """Refused before any engine starts or anything is written (dispute claims the same way)."""
    run, work = resumed["run"], resumed["work"]
    other = _hold(run, "fedscore run --resume")
    try:
        served = run_cli("serve", str(run), cwd=work, timeout=120)
        drifted = run_cli("drift", str(run), cwd=work, timeout=120)
    finally:
        _release(other)
    assert not (run / "drift").exists()
    for proc in (served, drifted):
        text = " ".join((proc.stdout + proc.stderr).split())
        assert proc.returncode == 2, text
        assert f"process {other.pid}" in text


# ---- a kill after training -----------------------------------------------------------------


@slow
def test_a_kill_as_the_baselines_start_resumes_to_the_same_outputs(resumed, tmp_path: Path):
    """The shared run was killed as the baselines start, then as the audit starts; each
    `--resume` continued at the first unfinished phase (no engine, no retraining) and ended
    with the outputs the federated part wrote before the kill: same scores, same ledger, same
    figures."""
    killed, procs = resumed["run"], resumed["procs"]
    said = " ".join((procs[2].stdout + procs[2].stderr).split())
    assert procs[2].returncode == 2, said[-3000:]
    assert "injected failure as phase baselines starts" in said
    assert f"fedscore run --resume {killed}" in said
    at_baselines, at_audit = resumed["at_baselines"], resumed["at_audit"]
    assert at_baselines["finished"] == ["align", "train", "score"]
    assert not at_baselines["metrics_written"]
    assert procs[3].returncode == 2, procs[3].stderr[-3000:]
    assert at_audit["finished"][-1] == "baselines"
    kept = at_audit["baselines"]

    assert procs[4].returncode == 0, procs[4].stderr[-3000:]
    assert run_phases.finished(killed) == list(run_phases.PHASES)
    metrics = json.loads((killed / "metrics.json").read_text())
    authority = json.loads((killed / "authority.json").read_text())
    # The federated results are the ones written before the kill, not made again.
    assert federated_digests(killed) == at_baselines["digests"]
    for key in ("auc", "ks", "brier"):  # authority.json: per named population
        assert metrics[key] == authority["scored_test"][key], key
        assert metrics[f"all_test_{key}"] == authority["all_test"][key], key
    for key in ("training_steps", "epsilon", "tiers", "round_trips"):
        assert metrics[key] == authority[key], key
    # The baselines are the ones the first resume trained, not trained again.
    assert metrics["baseline_seconds"] == {n: round(r["seconds"], 3) for n, r in kept.items()}
    assert metrics["baseline_central_auc"] == kept["central"]["metrics"]["auc"]
    assert metrics["audit"]["canary"]["accounted_epsilon"] is not None
    verified = run_cli("ledger", "verify", str(killed), cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout


# ---- the audit log's anchor ----------------------------------------------------------------


@pytest.fixture
def disputed(tmp_path: Path) -> tuple[AuditLog, Path, Path]:
    """A run directory layout with scores and a silo's corrections, and a log of two cases
    (written as `fedscore dispute` writes them: corrections and scores first, then the log)."""
    store = Keystore.init(tmp_path / "parties.keys")
    parties, run = tmp_path / "parties", tmp_path / "run"
    (parties / "payments").mkdir(parents=True)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"parties": str(parties)}))
    scores, fixes = run / "scores.parquet.enc", parties / "payments" / "corrections.json.enc"
    log = AuditLog(run / "audit.log", store, log_name="0123abcd/audit")
    for i in range(2):
        scores.write_bytes(b"scores after case %d" % i)
        fixes.write_bytes(b"corrections after case %d" % i)
        log.append({"kind": "dispute", "case": i})
    assert log.anchor_path.is_relative_to(store.path)
    return log, scores, fixes


def _problems(log: AuditLog, expect_head: str | None = None) -> str:
    return " ".join(check_anchor(log, expect_head).problems)


def test_an_untouched_log_matches_its_anchor(disputed):
    log, _, _ = disputed
    result = check_anchor(log)
    assert result
    assert result.entries == 2
    assert result.anchored


def test_a_deleted_log_is_reported_not_taken_for_no_disputes(disputed):
    log, _, _ = disputed
    head = log.verify().head
    log.path.unlink()
    assert "the log was deleted" in _problems(log)
    assert "the log was deleted" in _problems(log, expect_head=head)


def test_a_cut_or_rolled_back_log_is_reported(disputed):
    log, _, _ = disputed
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(lines[0])  # the log as it was after the first case
    assert "rolled back" in _problems(log)


def test_a_replaced_log_is_reported(disputed, tmp_path: Path):
    log, _, _ = disputed
    other = AuditLog(tmp_path / "other.log", log.store, log_name=log.log_name)
    for i in range(2):
        other.append({"kind": "dispute", "case": 10 + i})
    shutil.copyfile(other.path, log.path)
    assert "replaced" in _problems(log)


def test_rolled_back_scores_or_corrections_are_reported(disputed):
    log, scores, fixes = disputed
    scores.write_bytes(b"scores after case 0")
    assert "scores differ" in _problems(log)
    scores.write_bytes(b"scores after case 1")
    assert check_anchor(log)
    fixes.unlink()
    assert "payments's corrections are missing" in _problems(log)


def test_no_log_and_no_anchor_is_no_disputes_yet(tmp_path: Path):
    store = Keystore.init(tmp_path / "keys")
    log = AuditLog(tmp_path / "run" / "audit.log", store, log_name="feed/audit")
    assert check_anchor(log)
    # ... unless the caller kept a head: then the log existed once.
    assert "deleted" in _problems(log, expect_head="ab" * 32)
    assert check_anchor(log, expect_head=genesis_hash(log.log_name))


@slow
def test_fedscore_audit_reports_a_deleted_log(small_run, tmp_path: Path):
    """Through the command, on a finished run: it said "no disputes yet" and exited 0. On a
    copy of the shared small run (its keystore keeps the copy's anchor under the copy's path)."""
    from simulations.service.session import open_finished

    run, work = tmp_path / "run", tmp_path
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns(".lock"))
    log = open_finished(run).audit_log()
    entry = log.append({"kind": "dispute", "subject_ref": "0" * 16, "silo": "payments",
                        "field": "overdue_count", "value": 0.0, "category": "transaction",
                        "opened": "2026-01-01T00:00:00+00:00", "due": "2026-01-02T00:00:00+00:00",
                        "resolved": "2026-01-01T00:00:00+00:00", "old_score": 600,
                        "new_score": 610, "old_tier": "fair", "new_tier": "fair"})
    ok = run_cli("audit", str(run), "--expect-head", entry.hash, cwd=work)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    log.path.unlink()
    gone = run_cli("audit", str(run), "--expect-head", entry.hash, cwd=work)
    text = " ".join(gone.stdout.split())
    assert gone.returncode == 1, text
    assert "no disputes yet" not in text
    assert "deleted" in text


def test_a_log_behind_its_anchor_is_not_appended_to(disputed):
    """A dispute after a deletion would otherwise start a fresh log and anchor it, hiding the
    deleted cases."""
    from server.audit_log import AuditLogError

    log, _, _ = disputed
    before = log.anchor_path.read_bytes()
    log.path.unlink()
    with pytest.raises(AuditLogError, match="does not match its anchor"):
        log.append({"kind": "dispute", "case": 2})
    assert not log.path.exists() or not log.path.read_bytes()
    assert log.anchor_path.read_bytes() == before


def test_ledger_consistency_names_gaps_doubles_and_lost_steps(tmp_path: Path):
    """The record checks alone (no accountant): what `fedscore ledger verify` adds to them."""
    from simulations.analysis.ledger_verify import consistency

    book = Ledger(tmp_path)
    for r in (1, 2, 3):
        book.append(_line(r))
    (tmp_path / "metrics.json").write_text(json.dumps({"training_steps": 9, "round_trips": 3}))
    assert consistency(tmp_path, checks=[]) == []
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    (tmp_path / "ledger.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    problems = " ".join(consistency(tmp_path, checks=[]))
    assert "carries sequence number 2, expected 1" in problems
    assert "the ledger holds 6 DP-SGD steps, the run trained 9" in problems
    assert "lost" in problems


def test_phases_are_recorded_in_order_and_atomically(tmp_path: Path):
    assert run_phases.first_unfinished(tmp_path) == "align"
    for phase in ("align", "train", "score"):
        run_phases.finish(tmp_path, phase)
    run_phases.finish(tmp_path, "baselines", {"central": {"metrics": {"auc": 0.9}}})
    assert run_phases.first_unfinished(tmp_path) == "audit"
    assert run_phases.federated_done(tmp_path)
    assert run_phases.saved(tmp_path, "baselines") == {"central": {"metrics": {"auc": 0.9}}}
    assert [p.name for p in tmp_path.iterdir()] == [run_phases.PHASES_FILE]  # no temp left
    with pytest.raises(ValueError, match="unknown run phase"):
        run_phases.finish(tmp_path, "bake")
