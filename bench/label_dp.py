"""Label-DP mechanisms at equal label epsilon, measured centrally (issue 17, item 3).

No Flower: the generated population's three silo tables are joined on the phone number and the
project's model (one bottom MLP per silo from clients/protocol/model.py, summed plus a bias, as in
`sum` mode) is trained in one process. The loss gradient per row is what the authority would send
the silos (server/label_dp.py), backpropagated through the joint model. Test AUC on clean labels.

Mechanisms, each at label epsilon eps against the silos (training labels only; validation and
test labels never reach a silo):
  rr        randomised response once on every training label, forward-corrected loss (today)
  lp2st     LP-2ST (Ghazi et al. 2021): a secret random half A gets RR and trains stage 1; the
            stage-1 model's P(y = 1 | x) is the prior for half B, whose labels go through
            RRWithPrior; stage 2 continues on A and B with the release's own likelihood
            (a pinned person's release ignores y, so it has zero gradient)
  rr-2st    LP-2ST's schedule without the prior: RR on A, stage 1, RR on B, stage 2 (a
            control: what the two-stage schedule alone does)
  rr-ce     RR labels with plain cross-entropy (no correction), for reference
  lp2st-ce  LP-2ST as the paper trains it: plain cross-entropy on every released label
Optionally with DP-SGD on the whole model (`--dp-epsilon 1`: one clip over each person's joint
gradient, Poisson batches, noise from a keyed ChaCha20 stream, PRV accountant; LP-2ST's two
stages are accounted as one history: a person in A is sampled in both).

    nice .venv/bin/python bench/label_dp.py                       # non-private model
    nice .venv/bin/python bench/label_dp.py --dp-epsilon 1 --batch 4096 --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from clients.protocol.accounting import epsilon as accounted_epsilon
from clients.protocol.dp_sgd import make_private, mark_empty_batch, noised_step
from clients.protocol.model import ModelSpec
from clients.protocol.schema import ID_COLUMN, LABEL_COLUMN, SILOS, feature_names, silo_salt
from clients.silo.data import prepare
from clients.silo.trainer import build
from crypto.identity import normalize_phones
from crypto.secret_random import SecretRandom
from server.label_dp import (
    flip_probability,
    prior_pins,
    randomized_response,
    release_gradient,
    release_probabilities,
    rr_with_prior,
    stage_split,
)
from server.metrics import auc
from simulations.data.population import PopulationConfig, generate

MECHANISMS = ("rr", "lp2st", "rr-2st", "rr-ce", "lp2st-ce")
DEFAULT_MECHANISMS = ("rr", "lp2st", "rr-ce", "lp2st-ce")


@dataclass
class Joined:
    xs: list[np.ndarray]  # one float32 matrix per silo, rows = people
    y: np.ndarray  # 0/1 int8
    p_true: np.ndarray


def joined_population(users: int, seed: int) -> Joined:
    """Every person in every silo (coverage 1), features prepared as each silo prepares them."""
    pop = generate(PopulationConfig(users=users, seed=seed, coverage=(1.0, 1.0, 1.0)))
    ids = normalize_phones(pop.authority[ID_COLUMN]).to_numpy()
    xs = []
    for silo in SILOS:
        # Exact standardisation statistics (rng=None, the experiment layer's reference) instead
        # of the silos' noisy ones: the same inputs for every mechanism compared.
        m = prepare(pop.silos[silo], silo, feature_names(silo), rng=None)
        rows = pd.Index(m.ids.to_numpy()).get_indexer(ids)
        assert (rows >= 0).all(), "coverage 1: every person is in every silo"
        xs.append(np.ascontiguousarray(m.x[rows]))
    truth = pop.truth.set_index(ID_COLUMN).loc[pop.authority[ID_COLUMN]]
    return Joined(xs, pop.authority[LABEL_COLUMN].to_numpy(np.int8),
                  truth["p_true"].to_numpy())


class Joint(torch.nn.Module):
    """z = b + sum_k g_k(x_k): the `sum` model in one module, so Opacus clips per person."""

    def __init__(self, dims: list[int], spec: ModelSpec, prior: float) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(
            build(d, spec, silo_salt(s))[0] for d, s in zip(dims, SILOS, strict=True))
        self.bias = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.bias.weight.fill_(math.log(prior / (1 - prior)))

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.bias(torch.ones(len(xs[0]), 1)).squeeze(-1) + sum(
            p(x) for p, x in zip(self.parts, xs, strict=True))


def plan(rows: np.ndarray, batch: int, rng: np.random.Generator, poisson: bool
         ) -> list[np.ndarray]:
    """One epoch: a shuffled partition, or round(1/q) Poisson samples (q = batch / N)."""
    if not poisson:
        return np.array_split(rng.permutation(rows), max(1, math.ceil(len(rows) / batch)))
    q = min(1.0, batch / len(rows))
    return [np.sort(rng.choice(rows, size=s, replace=False))
            for s in rng.binomial(len(rows), q, size=max(1, round(1 / q)))]


class Trainer:
    def __init__(self, data: Joined, prior: float, args: argparse.Namespace, seed: int,
                 random: SecretRandom, sigma: float) -> None:
        self.xs = [torch.from_numpy(x) for x in data.xs]
        spec = ModelSpec(hidden=(32, 16), lr=args.lr, seed=seed)
        self.model = Joint([x.shape[1] for x in data.xs], spec, prior)
        opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.dp = sigma > 0
        self.random, self.steps, self.batch = random, 0, args.batch
        self.module, self.opt = self.model, opt
        if self.dp:
            self.module, self.opt = make_private(
                self.model, opt, noise_multiplier=sigma, max_grad_norm=args.clip,
                expected_batch=args.batch)

    def set_batch(self, batch: int) -> None:
        """The (expected) batch size from here on; DP-SGD averages over it."""
        self.batch = batch
        if self.dp:
            self.opt.expected_batch_size = batch

    def logits(self, rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(*(x[rows] for x in self.xs)).numpy().astype(np.float64)

    def epochs(self, rows: np.ndarray, n: int, released: np.ndarray, if_one: np.ndarray,
               if_zero: np.ndarray, rng: np.random.Generator,
               val: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """`n` epochs over `rows`; per-row targets and release probabilities indexed by row.

        With `val` (rows, clean labels: the authority's own, never sent to a silo) the model
        and optimiser go back to the epoch with the best validation AUC; returns that epoch."""
        best, best_epoch, snapshot = -1.0, n, None
        for epoch in range(1, n + 1):
            self._epoch(rows, released, if_one, if_zero, rng)
            if val is not None:
                score = auc(val[1], self.logits(val[0]))
                if score > best:
                    best, best_epoch = score, epoch
                    snapshot = copy.deepcopy((self.model.state_dict(), self.opt.state_dict()))
        if snapshot is not None:
            self.model.load_state_dict(snapshot[0])
            self.opt.load_state_dict(snapshot[1])
        return best_epoch

    def _epoch(self, rows: np.ndarray, released: np.ndarray, if_one: np.ndarray,
               if_zero: np.ndarray, rng: np.random.Generator) -> None:
        for b in plan(rows, self.batch, rng, self.dp):
            self.opt.zero_grad(set_to_none=True)
            if len(b):
                z = self.module(*(x[b] for x in self.xs))
                g = release_gradient(z.detach().numpy(), released[b], if_one[b], if_zero[b])
                z.backward(torch.from_numpy((g / len(b)).astype(np.float32)))
            elif self.dp:
                mark_empty_batch(self.model)
            if self.dp:
                noised_step(self.opt, noise=self.random.generator("dp-noise", self.steps))
            else:
                self.opt.step()
            self.steps += 1


def steps_per_epoch(n: int, batch: int, dp: bool) -> int:
    return max(1, round(n / batch)) if dp else max(1, math.ceil(n / batch))


def calibrate(history_of, target: float, delta: float) -> float:
    """Smallest sigma (to 0.1 %) with the PRV epsilon of history_of(sigma) within target."""
    lo, hi = 0.3, 1.0
    while accounted_epsilon("prv", history_of(hi), delta, precise=False) > target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if accounted_epsilon("prv", history_of(mid), delta, precise=False) > target:
            lo = mid
        else:
            hi = mid
    return hi


def run_one(data: Joined, split: dict[str, np.ndarray], mech: str, eps: float, seed: int,
            args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    # A bench's "secret": fixed per seed so the table is reproducible. A party keeps its own.
    random = SecretRandom(hashlib.sha256(f"bench/label_dp/{seed}".encode()).digest())
    train, test = split["train"], split["test"]
    y = data.y
    n = len(y)
    two_stage = mech.startswith("lp2st") or mech == "rr-2st"
    corrected = not mech.endswith("-ce")
    a_rows, b_rows = (stage_split(train, random.generator("lp2st-split"))
                      if two_stage else (train, train[:0]))
    q_all = args.batch / len(train)
    batch1 = args.stage1_batch or args.batch
    s1 = args.stage1_epochs * steps_per_epoch(len(a_rows), batch1, True) if two_stage else 0
    final_epochs = (args.stage2_epochs or args.epochs) if two_stage else args.epochs
    s2 = final_epochs * steps_per_epoch(len(train), args.batch, True)
    sigma = 0.0
    if math.isfinite(args.dp_epsilon):
        delta = 1.0 / len(train)

        def history(s: float) -> list:
            h = [(s, batch1 / len(a_rows), s1)] if s1 else []
            return [*h, (s, q_all, s2)]

        sigma = calibrate(history, args.dp_epsilon, delta)
    released = y.astype(np.float64).copy()
    if_one, if_zero = np.ones(n), np.zeros(n)
    rho = flip_probability(eps)
    released[a_rows] = randomized_response(y[a_rows], eps, random.generator("rr"))
    if_one[a_rows], if_zero[a_rows] = 1 - rho, rho
    prior = float(y[train].mean())
    trainer = Trainer(data, prior, args, seed, random, sigma)
    rng = np.random.default_rng([seed, 0xBA7C])
    # Early stopping on clean validation labels for the non-private model (noisy labels are
    # overfitted within a few epochs); DP-SGD runs its whole budgeted schedule.
    val = None if trainer.dp else (split["val"], y[split["val"]])
    out: dict = {"mechanism": mech, "label_epsilon": eps, "seed": seed, "sigma": sigma}
    if two_stage:
        trainer.set_batch(batch1)
        out["stage1_epoch"] = trainer.epochs(
            a_rows, args.stage1_epochs, released, _fit(if_one, corrected),
            _fit(if_zero, corrected, zero=True), rng, val)
        trainer.set_batch(args.batch)
        out["stage1_auc"] = auc(y[test], trainer.logits(test))
        p_b = 1 / (1 + np.exp(-trainer.logits(b_rows)))
        if mech == "rr-2st":
            p_b = np.full(len(b_rows), 0.5)  # an uninformative prior: plain RR on B
        released[b_rows] = rr_with_prior(y[b_rows], p_b, eps, random.generator("rr-prior"))
        if_one[b_rows], if_zero[b_rows] = release_probabilities(p_b, eps)
        pinned = prior_pins(p_b, eps)
        out["pinned_share_b"] = float(pinned.mean())
        out["pinned_defaulters_b"] = int((pinned & (y[b_rows] == 1)).sum())
        out["b_release_accuracy"] = float((released[b_rows] == y[b_rows]).mean())
    if corrected is False:
        if_one, if_zero = np.ones(n), np.zeros(n)  # plain cross-entropy on the released labels
    out["epoch"] = trainer.epochs(train, final_epochs, released, if_one, if_zero, rng, val)
    out["auc"] = auc(y[test], trainer.logits(test))
    out["train_release_accuracy"] = float((released[train] == y[train]).mean())
    out["seconds"] = time.perf_counter() - t0
    return out


def _fit(values: np.ndarray, corrected: bool, zero: bool = False) -> np.ndarray:
    """Release probabilities as the loss sees them: the real ones, or (plain cross-entropy)
    the released label taken as the truth."""
    return values if corrected else np.full_like(values, 0.0 if zero else 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--population-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5, 1, 2, 4, math.inf])
    ap.add_argument("--mechanisms", nargs="+", default=list(DEFAULT_MECHANISMS),
                    choices=MECHANISMS)
    ap.add_argument("--epochs", type=int, default=8, help="epochs over all training people "
                    "(RR; LP-2ST's stage 2); at most this many without DP (early stopping)")
    ap.add_argument("--stage1-epochs", type=int, default=8, help="LP-2ST: epochs over half A")
    ap.add_argument("--stage2-epochs", type=int, default=None,
                    help="LP-2ST: epochs over everyone after stage 1 (default --epochs; with "
                    "DP, --epochs minus --stage1-epochs samples a person of A as often as RR)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--stage1-batch", type=int, default=None,
                    help="LP-2ST's stage-1 (expected) batch over half A (default --batch; "
                    "half of it keeps DP-SGD's sample rate, and so sigma, as in stage 2)")
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--dp-epsilon", type=float, default=math.inf,
                    help="combined model epsilon of DP-SGD (inf = non-private model)")
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="print the table of runs saved with --json (e.g. one file per seed)")
    args = ap.parse_args()
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = joined_population(args.users, args.population_seed)
    print(f"population: {args.users:,} people, default rate {data.y.mean():.4f}, "
          f"{sum(x.shape[1] for x in data.xs)} model inputs ({time.perf_counter() - t0:.1f} s)")
    rows = []
    oracle = []
    for seed in args.seeds:
        perm = np.random.default_rng([seed, 0x5B17]).permutation(len(data.y))
        n_tr, n_va = round(0.7 * len(perm)), round(0.15 * len(perm))
        split = {"train": np.sort(perm[:n_tr]), "val": np.sort(perm[n_tr:n_tr + n_va]),
                 "test": np.sort(perm[n_tr + n_va:])}
        oracle.append(auc(data.y[split["test"]], data.p_true[split["test"]]))
        for eps in args.eps:
            for mech in args.mechanisms:
                r = run_one(data, split, mech, eps, seed, args)
                rows.append(r)
                extra = "".join(f" {k}={r[k]:.3f}" for k in
                                ("stage1_auc", "pinned_share_b", "b_release_accuracy",
                                 "stage1_epoch", "epoch")
                                if k in r)
                print(f"seed {seed} eps {eps:g} {mech:9s} AUC {r['auc']:.4f}{extra} "
                      f"sigma {r['sigma']:.3f} ({r['seconds']:.1f} s)", flush=True)
    print(f"\noracle test AUC {statistics.mean(oracle):.4f} (mean over seeds' test splits), "
          f"all people {auc(data.y, data.p_true):.4f}")
    print(table(rows, args.mechanisms, args.eps))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                                for k, v in vars(args).items()},
                       "oracle_test_auc": oracle, "runs": rows}, f, indent=1, default=str)


def report(paths: list[str]) -> None:
    rows, oracle = [], []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        oracle += saved["oracle_test_auc"]
        rows += [{**r, "label_epsilon": float(r["label_epsilon"])} for r in saved["runs"]]
    mechanisms = [m for m in MECHANISMS if any(r["mechanism"] == m for r in rows)]
    epsilons = sorted({r["label_epsilon"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    print(f"seeds {seeds}; oracle test AUC {statistics.mean(oracle):.4f}")
    print(table(rows, mechanisms, epsilons))
    for key in ("pinned_share_b", "stage1_auc", "epoch", "sigma"):
        for mech in mechanisms:
            got = [(r["label_epsilon"], r[key]) for r in rows if r["mechanism"] == mech
                   and key in r]
            if got and any(v for _, v in got):
                print(f"{key} {mech}: " + ", ".join(
                    f"eps {e:g} {statistics.mean(v for x, v in got if x == e):.3f}"
                    for e in epsilons))


def table(rows: list[dict], mechanisms: list[str], epsilons: list[float]) -> str:
    head = "| label eps | " + " | ".join(mechanisms) + " |"
    lines = [head, "|" + " --- |" * (len(mechanisms) + 1)]
    for eps in epsilons:
        cells = []
        for mech in mechanisms:
            v = [r["auc"] for r in rows if r["mechanism"] == mech and r["label_epsilon"] == eps]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}")
        lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
    if "rr" in mechanisms and len(mechanisms) > 1:
        lines += ["", "Paired by seed (same split and initialisation), mechanism minus rr, "
                  "mean ± sd over seeds:", ""]
        others = [m for m in mechanisms if m != "rr"]
        lines += ["| label eps | " + " | ".join(others) + " |",
                  "|" + " --- |" * (len(others) + 1)]
        for eps in epsilons:
            cells = []
            for mech in others:
                base = {r["seed"]: r["auc"] for r in rows
                        if r["mechanism"] == "rr" and r["label_epsilon"] == eps}
                d = [r["auc"] - base[r["seed"]] for r in rows if r["mechanism"] == mech
                     and r["label_epsilon"] == eps and r["seed"] in base]
                sd = statistics.stdev(d) if len(d) > 1 else 0.0
                cells.append(f"{statistics.mean(d):+.4f} ± {sd:.4f}" if d else "-")
            lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
