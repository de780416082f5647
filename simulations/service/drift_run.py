"""Drift monitoring: score a later cohort of the run's people with the run's models.

The later cohort is the same people some time on, their behaviour drifted
(`simulations.data.cohort.write_later_cohort`). Every silo scores it with its final-round model,
prepared with the statistics of the table the model was trained on, and reports the population
stability index of its own points (only that number leaves the silo); the authority compares
the score distributions. Thresholds: < 0.1 stable, 0.1..0.25 moderate, >= 0.25 shift.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from clients.protocol.schema import federation_silos
from clients.silo import drift
from server import rescore
from server.federation import Federation
from server.rescore import Scorer
from server.scores_file import read_scores
from server.scoring import TIER_KEYS
from simulations.data.cohort import write_later_cohort
from simulations.service.channel import request
from simulations.service.session import FinishedRun, Progress, open_finished, run_session

log = logging.getLogger(__name__)

DRIFT_DIR = "drift"


def run_drift(run_dir: Path, cohort: str = "later", amount: float = 0.3, seed: int | None = None,
              progress: Progress | None = None) -> dict:
    """Write the cohort if it is new, then score it: through `fedscore serve` when one serves
    the run, else in a session of its own."""
    run = open_finished(run_dir)
    made = not all((run.parties / s / "cohorts" / cohort).exists()
                   for s in _silos(run.parties))
    if made:
        write_later_cohort(run.parties, name=cohort, drift=amount, seed=seed, store=run.store)
    else:
        log.info("cohort %r exists; scoring it as it is (--drift and --seed apply to new "
                 "cohorts only)", cohort)
    answer = request(run.run_dir, {"op": "drift", "cohort": cohort, "made": made})
    if answer is None:
        answer = run_session(run, lambda fed, scorer: drift_report(run, fed, scorer, cohort,
                                                                   made), progress)
    return answer


def drift_report(run: FinishedRun, fed: Federation, scorer: Scorer, cohort: str, made: bool
                 ) -> dict:
    """Score the cohort's scored people, compare, and write drift.json and drift.png."""
    scores = read_scores(run.run_dir, run.keystore)
    scored = scores["score"].notna().to_numpy()
    if "status" in scores:
        scored = scored & (scores["status"].astype(str) == "scored").to_numpy()
    positions = np.flatnonzero(scored)
    later = rescore.score(fed, scorer, positions, cohort=cohort, drift=True, explain=0)
    before = scores["score"].to_numpy()[positions].astype(np.float64)
    after = later.frame["score"].to_numpy().astype(np.float64)
    psi = {"score": _row(drift.psi(before, after))}
    psi |= {f"points_{silo}": _row(value) for silo, value in later.drift.items()}
    tiers_before = _shares(scores["tier"].astype(str).to_numpy()[positions])
    tiers_after = _shares(later.frame["tier"].astype(str).to_numpy())
    out_dir = run.run_dir / DRIFT_DIR / cohort
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "cohort": cohort, "people": len(positions), "new_cohort": made,
        "psi": psi, "thresholds": {"moderate": drift.STABLE_BELOW, "shift": drift.SHIFT_FROM},
        "mean_score": {"before": float(before.mean()), "after": float(after.mean())},
        "tier_shares": {"before": tiers_before, "after": tiers_after},
        "seconds": {"federation": later.seconds},
    }
    files = {"json": str(out_dir / "drift.json"), "png": str(out_dir / "drift.png")}
    report["files"] = files
    Path(files["json"]).write_text(json.dumps(report, indent=2) + "\n")
    _plot(before, after, psi, Path(files["png"]), cohort)
    return report


def _silos(parties: Path) -> tuple[str, ...]:
    return federation_silos(parties)


def _row(value: float) -> dict:
    return {"psi": float(value), "status": drift.classify(value)}


def _shares(tiers: np.ndarray) -> dict[str, float]:
    return {k: float(np.mean(tiers == k)) for k in TIER_KEYS}


def _plot(before: np.ndarray, after: np.ndarray, psi: dict, path: Path, cohort: str) -> None:
    # Here, not at the top: matplotlib costs seconds, and the backend must be chosen before
    # pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = np.arange(300, 860, 10)
    left.hist(before, bins=bins, alpha=0.55, density=True, label="the run's people")
    left.hist(after, bins=bins, alpha=0.55, density=True, label=f"cohort {cohort!r}")
    left.set_xlabel("score")
    left.set_ylabel("density")
    left.set_title(f"score PSI {psi['score']['psi']:.3f} ({psi['score']['status']})")
    left.legend()
    names = list(psi)
    values = [psi[n]["psi"] for n in names]
    right.barh(names, values, color=["#27ae60" if v < drift.STABLE_BELOW else "#f39c12"
                                     if v < drift.SHIFT_FROM else "#c0392b" for v in values])
    for x, label in ((drift.STABLE_BELOW, "0.1"), (drift.SHIFT_FROM, "0.25")):
        right.axvline(x, color="grey", linestyle="--", linewidth=1)
        right.text(x, -0.6, label, ha="center", fontsize=8)
    right.set_xlabel("population stability index")
    right.set_title("stability by population")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
