"""Secure sum against plaintext sum: same population, seed and config, in one run.

Runs the default experiment with `aggregation.secure=true` and `=false`, alternating the order
over `--repeats` pairs (the machine is shared and noisy), and prints AUCs, training times and
the secure / plaintext training-time ratio (target <= 1.15; FATE reports ~7.5x for Paillier).

    .venv/bin/python bench/secure_sum.py [--users 100000] [--repeats 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from simulations.data.paths import Parties
from simulations.run.config import make_config, parse_assignments
from simulations.run.engine import configure_environment, quiet_engine_logs
from simulations.run.experiment import prepare_parties, run_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="assignments", action="append", default=[])
    args = ap.parse_args()
    configure_environment()
    quiet_engine_logs()
    base = parse_assignments(args.assignments)
    times: dict[bool, list[float]] = {True: [], False: []}
    aucs: dict[bool, float] = {}
    with tempfile.TemporaryDirectory(prefix="secure-bench-") as tmp:
        parties = Path(tmp) / "parties"
        prepare_parties(make_config(base, args.users).population, Parties(parties))
        for i in range(args.repeats):
            for secure in ((True, False) if i % 2 == 0 else (False, True)):
                cfg = make_config({**base, "aggregation.secure": secure}, args.users)
                m = run_experiment(cfg, Path(tmp) / f"run-{i}-{secure}", parties)
                times[secure].append(m["seconds"]["train"])
                aucs[secure] = m["auc"]
                print(f"repeat {i} secure={secure}: train {m['seconds']['train']:.2f} s, "
                      f"AUC {m['auc']:.5f}")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"AUC secure {aucs[True]:.5f} vs plaintext {aucs[False]:.5f}: "
          f"difference {abs(aucs[True] - aucs[False]):.5f} (target < 0.001)")
    print(f"training time, median of {args.repeats}: secure {statistics.median(times[True]):.2f} s"
          f", plaintext {statistics.median(times[False]):.2f} s, ratio {ratio:.2f} "
          "(target <= 1.15)")


if __name__ == "__main__":
    main()
