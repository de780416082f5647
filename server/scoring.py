"""From default probability to a 300..850 score and a tier.

score = offset + factor * ln((1 - p) / p), factor = PDO / ln 2, offset = base - factor * ln(odds):
every PDO points double the odds of repaying; base_score sits at base_odds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from server.config import ScoreConfig

SCORE_MIN, SCORE_MAX = 300, 850


@dataclass(frozen=True)
class Tier:
    key: str
    name_zh: str
    low: int  # inclusive
    high: int  # inclusive
    benefit: str


TIERS: tuple[Tier, ...] = (
    Tier("watch", "待观察", 300, 409, "none, observation"),
    Tier("fair", "普通", 410, 559, "basic payment functions"),
    Tier("good", "良好", 560, 659, "priority customer service"),
    Tier("excellent", "优秀", 660, 759, "deposit fully offset"),
    Tier("exceptional", "极优", 760, 850, "deposit-free limit of 20,000 CNY"),
)
TIER_KEYS = tuple(t.key for t in TIERS)
_LOWER = np.array([t.low for t in TIERS[1:]])


def scale(cfg: ScoreConfig) -> tuple[float, float]:
    """(offset, factor) of the PDO scaling."""
    factor = cfg.pdo / np.log(2.0)
    return float(cfg.base_score - factor * np.log(cfg.base_odds)), float(factor)


def to_score(p: np.ndarray, cfg: ScoreConfig) -> np.ndarray:
    """Integer scores in 300..850 from default probabilities."""
    offset, factor = scale(cfg)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    raw = offset + factor * (np.log1p(-p) - np.log(p))
    return np.clip(np.rint(raw), SCORE_MIN, SCORE_MAX).astype(np.int16)


def to_tier(score: np.ndarray) -> np.ndarray:
    """Tier index 0..4 (see TIERS) for integer scores."""
    return np.searchsorted(_LOWER, np.asarray(score), side="right").astype(np.int8)


def tier_counts(tier_index: np.ndarray) -> dict[str, int]:
    counts = np.bincount(np.asarray(tier_index, dtype=np.int64), minlength=len(TIERS))
    return {t.key: int(c) for t, c in zip(TIERS, counts, strict=True)}


@dataclass(frozen=True)
class Platt:
    """p = sigmoid(a * clip(z, low, high) + b), fitted on held-out logits.

    Newton's method with backtracking on the standardised logit, so extreme or badly scaled
    logits (an unstable model) still give a finite, loss-decreasing fit instead of diverging.
    The exact fit holds for every logit; the private fit only saw logits clipped to its declared
    domain, so it is applied the same way (`low`, `high`): outside it, the fitted function is
    flat, and extending its line there scored a diverged model's people as almost riskless.
    """

    a: float = 1.0
    b: float = 0.0
    low: float = -math.inf
    high: float = math.inf

    def to_json(self) -> dict[str, float | list[float]]:
        """For authority.json (JSON holds no infinity: an unbounded domain is left out)."""
        out: dict[str, float | list[float]] = {"a": self.a, "b": self.b}
        if math.isfinite(self.low) or math.isfinite(self.high):
            out["domain"] = [self.low, self.high]
        return out

    @classmethod
    def from_json(cls, data: dict) -> Platt:
        low, high = data.get("domain", (-math.inf, math.inf))
        return cls(float(data["a"]), float(data["b"]), float(low), float(high))

    @classmethod
    def fit(cls, z: np.ndarray, y: np.ndarray, iterations: int = 100) -> Platt:
        z, y = np.asarray(z, dtype=np.float64), np.asarray(y, dtype=np.float64)
        mu, sd = z.mean(), z.std()
        sd = sd if sd > 0 else 1.0
        X = np.column_stack([(z - mu) / sd, np.ones_like(z)])
        prior = np.clip(y.mean(), 1e-6, 1 - 1e-6)
        w = np.array([0.0, np.log(prior / (1 - prior))])
        loss = _nll(X, y, w)
        for _ in range(iterations):
            p = _sigmoid(X @ w)
            grad = X.T @ (p - y)
            hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            t = 1.0
            while t > 1e-8 and _nll(X, y, w - t * step) > loss:
                t /= 2
            w_new = w - t * step
            new_loss = _nll(X, y, w_new)
            converged = loss - new_loss < 1e-12
            w, loss = w_new, min(loss, new_loss)
            if converged:
                break
        # A calibration never reverses the model's ranking: on a handful of validation
        # people the fitted slope can come out negative, which would turn every score upside
        # down; the slope is kept positive (the released order stays the model's).
        if w[0] < MIN_SLOPE:  # per standard deviation of z: nearly flat, the prior on average
            a = MIN_SLOPE / sd
            return cls(a, float(np.log(prior / (1 - prior)) - a * mu))
        return cls(float(w[0] / sd), float(w[1] - w[0] * mu / sd))

    @classmethod
    def fit_private(cls, z: np.ndarray, y: np.ndarray, *, noise_multiplier: float, steps: int,
                    expected_n: float, rng: np.random.Generator) -> Platt:
        """Differentially private fit: `steps` Newton steps from the identity (a = 1, b = 0:
        the model's logits are already probabilities), each on a noisy gradient and Hessian.

        Nothing about the data is used unnoised: the logit is mapped to x = clip((z + 3) / 3,
        -1, 1) by declared constants, so one person adds at most sqrt 2 to the gradient
        (p - y)(x, 1) and sqrt(3) / 4 to the Hessian's three entries p (1 - p)(x^2, x, 1);
        each step releases those five sums with Gaussian noise of noise_multiplier times their
        joint L2 sensitivity. The Hessian is ridged by a public share of `expected_n` and kept
        positive definite, so a noisy step on few people stays small."""
        x = np.clip((np.asarray(z, dtype=np.float64) - CALIBRATION_CENTRE) / CALIBRATION_SCALE,
                    -1.0, 1.0)
        X = np.column_stack([x, np.ones_like(x)])
        y = np.asarray(y, dtype=np.float64)
        w = np.array([CALIBRATION_SCALE, CALIBRATION_CENTRE])
        std = noise_multiplier * CALIBRATION_SENSITIVITY
        ridge = CALIBRATION_RIDGE * max(expected_n, 1.0)
        for _ in range(steps):
            p = _sigmoid(X @ w)
            v = p * (1 - p)
            sums = np.array([X[:, 0] @ (p - y), np.sum(p - y), v @ (x * x), v @ x, v.sum()])
            g0, g1, h00, h01, h11 = sums + rng.normal(0.0, std, 5)
            hess = np.array([[h00, h01], [h01, h11]]) + ridge * np.eye(2)
            values, vectors = np.linalg.eigh(hess)
            hess = (vectors * np.maximum(values, ridge)) @ vectors.T
            step = np.linalg.solve(hess, np.array([g0, g1]))
            # A trust region (post-processing, no privacy cost): from the identity, a model far
            # from calibrated (a diverged one) made a full Newton step overshoot to the slope's
            # bound, and the few affordable steps never came back.
            w = w - step * min(1.0, CALIBRATION_TRUST / max(float(np.linalg.norm(step)), 1e-12))
        # A calibration never reverses the ranking (post-processing, no privacy cost).
        a = float(np.clip(w[0] / CALIBRATION_SCALE, 0.1, 10.0))
        return cls(a, float(w[1] - a * CALIBRATION_CENTRE),
                   CALIBRATION_CENTRE - CALIBRATION_SCALE, CALIBRATION_CENTRE + CALIBRATION_SCALE)

    @staticmethod
    def private_fit_pays(noise_multiplier: float, expected_n: float) -> bool:
        """Whether a DP fit on about `expected_n` people is worth its noise: the noise on each
        released sum must stay below 2 % of the count. A public decision (no data read)."""
        return noise_multiplier * CALIBRATION_SENSITIVITY < 0.02 * expected_n

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.clip(np.asarray(z, dtype=np.float64), self.low, self.high)
        return _sigmoid(self.a * z + self.b)


MIN_SLOPE = 1e-3
# Declared constants of the private calibration: typical credit logits lie in [-6, 0].
CALIBRATION_CENTRE, CALIBRATION_SCALE = -3.0, 3.0
# One person's largest change to the five released sums: sqrt(2 + 3 / 16).
CALIBRATION_SENSITIVITY = float(np.sqrt(2.0 + 3.0 / 16.0))
CALIBRATION_RIDGE = 0.01  # share of the expected count added to the Hessian's diagonal
CALIBRATION_TRUST = 1.5  # the longest Newton step in (slope, intercept) of the unit logit


def contribution_points(summary: dict[str, float], calibration: Platt, cfg: ScoreConfig
                        ) -> dict[str, float]:
    """A silo's contributions as score points against the population's average person.

    score = offset - factor * (a z + b) and z = b0 + sum_k g_k, so silo k moves a score by
    -factor * a * (g_k - mean g_k) points; the map is linear, so quantiles map to quantiles
    (reversed when a > 0: a larger contribution means more risk, fewer points)."""
    _, factor = scale(cfg)
    slope = -factor * calibration.a
    mean = summary["mean"]
    points = sorted(slope * (summary[q] - mean) for q in ("q10", "q50", "q90"))
    return {"mean_abs_points": abs(slope) * summary["mad"], "p10": points[0],
            "p50": points[1], "p90": points[2]}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))  # stable for large |x|


def _nll(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    s = X @ w
    # log(1 + e^s) - y s, computed without overflow
    return float(np.sum(np.logaddexp(0.0, s) - y * s))


def rate_by_tier(y: np.ndarray, tier: np.ndarray) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for i, key in enumerate(TIER_KEYS):
        sel = tier == i
        out[key] = float(y[sel].mean()) if sel.any() else None
    return out
