"""MLP training defaults under DP that hold on both data sizes (issue 20 acceptance: the MLP with
default settings at eps 1 >= 0.76 on UCI), in process.

The protocol's training loop replayed without the engine (bench/stale_gradients.py `simulate`:
the real SiloTrainer and BiasHead, DP-SGD noise from a secret stream, randomised response on
the training labels), with the noise each cell's privacy plan calibrates: server/privacy.py
`PrivacyPlan` for the cell's training people, batch and epochs at combined eps 1 (the
statistics' releases composed first, as in a run). Cells are chosen on VALIDATION AUC (the last
epoch's); test AUC is printed beside it, never used to choose.

A cell is `key=value,...` over: b (batch), e (epochs),
lr, clip (each party's clip: privacy.max_grad_norm / sqrt(K) since the split; 2.5 is the
joint 5 of 4 blocks), label (label epsilon, inf = off), k (the blocks
the per-party noise is calibrated over: 4 in a 3-silo run; 1 gives each party the joint noise,
the central model's noise, which no run may use: a diagnostic of what the split costs), c
(chunk batches), h (model.hidden, e.g. 32-16).

    PYTHONPATH=. nice -n 19 .venv/bin/python bench/mlp_defaults.py --data uci --seeds 0 1 2 \
        --cell b=2048 --cell b=2048,k=1 --cell b=2048,clip=2.5,h=16

(bench/RESULTS.md "MLP defaults that hold on both data sizes" lists every call behind its tables.)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlp_cells import cell_arguments, parse_cell, seeded_data
from stale_gradients import Joined, Privacy, simulate

from server.config import PrivacyConfig, TrainConfig
from server.privacy import PrivacyPlan

DEFAULT_CELL = {"b": "2048", "e": "12", "lr": "0.01", "clip": "5", "label": "2", "k": "4",
                "c": "4", "h": "32-16"}


def train_config(cell: dict[str, str], n_train: int) -> TrainConfig:
    return TrainConfig(batch_size=int(cell["b"]), epochs=int(cell["e"]), lr=float(cell["lr"]),
                       chunk_batches=int(cell["c"]))


def run_cell(data: Joined, cell: dict[str, str], seed: int, secret: bytes) -> dict:
    n_train = len(data.train)
    cfg = train_config(cell, n_train)
    silos = tuple(f"silo{i}" for i in range(len(data.xs)))
    plan = PrivacyPlan(PrivacyConfig(epsilon=1.0, max_grad_norm=float(cell["clip"])), silos,
                       n_train, cfg.batch_size, cfg.epochs, ledger=None)
    sigma = plan.joint_sigma * math.sqrt(int(cell["k"]))
    hidden = tuple(int(h) for h in cell["h"].split("-"))
    out = simulate(data, cfg, hidden, seed=seed,
                   privacy=Privacy(sigma, float(cell["clip"]), float(cell["label"])),
                   secret=secret)
    return {"batch": cfg.batch_size, "epochs": cfg.epochs, "lr": cfg.lr, "steps":
            plan.steps_planned, "joint_sigma": plan.joint_sigma, "sigma": sigma,
            "val": out.val_auc[-1], "test": out.test_auc, "curve": out.val_auc,
            "seconds": out.seconds}


def main() -> None:
    args = cell_arguments(__doc__).parse_args()
    cells = [parse_cell(c, DEFAULT_CELL) for c in args.cell]
    results: dict[int, list[dict]] = {i: [] for i in range(len(cells))}
    for seed, secret, data in seeded_data(args, "mlpdef-"):
        for i, cell in enumerate(cells):
            r = run_cell(data, cell, seed, secret)
            results[i].append(r)
            print(f"  {args.cell[i]:40s} b {r['batch']:5d} e {r['epochs']:3d} lr {r['lr']:.4f} "
                  f"steps {r['steps']:4d} sigma_j {r['joint_sigma']:.2f} val {r['val']:.4f} "
                  f"test {r['test']:.4f} {r['seconds']:5.1f} s  val by epoch "
                  + " ".join(f"{v:.3f}" for v in r["curve"]), flush=True)
    print("\nmeans over seeds", args.seeds)
    print("| cell | batch | epochs | lr | steps | joint sigma | val AUC | test AUC |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for i in range(len(cells)):
        rs = results[i]
        print(f"| {args.cell[i]} | {rs[0]['batch']} | {rs[0]['epochs']} | {rs[0]['lr']:g} | "
              f"{rs[0]['steps']} | {rs[0]['joint_sigma']:.2f} | "
              f"{np.mean([r['val'] for r in rs]):.4f} | {np.mean([r['test'] for r in rs]):.4f} |")


if __name__ == "__main__":
    main()
