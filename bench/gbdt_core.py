"""The in-process vertical GBDT (simulations/run/gbdt.py) against LightGBM on one thread, with
the same trees: 100,000 rows, 3 silos x 10 features, 50 trees, depth 5, 32 bins, lr 0.1.
Wall times by time.perf_counter in one process, three repetitions (the machine is shared).

    PYTHONPATH=. .venv/bin/python bench/gbdt_core.py
"""

from __future__ import annotations

import time

import lightgbm as lgb
import numpy as np
from sklearn.metrics import roc_auc_score

from simulations.run.gbdt import fit_vertical, predict_vertical


def problem(n: int = 100_000, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features on the prepared scale [-1, 1], a nonlinear logit with an interaction across
    silos; 3 silos of 10 columns."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(0, 0.45, (n, 30)), -1, 1)
    logit = (1.5 * x[:, 0] - 2 * np.abs(x[:, 11]) + np.sin(4 * x[:, 22])
             + 2 * x[:, 3] * x[:, 14] - 1)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    return {"a": x[:, :10], "b": x[:, 10:20], "c": x[:, 20:]}, y


def main() -> None:
    silos, y = problem()
    x = np.hstack(list(silos.values()))
    for _ in range(3):
        t0 = time.perf_counter()
        model = fit_vertical(silos, y, trees=50, depth=5, bins=32, lr=0.1)
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = predict_vertical(model, silos)
        predict = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = lgb.LGBMClassifier(n_estimators=50, max_depth=5, num_leaves=32, learning_rate=0.1,
                                 max_bin=32, reg_lambda=1.0, min_child_weight=1.0,
                                 min_child_samples=1, n_jobs=1, verbose=-1).fit(x, y)
        central = time.perf_counter() - t0
        print(f"fit_vertical {fit:.2f} s (predict {predict:.2f} s), LightGBM {central:.2f} s; "
              f"train AUC {roc_auc_score(y, p):.4f} against "
              f"{roc_auc_score(y, ref.predict_proba(x)[:, 1]):.4f}", flush=True)


if __name__ == "__main__":
    main()
