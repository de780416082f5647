"""A `fedscore run --set model.kind=scorecard` run against the in-process scorecard on the same
data.

    PYTHONPATH=. .venv/bin/python bench/scorecard_wired.py RUN_DIR [--parties DIR]

Rebuilds the run's aligned people, split and prepared silo matrices (simulations/analysis/
baselines.py `join_parties`, as bench/gbdt_wired.py does), fits simulations/run/scorecard.py's
in-process scorecard with the run's settings on the training people's clean labels, and prints
the test AUC of both beside the run's central WoE scorecard reference. With
privacy.label_epsilon=inf the two fits see the same labels and must agree (the wiring is
lossless); at a finite label epsilon the run fits on randomised-response labels, so the
difference is what label DP costs; for a DP scorecard run (a finite privacy.epsilon), what
the DP model costs against the non-private one on the same people.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from crypto.at_rest import AUTO, open_keystore
from server.metrics import auc
from server.scorecard import ScorecardParams
from server.scores_file import read_scores
from simulations.analysis.baselines import join_parties
from simulations.data.paths import Parties
from simulations.run.scorecard import fit_vertical_scorecard, predict_vertical_scorecard


def compare(run_dir: Path, parties: Parties) -> dict:
    """The run's test AUC beside the in-process scorecard's on the same people and settings."""
    config = json.loads((run_dir / "config.json").read_text())
    flat = config.get("authority", config)
    store = open_keystore(str(flat.get("storage.keystore", AUTO)), parties.root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    authority = json.loads((run_dir / "authority.json").read_text())
    scores = read_scores(run_dir, store.path if store else None, with_split=True)
    joined = join_parties(parties, scores, authority["subject_ref"].removeprefix("hmac-"), store)
    train, test = joined.positions("train"), joined.positions("test")
    card = authority["scorecard"]
    xs = {s: x.astype(np.float64) / float(card["input_scale"]) for s, x in joined.xs.items()}
    t0 = time.perf_counter()
    # A DP run (its "mode" says so) made a fixed number of noisy Newton steps: the
    # non-private reference beside it runs the non-private scorecard's L-BFGS to the end.
    steps = ScorecardParams().iterations if "mode" in card else card["max_steps"]
    model = fit_vertical_scorecard({s: x[train] for s, x in xs.items()}, joined.y[train],
                                   bins=card["pre_bins"], min_bin_share=card["min_bin_share"],
                                   smoothing=card["smoothing"], iterations=steps)
    fit_seconds = time.perf_counter() - t0
    p = predict_vertical_scorecard(model, {s: x[test] for s, x in xs.items()})
    return {
        "label_epsilon": metrics["epsilon"]["label"],
        "model_epsilon": metrics["epsilon"]["model"],
        # metrics.json's all_test_auc: every test person (the scores file hides the
        # probability of people who fail the opening conditions).
        "federated_all_test_auc": metrics["all_test_auc"],
        "in_process_test_auc": float(auc(joined.y[test], p)),
        "in_process_steps": model.steps,
        "federated_steps": card["steps"],
        "central_scorecard_auc": metrics.get("baseline_central_scorecard_auc"),
        "oracle_auc": metrics.get("oracle_auc"),
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
