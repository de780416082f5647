"""An experiment's configuration: the population to generate plus the authority's run config.

One flat namespace of dotted keys: `population.*` for the generator, everything else for the
authority (`seed`, `train.*`, `model.*`, `split.*`, `score.*`, `psi.*`). `--seed` sets both the
population's and the training seed; `--users` sets population.users.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from server.config import AuthorityConfig, ConfigError
from server.config_keys import build, coerce, flat_fields, to_flat, unknown_key_error
from server.delta_budget import releases_outside_sgd, split_delta
from server.guardrails import People, before_training
from simulations.data.population import PopulationConfig

log = logging.getLogger(__name__)

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


def most_in_training(cfg: ExperimentConfig, people: int) -> int:
    """An upper bound on the people in training when the authority knows `people`: split.train
    of them, rounded up, plus the split's per-class rounding."""
    return min(people, math.ceil(cfg.authority.split.train * people) + 2)


def warn_unused(configs: Iterable[ExperimentConfig], where: str) -> list[str]:
    """Warn of the scorecard.* keys set off their default that change nothing in any of
    `configs` (another model.kind, or a key of the other privacy mode): accepted, as the gbdt.*
    keys are in an MLP run, since a grid may vary model.kind or privacy.epsilon under one
    --set, but never silently. Returns the keys."""
    unused = [set(c.authority.scorecard.unused(c.authority.model.kind,
                                               c.authority.privacy.dp_sgd)) for c in configs]
    keys = sorted(set.intersection(*unused)) if unused else []
    if keys:
        log.warning("%s %s: %s nothing in %s: the scorecard's bins, min_bin_share and "
                    "smoothing apply to model.kind=scorecard, its iterations at "
                    "privacy.epsilon=inf only, its steps, count_share, hessian_noise and clip "
                    "at a finite privacy.epsilon only", where, ", ".join(keys),
                    "changes" if len(keys) == 1 else "change",
                    "this run" if len(unused) == 1 else "any of its runs")
    return keys


def check_delta(cfg: ExperimentConfig, people: int, source: str) -> None:
    """Refuse privacy.delta >= 1/N before the engine starts, N bounded from above by what is
    known then: `people` the authority knows (its table's rows, or the population to
    generate), of whom at most `most_in_training` can be in training. A delta refused here
    would be refused after PSI too (PrivacyConfig.delta_for, the exact check)."""
    if people < 1:
        return
    split = cfg.authority.split.train
    n_max = most_in_training(cfg, people)
    cfg.authority.privacy.check_delta(
        n_max, f"at most N = {n_max:,} people can be in training: {source} has {people:,} "
        f"people, split.train={split:g}")


def check_delta_reservation(cfg: ExperimentConfig, silos: tuple[str, ...]) -> None:
    """Refuse, before the engine starts, a privacy.delta that the silos' category thresholds
    would use up (server/delta_budget.py `split_delta`, the plan's own check, which otherwise
    comes after PSI). The default delta 1/(10 N) waits for N."""
    privacy = cfg.authority.privacy
    if privacy.delta and privacy.dp_sgd:
        split_delta(privacy.delta, releases_outside_sgd(silos, summaries=False))


def check_guardrails(cfg: ExperimentConfig, people: int, source: str,
                     positive_rate: float | None = None) -> None:
    """Before the engine starts, refuse a configuration that cannot learn, whatever the model
    (server/guardrails.py `before_training`, level "refuse"), unless privacy.guardrails=warn.
    The warnings are the authority's to log and record (server/run_plan.py `run_guardrails`,
    on its exact training people), as a refusal's figures are the operator's: the error
    carries them (`Guardrail.for_operator`), and a refused run writes nothing. N is bounded
    from above as in `check_delta`: more people only means more steps or more hessian, so a
    configuration refused here would be refused with the exact N too. `positive_rate`: the
    authority's default rate, when its table was read (the trees on randomised labels need
    it)."""
    if people < 1:
        return
    n_max = most_in_training(cfg, people)
    found = before_training(cfg.authority, People(n_train=n_max, positive_rate=positive_rate))
    refused = [g for g in found if g.level == "refuse"]
    if refused and cfg.authority.privacy.guardrails != "warn":
        reasons = "; ".join(g.for_operator() for g in refused)
        raise ConfigError(f"this configuration cannot learn ({source}: {people:,} people): "
                          f"{reasons}. To run it anyway: --set privacy.guardrails=warn")


# What each key does, in one line, for `fedscore config`: the one place these words live (the
# comments beside the dataclass fields say why a default is what it is). Only words: nothing here
# reaches a configuration, so a run's key and draws do not depend on it. tests/test_cli.py
# checks that every key has a description and every description a key.
DESCRIPTIONS: dict[str, str] = {
    "seed": "training seed: the models' initialisation (DP noise and batches: keystores)",
    "model.kind": "mlp (bottom MLPs, DP-SGD), gbdt (vertical trees: DP at a finite epsilon) "
                  "or scorecard (vertical WoE scorecard: DP at a finite epsilon)",
    "model.hidden": "hidden layers of each silo's bottom MLP, units per layer; 0 = none, "
                    "linear (unset: 16 under DP-SGD in the vertical sum model, else 32,16)",
    "model.embedding_dim": "aggregation.mode=concat: width of each silo's embedding",
    "model.top_hidden": "aggregation.mode=concat: hidden layers of the authority's top MLP",
    "gbdt.trees": "model.kind=gbdt: trees (unset: 50 at epsilon=inf, 300 DP)",
    "gbdt.depth": "model.kind=gbdt: depth of each tree (unset: 5 at epsilon=inf, 6 DP)",
    "gbdt.bins": "model.kind=gbdt: bins of each prepared feature (at most)",
    "gbdt.binning": "gbdt: quantile (each silo's own, epsilon=inf default) or uniform (DP)",
    "gbdt.lr": "model.kind=gbdt: shrinkage of each tree's leaves (unset: 0.1, DP 0.5)",
    "gbdt.reg_lambda": "model.kind=gbdt: L2 penalty on leaf weights (unset: 1, DP 300)",
    "gbdt.min_child_weight": "gbdt at epsilon=inf: least hessian a child keeps (unset: 20)",
    "gbdt.protection": "gbdt at epsilon=inf: rr (gradients from RR labels) or he (BFV, slow)",
    "gbdt.sample_rate": "DP trees (finite epsilon): Poisson row sampling rate per tree",
    "gbdt.batch": "DP trees: trees per boosting step (same gradients, values averaged)",
    "gbdt.hessian_noise": "DP trees: noise multiplier of the leaves' H over that of G",
    "gbdt.max_leaf": "DP trees: bound on each leaf value",
    "gbdt.guide_every": "DP trees: trees per guided stage, each after one accounted split "
                        "release (0: totally random trees, the default)",
    "gbdt.guide_sigma": "DP trees, guided: joint noise multiplier of each split release",
    "gbdt.guide_beta": "DP trees, guided: how sharply draws favour high gains",
    "gbdt.guide_mix": "DP trees, guided: share of uniform (column, bin) draws",
    "gbdt.guide_stat": "DP trees, guided: what is released (bins, score, mass, leaves)",
    "gbdt.guide_bins": "DP trees, guided: the split histograms' bins (0: gbdt.bins)",
    "gbdt.guide_share": "DP trees, guide_stat=mass: least share of people on each side",
    "gbdt.leaf_rule": "DP trees: leaf values from the noisy sums: newton, hs or eb",
    "gbdt.hs_kappa": "DP trees, leaf_rule=hs: hierarchical shrinkage strength",
    "gbdt.eb_decay": "DP trees, leaf_rule=eb: the prior's weight per earlier tree",
    "gbdt.reuse": "DP trees: share of steps re-releasing the best structure so far",
    "gbdt.init": "DP trees: none, or additive (boost on a DP scorecard stage first)",
    "gbdt.init_share": "DP trees, init=additive: the stage's share of the budget",
    "scorecard.bins": "model.kind=scorecard: equal-width pre-bins of each prepared feature",
    "scorecard.min_bin_share": "scorecard: least share of the training people per merged bin",
    "scorecard.smoothing": "scorecard: the WoE's pseudo-count per bin and class",
    "scorecard.iterations": "scorecard at epsilon=inf: most steps of the regression (L-BFGS)",
    "scorecard.steps": "DP scorecard (finite epsilon): noisy Newton steps, fixed in number",
    "scorecard.count_share": "DP scorecard: the noisy counts' share of the budget",
    "scorecard.hessian_noise": "DP scorecard: noise multiplier of the Hessian over the "
                               "gradient's",
    "scorecard.clip": "DP scorecard: clipping bound over the RMS norm of a person's WoE row",
    "train.epochs": "passes over the training people (vertical topology)",
    "train.batch_size": "expected Poisson batch size of DP-SGD",
    "train.lr": "learning rate (Adam) of the vertical model",
    "train.weight_decay": "L2 weight decay (Adam) of the vertical model",
    "train.chunk_batches": "mini-batches per Flower round trip",
    "train.keep_best": "without DP, score the epoch of the best validation loss (false: the last)",
    "train.chunk_warmup": "start at one batch per round trip and double up to chunk_batches",
    "train.delay_compensation": "silos correct stale gradients (sum mode, no DP-SGD; 0: off)",
    "split.train": "share of the aligned people in training",
    "split.val": "share in validation (calibration); the rest is the test set",
    "score.base_score": "score of a person at odds base_odds (300..850 scale)",
    "score.base_odds": "good:bad odds that score base_score",
    "score.pdo": "points to double the odds",
    "explain.reasons": "reason codes per person, 0 = none (on: the authority sees silo points)",
    "psi.workers": "processes for the authority's PSI blinding",
    "privacy.epsilon": "eps_model target of the combined model; inf = no DP-SGD",
    "privacy.delta": "delta of the (epsilon, delta) budgets; 0 = 1/(10 N), N = people in training",
    "privacy.accountant": "DP-SGD accountant: prv or rdp",
    "privacy.max_grad_norm": "per-sample clipping bound of a person's whole gradient (each "
                             "of the K parties clips its block at it / sqrt(K))",
    "privacy.cap": "eps_model at which training stops; 0 = the target privacy.epsilon",
    "privacy.label_epsilon": "eps_label: randomised response on the training labels; inf = off",
    "privacy.transcript_sigma": "noise multiplier on contributions sent to the authority; 0 = off",
    "privacy.transcript_clip": "clipping bound of each contribution sent to the authority",
    "privacy.transcript_cap": "eps_transcript at which training stops; inf = no cap",
    "privacy.guardrails": "a configuration that cannot learn on this data (any model): refuse, "
                          "or only warn",
    "privacy.selection_noise": "noise multiplier of a tune's validation score, room left for "
                               "it in the calibration; 0 = none (fedscore tune sets it)",
    "aggregation.mode": "sum (a scorecard, secure sum) or concat (split learning, weaker)",
    "aggregation.secure": "sum mode: pairwise-masked secure sum of the silos' contributions",
    "storage.keystore": "encryption at rest: auto (<parties>.keys), none, or a keystore dir",
    "eligibility.require_real_name": "score only people with real-name verification",
    "eligibility.require_bound_card": "score only people with a bound bank card",
    "eligibility.severe_default_window_days": "no score after a severe default within this many "
                                              "days; 0 = no check",
    "topology": "vertical (silos hold different facts) or horizontal (regions hold people)",
    "regions": "horizontal topology: number of regions",
    "horizontal.rounds": "horizontal: federated rounds",
    "horizontal.local_epochs": "horizontal: epochs each region trains per round",
    "horizontal.lr": "horizontal: learning rate of each region's optimiser",
    "horizontal.strategy": "horizontal: fedavg or fedprox",
    "horizontal.proximal_mu": "horizontal, fedprox: weight mu of the proximal term",
    "horizontal.dp": "horizontal: sample-level DP-SGD in each region, or user-level (a region)",
    "horizontal.clipping": "horizontal, user-level DP: clip updates at the server or client",
    "horizontal.update_clip": "horizontal, user-level DP: L2 bound of a region's update",
    "join_timeout": "seconds to wait for every silo to join",
    "reply_timeout": "seconds to wait for any one reply",
    "retries": "times a message without a reply is sent again before the run stops",
    "population.users": "people the authority knows (generated population)",
    "population.seed": "seed of the generated population",
    "population.default_rate": "mean true default probability over the authority's people",
    "population.coverage": "share of the authority's people each silo holds (payments, social, "
                           "device)",
    "population.outsiders": "people the authority does not know, per silo, as a share of users",
    "population.missing_rate": "share of missing cells in the columns that can be missing",
    "population.signal_share": "share of the label's signal in each silo (sums to 1)",
    "population.signal_scale": "std of the true default logit (sets the oracle AUC)",
    "population.unverified_rate": "share of people without real-name verification",
    "population.unbound_card_rate": "share of people without a bound bank card",
    "population.severe_default_rate": "share of people with a severe default in the last year",
    "population.region_skew": "horizontal: how far regions differ, 0 (alike) to 1",
    DATA_KEY: "real data instead of the generator: uci, a CSV, or a directory; empty = generated",
}


def describe_keys() -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key, for `fedscore config`."""
    defaults = ExperimentConfig().flat()
    return [(k, getattr(t, "__name__", str(t)), repr(defaults[k]), DESCRIPTIONS[k])
            for k, t in known_keys().items()]

