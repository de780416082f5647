"""A run directory: claimed once, reopened to resume, filled with results.

config.json (resolved) and run.json (parties, engine) when claimed; manifest.json (versions,
commit, seed, timings), curves.json and last metrics.json, whose presence marks the run
finished, when done. Party tables live elsewhere (simulations/data/paths.py).
"""

from __future__ import annotations

import io
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from crypto.at_rest import Keystore, open_keystore, read_party_file
from crypto.private_files import write_atomic
from server import checkpoint, run_phases
from server.config import ConfigError
from server.metrics import auc
from server.run_lock import LOCK_FILE, held_token, holder
from server.run_phases import PhaseTimer
from simulations.data.paths import (
    FLWR_ENGINE,
    RUN_FILE,
    Parties,
    RunDirError,
    check_new_dir,
    resume_command,
)
from simulations.run.config import ExperimentConfig, from_flat, make_config

Progress = Callable[..., None]

log = logging.getLogger(__name__)


def unclaim_run_dir(out_dir: Path) -> None:
    """Undo open_run's files when an input is refused before the engine starts, so the same
    --out is free again once the input is fixed. Only what open_run wrote goes."""
    for name in ("config.json", RUN_FILE):
        (out_dir / name).unlink(missing_ok=True)


def claim_run_dir(out_dir: Path, *, clear_failed: bool = False) -> None:
    """Refuse an --out that holds results; accept a new or empty one, or one holding only a
    run that failed before anything could be resumed (`failed_run`): a failed run never
    blocks its own --out. `clear_failed` (under the run's lock, `open_run`) removes that
    failed attempt's files."""
    # `--out afile/r` and the like: refused with the path named, before anything is made.
    check_new_dir(out_dir, "--out")
    # The run lock's own file (taken just before) does not count as a result.
    if out_dir.exists() and any(p.name != LOCK_FILE for p in out_dir.iterdir()):
        if not failed_run(out_dir):
            raise RunDirError(f"{out_dir} already holds files; choose a new --out directory "
                              f"(nothing was changed){_resume_hint(out_dir)}")
        if clear_failed:
            _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def resumable(out_dir: Path) -> bool:
    """Whether the run in `out_dir` got far enough to continue from where it stopped: a
    training round finished (the checkpoint) or the whole federated part did (phases.json,
    authority.json: baselines and audit resume from there)."""
    return checkpoint.path(out_dir).exists() or run_phases.federated_done(out_dir)


def failed_run(out_dir: Path) -> bool:
    """Whether `out_dir` holds a run that stopped before its first checkpoint, and that no
    process is running: nothing in it can be resumed, so a retry may start afresh."""
    return ((out_dir / "config.json").exists() and (out_dir / RUN_FILE).exists()
            and not (out_dir / "metrics.json").exists()
            and not resumable(out_dir)
            # Nobody else is running it (this process may hold its lock: the retry).
            and (held_token(out_dir) is not None or holder(out_dir) is None))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run or a sweep, once every process it started had ended. `resume` is
    the command that continues it (None: nothing was left to continue)."""

    def __init__(self, resume: str | None) -> None:
        super().__init__(resume or "")
        self.resume = resume


def _resume_hint(out_dir: Path) -> str:
    command = resume_command(out_dir) if resumable(out_dir) else None
    return f"; it holds an unfinished run: {command}" if command else ""


def _clear(out_dir: Path) -> None:
    """Remove a failed run's files (not the lock we hold): the retry's ledger, phases and logs
    must not mix with the failed attempt's."""
    log.warning("%s: removing the files of a run that failed before its first checkpoint, "
                "to start it again", out_dir)
    for entry in out_dir.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def resume_target(out_dir: Path, overrides: dict | None
                  ) -> tuple[ExperimentConfig, Path, dict]:
    """The configuration, parties directory and run.json of an interrupted run in `out_dir`.

    Overrides must agree with the run's own config.json: a resumed run is the same run.
    """
    if not (out_dir / "config.json").exists() or not (out_dir / RUN_FILE).exists():
        raise RunDirError(f"{out_dir} is not a fedscore run directory; nothing to resume")
    if (out_dir / "metrics.json").exists():
        raise RunDirError(f"{out_dir} already finished (metrics.json exists); nothing to resume")
    saved = json.loads((out_dir / "config.json").read_text())
    cfg = from_flat(saved)
    if overrides:
        resolved = cfg.flat()
        asked = make_config({**resolved, **overrides}).flat()
        changed = sorted(k for k in asked if asked[k] != resolved[k])
        if changed:
            raise ConfigError(
                f"cannot resume {out_dir} with a different configuration ({', '.join(changed)} "
                "differ from its config.json); drop those --set options or start a new run"
            )
    how = json.loads((out_dir / RUN_FILE).read_text())
    if how.get("engine") == FLWR_ENGINE:
        raise RunDirError(f"{out_dir} holds a `flwr run .` federation being completed, not an "
                          f"interrupted fedscore run; continue it with: {resume_command(out_dir)}")
    return cfg, Path(how["parties"]), how


@dataclass
class Run:
    """One run directory being filled: what `finish_run` needs after the federation."""

    cfg: ExperimentConfig
    out_dir: Path
    parties: Parties
    resume: bool
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    t0: float = field(default_factory=time.perf_counter)
    timer: PhaseTimer = field(default_factory=lambda: PhaseTimer(None))
    reused: bool = False
    authority: dict = field(default_factory=dict)

    @cached_property
    def keystore(self) -> Keystore | None:
        """The run's keystore (`storage.keystore` against its parties), resolved once for the
        whole run. A missing or leaky keystore stops the run at the first use, before the
        party tables are touched; "auto" creates `<parties>.keys` on first use."""
        return open_keystore(self.cfg.authority.storage.keystore, self.parties.root)

    @property
    def keystore_dir(self) -> Path | None:
        """Where the keystore lives (None: plaintext), for what opens it on its own: the
        parties' apps, the deployed nodes, the experiment's secret."""
        return self.keystore.path if self.keystore is not None else None


def open_run(cfg: ExperimentConfig, out_dir: Path, parties_dir: Path, resume: bool,
             progress: Progress | None = None, how: dict | None = None) -> Run:
    """Claim a new run directory (config.json, run.json), or reopen one to resume. `how`
    (engine, credentials) goes into run.json, so a resumed run runs the same way."""
    if not resume:
        claim_run_dir(out_dir, clear_failed=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.flat(), indent=2) + "\n")
        (out_dir / RUN_FILE).write_text(
            json.dumps({"parties": str(parties_dir), **(how or {})}) + "\n")
    return Run(cfg, out_dir, Parties(parties_dir), resume, timer=PhaseTimer(progress))


def write_results(run: Run, metrics: dict, curves: dict) -> dict:
    """curves.json, manifest.json, then metrics.json: its presence marks the run finished
    (sweeps skip finished cells)."""
    out_dir = run.out_dir
    (out_dir / "curves.json").write_text(json.dumps(curves) + "\n")
    manifest = _manifest(run.cfg, run.started, run.timer.seconds, run.reused)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # Whole or not at all: an interrupt while it is written must not leave a finished-looking
    # run (a sweep never reruns a cell with a metrics.json).
    write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n",
                 public=True)
    run_phases.finish(out_dir, "report")
    return metrics


def oracle_auc(parties: Parties, ids: np.ndarray, y: np.ndarray, store: Keystore | None
                ) -> float:
    path = parties.truth
    if not path.exists():
        path = path.with_name(path.name + ".enc")
    data = read_party_file(path, "simulation", store)
    truth = pd.read_parquet(io.BytesIO(data), columns=["phone", "p_true"])
    idx = pd.Index(truth["phone"].astype(str)).get_indexer(ids)
    if (idx < 0).any():
        raise ValueError("the truth table lacks people the run scored; regenerate the parties")
    return auc(y, truth["p_true"].to_numpy()[idx])


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _manifest(cfg: ExperimentConfig, started: datetime, seconds: dict, reused: bool) -> dict:
    packages = ("fedscore", "flwr", "torch", "opacus", "numpy", "pandas", "pyarrow",
                "cryptography", "ray")
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": _git_commit(),
        "seed": cfg.authority.seed,
        "population_seed": cfg.population.seed if cfg.generated else None,
        "data": cfg.data or "generated",
        "parties_reused": reused,
        "seconds": seconds,
    }
