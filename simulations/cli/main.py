"""`fedscore`: run federated credit-scoring experiments.

  fedscore run --out DIR [--users N] [--seed S] [--set key=value ...]
  fedscore run --resume RUN_DIR        # continue an interrupted run, on its own engine
  fedscore deploy --out DIR [...]      # `run` on the deployment engine (TLS, node auth)
  fedscore certs --out DIR --host H    # TLS and SuperNode keys for separate machines
  fedscore data check DIR             # every problem of a mapping and its tables, at once
  fedscore generate --parties DIR [--users N] [--seed S] [--keystore DIR] [--set population.k=v]
  fedscore sweep --out DIR [--epsilons 0.5,1,2,4,8,inf] [--seeds 0,1,2] [--set key=value ...]
  fedscore tune --out DIR --grid key=v1,v2 --epsilon E   # selection on private labels, accounted
  fedscore finish FLWR_RUN_DIR --parties DIR   # a `flwr run .` output made a run directory
  fedscore report RUN_OR_SWEEP_DIR [--force]   # report.html, tables.tex, report/*.csv
  fedscore compare DIR DIR ... --out DIR [--force]   # runs or sweeps side by side
  fedscore ledger verify RUN_OR_SWEEP_DIR   # every epsilon recomputed with dp-accounting
  fedscore config                      # every --set key: type, default, what it does
  echo PHONE | fedscore score RUN_DIR      # one person's score and reasons (phone on stdin)
  echo PHONE | fedscore dispute RUN_DIR --silo S --field F --value V --category C
  fedscore audit RUN_DIR               # verify the dispute audit log
  fedscore drift RUN_DIR [--drift 0.3] # score a later cohort, population stability index

-v/--verbose goes anywhere on the line; `fedscore COMMAND --help` shows every option's default.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import math
import os
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from clients.protocol.schema import AUTHORITY
from crypto.at_rest import Keystore
from crypto.private_files import PrivateDirError
from crypto.tls import write_credentials
from server.config import ConfigError
from server.guardrails import People, before_training
from simulations.cli import people as cli_people
from simulations.cli.ledger import ledger_command
from simulations.cli.output import console
from simulations.cli.parsing import Parser
from simulations.cli.run import add_finish_parser, finish_command, run_command
from simulations.cli.sweep import add_sweep_parser, sweep_command
from simulations.cli.tune import add_tune_parser, tune_command
from simulations.data.check import inspect
from simulations.data.mapping import MAPPING_HELP, DataImportError, resolve_mapping
from simulations.data.paths import check_new_dir
from simulations.data.population import generate, write_parties
from simulations.run.config import (
    POPULATION_PREFIX,
    ExperimentConfig,
    describe_keys,
    make_config,
    parse_assignments,
)
from simulations.run.engine import configure_environment, quiet_engine_logs
from simulations.run.errors import USER_ERRORS

log = logging.getLogger("fedscore")

FORCE_HELP = "replace the report files an earlier report wrote there"
INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT)

def _parser() -> argparse.ArgumentParser:
    p = Parser.top_level(prog="fedscore", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)  # of class Parser, like p

    run = sub.add_parser("run", help="generate parties, train the federation, score, compare",
                         epilog=MAPPING_HELP)
    _run_args(run)
    deploy = sub.add_parser(
        "deploy", help="`run` on Flower's deployment engine: a TLS SuperLink and one "
                       "authenticated SuperNode per silo, on this machine")
    _run_args(deploy)
    deploy.add_argument("--credentials", type=Path, default=None, metavar="DIR",
                        help="TLS and node keys from `fedscore certs` (default: made on first "
                             "use in <parties>.deploy/credentials)")

    certs = sub.add_parser("certs", help="TLS certificates and SuperNode keys for a "
                                         "federation across machines (docs/deployment.md)")
    certs.add_argument("--out", type=Path, required=True, help="new credentials directory")
    certs.add_argument("--host", dest="hosts", action="append", default=[],
                       help="the SuperLink's host name or IP (repeat for several; default "
                            "127.0.0.1 and localhost)")
    certs.add_argument("--silos", default="payments,social,device",
                       help="one node key per silo, comma-separated")

    add_sweep_parser(sub, users_help=_shortcut_help("users"))
    add_tune_parser(sub, users_help=_shortcut_help("users"))

    _tool_parsers(sub)
    add_finish_parser(sub)

    _report_parsers(sub)
    cli_people.add_parsers(sub)
    return p


def _tool_parsers(sub: argparse._SubParsersAction) -> None:
    """data check, generate, config, ledger verify, keys."""
    data = sub.add_parser("data", help="real-data tools (fedscore data check DIR)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check", help="validate mapping.json and every party's table; report every problem",
        description="Validate a real-data directory before a run: the mapping, every party's\n"
                    "table, labels and identifiers, and who the parties share (counted on\n"
                    "keyed hashes). Exit code 2 when there are problems, 0 when clean.",
        epilog=MAPPING_HELP)
    check.add_argument("dir", metavar="uci|FILE.csv|DIR",
                       help="the data, as for `fedscore run --data`")
    check.add_argument("--set", dest="assignments", action="append", default=[],
                       metavar="KEY=VALUE", help="the run's config keys, for the privacy "
                       "guardrails on this many people (see `fedscore config`)")

    gen = sub.add_parser("generate", help="write a generated population's party tables")
    gen.add_argument("--parties", type=Path, required=True, help="directory for party tables")
    gen.add_argument("--overwrite", action="store_true", help="replace existing tables")
    gen.add_argument("--keystore", type=Path, default=None,
                     help="write the tables encrypted with this keystore (fedscore keys init)")
    _population_args(gen)

    sub.add_parser("config", help="list every --set key with its type, default and what it "
                                  "does")

    led = sub.add_parser("ledger", help="privacy ledger tools")
    led_sub = led.add_subparsers(dest="ledger_command", required=True)
    verify = led_sub.add_parser(
        "verify", help="recompute every party's epsilon with Google's dp-accounting, for a run "
                       "or each cell of a sweep (exit 1 when any ledger does not verify)"
    )
    verify.add_argument("run_dir", type=Path, metavar="RUN_OR_SWEEP_DIR")

    keys = sub.add_parser("keys", help="keystores for encryption at rest")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="create a keystore (0700 directory, 0600 keys)")
    init.add_argument("dir", type=Path)
    init.add_argument("--suite", default="aes-256-gcm", choices=["aes-256-gcm", "sm4-gcm"],
                      help="cipher suite: AES-256-GCM, or SM4-GCM with HMAC-SM3 references")
    rotate = keys_sub.add_parser("rotate", help="add a key and make it active")
    rotate.add_argument("dir", type=Path)


def _report_parsers(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="write report.html, tables.tex and report/*.csv "
                                           "into a run or sweep directory")
    report.add_argument("dir", type=Path, metavar="RUN_OR_SWEEP_DIR")
    report.add_argument("--force", action="store_true", help=FORCE_HELP)
    compare = sub.add_parser("compare", help="one report comparing runs or sweeps (e.g. the "
                                             "vertical and horizontal topologies): one series per "
                                             "configuration, intervals, each one's oracle")
    compare.add_argument("dirs", type=Path, nargs="+", metavar="RUN_OR_SWEEP_DIR")
    compare.add_argument("--out", type=Path, required=True, help="directory for the report")
    compare.add_argument("--force", action="store_true", help=FORCE_HELP)


def _shortcut_help(option: str) -> str:
    """--users and --seed set config keys, whose defaults are the options' defaults."""
    defaults = ExperimentConfig()
    if option == "users":
        return (f"people the authority knows: sets population.users (default: "
                f"{defaults.population.users})")
    return (f"seed of the data and the models: sets population.seed and seed (default: "
            f"{defaults.population.seed} and {defaults.authority.seed})")


def _run_args(run: argparse.ArgumentParser) -> None:
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="new run directory")
    target.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue an interrupted run from its last checkpoint, on the "
                             "engine it started on")
    run.add_argument("--parties", type=Path, default=None,
                     help="party tables (default: <out>.parties, beside the run)")
    run.add_argument("--data", default=None, metavar="uci|FILE.csv|DIR",
                     help="real data instead of the generator: `uci` (../shared/data), a CSV in "
                          "the UCI layout, or a directory of one CSV per party + mapping.json")
    _population_args(run)


def _population_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=None, help=_shortcut_help("users"))
    p.add_argument("--seed", type=int, default=None, help=_shortcut_help("seed"))
    p.add_argument("--set", dest="assignments", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (see `fedscore config`)")


def _generate(args: argparse.Namespace) -> int:
    values = parse_assignments(args.assignments)
    bad = [k for k in values if not k.startswith(POPULATION_PREFIX)]
    if bad:
        raise ConfigError(f"`generate` takes only population.* keys, not {', '.join(bad)}")
    cfg = make_config(values, args.users, args.seed)

    check_new_dir(args.parties, "--parties")
    store = Keystore(args.keystore) if args.keystore else None
    with console.status("generating population"):
        paths = write_parties(generate(cfg.population), args.parties, overwrite=args.overwrite,
                              store=store)
    # Every silo gets an identity key, the roster and the strict default policy, in the
    # keystore the parties run with (storage.keystore=auto without --keystore).
    from clients.protocol.schema import federation_silos
    from clients.silo.enrolment import enrol
    from crypto.at_rest import AUTO, open_keystore

    keys = store if store is not None else open_keystore(AUTO, args.parties)
    enrol(args.parties, federation_silos(args.parties), keys.path if keys is not None else None)
    Console().print(f"wrote {len(paths)} files under {args.parties}")
    return 0


def _data(args: argparse.Namespace) -> int:
    """`fedscore data check`: the summary on stdout, every problem on stderr."""
    try:
        with console.status("checking the data"):
            mapping = resolve_mapping(args.dir)
            checked = inspect(mapping)
    except DataImportError as exc:  # the mapping itself: its problems, no tables read
        _print_problems(exc.problems)
        return 2
    table = Table("party", "file", "identifier column", "rows", "shared with the authority",
                  title=f"fedscore data check {args.dir}")
    for party, name in checked.files.items():
        rows = checked.rows.get(party)
        shared = checked.shared.get(party)
        table.add_row(party, name, checked.id_columns[party],
                      "-" if rows is None else f"{rows:,}",
                      "" if shared is None else f"{shared:,}")
    out = Console()
    out.print(table)
    out.print(f"identifiers: {checked.identifiers}; counted on keyed hashes only",
              soft_wrap=True, highlight=False)
    if checked.joint is not None:
        out.print(f"people held by every party: {checked.joint:,}", highlight=False)
    for silo, columns in checked.text_columns.items():
        listed = ", ".join(f"{c} ({how})" for c, how in columns.items())
        out.print(f"text category columns of {silo}: {listed}", soft_wrap=True, highlight=False)
    if checked.problems:
        _print_problems(checked.problems)
        return 2
    out.print("[green]no problems[/]: ready for fedscore run --data", highlight=False)
    _print_data_guardrails(args, checked.joint, _label_rate(checked, mapping.label))
    return 0


def _print_data_guardrails(args: argparse.Namespace, people: int | None,
                           positive_rate: float | None = None) -> None:
    """What the guardrails (server/guardrails.py) say of a run on these people with the
    configuration given by --set, before any engine: for DP-SGD the sampling only (the noise
    needs the run's calibration)."""
    cfg = make_config(parse_assignments(args.assignments))
    if not people:
        return
    n_train = max(1, math.floor(cfg.authority.split.train * people))
    found = before_training(cfg.authority, People(n_train=n_train, positive_rate=positive_rate))
    out = Console()
    for guardrail in found:
        colour = "red" if guardrail.level == "refuse" else "yellow"
        out.print(f"[{colour}]privacy guardrail ({guardrail.check}, {guardrail.level}):[/] "
                  f"{guardrail.for_operator()}", soft_wrap=True, highlight=False)
    if found:
        out.print(f"(for about {n_train:,} people in training, model.kind="
                  f"{cfg.authority.model.kind}, privacy.epsilon="
                  f"{cfg.authority.privacy.epsilon:g}; change the run with --set KEY=VALUE "
                  "as each message says)", soft_wrap=True, highlight=False)


def _label_rate(checked, label: str) -> float | None:
    """The authority's default rate in its checked table (labels already 0/1 there)."""
    frame = checked.frames.get(AUTHORITY)
    if frame is None or label not in frame or not len(frame):
        return None
    return float(frame[label].astype(float).mean())


def _print_problems(problems) -> None:
    noun = "problem" if len(problems) == 1 else "problems"
    console.print(f"[bold red]{len(problems)} {noun}:[/]", highlight=False)
    for problem in problems:
        console.print(f"  - {problem}", soft_wrap=True, highlight=False, markup=False)


def _config(_: argparse.Namespace) -> int:
    table = Table("key", "type", "default", "description")
    for row in describe_keys():
        table.add_row(*row)
    Console().print(table)
    return 0


def _keys(args: argparse.Namespace) -> int:
    if args.keys_command == "init":
        store = Keystore.init(args.dir, args.suite)
        verb = "created"
    else:
        store = Keystore(args.dir)
        store.rotate()
        verb = "rotated"
    key = store.active()
    Console().print(f"{verb} keystore {args.dir} ({store.suite}); active key {key.key_id.hex()}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    hosts = args.hosts or ["127.0.0.1", "localhost"]
    silos = [s.strip() for s in args.silos.split(",") if s.strip()]
    creds = write_credentials(args.out, hosts, silos)
    out = Console()
    out.print(f"credentials in {creds.root} for SuperLink host(s) {', '.join(hosts)}",
              soft_wrap=True, highlight=False)
    out.print(f"  SuperLink: {creds.server_cert.name}, {creds.server_key.name}; "
              f"every party: {creds.ca_cert.name}", highlight=False)
    for silo in silos:
        out.print(f"  silo {silo}: {creds.node_key(silo)} (private, to that silo only), "
                  f"{creds.node_public_key(silo).name} (register at the SuperLink)",
                  soft_wrap=True, highlight=False)
    return 0


def _report(args: argparse.Namespace) -> int:
    # Here, not at the top: the report's figures load matplotlib (seconds), which no other
    # command needs.
    from simulations.report.compare import build_comparison
    from simulations.report.load import ReportError
    from simulations.report.render import build_report

    target = args.out if args.command == "compare" else args.dir
    existing = [] if args.force else _report_outputs(target)
    if existing:
        console.print(f"[bold red]error:[/] {escape(', '.join(map(str, existing)))} already "
                      f"exist{'s' if len(existing) == 1 else ''}: pass --force to overwrite "
                      "the previous report (nothing was written)", soft_wrap=True,
                      highlight=False)
        return 2
    try:
        with console.status("writing the report"):
            files = (build_comparison(args.dirs, args.out) if args.command == "compare"
                     else build_report(args.dir))
    except ReportError as exc:
        # Handled here rather than in USER_ERRORS so the report stays one self-contained edit.
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    out = Console()
    # soft_wrap: paths are printed whole, so they can be copied from a narrow terminal.
    out.print(f"[bold]{files.kind} report[/] {files.html}", soft_wrap=True, highlight=False)
    out.print(f"[bold]LaTeX tables[/] {files.tex}", soft_wrap=True, highlight=False)
    out.print(f"[bold]{len(files.csvs)} CSVs[/] {files.html.parent / 'report'}", soft_wrap=True,
              highlight=False)
    return 0


def _report_outputs(directory: Path) -> list[Path]:
    """The files and folders of a report already in `directory` (the names
    simulations/report/render.py writes), which a new report would replace."""
    from simulations.report.render import (  # matplotlib: see _report
        CSV_DIR,
        FIGURE_DIR,
        HTML_FILE,
        TEX_DOCUMENT,
        TEX_FILE,
    )

    return [directory / name for name in (HTML_FILE, TEX_FILE, TEX_DOCUMENT, FIGURE_DIR, CSV_DIR)
            if (directory / name).exists()]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.command_line = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,  # Opacus (imported through server.privacy) configures logging on import
    )

    try:
        configure_environment()  # refuses a hijacked private directory in the temp dir
    except PrivateDirError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    quiet_engine_logs(args.verbose)

    try:
        commands = {"run": run_command, "deploy": run_command, "certs": _certs,
                    "sweep": sweep_command, "tune": tune_command, "generate": _generate,
                    "data": _data, "config": _config,
                    "ledger": ledger_command, "keys": _keys, "finish": finish_command,
                    "report": _report, "compare": _report}
        if args.command in cli_people.COMMANDS:
            return cli_people.COMMANDS[args.command](args, console)
        return commands[args.command](args)
    except USER_ERRORS as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt as exc:
        console.print("[yellow]interrupted[/]")
        resume = getattr(exc, "resume", None)  # rundir.Interrupted: how to go on
        if resume:
            console.print(f"Continue it with:\n  {resume}", soft_wrap=True, highlight=False)
        return INTERRUPTED


def entry() -> int:
    """The `fedscore` command: `main`, then the process ends. Its last garbage collection
    would walk every object of torch, Ray and pandas (1.1 s on a quiet machine after the
    imports alone, 0.2 s frozen; 4-9 s on a busy one, longer than an interrupted run takes to
    stop), and nothing there needs collecting, so the objects are left out of it. Only here:
    `main` called in a longer-lived process (the tests, the Python API) must not freeze the
    caller's objects for good."""
    code = main()
    gc.freeze()
    if code == INTERRUPTED:
        _exit_interrupted(code)
    return code


def _exit_interrupted(code: int) -> None:
    """After Ctrl-C, end the process as Python would, less the teardown of its modules: that
    teardown (torch's, Ray's, pandas' objects freed one by one) took 1.5-2 s of the 5 s an
    interrupted run may take to stop, on a busy 2-core machine. The exit handlers still run
    (Ray's shutdown, temporary directories, logging) and the output is flushed; the run's own
    files were written before `main` returned. With a thread still at work (Python's exit
    would wait for it, and it may be writing a file), this returns and Python ends as usual."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())
