"""Red-team attack 3 (overview in redteam.py): replaying the old code's public seed.

Seed replay: what the old code drew from the public seed (batch plans, label flips, the
order of positions) replayed and compared with what the silo actually received.

The `old_*` functions here reproduce the mechanisms of the code before commit e13c364 (draws from
`np.random.default_rng([seed, salt])`, a split stratified on labels), so a test can show each
attack succeeding when the protection is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from server.training import batch_plan
from simulations.analysis.redteam import SiloView, Step, _cuts
from simulations.analysis.redteam_gradients import LabelGuess

# The salts of the old code's public-seed streams (pre-e13c364).
SPLIT_SALT = 0x5917
PLAN_SALT = 0xBA7C
FLIP_SALT = 0x1AB
POSITIONS_SALT = 0xA11


def old_split_sizes(n: int, train: float, val: float) -> tuple[int, int, int]:
    n_train, n_val = round(train * n), round(val * n)
    return n_train, n_val, n - n_train - n_val


def old_stratified_split(y: np.ndarray, train: float, val: float, seed: int) -> np.ndarray:
    """The pre-e13c364 split (server/split.py `stratified_split`): codes 0/1/2 per position."""
    rng = np.random.default_rng([seed, SPLIT_SALT])
    codes = np.empty(len(y), dtype=np.int8)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        nt, nv, _ = old_split_sizes(len(idx), train, val)
        codes[idx[:nt]], codes[idx[nt:nt + nv]], codes[idx[nt + nv:]] = 0, 1, 2
    return codes


def old_batch_plan(train: np.ndarray, batch_size: int, epoch: int, seed: int,
                   poisson: bool) -> list[np.ndarray]:
    """The pre-e13c364 batch plan: today's `batch_plan` fed from the public seed, as it was."""
    return batch_plan(train, batch_size, np.random.default_rng([seed, PLAN_SALT, epoch]), poisson)


def old_label_flips(n_train: int, epsilon: float, seed: int) -> np.ndarray:
    """Which training people (in position order) the pre-e13c364 randomised response flipped."""
    rho = 0.0 if math.isinf(epsilon) else 1.0 / (1.0 + math.exp(epsilon))
    return np.random.default_rng([seed, FLIP_SALT]).random(n_train) < rho


def old_position_order(n: int, seed: int) -> np.ndarray:
    """The pre-e13c364 order of positions: position p holds the perm[p]-th smallest of the
    authority's aligned rows."""
    return np.random.default_rng([seed, POSITIONS_SALT]).permutation(n)


def old_mechanism_view(y: np.ndarray, config: dict, silo: str = "replayed") -> SiloView:
    """What a silo received under the OLD code for labels `y` in position order: the stratified
    split from the public seed, batch plans from it, and validation-only eval messages."""
    seed = int(config["seed"])
    codes = old_stratified_split(y, float(config["split.train"]), float(config["split.val"]),
                                 seed)
    train, val = np.flatnonzero(codes == 0), np.flatnonzero(codes == 1)
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    view = SiloView(silo, len(y))
    for epoch in range(int(config["train.epochs"])):
        plan = old_batch_plan(train, int(config["train.batch_size"]), epoch, seed, poisson)
        view.steps.append(Step(len(view.steps) + 1, plan=np.concatenate(plan),
                               eval=val if epoch > 0 else None,
                               done_sizes=np.array([len(b) for b in plan])))
    view.steps.append(Step(len(view.steps) + 1, eval=np.arange(len(y))))
    return view


def received_batches(view: SiloView) -> list[np.ndarray]:
    """Every mini-batch a silo was asked to compute, in order (plans cut by their sizes as the
    gradients later returned them; a plan whose gradient never came counts whole)."""
    out: list[np.ndarray] = []
    for s in view.steps:
        if s.done_plan is not None:
            out += np.split(s.done_plan, _cuts(s.done_sizes))
    if not out:  # a view without gradients (old_mechanism_view): plans cut by their sizes
        out = [b for s in view.steps if s.plan is not None and s.done_sizes is not None
               for b in np.split(s.plan, np.cumsum(s.done_sizes)[:-1])]
    return out


@dataclass
class PlanReplay:
    """Replayed against received batches, per batch: |replayed ∩ real| / |real| (the share of
    a real batch the replay predicts) and the Jaccard index; q is what chance gives."""

    overlap: float
    jaccard: float
    first_jaccard: float
    q: float
    batches: int


def replay_plans(view: SiloView, config: dict) -> PlanReplay:
    """Replay the old code's batch plans from config.json's seed over the training positions
    the silo saw (the union of its plans, sorted, as the old split returned them) and compare
    them batch by batch with the real ones."""
    real = received_batches(view)
    train = np.unique(np.concatenate(real))
    batch_size, seed = int(config["train.batch_size"]), int(config["seed"])
    poisson = math.isfinite(float(config["privacy.epsilon"]))
    replayed: list[np.ndarray] = []
    epoch = 0
    while len(replayed) < len(real):
        replayed += old_batch_plan(train, batch_size, epoch, seed, poisson)
        epoch += 1
    overlaps, jaccards = [], []
    for r, s in zip(real, replayed, strict=False):
        inter = len(np.intersect1d(r, s))
        overlaps.append(inter / max(1, len(r)))
        jaccards.append(inter / max(1, len(np.union1d(r, s))))
    return PlanReplay(float(np.mean(overlaps)), float(np.mean(jaccards)), float(jaccards[0]),
                      min(1.0, batch_size / len(train)), len(real))


def replay_flips(view: SiloView, config: dict, noisy: LabelGuess) -> LabelGuess:
    """Undo randomised response with the old code's flips replayed from the public seed: the
    label the gradients show (`noisy`, e.g. the sign attack) XOR the replayed flip."""
    train = np.unique(np.concatenate(received_batches(view)))
    flips = old_label_flips(len(train), float(config["privacy.label_epsilon"]),
                            int(config["seed"]))
    flipped = np.zeros(view.n_positions, dtype=bool)
    flipped[train] = flips
    guess = noisy.guess.astype(bool) ^ flipped[noisy.positions]
    return LabelGuess(noisy.positions, guess.astype(np.float64), guess)


def replay_position_order(view: SiloView, config: dict) -> np.ndarray:
    """The rank, among the aligned people, of each position's row in the authority's table,
    as the old code's public-seed permutation would give it."""
    return old_position_order(view.n_positions, int(config["seed"]))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho."""
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])
