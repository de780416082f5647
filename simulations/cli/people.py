"""`fedscore score | dispute | audit | drift`: the score as people meet it, after a run.

  fedscore score RUN_DIR [--subject-file PATH] [--repeat N] [--lang en|zh]
  fedscore dispute RUN_DIR [--subject-file PATH] --silo payments --field overdue_count --value 0
                   --category transaction|identity_theft|system_error
  fedscore audit RUN_DIR [--expect-head HASH]
  fedscore drift RUN_DIR [--cohort later] [--drift 0.3]
  fedscore serve RUN_DIR               # keep the federation up: score and dispute in ~1 s

The person's phone number never goes on the command line, where every user of the machine sees
it (`ps`) and Ray's job table keeps it: `score` and `dispute` read it from stdin
(`echo 13812345678 | fedscore score RUN_DIR`), from a prompt on a terminal, or from
--subject-file PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from clients.protocol.reasons import reason_text
from server.audit_log import AuditLogError, check_anchor
from server.rescore import RescoreError
from server.run_lock import SERVE, claim, holder
from server.scoring import TIERS
from simulations.service.drift_run import run_drift
from simulations.service.serve import serve as run_server
from simulations.service.session import DUE_HOURS, lookup, open_finished
from simulations.service.session import dispute as settle


def add_parsers(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser("score", help="one person's score, tier and reasons, through the "
                                         "federation")
    score.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _add_subject(score)
    score.add_argument("--repeat", type=int, default=1,
                       help="score this many times in one session and report the latency")
    score.add_argument("--lang", choices=["en", "zh"], default="en", help="reason language")

    dispute = sub.add_parser("dispute", help="correct a silo's record of a person, re-score "
                                             "them and log the case")
    dispute.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _add_subject(dispute)
    dispute.add_argument("--silo", required=True, help="the silo holding the wrong record")
    dispute.add_argument("--field", required=True, help="the field to correct")
    dispute.add_argument("--value", required=True, type=float, help="its corrected value")
    dispute.add_argument("--category", required=True, choices=list(DUE_HOURS),
                         help="transaction (24 h), identity_theft (48 h), system_error (72 h)")
    dispute.add_argument("--lang", choices=["en", "zh"], default="en", help="reason language")

    audit = sub.add_parser("audit", help="verify a run's dispute audit log")
    audit.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    audit.add_argument("--expect-head", default=None, metavar="HASH",
                       help="the head hash printed by the last dispute (catches a cut log)")

    drift = sub.add_parser("drift", help="score a later cohort with behaviour drift and report "
                                         "population stability")
    drift.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    drift.add_argument("--cohort", default="later", help="cohort name (made if missing)")
    drift.add_argument("--drift", type=float, default=0.3,
                       help="behaviour drift of a new cohort: 0 = none, 1 = large")
    drift.add_argument("--seed", type=int, default=None,
                       help="seed of a new cohort (default: the population's seed)")

    serve = sub.add_parser("serve", help="keep a run's federation up so `score` and `dispute` "
                                         "skip the engine start (Ctrl-C stops it)")
    serve.add_argument("run_dir", type=Path, metavar="RUN_DIR")


SUBJECT_HOW = ("give it on stdin (`echo PHONE | fedscore score RUN_DIR`), at the prompt (run "
               "in a terminal), or in a file with --subject-file PATH")


def _add_subject(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subject-file", type=Path, metavar="PATH",
                        help="a file holding the person's phone number (without it: stdin, or "
                             "a hidden prompt on a terminal)")
    # Accepted only to be refused with a clear message (read_subject): the phone would be on
    # the command line already, but not yet in Ray's job table.
    parser.add_argument("--subject", default=None, help=argparse.SUPPRESS)


def read_subject(args: argparse.Namespace) -> str:
    """The person's phone number, from --subject-file, stdin or a prompt; never argv."""
    if args.subject is not None:
        raise RescoreError("--subject PHONE puts the phone number on the command line, where "
                           "every user of this machine can read it (ps) and Ray's job table "
                           f"keeps it; {SUBJECT_HOW}")
    if args.subject_file is not None:
        try:
            text = args.subject_file.read_text()
        except OSError as exc:
            raise RescoreError(f"--subject-file {args.subject_file}: {exc.strerror}") from None
    elif sys.stdin is not None and sys.stdin.isatty():
        text = getpass.getpass("the person's phone number (not echoed): ")
    elif sys.stdin is not None:
        text = sys.stdin.readline()
    else:
        text = ""
    phone = text.strip()
    if not phone:
        raise RescoreError(f"no phone number given; {SUBJECT_HOW}")
    return phone


def _reason_rows(row: dict, lang: str) -> list[tuple[str, str, str, str]]:
    out = []
    for j in range(1, 9):
        code = row.get(f"reason_{j}")
        if code is None:
            continue
        silo, feature = str(code).split(".", 1)
        text = reason_text(silo, feature)
        label, tip = (text.label_zh, text.tip_zh) if lang == "zh" else (text.label_en,
                                                                          text.tip_en)
        out.append((silo, label, f"{row[f'reason_{j}_points']:.1f}", tip))
    return out


def _print_person(row: dict, lang: str, title: str) -> None:
    out = Console()
    tier = next((t for t in TIERS if t.key == row.get("tier")), None)
    status = row.get("status", "scored")
    if status == "ineligible":
        out.print(f"[bold]{title}[/]: ineligible: {row.get('ineligible_reason')}")
        return
    name = f"{tier.key} ({tier.name_zh})" if tier else "-"
    out.print(f"[bold]{title}[/]: score {row['score']}, tier {name}", highlight=False)
    if "points_base" in row:
        parts = ", ".join(f"{k.removeprefix('points_')} {v:+.1f}" for k, v in row.items()
                          if k.startswith("points_") and k != "points_base" and v)
        out.print(f"points: typical person {row['points_base']:.1f}; {parts}", highlight=False)
    reasons = _reason_rows(row, lang)
    if reasons:
        table = Table("silo", "reason", "points", "what helps", title="reason codes")
        for r in reasons:
            table.add_row(*r)
        out.print(table)


def score(args: argparse.Namespace, console: Console) -> int:
    if args.repeat < 1:
        from server.config import ConfigError  # a user error: printed, no traceback

        raise ConfigError(f"--repeat {args.repeat}: give 1 or more lookups (the default is 1)")
    phone = read_subject(args)  # before the spinner: a prompt must be visible
    with console.status("scoring through the federation"):
        result = lookup(args.run_dir, phone, args.repeat)
    _print_person(result, args.lang, f"subject {result['subject_ref'][:12]}…")
    lat = result["latency"]
    if lat is None:
        return 0
    Console().print(f"federation round trip: p50 {1000 * lat['p50']:.0f} ms, "
                    f"p90 {1000 * lat['p90']:.0f} ms over {lat['trips']} trip(s)",
                    highlight=False)
    return 0


def dispute(args: argparse.Namespace, console: Console) -> int:
    phone = read_subject(args)
    with _claimed(args.run_dir, "fedscore dispute"), \
            console.status("recording the correction and re-scoring through the federation"):
        _check_anchored(args.run_dir)
        case = settle(args.run_dir, phone, args.silo, args.field, args.value,
                      args.category)
    out = Console()
    out.print(f"dispute #{case['seq']} ({case['category']}, due {case['due']}): score "
              f"{case['old_score']} -> {case['new_score']}, tier {case['old_tier']} -> "
              f"{case['new_tier']}", highlight=False)
    _print_person(case["reasons"], args.lang, "after the correction")
    sec = case["seconds"]
    how = "served federation" if case.get("served") else \
        f"federation session {sec.get('session', 0):.2f} s"
    out.print(f"took {sec['total']:.2f} s ({how}, correction {1000 * sec['correct']:.0f} ms, "
              f"re-score {1000 * sec['score']:.0f} ms)", highlight=False)
    out.print(f"audit log head: {case['head']}  (keep it: fedscore audit --expect-head)",
              soft_wrap=True, highlight=False)
    return 0


def audit(args: argparse.Namespace, console: Console) -> int:
    log = open_finished(args.run_dir).audit_log()
    # Against the anchor in the keystore, not the log alone: a deleted or rolled-back log, or
    # rolled-back scores or corrections, must not pass as "no disputes yet".
    result = check_anchor(log, expect_head=args.expect_head)
    out = Console()
    if not result:
        for problem in result.problems:
            out.print(f"[bold red]audit log does not verify[/]: {problem}", soft_wrap=True,
                      highlight=False)
        return 1
    if not log.path.exists():
        out.print(f"{log.path}: no disputes yet", soft_wrap=True, highlight=False)
        return 0
    table = Table("#", "subject", "category", "silo.field", "score", "opened", "due",
                  title=f"audit log: {result.entries} entries, chain verified, anchored")
    for i, e in enumerate(log.entries()):
        table.add_row(str(i), f"{e['subject_ref'][:12]}…", e["category"],
                      f"{e['silo']}.{e['field']}", f"{e['old_score']} -> {e['new_score']}",
                      e["opened"], e["due"])
    out.print(table)
    out.print(f"head: {result.head}", highlight=False)
    return 0


def drift(args: argparse.Namespace, console: Console) -> int:
    with _claimed(args.run_dir, "fedscore drift"), \
            console.status(f"scoring cohort {args.cohort!r} through the federation"):
        report = run_drift(args.run_dir, args.cohort, args.drift, args.seed)
    table = Table("population", "PSI", "status", title=f"drift: cohort {args.cohort!r} vs the "
                  "run's people")
    for name, row in report["psi"].items():
        table.add_row(name, f"{row['psi']:.4f}", row["status"])
    out = Console()
    out.print(table)
    out.print(f"mean score {report['mean_score']['before']:.1f} -> "
              f"{report['mean_score']['after']:.1f}; {report['files']['json']}, "
              f"{report['files']['png']}", soft_wrap=True, highlight=False)
    return 0


def _claimed(run_dir: Path, purpose: str) -> contextlib.AbstractContextManager:
    """The run directory for a command that writes into it (server/run_lock.py); when
    `fedscore serve` holds it, the server does the writing under its own lock."""
    if not (run_dir / "run.json").exists():
        return contextlib.nullcontext()  # not a run directory: opening it says so, unchanged
    who = holder(run_dir)
    if who is not None and who.get("purpose") == SERVE:
        return contextlib.nullcontext()
    return claim(run_dir, purpose)


def _check_anchored(run_dir: Path) -> None:
    """Before a dispute changes the scores and the log: they must be what the last dispute
    left (the anchor). A new case on a rolled-back run would anchor the rollback."""
    run = open_finished(run_dir)
    if run.store is None:
        return  # no keystore: the dispute itself refuses (it needs an encrypted log)
    problems = check_anchor(run.audit_log()).problems
    if problems:
        raise AuditLogError(f"{problems[0]}; nothing was changed. Investigate with "
                            f"`fedscore audit {run_dir}` before settling more disputes")


def serve(args: argparse.Namespace, console: Console) -> int:
    stop = threading.Event()
    # Ctrl-C and SIGTERM stop serving while serving; after it they mean what they meant (a
    # caller that runs this in its own process, a test, gets its handlers back).
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}

    def ready(path: Path) -> None:
        console.print(f"serving {args.run_dir} (socket {path}); fedscore score / dispute now "
                      "go through it. Ctrl-C stops.", soft_wrap=True, highlight=False)

    try:
        with console.status("starting the federation and restoring the silos' models"):
            served = run_server(args.run_dir, on_ready=ready, stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print(f"stopped after {served} request(s)")
    return 0


COMMANDS = {"score": score, "dispute": dispute, "audit": audit, "drift": drift, "serve": serve}
