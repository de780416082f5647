"""A `fedscore run --set model.kind=gbdt` run against the in-process core on the same data.

    PYTHONPATH=. .venv/bin/python bench/gbdt_wired.py RUN_DIR [--parties DIR]

Rebuilds the run's aligned people, split and prepared silo matrices (simulations/analysis/
baselines.py `join_parties`, as the run's baselines do), fits simulations/run/gbdt.py's
in-process trees with the run's gbdt.* settings (binning, and the number of trees of the best
validation log loss, as the run keeps) on the training people, and prints the test AUC
of both beside the run's central GBDT reference. With privacy.label_epsilon=inf the two fits
see the same labels and must agree (the wiring is lossless); at a finite label epsilon the run
trains on randomised-response labels and the in-process fit on clean ones, so the difference
is what label DP costs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from crypto.at_rest import AUTO, open_keystore
from server.metrics import auc
from server.scores_file import read_scores
from simulations.analysis.baselines import join_parties
from simulations.data.paths import Parties
from simulations.run.gbdt import best_count, fit_vertical, predict_vertical, truncated


def compare(run_dir: Path, parties: Parties) -> dict:
    """The run's test AUC beside the in-process core's on the same people and settings."""
    config = json.loads((run_dir / "config.json").read_text())
    flat = config.get("authority", config)
    store = open_keystore(str(flat.get("storage.keystore", AUTO)), parties.root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    authority = json.loads((run_dir / "authority.json").read_text())
    scores = read_scores(run_dir, store.path if store else None, with_split=True)
    joined = join_parties(parties, scores, authority["subject_ref"].removeprefix("hmac-"), store)
    train, val, test = (joined.positions(p) for p in ("train", "val", "test"))
    gbdt = authority["gbdt"]
    # What the silos' trees bin (clients/silo/gbdt_handlers.py); runs made before the scale
    # existed binned the prepared matrix as is.
    scale = float(gbdt.get("input_scale", 1.0))
    joined.xs = {s: x.astype(np.float64) / scale for s, x in joined.xs.items()}
    t0 = time.perf_counter()
    fitted_on = {s: x[train] for s, x in joined.xs.items()}
    model = fit_vertical(fitted_on, joined.y[train],
                         trees=gbdt["trees"], depth=gbdt["depth"], bins=gbdt["bins"],
                         lr=gbdt["lr"], lambda_=gbdt["reg_lambda"],
                         min_child_weight=gbdt["min_child_weight"],
                         binning=gbdt.get("binning", "uniform"))
    fit_seconds = time.perf_counter() - t0
    grown = len(model.trees)
    if "trees_kept" in gbdt:  # runs since the best-validation model keep as many trees
        model = truncated(model, best_count(model, {s: x[val] for s, x in joined.xs.items()},
                                            joined.y[val], fitted_on))
    p = predict_vertical(model, {s: x[test] for s, x in joined.xs.items()}, fitted_on)
    return {
        "label_epsilon": metrics["epsilon"]["label"],
        # metrics.json's all_test_auc: every test person (the scores file hides the
        # probability of people who fail the opening conditions).
        "federated_all_test_auc": metrics["all_test_auc"],
        "in_process_test_auc": float(auc(joined.y[test], p)),
        "central_gbdt_auc": metrics.get("baseline_central_gbdt_auc"),
        "trees_kept": {"run": gbdt.get("trees_kept", grown), "in_process": len(model.trees)},
        "federated_train_seconds": metrics["seconds"]["train"],
        "in_process_fit_seconds": round(fit_seconds, 2),
        "round_trips": metrics["round_trips"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--parties", type=Path, help="default: RUN_DIR.parties")
    args = parser.parse_args()
    parties = Parties(args.parties or args.run_dir.with_name(args.run_dir.name + ".parties"))
    print(json.dumps(compare(args.run_dir, parties), indent=2))


if __name__ == "__main__":
    main()
