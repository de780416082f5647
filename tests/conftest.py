"""Shared fixtures. Engine runs go through the CLI in a subprocess, as a user would run them,
each with a private Flower home; one after another, they join the session's Ray head
(tests/ray_head.py) instead of each starting a Ray of its own."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from simulations.run.engine import SILO_ENV
from tests import background, cli_inline, priority, zygote
from tests.ray_head import HEAD, LANE_HEADS, wait_for_agents
from tests.ray_head import stop_all as stop_ray_heads
from tests.resumed_run import resumed_run  # noqa: F401  (a fixture: the shared resumed run)

ENGINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # One Ray worker per test run (simulations/run/engine.py, engine_workers; the session's
    # head has one CPU to match, tests/ray_head.py). The suite's runs are small, so a second
    # worker buys no parallelism on two cores already shared with a background run; it costs
    # its own torch, Opacus and Flower imports and its own copy of the silos' tables. Measured
    # on a loaded machine, the same 3,000-person run: 45-51 s with one worker, 65-69 s with two.
    "FEDSCORE_ENGINE_WORKERS": "1",  # engine.WORKERS_ENV (importing it here loads Flower)
    # One OpenMP thread in this process and every process the suite starts. The suite's
    # models are small, and the background lanes keep both cores busy: two OpenMP threads
    # then wait on each other. Measured on the loaded 2-core machine, test_audit's 400 full
    # steps of a 50x128 MLP: 53 s wall (16.5 s CPU) on two threads, 2.3 s (0.7 s) on one.
    "OMP_NUM_THREADS": "1",
}
os.environ.update(ENGINE_ENV)
torch.set_num_threads(1)  # torch was loaded before the variable was set (imports above)

# No per-example deadline: engine runs share the two cores with the foreground, and a property
# test whose example waited for a core failed on time, not on its property.
settings.register_profile("fedscore", deadline=None)
settings.load_profile("fedscore")


def _compile_sources() -> None:
    """Write the project's bytecode once (about 1 s; nothing when it is current). With
    PYTHONDONTWRITEBYTECODE set, as on the CI machines, no process writes it, so every process
    the suite starts (Ray workers, ClientApp processes, checks: a few hundred) compiled the
    modules it imports again, about 0.5 s of CPU each. Reading bytecode is never turned off."""
    import compileall

    root = Path(__file__).resolve().parents[1]
    for package in ("crypto", "clients", "server", "simulations", "tests"):
        compileall.compile_dir(root / package, quiet=1)


_compile_sources()


def _cli_env(cwd: Path) -> dict[str, str]:
    return {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(cwd / ".flwr"), "COLUMNS": "200"}


def _engine_env(cwd: Path) -> dict[str, str]:
    """_cli_env for a command that may start the engine in the foreground: it joins the
    session's Ray head."""
    return {**_cli_env(cwd), **HEAD.join_env()}


# The parties whose secret streams decide a default run's noise, plans, flips and split; a
# horizontal run's.
FIXED_SECRET_PARTIES = ("authority", "payments", "social", "device")
HORIZONTAL_SECRET_PARTIES = ("region_1", "region_2", "region_3", "server", "simulation")


def fix_secrets(keystore: Path, label: str,
                parties: tuple[str, ...] = FIXED_SECRET_PARTIES) -> None:
    """Give a run's parties fixed randomness secrets, derived from `label`, before the run
    makes fresh ones: a test's run is then the same run on every machine (the guarantee tests
    that need fresh secrets delete these, test_privacy_run.py), so a figure a test asserts
    cannot pass here and fail in CI by the luck of a draw."""
    import hashlib

    from crypto.at_rest import Keystore
    from crypto.private_files import write_private
    from crypto.secret_random import SECRET_FILE

    if keystore.exists():
        return
    Keystore.init(keystore)
    for party in parties:
        write_private(keystore / SECRET_FILE.format(party=party),
                      hashlib.sha256(f"fedscore-test/{label}/{party}".encode()).digest())


def _command(args: tuple[str, ...]) -> str:
    """The subcommand of a fedscore command line (options such as -v may come first)."""
    return next((a for a in args if not a.startswith("-")), "")


def _fix_run_secrets(args: tuple[str, ...], cwd: Path) -> None:
    """`fedscore run --out X` without `--parties` makes X.parties and its keystore
    X.parties.keys: fix the secrets there (see fix_secrets; a sweep's test fixes its own)."""
    if _command(args) != "run" or "--out" not in args or "--parties" in args or \
            any(a.startswith("storage.keystore=") for a in args):
        return
    out = cwd / args[args.index("--out") + 1]
    fix_secrets(out.with_name(out.name + ".parties.keys"), out.name)


# Commands that never start an engine. Each fedscore process spends seconds importing torch,
# Opacus and Flower before it does anything, so these run inside the test process (the suite
# calls them about a hundred times); engine runs keep a process of their own (a fresh Ray).
NO_ENGINE_COMMANDS = frozenset({"config", "ledger", "keys", "audit", "generate", "report", "data",
                                "compare", "certs", "finish"})


def run_cli(*args: str, cwd: Path, timeout: float = 300, engine: bool | None = None
            ) -> subprocess.CompletedProcess:
    """`fedscore ARGS` in `cwd`. `engine=False` says the command must stop before any engine
    starts (a refusal): it then runs in this process with the engine barred, so a refusal
    that comes too late fails the test instead of starting Ray. By default the commands of
    NO_ENGINE_COMMANDS run in this process too, and the others in a subprocess."""
    _fix_run_secrets(args, cwd)
    if engine is False or (engine is None and _command(args) in NO_ENGINE_COMMANDS):
        return cli_inline.run(args, cwd=cwd, env=_cli_env(cwd))
    # A process of its own as far as the command can tell, forked from one that imported the
    # CLI once (tests/zygote.py: 4 s of CPU saved a command).
    env = _engine_env(cwd)
    return zygote.run(HEAD.forking(), args, cwd=cwd, env=env, timeout=timeout)


def run_cli_for(phone: str, *args: str, cwd: Path, timeout: float = 300,
                engine: bool = True) -> subprocess.CompletedProcess:
    """`run_cli` for a command about one person: the phone goes on stdin, as people pass it
    (never on the command line, where `ps` and Ray's job table would show it). `engine=False`:
    a command answered by a served federation, run in this process with the engine barred."""
    if not engine:
        return cli_inline.run(args, cwd=cwd, env=_cli_env(cwd), stdin=f"{phone}\n")
    env = _engine_env(cwd)
    return zygote.run(HEAD.forking(), args, cwd=cwd, env=env, timeout=timeout,
                      input=f"{phone}\n")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    # Tests that await a background run go last, so it has the whole suite to finish in; of
    # those, the ones with work of their own after it first (background.register `early`).
    items.sort(key=lambda item: (background.awaited_by(item),
                                 not background.awaits_early(item)))


def _background_env(cwd: Path) -> dict[str, str]:
    """_cli_env without the faults a foreground test may have set for its own run (a faulty
    silo, an authority failing after a round: run_cli_crashing): a background run starting
    meanwhile must not inherit them. A background run names its own (Command.env)."""
    from server.authority import FAIL_AFTER_ROUND

    return {k: v for k, v in _cli_env(cwd).items()
            if k not in SILO_ENV and k != FAIL_AFTER_ROUND}


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:  # nothing will await them
        return
    if any(background.awaited_by(item) for item in session.items):
        for head in LANE_HEADS:  # here, in the main thread (ray_head.spawn says why)
            head.spawn()
        # The background yields the CPU to the foreground, once the lanes' heads are up: at
        # nice 10 beside the foreground and the deployment engine's start, a head's dashboard
        # agent missed the raylet's 15 s deadline and both lane heads died (two CIs).
        threading.Thread(target=_yield_once_up, name="yield-after-heads", daemon=True).start()
    background.start_for(session.items, _background_env, prepare=_fix_run_secrets,
                         lane_env=lambda lane: LANE_HEADS[lane].join_env(),
                         launch=_launch)


def _yield_once_up() -> None:
    wait_for_agents(list(LANE_HEADS))
    # First: a lane's run waiting for its zygote's imports holds the zygote's lock, and
    # forking() would wait for it too.
    priority.YIELDER.start()
    for head in LANE_HEADS:
        head.forking()  # starts its zygote; the lanes' runs use it once it is ready


def _launch(lane: int | None, args, **how):
    """A background command forked from its lane head's zygote (tests/zygote.py), waiting for
    it if it is still importing: the suite keeps both cores busy throughout, so the 4 s of CPU
    a command's own imports would take are the suite's, and the lanes' first runs crawl beside
    the foreground for minutes whenever they start."""
    return zygote.launch(None if lane is None else LANE_HEADS[lane].forking(wait=True), args,
                         **how)


_SESSION_START = time.time()
_cpu_seen = [time.process_time()]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With FEDSCORE_TIMELINE=FILE, each phase of each test as a line (start from the session's
    start, seconds, CPU seconds of this process since the last phase, phase, test): where the
    suite's time goes, beside the background lanes'. The suite keeps both cores busy, so what
    the foreground burns itself matters as much as how long it takes."""
    path = os.environ.get("FEDSCORE_TIMELINE")
    cpu = time.process_time() - _cpu_seen[0]
    _cpu_seen[0] += cpu
    if path and (report.duration >= 0.5 or cpu >= 0.5):
        with open(path, "a") as out:
            out.write(f"{report.start - _SESSION_START:7.1f} {report.duration:6.1f} "
                      f"{cpu:6.1f} {report.when:8} {report.nodeid}\n")


def pytest_terminal_summary(terminalreporter) -> None:
    lines = background.timings()
    if lines:
        terminalreporter.section("background runs")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    priority.YIELDER.stop()
    background.stop_all()
    stop_ray_heads()


@pytest.fixture(scope="session")
def background_runs():
    """finish(name) -> (one process result per command, work directory) of a background run
    a test module registered (tests/background.py)."""
    return background.finish


def run_cli_crashing(after_round: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI with the authority failing on purpose after `after_round` (its checkpoint
    for that round is written first); the run must then stop with an error."""
    from server.authority import FAIL_AFTER_ROUND

    os.environ[FAIL_AFTER_ROUND] = str(after_round)
    try:
        proc = run_cli(*args, cwd=cwd)
    finally:
        del os.environ[FAIL_AFTER_ROUND]
    assert proc.returncode != 0
    assert f"injected failure after round {after_round}" in proc.stderr
    return proc


def processes_using(flwr_home: Path, *, grace: float = 15.0) -> list[int]:
    """Living processes whose environment names `flwr_home`: every process a Flower launch
    starts inherits it, and each test's home is private, so these are the test's own. A process
    already told to stop may take a moment to go (Ray's workers after their raylet): it counts
    only if it is still there after `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        pids = _living_with(f"FLWR_HOME={flwr_home}\0".encode())
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


def _living_with(env_entry: bytes) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if env_entry in (proc / "environ").read_bytes() and \
                    "State:\tZ" not in (proc / "status").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def assert_no_identifiers(run_dir: Path) -> None:
    """No phone number of the run's people, nor an unkeyed hash of one, in any file of the run
    directory (scores, logs, reports, the audit log, drift reports)."""
    import hashlib
    import re

    import pandas as pd

    from crypto.at_rest import Keystore
    from server.labels import load_labels

    parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    keys = Keystore(parties.with_name(parties.name + ".keys"))
    if (parties / "authority").exists():
        e164, _ = load_labels(parties / "authority", keys)
    else:  # the horizontal topology: each region holds its own customers
        from clients.region.data import listed_regions, load_region

        e164 = pd.concat([load_region(parties / r, r, keys).ids
                          for r in listed_regions(parties)])
    digits = set(e164.str.slice(1)) | set(e164.str.slice(3))
    hashes = {hashlib.sha256(v.encode()).hexdigest() for v in e164}
    hashes |= {hashlib.md5(v.encode()).hexdigest() for v in e164}
    for path in run_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            text = pd.read_parquet(path).astype(str).to_csv()
        else:
            text = path.read_bytes().decode("latin-1")
        found_digits = set(re.findall(r"\d{11,13}", re.sub(r"[ \-()+]", "", text)))
        assert not found_digits & digits, f"a phone number appears in {path.name}"
        assert not set(re.findall(r"[0-9a-f]{32,64}", text)) & hashes, path.name
        for h in hashes:
            assert h[:32] not in text, f"an unkeyed hash appears in {path.name}"


def scores_of(run_dir: Path, with_split: bool = False):
    """A run's scores, decrypted with its automatic keystore (`<parties>.keys`); with the
    authority's private split (the experiment layer's view) when asked."""
    import json

    from server.scores_file import read_scores

    parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    return read_scores(run_dir, parties.with_name(parties.name + ".keys"), with_split)


SMALL_RUN_ARGS = ("--users", "3000", "--seed", "7",
                  "--set", "train.epochs=2", "--set", "train.batch_size=256",
                  "--set", "train.chunk_batches=1", "--set", "privacy.epsilon=inf",
                  "--set", "privacy.label_epsilon=inf",
                  # the research switch: reasons reveal per-silo points
                  "--set", "explain.reasons=4")
# Early: two of its tests serve and score people on a private Ray (25 s each) after it.
background.register("small_run", lambda work: [("run", "--out", str(work / "run"),
                                                *SMALL_RUN_ARGS)], early=True)


@pytest.fixture(scope="session")
def small_run(background_runs) -> Path:
    """One small federated run with one batch per round trip (no staleness), shared by the
    end-to-end tests; made in the background while the suite runs (tests/background.py)."""
    return _finished_run(background_runs, "small_run")


def _finished_run(background_runs, name: str) -> Path:
    (proc,), work = background_runs(name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "run"


# Split learning without protection, one batch per round trip, every message captured: the
# red team's open run (test_attacks.py: the silos read labels from their gradient vectors) and
# the concat mode's exactness (test_concat.py: no staleness, so the federation is the central
# model step for step) check different things of this one run.
CONCAT_RUN_ARGS = ("--users", "2000", "--seed", "7",
                   "--set", "aggregation.mode=concat", "--set", "model.embedding_dim=3",
                   "--set", "train.epochs=2", "--set", "train.batch_size=256",
                   "--set", "train.chunk_batches=1", "--set", "privacy.epsilon=inf",
                   "--set", "privacy.label_epsilon=inf")


def _concat_commands(work: Path) -> list[background.Command]:
    from clients.protocol.capture import CAPTURE_ENV

    return [background.Command(("-v", "run", "--out", str(work / "run"), *CONCAT_RUN_ARGS),
                               env={CAPTURE_ENV: str(work / "capture")})]


background.register("concat_run", _concat_commands)


@pytest.fixture(scope="session")
def concat_run(background_runs) -> tuple[Path, Path, str]:
    """The shared concat run: (run directory, capture directory, its -v output)."""
    (proc,), work = background_runs("concat_run")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return work / "run", work / "capture", proc.stdout + proc.stderr


PRIVATE_RUN_ARGS = ("--users", "8000", "--seed", "5",
                    "--set", "train.epochs=3", "--set", "train.batch_size=256",
                    "--set", "train.chunk_batches=1",
                    "--set", "privacy.epsilon=32", "--set", "privacy.cap=28",
                    "--set", "privacy.label_epsilon=5", "--set", "privacy.accountant=rdp")


background.register("private_run", lambda work: [("run", "--out", str(work / "run"),
                                                  *PRIVATE_RUN_ARGS)])


@pytest.fixture(scope="session")
def private_run(background_runs) -> Path:
    """A small private run: DP-SGD at combined eps 32 with a cap at 28 (so it stops early; a
    few thousand people learn little at smaller budgets once the epsilon is the combined
    model's, and 8,000 keep the test AUC's noise small), label DP at eps 5, RDP accounting.
    Made in the background while the suite runs."""
    return _finished_run(background_runs, "private_run")


# ---- one interrupted run and its uninterrupted twin, shared by the modules that check them ----

INTERRUPTED_RUN_ARGS = ("--users", "3000", "--seed", "3", "--set", "train.epochs=2",
                        "--set", "train.batch_size=256")


def _interrupted_commands(work: Path) -> list[background.Command]:
    """The interrupted run and its twin as one background run (see `interrupted_runs`)."""
    import shutil

    from clients.silo.training import SILO_FAULT

    crashed, full = work / "crashed", work / "full"
    parties = crashed.with_name(crashed.name + ".parties")
    keys = parties.with_name(parties.name + ".keys")
    args = (*INTERRUPTED_RUN_ARGS, "--set", f"storage.keystore={keys}")

    def stopped_as_it_should(work: Path) -> None:
        """What the stop left, checked and kept before the resume removes it."""
        if not (crashed / "checkpoint" / "authority.npz").exists():
            raise AssertionError("the stopped run left no authority checkpoint")
        if (crashed / "metrics.json").exists():
            raise AssertionError("the stopped run wrote metrics.json")
        (crashed / "stderr.txt").write_text((work / "cli-1.stderr").read_text())
        shutil.copytree(crashed / "checkpoint", work / "stopped-checkpoint")

    def without_secrets(work: Path) -> None:
        """A copy of the parties and keystore whose randomness secrets are gone (the tables'
        data keys kept; the silos' checkpoints are the run's, not the tables')."""
        from crypto.secret_random import SECRET_FILE

        shutil.copytree(parties, work / "fresh.parties",
                        ignore=shutil.ignore_patterns("checkpoints"))
        shutil.copytree(keys, work / "fresh.parties.keys")
        for path in (work / "fresh.parties.keys").glob(SECRET_FILE.format(party="*")):
            path.unlink()

    fresh = ("--parties", str(work / "fresh.parties"), *INTERRUPTED_RUN_ARGS,
             "--set", f"storage.keystore={work / 'fresh.parties.keys'}")
    return [
        background.Command(("keys", "init", str(keys), "--suite", "sm4-gcm")),
        background.Command(("run", "--out", str(crashed), *args),
                           env={SILO_FAULT: "payments:3:shape"}, expect=2,
                           before=lambda _: _fix_secrets_in(keys, crashed.name)),
        background.Command(("run", "--resume", str(crashed)), before=stopped_as_it_should),
        # A process of its own: the resumed run came from the lane's zygote, and two runs
        # forked from one share Python's hash seed (an order that follows it would agree).
        background.Command(("run", "--out", str(full), "--parties", str(parties), *args),
                           fresh=True),
        # test_privacy_run's rerun with fresh randomness secrets (its rerun with the same
        # keystore is `full` itself: the second run of `crashed`'s parties and keystore).
        background.Command(("run", "--out", str(work / "fresh"), *fresh),
                           before=without_secrets),
    ]


background.register("interrupted_runs", _interrupted_commands)


@pytest.fixture(scope="session")
def interrupted_runs(background_runs) -> dict[str, Path]:
    """A run with a keystore of the national-standard suite (SM4-GCM, HMAC-SM3 references;
    every other run in the suite uses the default AES-256-GCM keystore), stopped at round 3 by
    a faulty silo (payments sends one contribution too few), resumed from its round-2
    checkpoint once the silo behaves; and the same run uninterrupted (same parties, same
    keystore); then the uninterrupted run with a copy of both whose randomness secrets are
    gone ("fresh"). Made in the
    background while the suite runs. test_resume checks that the two
    are one run, test_encrypted_run what rests encrypted, test_privacy_run that a rerun with
    the same keystore reproduces it.

    Returns paths: "crashed" (the resumed run), "full", "keys" (the keystore, where the
    automatic one would be: `<parties>.keys`, so scores_of reads both runs), "parties" and
    "stopped_checkpoint" (a copy of the authority's checkpoint as the stop left it; a finished
    run removes its own)."""
    procs, work = background_runs("interrupted_runs")
    outputs = "\n".join(p.stdout[-2000:] + p.stderr[-3000:] for p in procs)
    assert [p.returncode for p in procs] == [0, 2, 0, 0, 0], outputs
    crashed = work / "crashed"
    parties = crashed.with_name(crashed.name + ".parties")
    return {"crashed": crashed, "full": work / "full", "parties": parties,
            "keys": parties.with_name(parties.name + ".keys"),
            "stopped_checkpoint": work / "stopped-checkpoint",
            "fresh": work / "fresh",
            "fresh_keys": work / "fresh.parties.keys"}


def _fix_secrets_in(keystore: Path, label: str) -> None:
    """fix_secrets for a keystore made beforehand (`fedscore keys init`, another suite)."""
    import hashlib

    from crypto.private_files import write_private
    from crypto.secret_random import SECRET_FILE

    for party in FIXED_SECRET_PARTIES:
        write_private(keystore / SECRET_FILE.format(party=party),
                      hashlib.sha256(f"fedscore-test/{label}/{party}".encode()).digest())
