"""Label differential privacy: randomised response, once, before training.

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
