"""ConfigError and the value checks every section of the run configuration
(server/config.py) shares."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


# The only settings where infinity means something ("off" or "no cap"); everywhere else an
# inf or nan would reach arithmetic that was never meant for it (a clipping bound of inf turns
# DP-SGD's noise into inf, a timeout of inf never fires), so it is refused at validation.
INFINITE_OK = frozenset({"privacy.epsilon", "privacy.label_epsilon", "privacy.transcript_cap"})


def finite(key: str, value: float, hint: str = "") -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value}: must be a finite number{hint}")


def positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}={value}: must be a positive whole number")
