"""Check by hand that a finished run's people are scored again as the run scored them
(`fedscore score` / `dispute` / `serve` go through server/rescore.py): one federation session
(the simulation engine) re-scores every scored person and compares probability, score,
points and reasons with the run's own scores file. Not in the test suite (an engine run).

    python bench/after_run_check.py RUN_DIR             # the comparison, printed as JSON
    python bench/after_run_check.py RUN_DIR --phone 0   # a scored person's phone on stdout,
                                                        # to pipe into `fedscore score RUN_DIR`

The phone comes from the simulation's truth file (generated populations only) and goes to
stdout only, for a pipe: never into a file or a log.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from crypto.at_rest import Keystore, read_party_file
from crypto.identity import keyed_refs, load_or_create_pepper
from server import rescore
from server.scores_file import read_scores
from simulations.service.session import open_finished, run_session


def compare(run_dir: Path) -> dict:
    run = open_finished(run_dir)
    scores = read_scores(run.run_dir, run.keystore)
    scored = np.flatnonzero((scores["status"].astype(str) == "scored").to_numpy())
    t0 = time.perf_counter()
    again = run_session(run, lambda fed, scorer: rescore.score(fed, scorer, scored))
    seconds = time.perf_counter() - t0
    before = scores.iloc[scored].reset_index(drop=True)
    after = again.frame
    out: dict = {"kind": run.cfg.authority.model.kind, "people": len(scored),
                 "session_seconds": round(seconds, 1),
                 "federation_seconds": round(again.seconds, 2),
                 "max_abs_probability": float(np.abs(after["probability"]
                                                     - before["probability"]).max()),
                 "scores_equal": int((after["score"].to_numpy()
                                      == before["score"].astype(float).to_numpy()).sum())}
    points = [c for c in after.columns if c.startswith("points_")]
    if points:
        out["max_abs_points"] = float(max(np.abs(after[c] - before[c].astype(float)).max()
                                          for c in points))
    reasons = [c for c in after.columns if c.startswith("reason_") and "_points" not in c]
    out["reasons_equal"] = {c: int((after[c].astype(object).fillna("").to_numpy()
                                    == before[c].astype(object).fillna("").to_numpy()).sum())
                            for c in reasons}
    return out


def phone_of(run_dir: Path, index: int) -> str:
    run = open_finished(run_dir)
    parties = run.parties
    store = Keystore(run.keystore) if run.keystore else None
    truth = pd.read_parquet(io.BytesIO(read_party_file(
        parties / "simulation" / "truth.parquet.enc", "simulation", store)))
    pepper = load_or_create_pepper(parties / "authority" / "pepper.key")
    refs = keyed_refs(truth["phone"].to_numpy(), pepper, "sha256")
    scores = read_scores(run.run_dir, run.keystore)
    scored = scores[scores["status"].astype(str) == "scored"]
    ref = scored["subject_ref"].iloc[index]
    return str(truth["phone"].to_numpy()[np.flatnonzero(refs == ref)[0]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--phone", type=int, default=None, metavar="I",
                        help="print the i-th scored person's phone (for a pipe) and stop")
    args = parser.parse_args()
    if args.phone is not None:
        sys.stdout.write(phone_of(args.run_dir, args.phone) + "\n")
        return 0
    print(json.dumps(compare(args.run_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
