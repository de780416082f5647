"""Differentially private vertical trees: totally random trees with noisy Newton leaves
(issue 20 item 1's DP mode; Maddock et al., "Federated Boosted Decision Trees with
Differential Privacy", CCS 2022, DP-TR Newton boosting). In process, like server/gbdt.py:
`fit_dp_trees` talks to `SiloEndpoint`s by method calls; in `fedscore run` (model.kind=gbdt at
a finite privacy.epsilon) server/gbdt_dp_run.py sends the routing request as one Flower message
per silo over every aligned person and boosts with `boost` on the training people's leaves.

The protocol. The tree STRUCTURE (per internal node: which silo, which of its columns, which
bin of the equal-width bins over the prepared scale u in [-1, 1]) is drawn from the authority's
secret stream before any data is read, independently of every table and label. The authority
draws all of it, not just the (silo, column) slots: one party's stream then reproduces the
whole model from one keystore, the authority learns nothing more than it does from SecureBoost
splits (which already name the bin), and a silo never chooses anything that could depend on
its data. Since no split depends on the data, all trees' structures are fixed up front and
each silo answers ONE routing request for the whole training (`RouteRequest`, the message
scoring uses too): its left/right bit per row for each of its nodes. Then the authority alone,
which holds the labels, boosts: per tree, with g = p - y in [-1, 1] and h = p (1 - p) in
[0, 1/4] at the current margin, each leaf's sums G and H over the tree's rows (a Poisson
sample at rate `sample_rate` from its secret stream), Gaussian noise on both, and the leaf
value -lr G~ / (max(H~, 0) + lambda), clipped to `max_leaf` (post-processing; other rules
that read only the released sums, and structure reuse, in server/gbdt_dp_post.py). Trees come in
batches of `batch` sharing the same gradients, their values averaged (Maddock's batched
updates). The first margin is the logit of a noisy prior (two noisy counts, as
server/run_plan.py `private_prior`), accounted too.

Privacy (add/remove one person's record). The structure reads no data. Per tree, one person's
row lands in exactly one leaf and moves that leaf's (G, H) by at most (1, 1/4): noising G with
std s_G * 1 and H with std s_H * 1/4 makes each tree one Gaussian mechanism whose whitened
sensitivity is sqrt(1/s_G^2 + 1/s_H^2), i.e. noise multiplier 1 / sqrt(1/s_G^2 + 1/s_H^2)
(clients/protocol/accounting.py `joint_multiplier`, as for DP-SGD's stacked blocks). Later
trees read each row's gradient at the released model's margin, so the composition is adaptive
over `trees` Poisson-subsampled Gaussian mechanisms: the project's accountant (PRV by default,
or RDP) composes them after the prior's release and whatever the caller passes as `prefix`
(e.g. the silos' preparation statistics), and `calibrate_sigma` picks the smallest multiplier
meeting (epsilon, delta). `DpTreesRelease` records the mechanism; its `ledger_lines()` are the
ledger's `GaussianRelease` lines, so `fedscore ledger verify` can recompute the epsilon.

Costs. Training is one routing round trip per silo; its reply is one bit per (node, row):
300 trees of depth 5 on 21,000 rows are 195 million bits, 24 MB bit-packed (np.packbits) for
all silos together, which the Flower wiring sends packed (one message per silo, everyone's
bits: 30,000 UCI people are 35 MB). In process, the (trees, nodes, rows) routing bits are one
bool array (190 MB at that size). Calibrating the noise (PRV, subsampled, after a prefix) takes
10-30 s on this machine.

What each party learns. The released model (structure + noisy leaf values + noisy prior) is
(epsilon, delta)-DP against whoever receives it. The AUTHORITY is not protected against: it
holds the labels, and it learns every training person's leaf in every tree, i.e. on which side
of each random threshold each of their silo columns falls (as SecureBoost's instance space
reveals each node's partition); on the u scale the bin edges are public, so with many trees
this approaches each person's binned features, but never a silo's raw units, declared ranges
or transforms. SILOS receive only the structure's (column, bin) pairs for their own columns,
drawn independently of every label and table: nothing label-dependent, nor anything about
other silos' columns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from clients.protocol.accounting import History, add_steps, calibrate_sigma
from clients.protocol.accounting import epsilon as accounted_epsilon
from clients.protocol.dp_constants import PRIOR_NOISE_MULTIPLIER
from clients.protocol.gbdt import RouteReply, RouteRequest, SiloEndpoint
from crypto.secret_random import SecretRandom
from server import gbdt_dp_columns, gbdt_dp_post
from server.gbdt import GbdtParams, Model, Split, Tree, gradients
from server.ledger_lines import GaussianRelease

log = logging.getLogger(__name__)

AUTHORITY = "authority"
H_BOUND = 0.25  # h = p (1 - p) <= 1/4: the hessian's sensitivity
G_BOUND = 1.0  # g = p - y in [-1, 1]: the gradient's sensitivity, no clipping needed
PURPOSE = "dp-trees"
PRIOR_PURPOSE = "prior"
TREES_PURPOSE = "dp-trees leaf sums"
GUIDE_PURPOSE = "dp-trees split histograms"


@dataclass(frozen=True, kw_only=True)
class DpTreeParams:
    """Totally random trees with noisy Newton leaves.

    `hessian_noise`: H's noise multiplier over G's (s_H = hessian_noise * s_G). H is large
    next to its sensitivity (1/4 a row), so noising it harder costs little accuracy and frees
    budget for G. `max_leaf` bounds each leaf value (after lr and averaging): an empty leaf
    holds only noise."""

    # Defaults: the best validation AUC of the settings bench/gbdt_dp.py tried on UCI at eps 1
    # (RESULTS.md "DP trees, chosen without UCI's test people"; `fedscore run`'s too).
    trees: int = 300
    depth: int = 6
    bins: int = 32  # must be the silos' bin count (GbdtSilo(bins=...))
    lr: float = 0.5
    lambda_: float = 300.0  # shrinks leaves towards 0: damps the noise of small leaves
    sample_rate: float = 0.3  # Poisson row sampling per tree (amplification)
    batch: int = 1  # trees per boosting step: same gradients, values averaged
    hessian_noise: float = 4.0  # with lambda_ 300: RESULTS.md "DP trees: post-processing ..."
    max_leaf: float = 1.0
    # True: every tree splits ONE column (cycled in a random order) at 2^depth - 1 sorted
    # random thresholds laid out as a search tree, so its leaves are that column's intervals:
    # boosting an additive model, as DP-EBM (Nori et al., ICML 2021) and Maddock et al.'s
    # one-feature interactions do. False: every node draws its own column (totally random).
    single_column: bool = False
    # >= 1: guided trees (server/gbdt_dp_guide.py): before every `guide_every` trees one noisy
    # release of every (column, bin)'s (G, H) at joint multiplier `guide_sigma` steers the
    # stage's random (column, bin) draws towards high gains: exp(guide_beta * gain / max gain)
    # for a share 1 - guide_mix of the draws, uniform for the rest. 0: totally random trees.
    guide_every: int = 0
    guide_sigma: float = 10.0
    guide_beta: float = 10.0
    guide_mix: float = 0.2
    # "bins": per-(column, bin) histograms; "score": per column; "leaves": no release, the
    # columns the trees released so far favour (post-processing).
    guide_stat: str = "bins"
    guide_bins: int = 0  # "bins": the histograms' bin count (a divisor of bins); 0: bins
    guide_share: float = 0.02  # "mass": both sides of a drawn threshold hold this share
    guide_levels: int = 0  # > 0: only the first levels' nodes are guided (bench only)
    # Post-processing of the released leaf sums (server/gbdt_dp_post.py; no budget):
    # "newton" -lr G~ / (H~ + lambda); "eb" empirical-Bayes shrinkage from the known noise,
    # its prior variance pooled over the trees released so far with weight eb_decay per tree.
    leaf_rule: str = "newton"
    eb_decay: float = 0.9
    hs_kappa: float = 100.0  # "hs": hierarchical shrinkage's strength (hessian mass)
    # A share of the steps re-release the routed structure of largest noisy gain so far.
    reuse: float = 0.0
    # "gain": after boosting, each tree's values scaled by its noisy gain's positive part over
    # their mean (pure-noise trees count less in the score); "none": as boosted.
    tree_weight: str = "none"
    accountant: str = "prv"

    def __post_init__(self) -> None:
        if self.trees < 1 or not 1 <= self.depth <= 10 or self.batch < 1:
            raise ValueError("trees and batch must be at least 1, depth in [1, 10]")
        if self.trees % self.batch:
            raise ValueError("trees must be a multiple of batch")
        if not 2 <= self.bins <= 256 or not 0 < self.sample_rate <= 1:
            raise ValueError("bins must lie in [2, 256] and sample_rate in (0, 1]")
        if not 0 < self.lr <= 1 or self.lambda_ < 0 or self.max_leaf <= 0:
            raise ValueError("lr must lie in (0, 1], lambda_ >= 0, max_leaf > 0")
        if self.hessian_noise <= 0 or self.accountant not in ("prv", "rdp"):
            raise ValueError("hessian_noise must be > 0 and accountant 'prv' or 'rdp'")
        if self.guide_every < 0 or (self.guide_every and (
                self.guide_every % self.batch or self.single_column)):
            raise ValueError("guide_every must be >= 0, a multiple of batch, and not with "
                             "single_column")
        if self.guide_bins and (self.guide_bins < 2 or self.bins % self.guide_bins):
            raise ValueError("guide_bins must be 0 or a divisor of bins, at least 2")
        if self.guide_stat not in ("bins", "score", "leaves", "mass"):
            raise ValueError("guide_stat must be 'bins', 'score', 'leaves' or 'mass'")
        if self.guide_sigma <= 0 or self.guide_beta < 0 or not 0 <= self.guide_mix <= 1:
            raise ValueError("guide_sigma must be > 0, guide_beta >= 0, guide_mix in [0, 1]")
        gbdt_dp_post.check(self)

    @property
    def guides(self) -> int:
        """The number of histogram releases (stages); 0 for totally random trees."""
        if not self.guide_every or self.guide_stat == "leaves":
            return 0
        if self.guide_stat == "mass":
            return 1
        return -(-self.trees // self.guide_every)


@dataclass(frozen=True, kw_only=True)
class DpTreesRelease:
    """The mechanism of one training, as the ledger needs it: the prior's Gaussian release
    (two counts, sensitivity sqrt 2, multiplier `prior_noise_multiplier`), then `trees`
    Poisson-sampled (rate `sample_rate`) Gaussian releases of every leaf's (G, H), whose
    whitened multiplier is `noise_multiplier` (G noised at `gradient_noise_multiplier` times 1,
    H at `hessian_noise_multiplier` times 1/4), after `prefix`. `epsilon` is the accountant's
    for the whole history at `delta`; inf without noise."""

    accountant: str
    target_epsilon: float
    epsilon: float
    delta: float
    noise_multiplier: float
    gradient_noise_multiplier: float
    hessian_noise_multiplier: float
    trees: int
    sample_rate: float
    prior_noise_multiplier: float
    prefix: tuple[tuple[float, float, int], ...] = ()
    # Guided trees: `guides` releases of the split histograms on everyone, each one Gaussian
    # mechanism of whitened multiplier `guide_noise_multiplier` (G's and H's parts below).
    guides: int = 0
    guide_noise_multiplier: float = 0.0
    guide_gradient_noise_multiplier: float = 0.0
    guide_hessian_noise_multiplier: float = 0.0

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def steps(self) -> int:
        """The trees' releases (one Gaussian mechanism each)."""
        return self.trees

    @property
    def priors(self) -> int:
        """1 when the trees release their own prior; 0 after a first stage that gives the
        margin they start from (server/gbdt_dp_init.py)."""
        return 1 if self.prior_noise_multiplier > 0 else 0

    def before_trees(self) -> History:
        """The accountant's history before the leaf sums: prefix, prior, split histograms."""
        history = add_steps(list(self.prefix), self.prior_noise_multiplier, 1.0, self.priors)
        return add_steps(history, self.guide_noise_multiplier, 1.0, self.guides)

    def history(self) -> History:
        """The accountant's history: prefix, prior, split histograms (guided), trees."""
        return add_steps(self.before_trees(), self.noise_multiplier, self.sample_rate,
                         self.trees)

    def ledger_lines(self, round_: int = 0) -> list[GaussianRelease]:
        """The prior's and the trees' lines (the prefix's own lines are its releaser's), each
        with the epsilon of everything up to it."""
        if not self.private:
            return []
        prior = add_steps(list(self.prefix), self.prior_noise_multiplier, 1.0, 1)
        lines = [
            GaussianRelease(party=AUTHORITY, population="train", purpose=PRIOR_PURPOSE,
                            noise_multiplier=self.prior_noise_multiplier, sample_rate=1.0,
                            steps=1, round=round_, delta=self.delta, accountant=self.accountant,
                            epsilon=accounted_epsilon(self.accountant, prior, self.delta))
        ] if self.priors else []
        if self.guides:
            lines.append(GaussianRelease(
                party=AUTHORITY, population="train", purpose=GUIDE_PURPOSE,
                noise_multiplier=self.guide_noise_multiplier, sample_rate=1.0,
                steps=self.guides, round=round_, delta=self.delta, accountant=self.accountant,
                epsilon=accounted_epsilon(self.accountant, self.before_trees(), self.delta)))
        return [
            *lines,
            GaussianRelease(party=AUTHORITY, population="train", purpose=TREES_PURPOSE,
                            noise_multiplier=self.noise_multiplier,
                            sample_rate=self.sample_rate, steps=self.trees, round=round_,
                            delta=self.delta, accountant=self.accountant, epsilon=self.epsilon),
        ]


def plan_noise(params: DpTreeParams, *, epsilon_: float, delta: float,
               prefix: History | Sequence[tuple[float, float, int]] = (),
               prior: bool = True) -> DpTreesRelease:
    """Calibrate the trees' noise so that prefix + prior + trees meet (epsilon_, delta) with the
    project's accountant (within `calibrate_sigma`'s 0.5 %). epsilon_ = inf: no noise.
    prior=False: no prior is released (a first stage in `prefix` gives the starting margin)."""
    prefix_t = tuple((float(s), float(q), int(n)) for s, q, n in prefix)
    k = params.hessian_noise
    if not math.isfinite(epsilon_):
        return DpTreesRelease(accountant=params.accountant, target_epsilon=math.inf,
                              epsilon=math.inf, delta=delta, noise_multiplier=0.0,
                              gradient_noise_multiplier=0.0, hessian_noise_multiplier=0.0,
                              trees=params.trees, sample_rate=params.sample_rate,
                              prior_noise_multiplier=0.0, prefix=prefix_t,
                              guides=params.guides)
    if not 0 < delta < 1 or epsilon_ <= 0:
        raise ValueError("epsilon must be > 0 and delta in (0, 1)")
    guide = params.guide_sigma if params.guides else 0.0
    prior_sigma = PRIOR_NOISE_MULTIPLIER if prior else 0.0
    before = add_steps(list(prefix_t), prior_sigma, 1.0, 1 if prior else 0)
    before = add_steps(before, guide, 1.0, params.guides)
    joint = calibrate_sigma(epsilon_, delta, params.sample_rate, params.trees,
                            params.accountant, prefix=before)
    s_g = joint * math.sqrt(1.0 + 1.0 / k**2)  # 1/s_G^2 + 1/(k s_G)^2 = 1/joint^2
    guide_g = guide * math.sqrt(1.0 + 1.0 / k**2)
    release = DpTreesRelease(
        accountant=params.accountant, target_epsilon=epsilon_, epsilon=0.0, delta=delta,
        noise_multiplier=joint, gradient_noise_multiplier=s_g, hessian_noise_multiplier=k * s_g,
        trees=params.trees, sample_rate=params.sample_rate,
        prior_noise_multiplier=prior_sigma, prefix=prefix_t, guides=params.guides,
        guide_noise_multiplier=guide, guide_gradient_noise_multiplier=guide_g,
        guide_hessian_noise_multiplier=k * guide_g)
    spent = accounted_epsilon(params.accountant, release.history(), delta)
    log.info("dp trees: joint noise multiplier %.3f (G %.3f, H %.3f), %d trees at q %.3f, "
             "epsilon %.4f at delta %.3g", joint, s_g, k * s_g, params.trees,
             params.sample_rate, spent, delta)
    return replace(release, epsilon=spent)


@dataclass(frozen=True, kw_only=True)
class DpTrees:
    """A trained model (`server.gbdt.predict_trees` scores it) and its mechanism."""

    model: Model
    release: DpTreesRelease
    # The routed structure each tree uses (structure reuse, server/gbdt_dp_post.py); None:
    # tree t is structure t.
    sources: tuple[int, ...] | None = None
    # Per tree, the released (G~, H~) of every leaf, (2, 2^depth): the reasons' input.
    sums: tuple[np.ndarray, ...] = ()

    def leaves(self, leaf: np.ndarray) -> np.ndarray:
        """Each tree's rows of `leaf` (the routed structures' leaf indices, one row each)."""
        return leaf if self.sources is None else leaf[list(self.sources)]


def draw_structure(silos: Mapping[str, SiloEndpoint], params: DpTreeParams,
                   rng: np.random.Generator,
                   weights: Mapping[str, Sequence[float]] | None = None) -> list[dict[int, Split]]:
    """Every tree's internal nodes (complete trees, heap order) from `rng`, reading no data.

    A node's column is drawn over all silos' columns, uniformly or by `weights` (per silo, one
    non-negative weight per column; it must be public and data-independent, e.g. from the
    schema's column kinds); its bin uniformly among the bins - 1 thresholds."""
    slots = [(name, f) for name, silo in silos.items() for f in range(silo.features)]
    if not slots:
        raise ValueError("the silos have no columns")
    w = np.ones(len(slots))
    if weights is not None:
        w = np.concatenate([np.asarray(weights.get(name, np.ones(silo.features)), dtype=float)
                            for name, silo in silos.items()])
        if w.shape != (len(slots),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights need one non-negative weight per column, not all 0")
    p = w / w.sum()
    internal = 2**params.depth - 1
    if params.single_column:
        picks, bins = gbdt_dp_columns.single_column(params.trees, params.depth,
                                                     params.bins, p, rng)
    else:
        picks = rng.choice(len(slots), size=(params.trees, internal), p=p)
        bins = rng.integers(0, params.bins - 1, size=(params.trees, internal))
    return [{node: Split(silo=slots[picks[t, node]][0], feature=slots[picks[t, node]][1],
                         bin=int(bins[t, node])) for node in range(internal)}
            for t in range(params.trees)]


def route_requests(names: Sequence[str], structure: list[dict[int, Split]]
                   ) -> tuple[dict[str, list[tuple[int, int]]], dict[str, RouteRequest]]:
    """Per silo, the (tree, node) of each of its splits in every tree, and the ONE routing
    request that asks for all of them (silos that own no split are not asked)."""
    owned: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    asked: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    for t, splits in enumerate(structure):
        for node, split in splits.items():
            owned[split.silo].append((t, node))
            asked[split.silo].append((split.feature, split.bin))
    return owned, {name: RouteRequest(splits=tuple(pairs)) for name, pairs in asked.items()
                   if pairs}


def leaves_from(owned: Mapping[str, list[tuple[int, int]]], replies: Mapping[str, RouteReply],
                trees: int, rows: int, depth: int) -> np.ndarray:
    """(trees, rows) leaf index (0 .. 2^depth - 1) of every row from the silos' routing bits
    (`route_requests`' order)."""
    left = np.zeros((trees, 2**depth - 1, rows), dtype=bool)
    for name, mine in owned.items():
        if not mine:
            continue
        reply = replies[name]
        if reply.left.shape != (len(mine), rows):
            raise ValueError(f"silo {name} returned routing bits of the wrong shape")
        nodes = np.array(mine, dtype=np.int64)
        left[nodes[:, 0], nodes[:, 1]] = reply.left
    position = np.zeros((trees, rows), dtype=np.int64)
    for _ in range(depth):  # complete trees: every row takes `depth` steps
        go_left = np.take_along_axis(left, position[:, None, :], axis=1)[:, 0, :]
        position = np.where(go_left, 2 * position + 1, 2 * position + 2)
    return position - (2**depth - 1)


def route_all(silos: Mapping[str, SiloEndpoint], structure: list[dict[int, Split]],
              rows: int, depth: int) -> np.ndarray:
    """(trees, rows) leaf index (0 .. 2^depth - 1) of every row: ONE routing request per silo
    for all its nodes of all trees."""
    owned, asked = route_requests(list(silos), structure)
    replies = {name: silos[name].route(request) for name, request in asked.items()}
    return leaves_from(owned, replies, len(structure), rows, depth)


def noisy_prior(y: np.ndarray, release: DpTreesRelease, rng: np.random.Generator) -> float:
    """The logit of the training default rate from two noisy counts (positives, people;
    sensitivity sqrt 2), as server/run_plan.py `private_prior`; exact without noise."""
    counts = np.array([y.sum(), len(y)], dtype=float)
    if release.private:
        counts += rng.normal(0.0, release.prior_noise_multiplier * math.sqrt(2.0), 2)
    rate = float(np.clip(counts[0] / max(counts[1], 1.0), 0.001, 0.999))
    return math.log(rate / (1.0 - rate))


def row_sample(rng: np.random.Generator, rows: int, rate: float) -> np.ndarray:
    """One tree's Poisson sample of `rows` people (a mask: each in with probability `rate`,
    everyone at rate 1), drawn from the authority's secret stream. The canary audit replays
    the same draw (simulations/analysis/tree_audit.py)."""
    return rng.random(rows) < rate if rate < 1 else np.ones(rows, dtype=bool)


def noisy_sums(g: np.ndarray, h: np.ndarray, leaf: np.ndarray, params: DpTreeParams,
               release: DpTreesRelease, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """One tree's released (2^depth,) sums G~, H~ from the sampled rows' g, h and leaves."""
    leaves = 2**params.depth
    g_sum = np.bincount(leaf, weights=g, minlength=leaves)
    h_sum = np.bincount(leaf, weights=h, minlength=leaves)
    if release.private:
        # Noise is drawn for every leaf, empty ones too: which leaves are empty is data.
        g_sum = g_sum + rng.normal(0.0, release.gradient_noise_multiplier * G_BOUND, leaves)
        h_sum = h_sum + rng.normal(0.0, release.hessian_noise_multiplier * H_BOUND, leaves)
    return g_sum, h_sum


def newton_leaf_values(g_sum: np.ndarray, h_sum: np.ndarray, params: DpTreeParams) -> np.ndarray:
    """Leaf values from released sums: Newton step, averaged over the batch, clipped."""
    value = gbdt_dp_post.newton_values(g_sum, h_sum, params.lambda_)
    return np.clip(params.lr * value / params.batch, -params.max_leaf, params.max_leaf)


def fit_dp_trees(silos: Mapping[str, SiloEndpoint], y: np.ndarray, params: DpTreeParams, *,
                 epsilon: float, delta: float, rng: SecretRandom, purpose: str = "",
                 prefix: History | Sequence[tuple[float, float, int]] = (),
                 weights: Mapping[str, Sequence[float]] | None = None) -> DpTrees:
    """Train on the aligned rows 0..M-1 (y: the authority's 0/1 labels of those rows) within
    (epsilon, delta) for everything released, after the releases in `prefix`.

    Every draw comes from `rng`, the authority's secret streams, addressed by `purpose` (e.g.
    the run key): the structure, the row samples, the prior's and the leaves' noise each from
    their own stream, so the same secret and purpose give the same model and nothing else does.
    """
    release = plan_noise(params, epsilon_=epsilon, delta=delta, prefix=prefix)
    return train_dp_trees(silos, y, params, release, rng, purpose=purpose, weights=weights)


def train_dp_trees(silos: Mapping[str, SiloEndpoint], y: np.ndarray, params: DpTreeParams,
                   release: DpTreesRelease, rng: SecretRandom, *, purpose: str = "",
                   weights: Mapping[str, Sequence[float]] | None = None,
                   init: np.ndarray | None = None) -> DpTrees:
    """`fit_dp_trees` with the noise already planned (`plan_noise`), e.g. for many trainings
    at one calibration; `init` as for `boost`."""
    if not silos:
        raise ValueError("at least one silo is needed")
    y = np.asarray(y, dtype=np.float64)
    structure = draw_structure(silos, params, rng.generator(PURPOSE, purpose, "structure"),
                               weights)
    leaf = route_all(silos, structure, len(y), params.depth)
    return boost(leaf, y, structure, params, release, rng, purpose=purpose, init=init)


def boost(leaf: np.ndarray, y: np.ndarray, structure: list[dict[int, Split]],
          params: DpTreeParams, release: DpTreesRelease, rng: SecretRandom, *,
          purpose: str = "", init: np.ndarray | None = None) -> DpTrees:
    """The authority's part after routing: the noisy prior, then every tree's noisy leaves on
    the rows' (trees, rows) leaf indices `leaf` (y: their 0/1 labels). The Flower wiring
    (server/gbdt_dp_run.py) routes everyone once and boosts on the training rows' columns.
    `init`: the rows' margin from a released first stage (server/gbdt_dp_init.py) to boost
    from instead of the prior (the release then has none): the model's base margin is 0 and
    a person's score adds the stage's margin."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y must be a 1-d array of 0/1 labels")
    if release.trees != params.trees or release.sample_rate != params.sample_rate:
        raise ValueError("the release was planned for other trees or another sampling rate")
    if leaf.shape != (params.trees, len(y)):
        raise ValueError("leaf needs one row of leaf indices per tree, one column per label")
    rows = len(y)
    if release.private and (init is None) != bool(release.priors):
        raise ValueError("a first stage's margin replaces the trees' prior: pass init exactly "
                         "when the release has no prior")
    if init is not None and init.shape != (rows,):
        raise ValueError("init needs one margin per label")
    base = (0.0 if init is not None
            else noisy_prior(y, release, rng.generator(PURPOSE, purpose, "prior")))
    sample_rng = rng.generator(PURPOSE, purpose, "rows")
    noise_rng = rng.generator(PURPOSE, purpose, "noise")
    post = gbdt_dp_post.Post(params, (release.gradient_noise_multiplier * G_BOUND) ** 2,
                             rng.generator(PURPOSE, purpose, "reuse"))
    margin = np.full(rows, base) if init is None else np.asarray(init, dtype=np.float64).copy()
    offset = 2**params.depth - 1  # heap index of the first leaf
    trees, sums = [], []
    for start in range(0, params.trees, params.batch):
        g, h = gradients(margin, y)  # g = p - y lies in [-1, 1], h in [0, 1/4]
        step = np.zeros(rows)
        for _ in range(start, start + params.batch):
            s = post.next(len(structure))
            taken = row_sample(sample_rng, rows, params.sample_rate)
            sums.append(np.stack(noisy_sums(g[taken], h[taken], leaf[s][taken], params,
                                            release, noise_rng)))
            values = post.values(s, sums[-1][0], sums[-1][1])
            step += values[leaf[s]]
            trees.append(Tree(splits=structure[s],
                              leaves={offset + i: float(v) for i, v in enumerate(values)}))
        margin += step
    model = Model(params=GbdtParams(trees=params.trees, depth=params.depth, bins=params.bins,
                                    lr=params.lr, lambda_=params.lambda_),
                  base_margin=base, trees=tuple(post.finish(trees)))
    return DpTrees(model=model, release=release, sources=post.sources(),
                   sums=tuple(sums))
