"""DP trees whose structure follows noisy split histograms (issue 20 acceptance "at combined
eps 1 >= 0.76"; server/gbdt_dp.py's totally random trees otherwise).

Why. The totally random trees (server/gbdt_dp.py) sit 0.012-0.021 AUC below central LightGBM on
UCI, and without noise they are hardly better: the random structure, not the noise, is what
limits them (bench/RESULTS.md "DP trees, chosen without UCI's test people"). Maddock et al.
(CCS 2022) choose splits from noisy gradient histograms instead; per tree and level that
costs a release each, far too many at eps 1. Here a few releases steer all trees: before each
STAGE of `guide_every` trees the authority releases, at the current margin, every (column,
bin)'s noisy sums of g and h over the training people (a Gaussian mechanism, accounted), turns
them into every candidate split's Newton gain (post-processing) and draws the stage's random
trees from a distribution that favours high-gain (column, bin) pairs. The leaves stay those of
server/gbdt_dp.py (noisy Newton sums per tree, Poisson-sampled).

How the authority gets the histograms. Each silo answers ONE routing request for every (column,
bin) pair of its own columns over every routed person (`bins_request`: the same
`RouteRequest` message the random trees and scoring use): the left bits at all thresholds of a
column give each person's bin on that column. From these the authority computes any
histogram and routes any tree itself, so training is still one round trip per silo, and the
silos' reply is smaller than the random trees' (UCI: 30 columns x 31 thresholds against 300
trees x 63 nodes of bits per person). The authority learns each routed person's BIN on every
column of the public equal-width grid on the silo's prepared scale (never the raw value, the
silo's ranges or transforms); the random trees' 18,900 random (column, bin) requests already
revealed nearly all of it.

Privacy (add/remove one person). A person's row lands in exactly one bin of each of the d
columns, so it moves the stacked per-bin sums (G over all columns, then H) by at most sqrt(d)
in G (|g| <= 1) and sqrt(d) / 4 in H (h <= 1/4). Noising G's bins with std s_G sqrt(d) and H's
with s_H sqrt(d) / 4 makes each stage's release ONE Gaussian mechanism of whitened multiplier
`guide_sigma` = 1 / sqrt(1/s_G^2 + 1/s_H^2) (s_H = hessian_noise * s_G, as for the leaves), on
everyone (no sampling). The stages compose adaptively with the prior and the trees' leaf sums on
the project's accountant (`DpTreesRelease.history`); the leaves' noise is calibrated after
them. The structure is a function of the released histograms and the authority's secret
stream only: post-processing. The ledger records the histograms as their own
`GaussianRelease` line ("dp-trees split histograms").

What is released (`DpTreeParams.guide_stat`): "bins" as above (optionally `guide_bins` coarser
bins); "score", per column sum g u and sum h u^2 (u the bin centre in [-1, 1]: the same
sensitivity, one number per column, no threshold); "mass", label-free people counts per (column,
bin), once, keeping thresholds with at least `guide_share` on each side; "leaves", nothing: the
columns the trees released so far favour (post-processing, no budget).

Measured (bench/RESULTS.md "DP trees guided by accounted split releases"): without noise the
guided trees gain up to 0.009 validation AUC on UCI; at eps 1 they tie the random trees (the
releases cost sqrt(112) sensitivity there, and trees whose thresholds all cut people have small
leaves that the leaf noise drowns). Off by default (`guide_every` 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clients.protocol.gbdt import RouteReply, RouteRequest, SiloEndpoint
from crypto.secret_random import SecretRandom
from server import gbdt_dp
from server.gbdt import GbdtParams, Model, Split, Tree, gradients
from server.gbdt_dp import G_BOUND, H_BOUND


def bins_request(features: int, bins: int) -> RouteRequest:
    """Every (column, bin) pair of a silo: the left bits at all of a column's thresholds."""
    return RouteRequest(splits=tuple((f, b) for f in range(features) for b in range(bins - 1)))


def bins_from_reply(reply: RouteReply, features: int, bins: int) -> np.ndarray:
    """(rows, features) uint8 bin of each routed person from the reply to `bins_request`: the
    number of thresholds the person lies right of. Bits that are not monotone along the
    thresholds (left at b but not at b + 1) cannot come from one binning: refused."""
    left = np.asarray(reply.left, dtype=bool)
    if left.ndim != 2 or left.shape[0] != features * (bins - 1):
        raise ValueError(f"silo {reply.silo} returned bin bits of the wrong shape")
    left = left.reshape(features, bins - 1, left.shape[1])
    if (left[:, :-1] & ~left[:, 1:]).any():
        raise ValueError(f"silo {reply.silo} returned bits no binning gives")
    return np.ascontiguousarray((~left).sum(axis=1, dtype=np.int64).T.astype(np.uint8))


@dataclass(frozen=True)
class Binned:
    """Every routed person's bin on every column, the columns of all silos side by side in
    `slots` order ((silo, feature) of each column)."""

    slots: tuple[tuple[str, int], ...]
    bins: np.ndarray  # (rows, columns) uint8

    def rows(self, which: np.ndarray | slice) -> Binned:
        return Binned(self.slots, self.bins[which])


def ask_bins(silos: Mapping[str, SiloEndpoint], bins: int) -> Binned:
    """ONE routing request per silo (in process: a method call)."""
    replies = {name: silo.route(bins_request(silo.features, bins))
               for name, silo in silos.items()}
    return binned_from({n: s.features for n, s in silos.items()}, replies, bins)


def binned_from(features: Mapping[str, int], replies: Mapping[str, RouteReply],
                bins: int) -> Binned:
    slots = tuple((name, f) for name, count in features.items() for f in range(count))
    if not slots:
        raise ValueError("the silos have no columns")
    parts = [bins_from_reply(replies[name], count, bins)
             for name, count in features.items() if count]
    return Binned(slots, np.hstack(parts))


def noisy_histograms(binned: Binned, g: np.ndarray, h: np.ndarray, n_bins: int,
                     noise: tuple[float, float] | None,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(columns, bins) sums of g and of h per bin; `noise` = (s_G, s_H) noises them at std
    s_G sqrt(d) and s_H sqrt(d) / 4 (d columns: one person moves one bin of each), every bin,
    empty ones too. None: exact (the non-private reference)."""
    _rows, d = binned.bins.shape
    flat = (binned.bins.astype(np.int64) + np.arange(d, dtype=np.int64) * n_bins).ravel()
    g_sum = np.bincount(flat, weights=np.repeat(g, d), minlength=d * n_bins)
    h_sum = np.bincount(flat, weights=np.repeat(h, d), minlength=d * n_bins)
    if noise is not None:
        s_g, s_h = noise
        g_sum = g_sum + rng.normal(0.0, s_g * math.sqrt(d) * G_BOUND, d * n_bins)
        h_sum = h_sum + rng.normal(0.0, s_h * math.sqrt(d) * H_BOUND, d * n_bins)
    return g_sum.reshape(d, n_bins), h_sum.reshape(d, n_bins)


def split_gains(g_hist: np.ndarray, h_hist: np.ndarray, lambda_: float,
                bin_var: float = 0.0) -> np.ndarray:
    """(columns, bins - 1) Newton gain of splitting at each threshold (left: bin <= b), from
    the (noisy) histograms, each squared sum less its noise's variance (`bin_var` per bin
    summed: a sum over many empty bins is otherwise all noise and looks like signal); at
    least 0."""
    n_bins = g_hist.shape[1]
    g_left = np.cumsum(g_hist, axis=1)[:, :-1]
    h_left = np.maximum(np.cumsum(h_hist, axis=1)[:, :-1], 0.0)
    g_all = g_hist.sum(axis=1, keepdims=True)
    h_all = np.maximum(h_hist.sum(axis=1, keepdims=True), 0.0)
    h_right = np.maximum(h_all - h_left, 0.0)
    width = np.arange(1, n_bins)
    gain = (np.maximum(np.square(g_left) - bin_var * width, 0.0) / (h_left + lambda_)
            + np.maximum(np.square(g_all - g_left) - bin_var * (n_bins - width), 0.0)
            / (h_right + lambda_)
            - np.maximum(np.square(g_all) - bin_var * n_bins, 0.0) / (h_all + lambda_))
    return np.maximum(gain, 0.0)


def noisy_scores(binned: Binned, g: np.ndarray, h: np.ndarray, n_bins: int,
                 noise: tuple[float, float] | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(columns,) score-test sums U = sum g u and information I = sum h u^2, with u in
    [-1, 1] each person's bin centre on the public grid: one person moves each column's U by
    at most 1 and I by at most 1/4, so the noise is that of `noisy_histograms` (std s_G sqrt(d)
    and s_H sqrt(d) / 4). One number per column instead of one per bin: far less noise per
    column at the same budget, but no threshold."""
    d = binned.bins.shape[1]
    u = (binned.bins.astype(np.float64) + 0.5) * (2.0 / n_bins) - 1.0
    score, information = g @ u, h @ np.square(u)
    if noise is not None:
        s_g, s_h = noise
        score = score + rng.normal(0.0, s_g * math.sqrt(d) * G_BOUND, d)
        information = information + rng.normal(0.0, s_h * math.sqrt(d) * H_BOUND, d)
    return score, information


def score_gains(score: np.ndarray, information: np.ndarray, n_bins: int, lambda_: float,
                noise_var: float = 0.0) -> np.ndarray:
    """(columns, bins - 1) gains from the score test, the same for every threshold of a
    column: (U^2 - the noise's variance) / (I + lambda), at least 0 (post-processing)."""
    gain = np.maximum(np.square(score) - noise_var, 0.0) / (np.maximum(information, 0.0)
                                                            + lambda_)
    return np.repeat(gain[:, None], n_bins - 1, axis=1)


def slot_weights(gains: np.ndarray, beta: float, mix: float,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Probabilities over (column, bin) pairs, flattened: a share `mix` uniform, the rest
    proportional to exp(beta * gain / max gain). `mask` (one weight per column, public) zeroes
    columns out. Every input is a released quantity: post-processing."""
    d, thresholds = gains.shape
    column_weight = np.ones(d) if mask is None else np.asarray(mask, dtype=float)
    allowed: np.ndarray = np.repeat(column_weight > 0, thresholds)
    top = gains.max()
    scaled = gains.ravel() / top if top > 0 else np.zeros(gains.size)
    # Pairs of gain exactly 0 (noise clamped, thresholds a coarse histogram cannot see, or
    # cutting nobody) get no favoured weight; the uniform share still reaches them.
    seen = (gains.ravel() > 0) | (top <= 0)
    favoured = np.where(allowed & seen, np.exp(beta * (scaled - 1.0)), 0.0)
    if favoured.sum() <= 0:
        favoured = allowed.astype(float)
    uniform = allowed.astype(float)
    p = (1.0 - mix) * favoured / favoured.sum() + mix * uniform / uniform.sum()
    return p / p.sum()


def draw_stage(p: np.ndarray, binned: Binned, bins: int, depth: int, trees: int,
               rng: np.random.Generator, levels: int = 0) -> list[dict[int, Split]]:
    """`trees` complete trees whose every node's (column, bin) is drawn from `p` (`levels` >
    0: only the nodes of the first `levels` levels; below, uniformly, as the random trees)."""
    internal = 2**depth - 1
    picks = rng.choice(p.size, size=(trees, internal), p=p)
    if levels:
        below = 2**levels - 1
        picks[:, below:] = rng.integers(0, p.size, size=(trees, internal - below))
    column, threshold = np.divmod(picks, bins - 1)
    return [{node: Split(silo=binned.slots[column[t, node]][0],
                         feature=binned.slots[column[t, node]][1],
                         bin=int(threshold[t, node])) for node in range(internal)}
            for t in range(trees)]


def leaves_of(structure: Sequence[dict[int, Split]], binned: Binned, depth: int) -> np.ndarray:
    """(trees, rows) int16 leaf (0 .. 2^depth - 1) of every row, from the rows' bins: what the
    silos' routing bits would give (left: bin <= the split's bin)."""
    index = {slot: c for c, slot in enumerate(binned.slots)}
    internal = 2**depth - 1
    rows = binned.bins.shape[0]
    out = np.empty((len(structure), rows), dtype=np.int16)
    every = np.arange(rows)
    for t, splits in enumerate(structure):
        column = np.array([index[(splits[n].silo, splits[n].feature)] for n in range(internal)])
        threshold = np.array([splits[n].bin for n in range(internal)])
        position = np.zeros(rows, dtype=np.int64)
        for _ in range(depth):
            go_left = binned.bins[every, column[position]] <= threshold[position]
            position = np.where(go_left, 2 * position + 1, 2 * position + 2)
        out[t] = position - internal
    return out


def leaf_importance(trees: Sequence[Tree], slots: Sequence[tuple[str, int]], depth: int,
                    n_bins: int) -> np.ndarray:
    """(columns, bins - 1) importance read from RELEASED trees only (their structure and noisy
    leaf values; no count, no row): per column, the mean over its nodes of the squared gap
    between the mean leaf value left and right of the node. Post-processing: no budget."""
    index = {slot: c for c, slot in enumerate(slots)}
    total, count = np.zeros(len(slots)), np.zeros(len(slots))
    internal = 2**depth - 1
    for tree in trees:
        values = np.array([tree.leaves[internal + i] for i in range(internal + 1)])
        for node, split in tree.splits.items():
            level = int(math.log2(node + 1))
            first = (node - (2**level - 1)) * 2 ** (depth - level)  # its leaves, in order
            half = 2 ** (depth - level - 1)
            gap = values[first:first + half].mean() - values[first + half:first + 2 * half].mean()
            c = index[(split.silo, split.feature)]
            total[c] += gap**2
            count[c] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return np.repeat(mean[:, None], n_bins - 1, axis=1)


def noisy_counts(binned: Binned, n_bins: int, sigma: float | None,
                 rng: np.random.Generator) -> np.ndarray:
    """(columns, bins) people per bin; one person adds 1 to one bin of each of d columns, so
    noise of std sigma sqrt(d) makes it one Gaussian mechanism of multiplier sigma. Reads no
    label."""
    _rows, d = binned.bins.shape
    flat = (binned.bins.astype(np.int64) + np.arange(d, dtype=np.int64) * n_bins).ravel()
    counts = np.bincount(flat, minlength=d * n_bins).astype(np.float64)
    if sigma is not None:
        std = sigma * math.sqrt(d)
        counts = counts + rng.normal(0.0, std, d * n_bins)
        # Post-processing: a bin below 3 noise stds is taken as empty. Without this, the
        # noise summed over a column's many empty bins makes thresholds in its empty tails
        # (or anywhere in a constant column) look as if they cut people.
        counts = np.where(counts > 3.0 * std, counts, 0.0)
    return counts.reshape(d, n_bins)


def mass_gains(counts: np.ndarray, share: float) -> np.ndarray:
    """(columns, bins - 1): 1 where both sides of the threshold hold at least `share` of the
    (noisy) people, else 0: thresholds that cut somebody, from a label-free release."""
    left = np.cumsum(counts, axis=1)[:, :-1]
    total = counts.sum(axis=1, keepdims=True)
    need = share * max(float(np.median(total)), 1.0)
    return ((left >= need) & (total - left >= need)).astype(np.float64)


def stage_gains(binned: Binned, g: np.ndarray, h: np.ndarray, params: gbdt_dp.DpTreeParams,
                noise: tuple[float, float] | None, rng: np.random.Generator) -> np.ndarray:
    """One stage's release (noisy) and the (columns, bins - 1) gains read from it."""
    if params.guide_stat == "score":
        score, information = noisy_scores(binned, g, h, params.bins, noise, rng)
        var = 0.0 if noise is None else (noise[0] * G_BOUND) ** 2 * binned.bins.shape[1]
        return score_gains(score, information, params.bins, params.lambda_, var)
    coarse = params.guide_bins or params.bins
    binned_c = binned if coarse == params.bins else Binned(
        binned.slots, binned.bins // (params.bins // coarse))
    g_hist, h_hist = noisy_histograms(binned_c, g, h, coarse, noise, rng)
    var = 0.0 if noise is None else (noise[0] * G_BOUND) ** 2 * binned.bins.shape[1]
    gains = split_gains(g_hist, h_hist, params.lambda_, var)
    if coarse == params.bins:
        return gains
    # A coarse threshold t is the fine threshold at its coarse bin's top edge; the fine
    # thresholds between get no weight.
    fine = np.zeros((gains.shape[0], params.bins - 1))
    fine[:, (np.arange(1, coarse) * (params.bins // coarse)) - 1] = gains
    return fine


def boost_guided(binned: Binned, y: np.ndarray, params: gbdt_dp.DpTreeParams,
                 release: gbdt_dp.DpTreesRelease, rng: SecretRandom, *, purpose: str = "",
                 weights: Mapping[str, Sequence[float]] | None = None) -> gbdt_dp.DpTrees:
    """The authority's training on the training rows' bins: the noisy prior, then per stage
    one noisy histogram release, the stage's structure drawn from its gains, and the stage's
    trees' noisy leaves (server/gbdt_dp.py `leaf_values`)."""
    if params.guide_every < 1:
        raise ValueError("the guided trees need guide_every >= 1")
    if release.guides != params.guides:
        raise ValueError("the release was planned for another number of stages")
    y = np.asarray(y, dtype=np.float64)
    rows = len(y)
    if binned.bins.shape[0] != rows:
        raise ValueError("binned needs one row per label")
    mask = None
    if weights is not None:
        mask = np.array([weights.get(s, [1.0] * (f + 1))[f] for s, f in binned.slots])
    base = gbdt_dp.noisy_prior(y, release, rng.generator(gbdt_dp.PURPOSE, purpose, "prior"))
    sample_rng = rng.generator(gbdt_dp.PURPOSE, purpose, "rows")
    noise_rng = rng.generator(gbdt_dp.PURPOSE, purpose, "noise")
    guide_rng = rng.generator(gbdt_dp.PURPOSE, purpose, "guide noise")
    structure_rng = rng.generator(gbdt_dp.PURPOSE, purpose, "structure")
    noise = ((release.guide_gradient_noise_multiplier, release.guide_hessian_noise_multiplier)
             if release.private else None)
    margin = np.full(rows, base)
    offset = 2**params.depth - 1
    trees: list[Tree] = []
    sums: list[np.ndarray] = []
    for stage in range(0, params.trees, params.guide_every):
        g, h = gradients(margin, y)
        if params.guide_stat == "leaves":  # from the trees released so far: no budget
            gains = leaf_importance(trees, binned.slots, params.depth, params.bins)
        elif params.guide_stat == "mass":  # one label-free release, at the first stage
            if stage == 0:
                mass = mass_gains(noisy_counts(
                    binned, params.bins, release.guide_noise_multiplier if release.private
                    else None, guide_rng), params.guide_share)
            gains = mass
        else:
            gains = stage_gains(binned, g, h, params, noise, guide_rng)
        p = slot_weights(gains, params.guide_beta, params.guide_mix, mask)
        drawn = draw_stage(p, binned, params.bins, params.depth,
                           min(params.guide_every, params.trees - stage), structure_rng,
                           params.guide_levels)
        leaf = leaves_of(drawn, binned, params.depth)
        for start in range(0, len(drawn), params.batch):
            g, h = gradients(margin, y)
            step = np.zeros(rows)
            for t in range(start, start + params.batch):
                taken = (sample_rng.random(rows) < params.sample_rate
                         if params.sample_rate < 1 else slice(None))
                sums.append(np.stack(gbdt_dp.noisy_sums(
                    g[taken], h[taken], leaf[t][taken], params, release, noise_rng)))
                values = gbdt_dp.newton_leaf_values(sums[-1][0], sums[-1][1], params)
                step += values[leaf[t]]
                trees.append(Tree(splits=drawn[t],
                                  leaves={offset + i: float(v) for i, v in enumerate(values)}))
            margin += step
    model = Model(params=GbdtParams(trees=params.trees, depth=params.depth, bins=params.bins,
                                    lr=params.lr, lambda_=params.lambda_),
                  base_margin=base, trees=tuple(trees))
    return gbdt_dp.DpTrees(model=model, release=release, sums=tuple(sums))


def train_guided(silos: Mapping[str, SiloEndpoint], y: np.ndarray,
                 params: gbdt_dp.DpTreeParams, release: gbdt_dp.DpTreesRelease,
                 rng: SecretRandom, *, purpose: str = "",
                 weights: Mapping[str, Sequence[float]] | None = None) -> gbdt_dp.DpTrees:
    """In process: one bins request per silo, then `boost_guided` on every row."""
    return boost_guided(ask_bins(silos, params.bins), y, params, release, rng,
                        purpose=purpose, weights=weights)


def train(silos: Mapping[str, SiloEndpoint], y: np.ndarray, params: gbdt_dp.DpTreeParams,
          release: gbdt_dp.DpTreesRelease, rng: SecretRandom, *, purpose: str = "",
          weights: Mapping[str, Sequence[float]] | None = None) -> gbdt_dp.DpTrees:
    """The guided trees when params.guide_every > 0, else the totally random ones."""
    if params.guide_every:
        return train_guided(silos, y, params, release, rng, purpose=purpose, weights=weights)
    return gbdt_dp.train_dp_trees(silos, y, params, release, rng, purpose=purpose,
                                  weights=weights)
