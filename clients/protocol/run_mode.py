"""What kind of model a run trains and at what privacy: announced once, with the alignment.

The authority's `query.align` (server/alignment.py `announce`) carries the run key and the
silos' model spec; it also names the run's `model.kind` and its target eps_model
(`privacy.epsilon`, infinite for a run without DP). Each silo pins the announcement in its
node state and in `<silo dir>/checkpoints/<run key>/model.json` (clients/silo/alignment.py),
and from then on judges every request of the run against the PINNED mode, never against a
flag in the request itself: the trees' `query.gbdt_start` must name the announced run key, and
a request only a non-private run makes (quantile bins, SecureBoost histograms and splits, the
scorecard's training logits) is refused in a run announced at a finite epsilon
(clients/silo/run_checks.py). A run key names one configuration (server/run_keys.py), so the
silo also refuses a later announcement of the same run key with another mode: an authority
cannot announce a DP run, then re-align the same run as a non-private one to get its
non-private answers under the DP run's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

KIND = "kind"  # announcement key: the run's model.kind
EPSILON = "epsilon"  # announcement key: the run's target eps_model (inf: no DP)
KINDS = ("mlp", "gbdt", "scorecard")
TREE_KINDS = ("gbdt", "scorecard")  # the runs that start with query.gbdt_start


class RunModeError(ValueError):
    """An announcement whose mode the silo cannot read."""


@dataclass(frozen=True)
class RunMode:
    kind: str = "mlp"
    epsilon: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RunModeError(f"model kind {self.kind!r}: one of {', '.join(KINDS)}")
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise RunModeError(f"epsilon {self.epsilon!r}: a positive number, or inf")

    @property
    def private(self) -> bool:
        """Whether the run claims a finite eps_model for what it releases."""
        return math.isfinite(self.epsilon)

    def describe(self) -> str:
        return (f"model.kind={self.kind} at privacy.epsilon={self.epsilon:g}" if self.private
                else f"model.kind={self.kind} without DP (privacy.epsilon=inf)")

    def to_config(self) -> dict[str, str | float]:
        return {KIND: self.kind, EPSILON: float(self.epsilon)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, object]) -> RunMode:
        """The mode an announcement (or a pinned model record) names; one written before modes
        were announced is an MLP run, whose privacy its own DP-SGD spec carries."""
        kind, epsilon = cfg.get(KIND, "mlp"), cfg.get(EPSILON, math.inf)
        if not isinstance(kind, str):
            raise RunModeError(f"model kind {kind!r}: one of {', '.join(KINDS)}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
            raise RunModeError(f"epsilon {epsilon!r}: a positive number, or inf")
        return cls(kind, float(epsilon))
