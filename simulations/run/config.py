"""An experiment's configuration: the population to generate plus the authority's run config.

One flat namespace of dotted keys: `population.*` for the generator, everything else for the
authority (`seed`, `train.*`, `model.*`, `split.*`, `score.*`, `psi.*`). `--seed` sets both the
population's and the training seed; `--users` sets population.users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from server.config import (
    AuthorityConfig,
    ConfigError,
    build,
    coerce,
    flat_fields,
    to_flat,
    unknown_key_error,
)
from server.privacy import Sampling, sampling_guardrails
from simulations.data.population import PopulationConfig

POPULATION_PREFIX = "population."


DATA_KEY = "data"


@dataclass(frozen=True)
class ExperimentConfig:
    population: PopulationConfig = field(default_factory=PopulationConfig)
    authority: AuthorityConfig = field(default_factory=AuthorityConfig)
    # Real data instead of the generator: "uci", a CSV in the UCI layout, or a directory with
    # one CSV per party and mapping.json (simulations/data/real_data.py). Empty = generated.
    data: str = ""

    @property
    def generated(self) -> bool:
        return not self.data

    def flat(self) -> dict[str, Any]:
        pop = {POPULATION_PREFIX + k: v for k, v in to_flat(self.population).items()}
        return {**to_flat(self.authority), **pop, DATA_KEY: self.data}


def known_keys() -> dict[str, Any]:
    pop = {POPULATION_PREFIX + k: t for k, t in flat_fields(PopulationConfig).items()}
    return {**flat_fields(AuthorityConfig), **pop, DATA_KEY: str}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`key=value` strings from --set into a dict; the last assignment of a key wins."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write key=value, e.g. --set train.epochs=5")
        out[key.strip()] = value.strip()
    return out


def make_config(
    overrides: dict[str, Any] | None = None,
    users: int | None = None,
    seed: int | None = None,
) -> ExperimentConfig:
    """Defaults, then `overrides` (dotted keys), then the --users / --seed shortcuts."""
    values = dict(overrides or {})
    if users is not None:
        values["population.users"] = users
    if seed is not None:
        values.setdefault("seed", seed)
        values.setdefault("population.seed", seed)
    types = known_keys()
    pop_values, auth_values = {}, {}
    data = ""
    for key, value in values.items():
        if key not in types:
            raise unknown_key_error(key, types)
        typed = coerce(key, types[key], value)
        if key == DATA_KEY:
            data = typed
        elif key.startswith(POPULATION_PREFIX):
            pop_values[key.removeprefix(POPULATION_PREFIX)] = typed
        else:
            auth_values[key] = typed
    try:
        population = build(PopulationConfig, pop_values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ExperimentConfig(population=population, authority=build(AuthorityConfig, auth_values),
                            data=data)


def from_flat(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuild from `config.json` (as written by ExperimentConfig.flat)."""
    return make_config(values)


def check_delta(cfg: ExperimentConfig, people: int, source: str) -> None:
    """Refuse privacy.delta >= 1/N before the engine starts, N bounded from above by what is
    known then: `people` the authority knows (its table's rows, or the population to
    generate), of whom at most split.train (rounded up, plus the split's per-class rounding)
    can be in training. Training has at most that many people, so a delta refused here would
    be refused after PSI too (PrivacyConfig.delta_for, which keeps the exact check)."""
    delta = cfg.authority.privacy.delta
    if not delta or people < 1:
        return
    n_max = min(people, math.ceil(cfg.authority.split.train * people) + 2)
    if delta >= 1.0 / n_max:
        raise ConfigError(
            f"privacy.delta={delta:g} is not below 1/N: at most N = {n_max:,} people can be "
            f"in training ({source}: {people:,} people, split.train="
            f"{cfg.authority.split.train:g}); use --set privacy.delta=0 for the default "
            f"1/(10 N), or a value at most {0.1 / n_max:.1e}"
        )


def check_guardrails(cfg: ExperimentConfig, people: int, source: str) -> None:
    """Refuse, before the engine starts, a DP-SGD configuration that cannot learn at all
    (server/privacy.py `sampling_guardrails`, level "refuse"), unless privacy.guardrails=warn.
    N is bounded from above as in `check_delta`: more people only means more steps, so a
    configuration refused here would be refused with the exact N too. Warnings wait for the
    authority's plan, which knows the exact N and the noise."""
    privacy, train = cfg.authority.privacy, cfg.authority.train
    if not privacy.dp_sgd or privacy.guardrails == "warn" or people < 1:
        return
    n_max = min(people, math.ceil(cfg.authority.split.train * people) + 2)
    sampling = Sampling(n_train=n_max, batch_size=train.batch_size, epochs=train.epochs)
    refused = [g for g in sampling_guardrails(sampling, privacy.delta_for(n_max))
               if g.level == "refuse"]
    if refused:
        reasons = "; ".join(g.message for g in refused)
        raise ConfigError(f"this DP configuration cannot learn ({source}: {people:,} people): "
                          f"{reasons}. To run it anyway: --set privacy.guardrails=warn")


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, type, default) for every key, for `fedscore config`."""
    defaults = ExperimentConfig().flat()
    return [(k, getattr(t, "__name__", str(t)), repr(defaults[k])) for k, t in known_keys().items()]

