"""Post-processing of the DP trees' released leaf sums (server/gbdt_dp.py): how the authority
turns each tree's noisy (G, H) into leaf values, and which routed structure the next tree
uses. Everything here reads only what is already released (the noisy sums, their known noise
variances, the public structure) and the authority's secret stream: no privacy cost, no new
ledger line.

Why (bench/RESULTS.md "DP trees guided by accounted split releases"): the random trees' leaves
hold few rows each after Poisson sampling, and their noisy G (std about 23 at eps 1 on UCI)
is as large as the signal of a leaf of a hundred people. The Newton value -G~ / (H~ + lambda)
with one lambda for every leaf shrinks a leaf by the same additive amount whatever the noise
and whatever the leaf's size.

Leaf rules (`DpTreeParams.leaf_rule`):
- "newton": -lr G~ / (max(H~, 0) + lambda), clipped (the random trees' rule since they exist).
- "eb": empirical Bayes. A leaf's mean gradient per unit hessian mu = G / H has a prior
  N(0, tau^2) shared by all leaves; the released sum is G~ = H mu + e, e of variance H (the
  rows' own Bernoulli spread: Var g = p (1 - p) = h) plus the known noise variance s_G^2. The
  posterior mean is mu^ = G~ H tau^2 / (H^2 tau^2 + H + s_G^2), the leaf value -lr mu^
  (lambda adds to H in the variance term as a floor: lambda 0 is plain EB). tau^2 is
  estimated by moments from the released sums themselves, E[G~^2] = H^2 tau^2 + H + s_G^2,
  pooled over the trees released so far with weight `eb_decay` per tree (the signal fades as
  boosting fits it). A large leaf is shrunk by about 1 / tau^2, a small or empty one by its
  noise: the shrinkage follows the known noise instead of one lambda for every leaf.

Structure reuse (`DpTreeParams.reuse`): a share of the boosting steps re-release the routed
structure whose last release showed the largest noisy gain, sum over leaves of (G~^2 - s_G^2) /
(H~+ + lambda) (unbiased in G's noise); the other steps take the next fresh random structure.
Every structure was routed before any label was read, so the silos see nothing new; the
choice reads only released sums. A re-released structure costs one tree's release like any
other step (the accountant counts steps, not distinct structures).

`tree_weight` "gain" (bench only): each finished tree scaled by its noisy gain over the mean.

Measured on UCI's validation people at eps 1 (bench/RESULTS.md "DP trees: post-processing the
released leaf sums"): none of them beats "newton" (hs and eb lose 0.001-0.009, reuse 0.0003-
0.002, tree_weight 0.021), so all are off by default; the random trees' small leaves are often
the rare informative cells, which any extra shrinkage costs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from server.gbdt import Tree


class DpTreeParams(Protocol):
    """The settings read here (server/gbdt_dp.py `DpTreeParams`, which imports this module)."""

    @property
    def lr(self) -> float: ...
    @property
    def lambda_(self) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def max_leaf(self) -> float: ...
    @property
    def guide_every(self) -> int: ...
    @property
    def leaf_rule(self) -> str: ...
    @property
    def hs_kappa(self) -> float: ...
    @property
    def eb_decay(self) -> float: ...
    @property
    def reuse(self) -> float: ...
    @property
    def tree_weight(self) -> str: ...


def check(params: DpTreeParams) -> None:
    """Refuse post-processing settings that mean nothing."""
    if params.tree_weight not in ("none", "gain"):
        raise ValueError("tree_weight must be 'none' or 'gain'")
    if params.leaf_rule not in ("newton", "eb", "hs") or not 0 <= params.eb_decay <= 1:
        raise ValueError("leaf_rule must be 'newton', 'eb' or 'hs', eb_decay in [0, 1]")
    if not 0 <= params.reuse < 1 or (params.reuse and (params.guide_every or params.batch > 1)):
        raise ValueError("reuse must lie in [0, 1), and not with guide_every or batch > 1")


def newton_values(g_sum: np.ndarray, h_sum: np.ndarray, lambda_: float) -> np.ndarray:
    """-G~ / (max(H~, 0) + lambda) per leaf (before lr), 0 where the denominator is 0."""
    denominator = np.maximum(h_sum, 0.0) + lambda_
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, -g_sum / denominator, 0.0)


def hierarchical_values(g_sum: np.ndarray, h_sum: np.ndarray, lambda_: float,
                        kappa: float) -> np.ndarray:
    """Hierarchical shrinkage (Agarwal et al., ICML 2022) on the released sums: every internal
    node's sums are the sums of its leaves' noisy sums (free), its Newton value v = -G / (H+ +
    lambda); a leaf's value is the root's plus each step down its path, (v_child - v_parent) /
    (1 + kappa / H+_parent). A leaf whose parent holds little hessian mass keeps its
    ancestors' value instead of being shrunk to 0. (2^depth,) leaves in heap order."""
    leaves = len(g_sum)
    depth = leaves.bit_length() - 1
    idx = np.arange(leaves)
    parent_h = np.maximum(h_sum.sum(), 0.0) * np.ones(leaves)
    parent_v = newton_values(np.full(leaves, g_sum.sum()), parent_h, lambda_)
    value = parent_v.copy()  # the root's value, then each step down
    for level in range(1, depth + 1):
        width = 2 ** (depth - level)  # leaves under one node of this level
        g = g_sum.reshape(-1, width).sum(axis=1)[idx // width]
        h = np.maximum(h_sum.reshape(-1, width).sum(axis=1), 0.0)[idx // width]
        v = newton_values(g, h, lambda_)
        value += (v - parent_v) / (1.0 + kappa / np.maximum(parent_h, 1e-9))
        parent_v, parent_h = v, h
    return value


@dataclass
class Shrinkage:
    """The empirical-Bayes prior variance tau^2 of the leaves' mean gradient per unit hessian,
    from the released sums only: exponentially weighted moments over the trees so far."""

    decay: float
    noise_var: float  # s_G^2: the variance of the noise added to each leaf's G
    floor: float = 1e-4  # tau^2 never below: a tree of pure noise still moves a little
    numerator: float = 0.0
    denominator: float = 0.0

    def update(self, g_sum: np.ndarray, h_sum: np.ndarray) -> float:
        """Add one released tree's sums; the current tau^2."""
        h = np.maximum(h_sum, 0.0)
        self.numerator = self.decay * self.numerator + float(
            np.sum(g_sum**2 - h - self.noise_var))
        self.denominator = self.decay * self.denominator + float(np.sum(h**2))
        return self.tau2

    @property
    def tau2(self) -> float:
        if self.denominator <= 0:
            return self.floor
        return max(self.numerator / self.denominator, self.floor)

    def values(self, g_sum: np.ndarray, h_sum: np.ndarray, lambda_: float) -> np.ndarray:
        """Posterior mean of -mu per leaf (before lr): -G~ H tau^2 / (H^2 tau^2 + H + lambda
        + s_G^2), H the clipped noisy hessian sum."""
        h = np.maximum(h_sum, 0.0)
        tau2 = self.tau2
        return -g_sum * h * tau2 / (h**2 * tau2 + h + lambda_ + self.noise_var)


def noisy_gain(g_sum: np.ndarray, h_sum: np.ndarray, noise_var: float,
               lambda_: float) -> float:
    """A released tree's Newton gain, sum of (G~^2 - s_G^2) / (max(H~, 0) + lambda): G's
    noise variance taken out, so a tree of pure noise scores about 0."""
    return float(np.sum((g_sum**2 - noise_var) / (np.maximum(h_sum, 0.0) + max(lambda_, 1.0))))


@dataclass
class Chooser:
    """Which routed structure each boosting step uses: the next fresh one, or (a share
    `reuse` of the steps, from the authority's secret stream) the one whose latest release
    showed the largest noisy gain."""

    reuse: float
    rng: np.random.Generator
    fresh: int = 0
    gains: dict[int, float] | None = None

    def next(self, available: int) -> int:
        gains = self.gains if self.gains is not None else {}
        draw = self.rng.random() if self.reuse > 0 else 1.0  # no draw: the defaults' streams
        if gains and (draw < self.reuse or self.fresh >= available):
            return max(gains, key=lambda s: gains[s])
        self.fresh += 1
        return self.fresh - 1

    def released(self, source: int, gain: float) -> None:
        if self.gains is None:
            self.gains = {}
        self.gains[source] = gain


def weighted(trees: list[Tree], gains: list[float]) -> list[Tree]:
    """Each tree's leaf values times its noisy gain's positive part over their mean (all 1
    when no gain is positive): a final reweighting read from the released sums only."""
    w = np.maximum(np.asarray(gains, dtype=float), 0.0)
    w = w / w.mean() if w.sum() > 0 else np.ones(len(trees))
    return [replace(tree, leaves={k: float(v * wt) for k, v in tree.leaves.items()})
            for tree, wt in zip(trees, w, strict=True)]


class Post:
    """One boosting's post-processing state: which routed structure each step uses, each
    tree's leaf values from its released sums by `params.leaf_rule` (averaged over the batch,
    clipped), and the final reweighting."""

    def __init__(self, params: DpTreeParams, noise_var: float,
                 reuse_rng: np.random.Generator) -> None:
        self.params, self.noise_var = params, noise_var
        self.shrink = Shrinkage(decay=params.eb_decay, noise_var=noise_var)
        self.chooser = Chooser(params.reuse, reuse_rng)
        self.used: list[int] = []
        self.gains: list[float] = []

    def next(self, available: int) -> int:
        source = self.chooser.next(available)
        self.used.append(source)
        return source

    def values(self, source: int, g_sum: np.ndarray, h_sum: np.ndarray) -> np.ndarray:
        p = self.params
        gain = noisy_gain(g_sum, h_sum, self.noise_var, p.lambda_)
        self.gains.append(gain)
        if p.reuse:
            self.chooser.released(source, gain)
        if p.leaf_rule == "eb":
            self.shrink.update(g_sum, h_sum)
            value = self.shrink.values(g_sum, h_sum, p.lambda_)
        elif p.leaf_rule == "hs":
            value = hierarchical_values(g_sum, h_sum, p.lambda_, p.hs_kappa)
        else:
            value = newton_values(g_sum, h_sum, p.lambda_)
        return np.clip(p.lr * value / p.batch, -p.max_leaf, p.max_leaf)

    def finish(self, trees: list[Tree]) -> list[Tree]:
        return weighted(trees, self.gains) if self.params.tree_weight == "gain" else trees

    def sources(self) -> tuple[int, ...] | None:
        """The structure each tree used, when reuse made it differ from tree t = structure t."""
        return tuple(self.used) if self.params.reuse else None
