"""Federated training time against central training of the same model, in the same run.

Runs the whole default experiment (simulation engine, 3 silos; private by default) and reports:
  - engine start-up (Ray, actors, silo discovery), separately;
  - federated training time (the `train` phase: every round trip, silo compute, validation);
  - central training time of the same model, initialisation, epochs and batch plan, trained in
    one process on the joined data (`baseline_central`, which also validates every epoch);
  - their ratio (target <= 2.0) and the AUCs;
  - for a private run, central DP-SGD with the same noise, clip and Poisson plan, the ratio
    federated DP / central DP (target <= 1.5) and every party's epsilon.
Non-private comparison: --set privacy.epsilon=inf

    .venv/bin/python bench/train_speed.py [--users 100000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from simulations.run.config import make_config, parse_assignments
from simulations.run.engine import configure_environment, quiet_engine_logs
from simulations.run.experiment import run_experiment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="assignments", action="append", default=[])
    args = ap.parse_args()
    configure_environment()
    quiet_engine_logs()
    cfg = make_config(parse_assignments(args.assignments), args.users, args.seed)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        m = run_experiment(cfg, Path(tmp) / "run", Path(tmp) / "parties")
    s = m["seconds"]
    b = m["baseline_seconds"]
    t = cfg.authority.train
    print(f"N={args.users:,} aligned={m['people']['aligned']:,} epochs={t.epochs} "
          f"batch={t.batch_size} chunk={t.chunk_batches} warmup={t.chunk_warmup}")
    print(f"  engine start-up + silo discovery: {s['connect']:.1f} s (excluded below)")
    print(f"  PSI: {s['psi']:.1f} s")
    print(f"  federated training: {s['train']:.2f} s over {m['round_trips']} round trips")
    print(f"  central training (same model, epochs, batch plan): {b['central']:.2f} s")
    print(f"  ratio federated / central: {s['train'] / b['central']:.2f} (target <= 2.0)")
    if "central_dp" in b:
        eps = next(iter(m["epsilon"]["model"].values()))
        print(f"  central DP training (same sigma {m['noise_multiplier']:.3f}, clip, plan): "
              f"{b['central_dp']:.2f} s")
        print(f"  ratio federated DP / central DP: {s['train'] / b['central_dp']:.2f} "
              "(target <= 1.5)")
        print(f"  epsilon per party ({m['accountant']}, delta {m['delta']:.2e}): "
              + ", ".join(f"{k} {v:.4f}" for k, v in m["epsilon"]["model"].items()))
        print(f"  AUC central DP {m['baseline_central_dp_auc']:.4f} (eps {eps:.3f})")
    print(f"  AUC (all test people) federated {m['all_test_auc']:.4f}, "
          f"central {m['baseline_central_auc']:.4f}, oracle {m['oracle_auc']:.4f}")
    print(f"  end to end: {s['total']:.1f} s")


if __name__ == "__main__":
    main()
