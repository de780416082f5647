"""The combined model's delta budget: which releases beside DP-SGD add a delta outside their
Gaussian mechanism, and the share of the configured delta left to the accountants.

A silo's statistics release keeps a category value only past a threshold that a value held by
one person passes with probability THRESHOLD_DELTA; the plan reserves that out of the configured
delta. Kept apart from server/privacy.py (which imports the accountants, and through Opacus
torch) so that a run can refuse a delta the reservation would use up before any engine starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from clients.protocol.dp_constants import (
    PRIOR_NOISE_MULTIPLIER,
    STATISTICS_NOISE_MULTIPLIER,
    THRESHOLD_DELTA,
)
from clients.protocol.schema import AUTHORITY
from server.config import ConfigError


class OutsideRelease(NamedTuple):
    """A Gaussian release beside DP-SGD, and the delta it adds outside its Gaussian (0: none)."""

    party: str
    purpose: str
    noise_multiplier: float
    extra_delta: float = 0.0


def releases_outside_sgd(silos: tuple[str, ...], summaries: bool) -> list[OutsideRelease]:
    """Every Gaussian release beside DP-SGD: each silo's preparation statistics and the
    authority's prior, and with `summaries` one histogram of its contributions per silo.

    Every silo's statistics release is charged its category thresholds' delta, whether or not
    its schema leaves a category column's values to the data: the authority cannot know that
    without the silo telling (a fact about its table that would then need trusting or proving),
    and the reservation is cheap: 1e-9 per silo against the default delta 1/(10 N) (1.7e-6 for
    the default run) moves the noise multiplier by under 0.1 %. The contribution summaries
    count in fixed bins, with no threshold: no extra delta."""
    releases = [OutsideRelease(p, "preparation statistics", STATISTICS_NOISE_MULTIPLIER,
                               THRESHOLD_DELTA) for p in silos]
    if summaries:
        releases += [OutsideRelease(p, "contribution summary", STATISTICS_NOISE_MULTIPLIER)
                     for p in silos]
    return [*releases, OutsideRelease(AUTHORITY, "prior", PRIOR_NOISE_MULTIPLIER)]


@dataclass(frozen=True)
class DeltaSplit:
    """The combined model's delta budget: the configured delta (`PrivacyConfig.delta_for`:
    privacy.delta, else 1/(10 N)), of which `reserved` goes to the releases' extra deltas and
    `accountant` to the Gaussian compositions (DP-SGD, statistics, calibration)."""

    configured: float
    reserved: float
    accountant: float

    @property
    def combined(self) -> float:
        """The delta the combined model claims: the accountant's plus every extra delta, at
        most the configured one (`split_delta` rounds the accountant's down to make sure)."""
        return self.accountant + self.reserved


def split_delta(configured: float, releases: list[OutsideRelease]) -> DeltaSplit:
    """Reserve the releases' extra deltas out of `configured`. Summed in release order, as the
    ledger's lines add them up (`record_start`), so the last statistics line's delta is
    `combined` to the last bit."""
    reserved = 0.0
    for release in releases:
        reserved += release.extra_delta
    if reserved >= configured:
        raise ConfigError(
            f"privacy.delta={configured:.3g} leaves nothing for DP-SGD after the {reserved:.3g} "
            f"reserved for the silos' category thresholds ({THRESHOLD_DELTA:g} per silo); "
            f"raise it, e.g. to {100 * reserved:.0e}, or use 0 for the default 1/(10 N)")
    accountant = configured - reserved
    while accountant + reserved > configured:  # floating point: never claim past the target
        accountant = math.nextafter(accountant, 0.0)
    return DeltaSplit(configured, reserved, accountant)
