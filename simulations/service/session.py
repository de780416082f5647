"""Work on a finished run through a new federation session: look a person up, settle a
dispute, score a later cohort for drift.

Each opens Flower's simulation engine on the run's party tables, has every silo restore its
final-round model (server/rescore.py) and then does its work. A person is named by phone number,
read from stdin, a prompt or a file (never the command line: simulations/cli/people.py); it is
turned into the run's keyed subject reference (HMAC under the authority's pepper) at once, and
only row positions travel to the silos.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.protocol.schema import AUTHORITY, authority_schema, federation_silos
from clients.silo.app import make_client_app
from crypto.at_rest import REF_HASH, Keystore
from crypto.identity import IdentifierError, keyed_refs, load_or_create_pepper, normalize_ids
from server import rescore
from server.audit_log import AuditLog
from server.federation import Federation, federation_roster
from server.rescore import RescoreError, Scorer
from server.scores_file import PEPPER_FILE, read_scores, write_scores
from simulations.data.paths import run_keystore, run_parties
from simulations.run.config import ExperimentConfig, from_flat
from simulations.run.engine import run_federation
from simulations.service.channel import request

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[..., None]

# Hours to settle a dispute, by category, as the seeds promise.
DUE_HOURS = {"transaction": 24, "identity_theft": 48, "system_error": 72}
AUDIT_FILE = "audit.log"


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    cfg: ExperimentConfig
    parties: Path
    keystore: Path | None
    scorer: Scorer

    @property
    def store(self) -> Keystore | None:
        return Keystore(self.keystore) if self.keystore else None

    def audit_log(self) -> AuditLog:
        if self.store is None:
            raise RescoreError("disputes keep an encrypted audit log, and this run has "
                               "storage.keystore=none; run again with a keystore")
        return AuditLog(self.run_dir / AUDIT_FILE, self.store,
                        log_name=f"{self.scorer.run_key}/audit")


def open_finished(run_dir: Path) -> FinishedRun:
    run_dir = run_dir.resolve()
    if not (run_dir / "run.json").exists():
        raise RescoreError(f"{run_dir} is not a fedscore run directory (no run.json)")
    cfg = from_flat(json.loads((run_dir / "config.json").read_text()))
    keystore = run_keystore(run_dir)
    scorer = Scorer.from_run(run_dir, keystore=keystore)
    return FinishedRun(run_dir, cfg, run_parties(run_dir), keystore, scorer)


def run_session(run: FinishedRun, work: Callable[[Federation, Scorer], T],
                progress: Progress | None = None) -> T:
    """`work(fed, scorer)` inside a federation session whose silos restored the run's models."""
    cfg = run.cfg.authority
    outcome: dict[str, object] = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            fed = Federation(grid, federation_silos(run.parties), cfg.join_timeout,
                             cfg.reply_timeout, cfg.retries,
                             roster=federation_roster(run.parties))
            fed.connect()
            if progress:
                progress("connect", 1, 1)
            rescore.restore(fed, run.scorer)
            outcome["value"] = work(fed, run.scorer)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    if progress:
        progress("connect", 0, None)
    client = make_client_app(run.parties, run.keystore, plaintext=run.keystore is None)
    run_federation(app, client, silos=len(federation_silos(run.parties)))
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    if "value" not in outcome:
        raise RuntimeError("the federation session ended before its work was done")
    return outcome["value"]  # type: ignore[return-value]


def subject(run: FinishedRun, phone: str) -> tuple[int, str, pd.DataFrame]:
    """(position, keyed reference, scores) of the person with this phone number in the run."""
    authority = run.parties / AUTHORITY
    try:
        e164 = normalize_ids(pd.Series([phone]), authority_schema(authority).id_format)
    except IdentifierError as exc:
        raise RescoreError(f"the phone number given: {exc}") from None
    pepper_file = authority / PEPPER_FILE
    if not pepper_file.exists():
        raise RescoreError(f"{pepper_file} is missing: the authority's pepper made this run's "
                           "subject references; restore it from backup")
    ref_hash = REF_HASH[run.store.suite] if run.store else "sha256"
    ref = str(keyed_refs(e164.to_numpy(), load_or_create_pepper(pepper_file), ref_hash)[0])
    scores = read_scores(run.run_dir, run.keystore)
    where = np.flatnonzero(scores["subject_ref"].to_numpy() == ref)
    if len(where) != 1:
        raise RescoreError("nobody with that phone number was scored in this run (the "
                           "authority does not know them, or no silo holds them)")
    return int(where[0]), ref, scores


def lookup(run_dir: Path, phone: str, repeat: int = 1, progress: Progress | None = None
           ) -> dict:
    """One person's score and reasons through the federation; `repeat` times, for latency.
    Goes through `fedscore serve` when one serves the run."""
    run = open_finished(run_dir)
    position, ref, scores = subject(run, phone)
    row = scores.iloc[position]
    if _ineligible(row):
        return {"subject_ref": ref, "position": position, **_plain(row.to_dict()),
                "latency": None}
    answer = request(run.run_dir, {"op": "score", "position": position, "ref": ref,
                                         "repeat": repeat})
    if answer is None:
        answer = run_session(run, lambda fed, scorer: score_person(fed, scorer, position, ref,
                                                                  repeat), progress)
    return answer


def score_person(fed: Federation, scorer: Scorer, position: int, ref: str, repeat: int = 1
                 ) -> dict:
    if repeat < 1:  # a served request skips the CLI's check; the latency figures need one
        raise ValueError(f"repeat={repeat}: give 1 or more lookups")
    results = [rescore.score(fed, scorer, np.array([position])) for _ in range(repeat)]
    seconds = np.array([r.seconds for r in results])
    row = results[-1].frame.iloc[0].to_dict()
    return {"subject_ref": ref, "position": position, **_plain(row),
            "latency": {"trips": len(seconds), "p50": float(np.median(seconds)),
                        "p90": float(np.quantile(seconds, 0.9)), "min": float(seconds.min())}}


def dispute(run_dir: Path, phone: str, silo: str, field: str, value: float, category: str,
            progress: Progress | None = None) -> dict:
    """Record the correction at the silo, re-score the person through the federation, update
    the run's scores and append the case to the run's encrypted audit log. Goes through
    `fedscore serve` when one serves the run (no engine start), else opens a session."""
    if category not in DUE_HOURS:
        raise RescoreError(f"--category {category!r}: choose one of {', '.join(DUE_HOURS)}")
    t0 = time.perf_counter()
    run = open_finished(run_dir)
    _checked_audit(run)  # before the engine starts: a broken log stops the case at once
    position, ref, _ = subject(run, phone)
    case: dict[str, Any] = {"position": position, "ref": ref, "silo": silo, "field": field,
            "value": float(value), "category": category,
            "opened": datetime.now(UTC).isoformat(timespec="seconds")}
    answer = request(run.run_dir, {"op": "dispute", **case})
    if answer is None:
        t = time.perf_counter()
        answer = run_session(run, lambda fed, scorer: settle(run, fed, scorer, **case),
                             progress)
        answer["seconds"]["session"] = time.perf_counter() - t
        answer["served"] = False
    answer["seconds"]["total"] = time.perf_counter() - t0
    return answer


def settle(run: FinishedRun, fed: Federation, scorer: Scorer, position: int, ref: str,
           silo: str, field: str, value: float, category: str, opened: str) -> dict:
    """A dispute inside a federation session whose silos restored the run's models."""
    audit = _checked_audit(run)
    scores = read_scores(run.run_dir, run.keystore)
    before = scores.iloc[position]
    timing: dict[str, float] = {}
    t = time.perf_counter()
    rescore.correct(fed, scorer, position, silo, field, value, category)
    timing["correct"] = time.perf_counter() - t
    if _ineligible(before):  # the correction stands; the opening conditions still fail
        timing["score"] = 0.0
        after = before
    else:
        scored = rescore.score(fed, scorer, np.array([position]))
        timing["score"] = scored.seconds
        after = scored.frame.iloc[0]
        _revise(run, scores, position, scored.frame)
    start = datetime.fromisoformat(opened)
    record = {
        "kind": "dispute", "subject_ref": ref, "silo": silo, "field": field,
        "value": float(value), "category": category, "opened": opened,
        "due": (start + timedelta(hours=DUE_HOURS[category])).isoformat(timespec="seconds"),
        "resolved": datetime.now(UTC).isoformat(timespec="seconds"),
        "old_score": _int(before["score"]), "new_score": _int(after["score"]),
        "old_tier": _str(before["tier"]), "new_tier": _str(after["tier"]),
    }
    entry = audit.append(record)
    log.info("dispute settled: score %s -> %s", record["old_score"], record["new_score"])
    return {**record, "seq": entry.seq, "head": entry.hash,
            "reasons": _plain(after.to_dict()), "seconds": timing}


def _revise(run: FinishedRun, scores: pd.DataFrame, position: int, new: pd.DataFrame) -> None:
    """The run's scores with the person's new score, reasons and a `revised` mark."""
    scores = scores.copy()
    if "revised" not in scores:
        scores["revised"] = False
    for column in new.columns:
        if column in scores.columns:
            scores.loc[scores.index[position], column] = new[column].iloc[0]
    scores.loc[scores.index[position], "revised"] = True
    write_scores(run.run_dir, scores, run.store, run.scorer.run_key)


def _checked_audit(run: FinishedRun) -> AuditLog:
    audit = run.audit_log()
    if audit.path.exists():
        checked = audit.verify()
        if not checked:
            raise RescoreError(f"{audit.path} does not verify ({checked.reason}); investigate "
                               "with fedscore audit before appending to it")
    return audit


def _ineligible(row: pd.Series) -> bool:
    return "status" in row and str(row["status"]) == "ineligible"


def _int(value: object) -> int | None:
    # A table cell: pandas types it as object; when present it is a number.
    return None if pd.isna(value) else int(value)  # type: ignore[call-overload]


def _str(value: object) -> str | None:
    return None if pd.isna(value) else str(value)


def _plain(row: dict) -> dict:
    return {k: (None if pd.isna(v) else v.item() if isinstance(v, np.generic) else v)
            for k, v in row.items()}
