"""The WoE scorecard's section of the run configuration (`scorecard.*` keys, model.kind=scorecard);
re-exported by server/config.py.

The keys are the settings of server/scorecard.py `ScorecardParams` and server/scorecard_dp.py
`DpScorecardParams`, with their defaults (tests/test_scorecard_keys.py holds them equal), so a
run that sets none of them computes what it computed before the keys existed, and keeps its run
key (server/run_keys.py enters a scorecard key only when it is not at its default and applies).
Which keys apply: bins, min_bin_share, smoothing to both modes; iterations to the scorecard
without DP (privacy.epsilon=inf); steps, count_share, hessian_noise, clip to the DP scorecard
(a finite privacy.epsilon). Not keys: ScorecardParams.protection (the run protects the labels
by randomised response, gbdt.protection=rr's path; BFV is not wired into Flower messages) and
DpScorecardParams.accountant (privacy.accountant's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from server.config_checks import ConfigError

PREFIX = "scorecard."
# The keys of one mode only; the rest apply to both.
DP_ONLY = frozenset({"steps", "count_share", "hessian_noise", "clip"})
PLAIN_ONLY = frozenset({"iterations"})


@dataclass(frozen=True)
class ScorecardConfig:
    """model.kind=scorecard: the pre-bins, the merging and WoE, and the fit."""

    # Equal-width pre-bins per prepared column (the silos bin, the authority merges them).
    bins: int = 32
    # Least share of the training people per merged bin, and the WoE's pseudo-count per bin
    # and class (server/woe.py, the central reference's).
    min_bin_share: float = 0.05
    smoothing: float = 0.5
    # Without DP: the most L-BFGS steps of the sign-constrained regression.
    iterations: int = 50
    # DP: noisy Newton steps (fixed in number), the counts' share of the budget (in
    # 1/sigma^2), the Hessian's noise over the gradient's, the clip over the RMS of ||x||
    # (server/scorecard_dp.py; the defaults chosen in bench/RESULTS.md "The DP WoE scorecard
    # in fedscore run").
    steps: int = 6
    count_share: float = 0.4
    hessian_noise: float = 2.0
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.bins <= 256:
            raise ConfigError(f"scorecard.bins={self.bins}: use 2 to 256 pre-bins, e.g. 32")
        if not 0 <= self.min_bin_share < 0.5:
            raise ConfigError(f"scorecard.min_bin_share={self.min_bin_share}: use a share in "
                              "[0, 0.5) of the training people, e.g. 0.05")
        if not 0 <= self.iterations <= 1000:
            raise ConfigError(f"scorecard.iterations={self.iterations}: use 0 to 1000 "
                              "regression steps, e.g. 50")
        if not 1 <= self.steps <= 100:
            raise ConfigError(f"scorecard.steps={self.steps}: use 1 to 100 noisy Newton steps, "
                              "e.g. 6")
        if not 0 < self.count_share < 1:
            raise ConfigError(f"scorecard.count_share={self.count_share}: use a share in "
                              "(0, 1) of the budget, e.g. 0.4")
        for key, example in (("smoothing", "0.5"), ("hessian_noise", "2"), ("clip", "1")):
            if not getattr(self, key) > 0:
                raise ConfigError(f"scorecard.{key}={getattr(self, key)}: must be > 0, "
                                  f"e.g. {example}")

    def unused(self, kind: str, dp: bool) -> list[str]:
        """The keys set off their default that change nothing in a run of this model and mode
        (the caller warns: a grid may vary model.kind or privacy.epsilon under one --set)."""
        default = ScorecardConfig()
        return [PREFIX + f.name for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)
                and (kind != "scorecard" or not applies(f.name, dp))]


def applies(name: str, dp: bool) -> bool:
    """Whether scorecard.<name> changes what a scorecard run of this mode computes."""
    return name not in (PLAIN_ONLY if dp else DP_ONLY)


def computed(config: dict[str, Any]) -> dict[str, Any]:
    """The scorecard keys of a flat configuration (typed, as `to_flat` writes it) that enter
    its run key: in a scorecard run, those off their default that apply to its mode."""
    if config.get("model.kind", "mlp") != "scorecard":
        return {}
    dp = math.isfinite(float(config.get("privacy.epsilon", math.inf)))
    default = ScorecardConfig()
    return {k: v for k, v in config.items() if k.startswith(PREFIX)
            and v != getattr(default, k.removeprefix(PREFIX), None)
            and applies(k.removeprefix(PREFIX), dp)}
