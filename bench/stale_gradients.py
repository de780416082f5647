"""What stale gradients cost: the chunked vertical protocol replayed in one process.

The federated `sum` model (z = b + sum_k g_k) trained exactly as server/training.py and the
silos do it, without the engine: each round trip the silos compute their contributions for a
chunk of mini-batches at their current weights (clients/silo/trainer.py SiloTrainer), the
authority's head (server/top.py BiasHead) steps its bias and returns d loss / d z per row, and
each silo replays the chunk with those gradients. Within a chunk a batch's gradient is computed
from contributions up to chunk-1 silo steps old: that is the staleness measured here.
Non-private (no DP-SGD, no label DP), which is where the issue measured the loss; the real
classes are used, so `train.*` and silo-side corrections behave as in a run.

Data: the generated population (`--users N`) or `--data uci`/DIR (the same import as
`fedscore run --data`), aligned on every party's identifiers, split 70/15/15 with `--seed`.
Reports test AUC of the final model and the round trips per setting, each against chunks of 1
(which equal central training step for step; compensation leaves them unchanged: the first batch
of a chunk is never stale). Data preparation draws fresh noisy statistics per run, so compare
settings within a run (one data set each seed), not across runs.

    PYTHONPATH=. .venv/bin/python bench/stale_gradients.py --data uci --seeds 0 1 2 \
        --chunks 1 4 16 --compensation 0 1
    PYTHONPATH=. .venv/bin/python bench/stale_gradients.py --users 100000 --chunks 1 4 16 \
        --set train.chunk_warmup=false
"""

from __future__ import annotations

import argparse
import dataclasses
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from clients.protocol.model import ModelSpec
from clients.protocol.schema import AUTHORITY, federation_silos, silo_salt
from clients.silo.data import load_silo
from clients.silo.trainer import SiloTrainer
from crypto.secret_random import SecretRandom
from server.config import TrainConfig
from server.label_dp import flip_probability, randomized_response
from server.labels import load_labels
from server.metrics import auc
from server.top import BiasHead
from server.training import batch_plan, chunk_schedule
from simulations.data.mapping import resolve_mapping
from simulations.data.paths import Parties
from simulations.data.population import PopulationConfig
from simulations.data.real_data import import_parties
from simulations.run.experiment import prepare_parties


@dataclass
class Joined:
    xs: list[np.ndarray]
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    salts: list[int]


def load(data: str | None, users: int, seed: int, root: Path) -> Joined:
    """Every party's table, aligned on identifiers present at all of them, split at random."""
    parties = Parties(root)
    if data is None:
        prepare_parties(PopulationConfig(users=users, seed=seed), parties)
    else:
        import_parties(resolve_mapping(data), root)
    ids, y = load_labels(parties.party(AUTHORITY))
    silos = federation_silos(root)
    tables = [load_silo(parties.party(s), s) for s in silos]
    common = set(ids.to_numpy())
    for t in tables:
        common &= set(t.ids.to_numpy())
    order = np.array(sorted(common), dtype=object)
    index = pd.Index(order)
    xs = [t.x[pd.Index(t.ids.to_numpy()).get_indexer(index)] for t in tables]
    yy = y[pd.Index(ids.to_numpy()).get_indexer(index)].astype(np.float64)
    perm = np.random.default_rng([seed, 0x57A1E]).permutation(len(order))
    a, b = int(0.7 * len(order)), int(0.85 * len(order))
    return Joined(xs, yy, np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]),
                  [silo_salt(s) for s in silos])


@dataclass
class Outcome:
    test_auc: float
    val_auc: list[float]
    trips: int
    seconds: float


@dataclass(frozen=True)
class Privacy:
    """DP-SGD per party (noise multiplier, clip) on Poisson batches, and randomised response
    on the training labels: what the engine derives from privacy.* (read them from a run's
    metrics.json: `noise_multiplier`, `max_grad_norm`, `epsilon.label`)."""

    sigma: float = 0.0
    clip: float = 5.0
    label_epsilon: float = float("inf")


def simulate(data: Joined, cfg: TrainConfig, hidden: tuple[int, ...] = (32, 16), seed: int = 0,
             privacy: Privacy = Privacy(), secret: bytes = b"") -> Outcome:
    """The protocol's training loop (server/training.py `train`, sum mode) in-process, with the
    silos' delay compensation as server/run_plan.py sets it (factor x silos). DP noise and
    label flips come from `secret` (fresh when empty); pass the same one to compare settings
    on the same draws."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    dp = privacy.sigma > 0
    q = min(1.0, cfg.batch_size / len(data.train))
    spec = ModelSpec(hidden, cfg.lr, cfg.weight_decay, seed,
                     noise_multiplier=privacy.sigma, max_grad_norm=privacy.clip,
                     sample_rate=q if dp else 0.0,
                     expected_batch=max(1, round(q * len(data.train))) if dp else 0,
                     staleness_correction=cfg.delay_compensation * len(data.xs))
    random = SecretRandom(secret or secrets.token_bytes(32))
    silos = [SiloTrainer(x.shape[1], spec, salt, random=random, run_key=f"silo{salt}")
             for x, salt in zip(data.xs, data.salts, strict=True)]
    rho = flip_probability(privacy.label_epsilon)
    y_view = (randomized_response(data.y, privacy.label_epsilon,
                                  random.generator("labels", "bench"))
              if rho > 0 else data.y)
    head = BiasHead(float(data.y[data.train].mean()), spec, rho, random, "bench")
    plans = {e: batch_plan(data.train, cfg.batch_size, np.random.default_rng([seed, 0xBA7C, e]),
                           poisson=dp)
             for e in range(cfg.epochs)}
    schedule = chunk_schedule(len(plans[0]), cfg)
    val_auc = []
    for epoch, first, end in schedule:
        if first == 0 and epoch > 0:
            val_auc.append(_auc(silos, head, data, data.val))
        chunk = plans[epoch][first:end]
        plan = np.concatenate(chunk)
        sizes = [len(b) for b in chunk]
        summed = np.sum([s.contributions(x[plan]) for s, x in zip(silos, data.xs, strict=True)],
                        axis=0, dtype=np.float64)
        grads = head.gradients(summed, y_view[plan].astype(np.float64), sizes)
        cuts = np.cumsum(sizes)[:-1]
        for s, x in zip(silos, data.xs, strict=True):
            s.replay(np.split(x[plan], cuts), np.split(grads, cuts))
    val_auc.append(_auc(silos, head, data, data.val))
    return Outcome(_auc(silos, head, data, data.test), val_auc, len(schedule) + 1,
                   time.perf_counter() - t0)


def _auc(silos: list[SiloTrainer], head: BiasHead, data: Joined, rows: np.ndarray) -> float:
    z = head.logits(np.sum([s.contributions(x[rows]) for s, x in
                            zip(silos, data.xs, strict=True)], axis=0, dtype=np.float64))
    return auc(data.y[rows], 1 / (1 + np.exp(-z)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="uci, a CSV or a mapping directory")
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--compensation", type=float, nargs="+", default=[0.0, 1.0],
                    help="train.delay_compensation values to compare")
    ap.add_argument("--sigma", type=float, default=0.0,
                    help="DP-SGD noise multiplier per party (0: no DP); eps 1 on UCI: 9.016")
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--label-epsilon", type=float, default=float("inf"))
    ap.add_argument("--set", dest="assignments", action="append", default=[],
                    help="train.KEY=VALUE (epochs, batch_size, lr, chunk_warmup, ...)")
    args = ap.parse_args()
    base = TrainConfig()
    for item in args.assignments:
        key, value = item.removeprefix("train.").split("=", 1)
        current = getattr(base, key)
        parsed = (value.lower() in ("1", "true", "yes") if isinstance(current, bool)
                  else type(current)(value))
        base = dataclasses.replace(base, **{key: parsed})
    for seed in args.seeds:
        secret = secrets.token_bytes(32)  # the same DP draws for every setting of this seed
        with tempfile.TemporaryDirectory(prefix="stale-") as tmp:
            data = load(args.data, args.users, seed, Path(tmp) / "parties")
        print(f"data={args.data or f'generated {args.users:,}'} seed={seed} "
              f"people={len(data.y):,} train={len(data.train):,} {base}")
        for chunk, factor in [(c, f) for c in args.chunks for f in args.compensation]:
            cfg = dataclasses.replace(base, chunk_batches=chunk, delay_compensation=factor)
            out = simulate(data, cfg, seed=seed,
                           privacy=Privacy(args.sigma, args.clip, args.label_epsilon),
                           secret=secret)
            print(f"  chunk {chunk:3d} compensation {factor:g}: test AUC {out.test_auc:.4f}  "
                  f"trips {out.trips:4d}  {out.seconds:6.1f} s  val AUC by epoch "
                  + " ".join(f"{v:.3f}" for v in out.val_auc), flush=True)


if __name__ == "__main__":
    main()
