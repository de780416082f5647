"""Reason codes at the authority: silos' logit shares turned into score points.

score = offset - factor * (a z + b), z = bias + sum_k g_k (`sum` mode), factor = PDO / ln 2.
Against every silo's typical person ref_k:

    score = base + sum_k points_k,   base = offset - factor * (a (bias + sum_k g_k(ref_k)) + b),
                                     points_k = -factor * a * (g_k(x) - g_k(ref_k)),

exactly, before the score is rounded and held to 300..850 (`points_limit` carries what the
limits cut off). Each silo splits its points over its features; the reason codes are the k
features, over all silos, that cost the most points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from flwr.app import Message

from clients.protocol import messages as m
from clients.protocol.reasons import top_reasons_matrix
from server.config import ScoreConfig
from server.scoring import SCORE_MAX, SCORE_MIN, Platt, scale

log = logging.getLogger(__name__)


class ExplanationError(ValueError):
    """A silo's reason codes that do not fit the request."""


@dataclass(frozen=True)
class Explained:
    """One silo's answer for n people (see clients/silo/explain.py)."""

    delta: np.ndarray  # (n,) g(x) - g(ref), logit units
    index: np.ndarray  # (n, k) feature indices, -1 = no reason
    share: np.ndarray  # (n, k) logit shares of those features
    reference: float
    features: list[str]


def parse(reply: Message, silo: str, n: int, k: int) -> Explained:
    try:
        delta = m.get_array(reply, "explain_delta", np.float32, 1)
        index = m.get_array(reply, "reason_index", np.int16, 2)
        share = m.get_array(reply, "reason_share", np.float32, 2)
    except m.ProtocolError as exc:
        raise ExplanationError(f"silo {silo!r} sent no reason codes: {exc}") from None
    cfg = m.get_config(reply)
    features = [str(f) for f in cfg.get("explain.features", [])]
    if delta.shape != (n,) or index.shape != (n, k) or share.shape != (n, k):
        raise ExplanationError(f"silo {silo!r} sent reason codes for the wrong number of people "
                               f"or reasons ({delta.shape}, {index.shape}); expected {n} x {k}")
    if (index < -1).any() or (index >= len(features)).any():
        raise ExplanationError(f"silo {silo!r} named a feature outside its {len(features)}")
    return Explained(delta.astype(np.float64), index.astype(np.int64), share.astype(np.float64),
                     float(cfg["explain.reference"]), features)


def points_frame(explained: dict[str, Explained], bias: float, calibrate: Platt,
                 cfg: ScoreConfig, k: int) -> pd.DataFrame:
    """Per person: base points, each silo's points, what the 300..850 limits cut off, and the
    k reasons (`silo.feature`) with the points each costs (negative)."""
    if calibrate.a <= 0:
        raise ExplanationError(
            f"the calibration slope is {calibrate.a:.3g} <= 0: higher contributions do not mean "
            "more risk, so no contribution can be called a reason; train longer or check labels"
        )
    offset, factor = scale(cfg)
    slope = -factor * calibrate.a
    silos = list(explained)
    reference = sum(e.reference for e in explained.values())
    base = offset - factor * (calibrate.a * (bias + reference) + calibrate.b)
    points = {s: slope * explained[s].delta for s in silos}
    raw = base + np.sum([points[s] for s in silos], axis=0)
    out = pd.DataFrame({"points_base": np.full(len(raw), base)}
                       | {f"points_{s}": points[s] for s in silos})
    out["points_limit"] = np.clip(np.rint(raw), SCORE_MIN, SCORE_MAX) - np.rint(raw)

    names = [f"{s}.{f}" for s in silos for f in explained[s].features]
    offsets = np.cumsum([0] + [len(explained[s].features) for s in silos[:-1]])
    index = np.hstack([np.where(explained[s].index >= 0, explained[s].index + o, -1)
                       for s, o in zip(silos, offsets, strict=True)])
    cost = np.hstack([slope * explained[s].share for s in silos])
    cost = np.where(index >= 0, cost, 0.0)
    pick, value = top_reasons_matrix(cost, k)
    chosen = np.where(pick >= 0, np.take_along_axis(index, np.maximum(pick, 0), axis=1), -1)
    for j in range(k):
        codes = chosen[:, j]
        out[f"reason_{j + 1}"] = pd.Categorical.from_codes(codes, names)
        out[f"reason_{j + 1}_points"] = value[:, j]
    return out
