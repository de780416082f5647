"""`fedscore finish`: a `flwr run .` output completed into an ordinary run directory.

Under Flower's own launcher the ServerApp writes what the authority measured into
`<out-dir>/<run id>/`: authority.json, ledger.jsonl, the scores and split (encrypted with the
run's keystore) and phases.json. What `fedscore run` adds after the federation (baselines on
the joined tables, the oracle from the generator's truth, the audit, curves.json,
manifest.json, config.json, run.json and last metrics.json) is missing, so `fedscore report`
has nothing to read. `finish_flwr_run` adds exactly that with `fedscore run`'s own
`finish_run`, so the directory is then a run directory like any other.

Where the configuration comes from: the authority's settings are recorded in authority.json
(`config`: everything the ServerApp parsed, [tool.flwr.app.config] with the `--run-config`
overrides); the population's in the parties' simulation/population.json. pyproject.toml is
never read: it holds the defaults, not the overrides the run was given. Parties imported from
real data record no source name, so `--data` says which.

Writes are whole or absent (config.json and run.json by rename, the baselines and audit into
phases.json, metrics.json last): a failed or interrupted finish is retried with the same
command, which reuses the phases already done.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path

from crypto.at_rest import AtRestError, Keystore, keystore_path
from crypto.private_files import write_atomic
from server import run_phases
from server.config import ConfigError
from server.run_lock import claim
from server.run_phases import PhaseTimer
from server.scores_file import SCORES_FILE, recorded_run_key
from server.server_app import FAILURE_FILE
from simulations.data.paths import (
    FLWR_ENGINE,
    RUN_FILE,
    Parties,
    RunDirError,
    finish_command,
    resume_command,
    run_record,
)
from simulations.data.population import PopulationConfig
from simulations.data.real_data import SOURCE_FILE
from simulations.run.config import ExperimentConfig, make_config
from simulations.run.finish_vertical import finish_run
from simulations.run.rundir import (
    Interrupted,
    Progress,
    Run,
    unclaim_run_dir,
)

AUTHORITY_FILE = "authority.json"


@dataclass(frozen=True, kw_only=True)
class FlwrRun:
    """A `flwr run .` output and what finishing it needs: its configuration (and where each
    part of it was read), its parties and the authority's measurements."""

    out_dir: Path
    parties: Path
    cfg: ExperimentConfig
    authority: dict
    sources: tuple[str, ...]  # where the configuration came from, for the user


def finish_flwr_run(out_dir: Path, parties_dir: Path, data: str | None = None,
                    progress: Progress | None = None) -> tuple[dict, FlwrRun]:
    """Complete the `flwr run .` output in `out_dir`, run on the party tables in
    `parties_dir` (its `data-dir`): returns metrics.json's content and what was finished.
    Everything is checked before anything is written."""
    out_dir, parties_dir = out_dir.resolve(), parties_dir.resolve()
    _check_directory(out_dir)  # before the lock, which would make a missing directory
    try:
        # The ServerApp holds the directory while it runs (a second finish too): refused then.
        with claim(out_dir, "fedscore finish"):
            _check_directory(out_dir)  # it may have finished meanwhile
            target = read_flwr_run(out_dir, parties_dir, data)
            _check_keystore(target)
            return _finish(target, progress), target
    except KeyboardInterrupt as exc:
        # The same command continues it, reusing the phases done (phases.json).
        again = finish_command(out_dir, str(parties_dir))
        raise Interrupted(again + (f" --data {shlex.quote(data)}" if data else "")) from exc


def _finish(target: FlwrRun, progress: Progress | None) -> dict:
    """config.json and run.json, then `fedscore run`'s own finishing."""
    out_dir = target.out_dir
    _record(target)
    run = Run(target.cfg, out_dir, Parties(target.parties), resume=True,
              timer=PhaseTimer(progress), reused=True, authority=dict(target.authority))
    federated = sum(target.authority["seconds"].values())
    # The run's total time includes the federation the authority measured.
    run.t0 = time.perf_counter() - federated
    try:
        try:
            return finish_run(run, federated)
        except (ValueError, FileNotFoundError) as exc:
            if "join" in run.timer.seconds:
                raise
            # The scores' keyed references are not the parties' people, or the parties never
            # ran (no pepper): plaintext runs; an encrypted run's keystore check refuses other
            # parties first.
            raise RunDirError(f"this run's scores cannot be joined with the party tables in "
                              f"{target.parties} ({exc}); if those are not the run's parties, "
                              "pass as --parties the data-dir the run was given") from None
    except BaseException:
        # Stopped before the baselines were kept (other parties' tables, say): the directory
        # goes back to what `flwr run .` left, so the retry may name other parties. Later,
        # the record stays: the retry continues from there.
        if run_phases.saved(out_dir, "baselines") is None:
            unclaim_run_dir(out_dir)
        raise


def _check_directory(out_dir: Path) -> None:
    """Refuse what is not an unfinished `flwr run .` output, naming what to do instead."""
    if not out_dir.is_dir():
        raise RunDirError(f"{out_dir} is not a directory; pass the run directory `flwr run .` "
                          "wrote: <out-dir>/<Flower run id>")
    if (out_dir / "metrics.json").exists():
        raise RunDirError(f"{out_dir} is finished already (metrics.json exists); nothing to "
                          f"do: fedscore report {out_dir}")
    failure = out_dir / FAILURE_FILE
    if failure.exists():
        why = json.loads(failure.read_text())
        raise RunDirError(f"the Flower run in {out_dir} failed ({why.get('error')}: "
                          f"{why.get('message')}); nothing to finish: fix the cause and run "
                          "`flwr run .` again")
    if not (out_dir / AUTHORITY_FILE).exists():
        raise RunDirError(f"{out_dir} holds no {AUTHORITY_FILE}: the federation has not "
                          "finished (it is still running, or stopped before scoring: see "
                          "Flower's log); nothing to finish yet")
    how = run_record(out_dir)
    if how is not None and how.get("engine") != FLWR_ENGINE:
        raise RunDirError(f"{out_dir} is a fedscore run, not a `flwr run .` output; continue "
                          f"it with: {resume_command(out_dir)}")


def read_flwr_run(out_dir: Path, parties_dir: Path, data: str | None) -> FlwrRun:
    """The run's configuration: the authority's from authority.json, the population's from
    the parties (or `data`, or what an earlier attempt recorded, for imported real data)."""
    authority = json.loads((out_dir / AUTHORITY_FILE).read_text())
    recorded = authority.get("config")
    if not isinstance(recorded, dict):
        raise ConfigError(
            f"{out_dir / AUTHORITY_FILE} records no run configuration, so the run's settings "
            "are unknown (pyproject.toml holds only the defaults, not the --run-config it ran "
            "with); it cannot be finished: run it again with this version")
    how = run_record(out_dir)
    if how is not None and Path(how["parties"]) != parties_dir:
        raise RunDirError(f"{out_dir} is being finished with the parties in {how['parties']}; "
                          f"continue with: {finish_command(out_dir, how['parties'])}")
    population, source = _population(out_dir, parties_dir, data)
    cfg = replace(make_config(recorded), **population)
    sources = (f"authority settings: {out_dir / AUTHORITY_FILE} (as the ServerApp ran)", source)
    return FlwrRun(out_dir=out_dir, parties=parties_dir, cfg=cfg, authority=authority,
                   sources=sources)


def _population(out_dir: Path, parties_dir: Path, data: str | None) -> tuple[dict, str]:
    """The generated population's config, or the `data` source of parties imported from real
    data (ExperimentConfig fields), with where it was read."""
    parties = Parties(parties_dir)
    if parties.population_json.exists():
        if data is not None:
            raise ConfigError(f"{parties_dir} holds a generated population "
                              f"({parties.population_json}); --data is for parties imported "
                              "from real data: drop it")
        population = PopulationConfig.from_json(parties.population_json.read_text())
        return {"population": population}, f"population: {parties.population_json}"
    if (parties_dir / SOURCE_FILE).exists():
        data = data or _earlier_data(out_dir)
        if not data:
            raise ConfigError(f"{parties_dir} holds parties imported from real data, which "
                              "record no source name: say which with --data uci|FILE.csv|DIR, "
                              "as given to `fedscore run --data`")
        return {"data": data}, f"data: {data} (real data: no oracle)"
    raise RunDirError(f"{parties_dir} holds no party tables of a run (neither "
                      f"simulation/population.json nor {SOURCE_FILE}): pass as --parties the "
                      "data-dir the run was given")


def _earlier_data(out_dir: Path) -> str | None:
    """The `data` an interrupted earlier finish recorded in config.json."""
    path = out_dir / "config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("data") or None


def _check_keystore(target: FlwrRun) -> None:
    """The keystore the run wrote its scores with must be the one `--parties` leads to (never
    created here: a wrong --parties must not leave a new keystore behind)."""
    setting = target.cfg.authority.storage.keystore
    path = keystore_path(setting, target.parties)
    if path is None:
        if not (target.out_dir / SCORES_FILE).exists():
            raise RunDirError(f"{target.out_dir} has no {SCORES_FILE}, though the run stored "
                              "plaintext (storage.keystore=none); nothing to finish")
        return
    where = (f"storage.keystore={setting} with --parties {target.parties}: pass the data-dir "
             "the run was given, beside its keystore")
    if not path.is_dir():
        raise AtRestError(f"no keystore at {path} ({where})")
    try:
        run_key = recorded_run_key(Keystore(path), target.out_dir)
    except AtRestError as exc:
        raise AtRestError(f"{exc} ({where})") from None
    if run_key != target.authority["model"]["run_key"]:
        raise AtRestError(f"the keystore {path} records another run in {target.out_dir} "
                          f"({where})")


def _record(target: FlwrRun) -> None:
    """config.json and run.json, as `fedscore run` writes them when it claims a run; each
    whole or not at all."""
    write_atomic(target.out_dir / "config.json", json.dumps(target.cfg.flat(), indent=2) + "\n",
                 public=True)
    write_atomic(target.out_dir / RUN_FILE,
                 json.dumps({"parties": str(target.parties), "engine": FLWR_ENGINE}) + "\n",
                 public=True)
