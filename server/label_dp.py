"""Label differential privacy: randomised response, once, before training (and RRWithPrior
for two-stage training, measured against it in bench/label_dp.py).

Every gradient a silo sees is then post-processing of the randomised labels, so the whole run is
pure eps_label label-DP against the silos. Flip probability rho = 1 / (1 + e^eps).

Training on flipped labels biases the model towards 0.5 (P(noisy = 1 | x) = rho + (1 - 2 rho) p);
the loss is corrected forward (Patrini et al. 2017): the model's sigmoid estimates the CLEAN p, and
the loss compares rho + (1 - 2 rho) sigmoid(z) with the noisy label. The prior enters through
that correction (with a 6 % default rate most flipped labels are false positives) and through
the authority's Platt calibration on clean validation labels, so probabilities stay calibrated.
"""

from __future__ import annotations

import math

import numpy as np


def flip_probability(epsilon: float) -> float:
    return 0.0 if math.isinf(epsilon) else 1.0 / (1.0 + math.exp(epsilon))


def randomized_response(y: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each 0/1 label with probability e^eps / (1 + e^eps), else flip it."""
    rho = flip_probability(epsilon)
    flip = rng.random(len(y)) < rho
    return np.where(flip, 1 - y, y).astype(y.dtype)


def corrected_gradient(z: np.ndarray, noisy: np.ndarray, rho: float) -> np.ndarray:
    """d/dz of BCE(noisy, rho + (1 - 2 rho) sigmoid(z)); equals sigmoid(z) - y when rho = 0."""
    s = 0.5 * (1 + np.tanh(0.5 * z))
    if rho == 0.0:
        return s - noisy
    p_noisy = np.clip(rho + (1 - 2 * rho) * s, 1e-12, 1 - 1e-12)
    return (p_noisy - noisy) / (p_noisy * (1 - p_noisy)) * (1 - 2 * rho) * s * (1 - s)


# ---- RRWithPrior and two-stage training (LP-2ST) ---------------------------------------------
#
# Ghazi, Golowich, Kumar, Manurangsi, Zhang, "Deep Learning with Label Differential Privacy"
# (NeurIPS 2021). RRWithPrior(y, prior p, eps): for k = 1..K let Y_k be the k most probable
# labels under p and w_k = e^eps / (e^eps + k - 1) * p(Y_k); take k* = argmax_k w_k and run
# RR-Top-k*: if y is in Y_k*, release y with probability e^eps / (e^eps + k* - 1), else one of
# the other labels of Y_k* uniformly; if y is not in Y_k*, release a label of Y_k* uniformly.
# The prior must not depend on y (LP-2ST: a model trained on the OTHER half's released labels).
#
# For binary labels K = 2: w_1 = max(p, 1 - p) and w_2 = e^eps / (1 + e^eps), so when the
# prior's top probability exceeds e^eps / (1 + e^eps) the release is the prior's argmax
# whatever y is (k* = 1, "pinned"); otherwise it is plain RR (k* = 2). At a tie either k is
# eps-DP; we take RR. A pinned release does not depend on y at all: it carries no information
# about the label, so the likelihood of the released label given x is constant there and the
# correct loss has zero gradient for that person. This is why, for binary labels, RRWithPrior
# can only ever be a garbling of RR (every eps-DP mechanism on a binary input is a
# post-processing of eps-RR: Kairouz, Oh, Viswanath 2015): with the correct likelihood it drops
# the pinned people's RR labels; the paper's gains come from training plain cross-entropy on the
# released labels, where the pinned labels act as self-distillation towards the prior.


def keep_probability(epsilon: float) -> float:
    """e^eps / (1 + e^eps): RR keeps the label with this probability (1 at eps = inf)."""
    return 1.0 - flip_probability(epsilon)


def prior_pins(prior: np.ndarray, epsilon: float) -> np.ndarray:
    """Per person: does RRWithPrior release the prior's argmax (k* = 1) instead of RR?"""
    prior = np.asarray(prior, dtype=np.float64)
    return np.maximum(prior, 1.0 - prior) > keep_probability(epsilon)


def rr_with_prior(y: np.ndarray, prior: np.ndarray, epsilon: float,
                  rng: np.random.Generator) -> np.ndarray:
    """RRWithPrior for 0/1 labels; `prior` = P(y = 1 | x) per person, independent of y.

    Pinned people (prior's top probability > e^eps / (1 + e^eps)) get the prior's argmax, the
    rest get RR at `epsilon`. One uniform draw per person either way, so the stream's position
    does not depend on the prior."""
    y = np.asarray(y)
    prior = np.asarray(prior, dtype=np.float64)
    if y.shape != prior.shape:
        raise ValueError(f"labels {y.shape} and prior {prior.shape} differ in shape")
    rr = np.where(rng.random(len(y)) < flip_probability(epsilon), 1 - y, y)
    top = (prior > 0.5).astype(y.dtype)
    return np.where(prior_pins(prior, epsilon), top, rr).astype(y.dtype)


def release_probabilities(prior: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """P(released = 1 | y = 1) and P(released = 1 | y = 0) per person under RRWithPrior:
    (1 - rho, rho) for RR, (argmax, argmax) for a pinned person."""
    prior = np.asarray(prior, dtype=np.float64)
    pinned = prior_pins(prior, epsilon)
    top = (prior > 0.5).astype(np.float64)
    rho = flip_probability(epsilon)
    return np.where(pinned, top, 1.0 - rho), np.where(pinned, top, rho)


def release_gradient(z: np.ndarray, released: np.ndarray, if_one: np.ndarray | float,
                     if_zero: np.ndarray | float) -> np.ndarray:
    """d/dz of BCE(released, q), q = if_zero + (if_one - if_zero) sigmoid(z): the forward
    correction for any per-person binary release with P(released = 1 | y) = if_one / if_zero.

    RR is if_one = 1 - rho, if_zero = rho (then this equals `corrected_gradient`); clean labels
    are 1 / 0 (sigmoid(z) - y exactly); a release that ignores y (if_one = if_zero) has zero
    gradient."""
    z = np.asarray(z, dtype=np.float64)
    released = np.asarray(released, dtype=np.float64)
    a = np.broadcast_to(np.asarray(if_one, dtype=np.float64), z.shape)
    b = np.broadcast_to(np.asarray(if_zero, dtype=np.float64), z.shape)
    s = 0.5 * (1 + np.tanh(0.5 * z))
    d = a - b
    q = np.clip(b + d * s, 1e-12, 1 - 1e-12)
    noisy = (q - released) / (q * (1 - q)) * d * s * (1 - s)
    clean = (a == 1.0) & (b == 0.0)
    return np.where(clean, s - released, np.where(d == 0.0, 0.0, noisy))


def release_log_loss(z: np.ndarray, released: np.ndarray, if_one: np.ndarray | float,
                     if_zero: np.ndarray | float) -> np.ndarray:
    """Per person BCE(released, q) whose derivative `release_gradient` is (for checking)."""
    z = np.asarray(z, dtype=np.float64)
    a = np.broadcast_to(np.asarray(if_one, dtype=np.float64), z.shape)
    b = np.broadcast_to(np.asarray(if_zero, dtype=np.float64), z.shape)
    s = 0.5 * (1 + np.tanh(0.5 * z))
    q = np.clip(b + (a - b) * s, 1e-12, 1 - 1e-12)
    released = np.asarray(released, dtype=np.float64)
    return -(released * np.log(q) + (1 - released) * np.log(1 - q))


def stage_split(positions: np.ndarray, rng: np.random.Generator, share: float = 0.5
                ) -> tuple[np.ndarray, np.ndarray]:
    """LP-2ST's halves: a uniformly random `share` of `positions` for stage 1 (A), the rest for
    stage 2 (B), both sorted. Drawn from `rng` alone, never from labels: revealing who is in
    which half reveals nothing about anyone's label."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"share={share!r}: must be in (0, 1), e.g. 0.5")
    positions = np.asarray(positions)
    order = rng.permutation(len(positions))
    cut = round(share * len(positions))
    return np.sort(positions[order[:cut]]), np.sort(positions[order[cut:]])
