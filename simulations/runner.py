"""One experiment: generate parties, run the federation, compare with baselines and the truth.

The run directory receives config.json (resolved), manifest.json (versions, commit, seed,
timings), metrics.json, authority.json (what the authority itself measured) and scores.parquet.
Party tables live elsewhere (see simulations.paths); nothing here holds a phone number.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from clients.client_app import make_client_app
from clients.schema import AUTHORITY, SILOS, feature_names
from clients.silo_data import load_silo
from crypto.at_rest import Keystore, read_party_file
from server.authority import read_scores
from server.config import ConfigError
from server.labels import load_labels
from server.metrics import auc
from server.server_app import make_server_app
from simulations.baselines import join_parties, train_central
from simulations.config import ExperimentConfig, from_flat, make_config
from simulations.engine import run_federation
from simulations.paths import Parties
from simulations.population import PopulationConfig, generate, write_parties

log = logging.getLogger(__name__)

Progress = Callable[..., None]
PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate",
                "max_grad_norm", "training_steps", "stopped_by_budget_cap")


class RunDirError(FileExistsError):
    """The run directory already holds results."""


def prepare_parties(pop: PopulationConfig, parties: Parties, store: Keystore | None = None
                    ) -> bool:
    """Generate and write the party tables unless the same population is already there;
    encrypted with `store` when given.

    Returns True when existing tables were reused.
    """
    if parties.population_json.exists():
        existing = json.loads(parties.population_json.read_text())
        if existing == json.loads(pop.to_json()):
            return True
        raise RunDirError(
            f"{parties.root} holds party tables of another population; choose another "
            "--parties directory or delete that one"
        )
    write_parties(generate(pop), parties.root, store=store)
    return False


def check_parties(parties: Parties, store: Keystore | None = None) -> dict[str, int]:
    """Validate every party's table before the engine starts; returns row counts."""
    ids, _ = load_labels(parties.party(AUTHORITY), store)
    rows = {AUTHORITY: len(ids)}
    for silo in SILOS:
        rows[silo] = len(load_silo(parties.party(silo), silo, feature_names(silo), store).x)
    return rows


def claim_run_dir(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunDirError(
            f"{out_dir} already holds files; choose a new --out directory (nothing was changed)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


RUN_FILE = "run.json"


def resume_target(out_dir: Path, overrides: dict | None) -> tuple[ExperimentConfig, Path]:
    """The configuration and parties directory of an interrupted run in `out_dir`.

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
    parties = Path(json.loads((out_dir / RUN_FILE).read_text())["parties"])
    return cfg, parties


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: Path,
    parties_dir: Path,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict:
    started = datetime.now(UTC)
    t_total = time.perf_counter()
    seconds: dict[str, float] = {}
    parties = Parties(parties_dir)
    if not resume:
        claim_run_dir(out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.flat(), indent=2) + "\n")
        (out_dir / RUN_FILE).write_text(json.dumps({"parties": str(parties_dir)}) + "\n")

    def phase(name: str, fn: Callable, *args):
        if progress:
            progress(name, 0, None)
        t = time.perf_counter()
        value = fn(*args)
        seconds[name] = round(time.perf_counter() - t, 3)
        if progress:
            progress(name, 1, 1)
        return value

    keystore = cfg.authority.storage.keystore
    # A missing or leaky keystore stops the run here, before anything is written.
    store = Keystore(Path(keystore)) if keystore else None
    reused = phase("generate", prepare_parties, cfg.population, parties, store)
    phase("validate", check_parties, parties, store)

    authority: dict = {}
    t = time.perf_counter()
    run_federation(
        make_server_app(cfg.authority, parties.root, out_dir, progress,
                        on_result=lambda r: authority.update(r.metrics), resume=resume),
        make_client_app(parties.root, Path(keystore) if keystore else None),
        silos=len(SILOS),
    )
    federation_seconds = time.perf_counter() - t
    seconds.update(authority["seconds"])
    seconds["engine"] = round(federation_seconds - sum(authority["seconds"].values()), 3)

    scores = read_scores(out_dir, cfg.authority.storage.keystore)
    ref_hash = authority["subject_ref"].removeprefix("hmac-")
    joined = phase("join", join_parties, parties, scores, ref_hash, store)
    sigma = authority["noise_multiplier"]
    central = phase("baseline_central", train_central, joined, SILOS, cfg.authority)
    central_dp = (
        phase("baseline_central_dp", train_central, joined, SILOS, cfg.authority, sigma)
        if sigma > 0 else None
    )
    # The best single silo, under the run's own privacy.
    payments = phase("baseline_payments", train_central, joined, ("payments",), cfg.authority,
                     sigma)
    test = joined.positions("test")
    oracle = _oracle_auc(parties, joined.ids[test], joined.y[test], store)
    seconds["total"] = round(time.perf_counter() - t_total, 3)

    metrics = {
        **{k: authority[k] for k in ("auc", "ks", "gini", "brier", "log_loss")},
        "oracle_auc": oracle,
        "baseline_central_auc": central.metrics["auc"],
        "baseline_central_dp_auc": central_dp.metrics["auc"] if central_dp else None,
        "baseline_payments_only_auc": payments.metrics["auc"],
        "gap_to_oracle": oracle - authority["auc"],
        "gap_to_central": central.metrics["auc"] - authority["auc"],
        "tiers": authority["tiers"],
        "test_default_rate_by_tier": authority["test_default_rate_by_tier"],
        "seconds": seconds,
        "people": authority["people"],
        "round_trips": authority["round_trips"],
        **{k: authority[k] for k in PRIVACY_KEYS},
        "history": {"federated": authority["history"], "central": central.history,
                    "central_dp": central_dp.history if central_dp else None},
        "baselines": {"central": central.metrics, "payments_only": payments.metrics,
                      "central_dp": central_dp.metrics if central_dp else None},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    manifest = _manifest(cfg, started, seconds, reused)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return metrics


def _oracle_auc(parties: Parties, ids: np.ndarray, y: np.ndarray, store: Keystore | None
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
    versions = {}
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
        "population_seed": cfg.population.seed,
        "parties_reused": reused,
        "seconds": seconds,
    }
