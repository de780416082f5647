"""The authority's run configuration.

Sections are dataclasses validated at construction. On the command line and in Flower's run
config they appear as flat dotted keys ("train.epochs"), so one parser serves `fedscore run
--set train.epochs=5`, `[tool.flwr.app.config]` and `config.json`. The privacy, horizontal
and scorecard sections live in config_privacy.py, config_horizontal.py and
config_scorecard.py, ConfigError and the shared checks in config_checks.py; all are
importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

# ConfigError, PrivacyConfig and HorizontalConfig stay importable from here (callers import
# the configuration from server.config); INFINITE_OK is re-exported explicitly.
from server.config_checks import INFINITE_OK as INFINITE_OK
from server.config_checks import ConfigError, finite, positive
from server.config_horizontal import HorizontalConfig
from server.config_privacy import PrivacyConfig
from server.config_scorecard import ScorecardConfig
from server.eligibility import EligibilityConfig

MODEL_KINDS = ("mlp", "gbdt", "scorecard")


@dataclass(frozen=True)
class ModelConfig:
    # "mlp": each silo's bottom MLP trained by DP-SGD (the default). "gbdt": vertical
    # gradient-boosted trees (the `gbdt.*` keys): SecureBoost-style without DP at
    # privacy.epsilon=inf (server/gbdt_run.py), DP random trees at a finite one
    # (server/gbdt_dp_run.py). "scorecard": the vertical WoE scorecard (server/scorecard_run.py),
    # labels protected from the silos by RR, at privacy.epsilon=inf; the DP scorecard at a
    # finite one (server/scorecard_dp_run.py: noisy counts and Newton steps, no RR needed).
    kind: str = "mlp"
    # Each silo's bottom MLP; unset (empty) = MLP_HIDDEN's default for the run's mode; 0 = no
    # hidden layer (each silo's contribution linear in its inputs).
    hidden: tuple[int, ...] = ()
    # `concat` mode only: each silo's embedding width, and the authority's MLP layers on top.
    embedding_dim: int = 4
    top_hidden: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind={self.kind!r}: choose one of {', '.join(MODEL_KINDS)}")
        for key, layers in (("model.hidden", self.hidden if self.hidden not in ((), LINEAR)
                             else (1,)),
                            ("model.top_hidden", self.top_hidden)):
            if not layers or any(h < 1 or h > 4096 for h in layers):
                zero = " (model.hidden=0 alone: no hidden layer)" if key == "model.hidden" else ""
                raise ConfigError(
                    f"{key}={layers}: give 1 to 4096 units per layer, e.g. 32,16{zero}"
                )
        if not 1 <= self.embedding_dim <= 256:
            raise ConfigError(f"model.embedding_dim={self.embedding_dim}: use 1 to 256")


# model.hidden=0: no hidden layer, so each silo's bottom model is linear in its prepared inputs
# (clients/protocol/model.py `hidden_layers` skips a width of 0).
LINEAR: tuple[int, ...] = (0,)

# model.hidden left unset: one layer of 16 under DP-SGD in the vertical `sum` model, else
# (32, 16). DP-SGD noises every weight, so a smaller bottom MLP keeps more signal per step:
# at eps 1, in process, mean validation AUC 0.762 against 0.750 on UCI (21,000 in training,
# 3 seeds), 0.829 against 0.824 on 30,000 generated people (3 seeds), 0.855 against 0.850 on
# 100,000 (2 seeds) (bench/RESULTS.md "MLP defaults that hold on both data sizes"). Not
# measured elsewhere (no DP, concat, horizontal), which keep (32, 16). No hidden layer
# (model.hidden=0) did better on validation in process (0.768 against 0.760 on UCI), but on
# the engine's UCI splits it was +0.003 on validation and -0.002 on test, reaching 0.76 on
# neither (bench/RESULTS.md "Input encodings and a linear bottom model at eps 1"): too thin
# an edge to change what every DP run trains; it stays an option.
MLP_HIDDEN: dict[bool, tuple[int, ...]] = {True: (16,), False: (32, 16)}


def default_hidden(dp_sgd: bool, topology: str, mode: str) -> tuple[int, ...]:
    """model.hidden's default for a run: MLP_HIDDEN[True] where it was measured better."""
    return MLP_HIDDEN[dp_sgd and topology == "vertical" and mode == "sum"]


GBDT_PROTECTIONS = ("rr", "he")


# Per mode, the defaults of the gbdt.* keys left unset (None): privacy.epsilon=inf grows
# SecureBoost trees (bench/RESULTS.md "Vertical GBDT core"), a finite epsilon the DP random
# trees (server/gbdt_dp.py `DpTreeParams`, the best on UCI at eps 1, "DP vertical trees on UCI").
# The SecureBoost trees bin by each silo's own quantiles (bench/RESULTS.md "GBDT on UCI, three
# seeds"); the DP trees must keep equal-width bins (GbdtConfig.binning).
GBDT_DEFAULTS: dict[bool, dict[str, Any]] = {
    False: {"trees": 50, "depth": 5, "lr": 0.1, "reg_lambda": 1.0, "binning": "quantile",
            "min_child_weight": 20.0},
    # min_child_weight is unused by the DP trees; 1 keeps their run key as it was. Depth 6:
    # the best validation AUC of the settings tried on UCI at eps 1, chosen without the test
    # people (bench/RESULTS.md "DP trees, chosen without UCI's test people"); reg_lambda 300
    # with hessian_noise 4 likewise ("DP trees: post-processing the released leaf sums").
    True: {"trees": 300, "depth": 6, "lr": 0.5, "reg_lambda": 300.0, "binning": "uniform",
           "min_child_weight": 1.0}}
GBDT_BINNINGS = ("quantile", "uniform")


@dataclass(frozen=True)
class GbdtConfig:
    """model.kind=gbdt: the trees and how the silos see the gradients.

    Which keys apply: trees, depth, bins, binning, lr, reg_lambda to both modes (trees,
    binning, lr, reg_lambda default by mode, GBDT_DEFAULTS; binning=quantile is refused with
    DP); min_child_weight and protection to the SecureBoost trees
    of privacy.epsilon=inf only (server/gbdt_run.py); sample_rate, batch, hessian_noise and
    max_leaf (and the guide_*, leaf_rule, hs_kappa, eb_decay and reuse keys) to the DP trees
    of a finite privacy.epsilon only (server/gbdt_dp_run.py), which
    send the silos nothing label-dependent, so protection has nothing to protect there."""

    # 32 bins, both modes; depth 5 (SecureBoost) or 6 (DP trees) unless set.
    trees: int | None = None
    depth: int | None = None
    bins: int = 32
    # "quantile": each silo's own quantiles of each column over the training people (the
    # edges stay in the silo; the bin index the authority learns is a rank). "uniform": equal
    # width over a fixed range, data-independent: the only one the DP trees accept.
    binning: str | None = None
    lr: float | None = None
    reg_lambda: float | None = None
    # Unset: 20 for the SecureBoost trees (not XGBoost's 1): on UCI, seeds 0-2, test AUC
    # 0.7849 -> 0.7864 with quantile bins, and it keeps small data from fitting single
    # defaulters (bench/RESULTS.md "GBDT on UCI, three seeds").
    min_child_weight: float | None = None
    # "rr": every silo sees g, h computed from the randomised-response labels at
    # privacy.label_epsilon (forward-corrected): post-processing of eps_label label DP.
    # "he": g, h under BFV encryption (crypto/he.py); silos see nothing in clear, but it costs
    # about 20 s of a core per silo level at 100,000 people (87 min for 50 trees).
    protection: str = "rr"
    # DP trees: Poisson row sampling per tree, trees per boosting step, H's noise over G's,
    # the bound on a leaf value (server/gbdt_dp.py `DpTreeParams`).
    sample_rate: float = 0.3
    batch: int = 1
    hessian_noise: float = 4.0  # 2 until "DP trees: post-processing the released leaf sums"
    max_leaf: float = 1.0
    # DP trees guided by noisy split histograms (server/gbdt_dp_guide.py): one accounted
    # release per guide_every trees (0: totally random trees) at joint multiplier guide_sigma;
    # guide_beta sharpens the draws towards high gains, guide_mix of them stay uniform.
    guide_every: int = 0
    guide_sigma: float = 10.0
    guide_beta: float = 10.0
    guide_mix: float = 0.2
    # What is released: "bins" (g, h per column and bin), "score" (per column), "mass" (people
    # per column and bin, once, label-free: thresholds that cut at least guide_share of them),
    # "leaves" (nothing: the trees released so far). guide_bins: the histograms' bins (0: bins).
    guide_stat: str = "bins"
    guide_bins: int = 0
    guide_share: float = 0.02
    # Post-processing of the DP trees' released leaf sums (server/gbdt_dp_post.py, no budget):
    # leaf_rule "newton" (-G~ / (H~ + reg_lambda)), "hs" (hierarchical shrinkage towards the
    # ancestors' sums, strength hs_kappa) or "eb" (empirical Bayes, prior pooled with weight
    # eb_decay per tree); reuse: the share of steps that re-release the routed structure of
    # largest noisy gain so far.
    leaf_rule: str = "newton"
    hs_kappa: float = 100.0
    eb_decay: float = 0.9
    reuse: float = 0.0
    # A first additive stage under the DP trees (server/gbdt_dp_init.py): "additive" fits the
    # DP WoE scorecard on init_share of the budget (in 1/sigma^2) and boosts the trees on its
    # margin; "none": the trees alone, from their own noisy prior.
    init: str = "none"
    init_share: float = 0.5

    def resolved(self, dp: bool) -> GbdtConfig:
        """The keys left unset filled in with the mode's defaults."""
        unset = {k: v for k, v in GBDT_DEFAULTS[dp].items() if getattr(self, k) is None}
        return replace(self, **unset) if unset else self

    def __post_init__(self) -> None:
        if self.trees is not None and not 1 <= self.trees <= 10_000:
            raise ConfigError(f"gbdt.trees={self.trees}: use 1 to 10000 trees, e.g. 50")
        if self.depth is not None and not 1 <= self.depth <= 12:
            raise ConfigError(f"gbdt.depth={self.depth}: use a depth of 1 to 12, e.g. 5")
        if not 2 <= self.bins <= 256:
            raise ConfigError(f"gbdt.bins={self.bins}: use 2 to 256 bins, e.g. 32")
        if self.lr is not None and not 0 < self.lr <= 1:
            raise ConfigError(f"gbdt.lr={self.lr}: use a learning rate in (0, 1], e.g. 0.1")
        for key in ("reg_lambda", "min_child_weight", "hessian_noise", "max_leaf"):
            value = getattr(self, key)
            if value is None:
                continue
            finite(f"gbdt.{key}", value, ", e.g. 1")
            if value < 0:
                raise ConfigError(f"gbdt.{key}={value}: must be >= 0, e.g. 1")
        self._check_dp_keys()
        if self.binning is not None and self.binning not in GBDT_BINNINGS:
            raise ConfigError(f"gbdt.binning={self.binning!r}: choose one of "
                              f"{', '.join(GBDT_BINNINGS)} (quantile: each silo's own "
                              "quantiles, without DP only; uniform: equal width, data-blind)")
        if self.protection not in GBDT_PROTECTIONS:
            raise ConfigError(f"gbdt.protection={self.protection!r}: choose one of "
                              f"{', '.join(GBDT_PROTECTIONS)} (rr: label DP at "
                              "privacy.label_epsilon; he: encrypted gradients, slow)")
        if self.protection == "he" and self.bins & (self.bins - 1):
            raise ConfigError(f"gbdt.bins={self.bins}: gbdt.protection=he packs bins by "
                              "halving, so use a power of two, e.g. 32")

    def _check_dp_keys(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"gbdt.sample_rate={self.sample_rate}: use a rate in (0, 1], "
                              "e.g. 0.3")
        if self.batch < 1 or (self.trees is not None and self.trees % self.batch):
            raise ConfigError(f"gbdt.batch={self.batch}: use a divisor of gbdt.trees, e.g. 1")
        if not (self.hessian_noise > 0 and self.max_leaf > 0):
            raise ConfigError("gbdt.hessian_noise and gbdt.max_leaf must be > 0, e.g. 4 and 1")
        if self.guide_every < 0 or (self.guide_every and self.guide_every % self.batch):
            raise ConfigError(f"gbdt.guide_every={self.guide_every}: use 0 (random trees) or "
                              "a multiple of gbdt.batch, e.g. 100")
        if not (self.guide_sigma > 0 and self.guide_beta >= 0 and 0 <= self.guide_mix <= 1):
            raise ConfigError("gbdt.guide_sigma must be > 0, gbdt.guide_beta >= 0 and "
                              "gbdt.guide_mix in [0, 1], e.g. 10, 10 and 0.2")
        if self.guide_stat not in ("bins", "score", "mass", "leaves"):
            raise ConfigError(f"gbdt.guide_stat={self.guide_stat!r}: choose bins, score, "
                              "mass or leaves")
        if self.guide_bins and (self.guide_bins < 2 or self.bins % self.guide_bins):
            raise ConfigError(f"gbdt.guide_bins={self.guide_bins}: use 0 or a divisor of "
                              "gbdt.bins, e.g. 8")
        if not 0 <= self.guide_share < 0.5:
            raise ConfigError(f"gbdt.guide_share={self.guide_share}: use a share in [0, 0.5)")
        self._check_post()

    def _check_post(self) -> None:
        if self.leaf_rule not in ("newton", "hs", "eb"):
            raise ConfigError(f"gbdt.leaf_rule={self.leaf_rule!r}: choose newton, hs or eb")
        if not (self.hs_kappa >= 0 and 0 <= self.eb_decay <= 1):
            raise ConfigError("gbdt.hs_kappa must be >= 0 and gbdt.eb_decay in [0, 1], e.g. "
                              "100 and 0.9")
        if not 0 <= self.reuse < 1 or (self.reuse and (self.guide_every or self.batch > 1)):
            raise ConfigError(f"gbdt.reuse={self.reuse}: use a share in [0, 1), and only for "
                              "the random trees (gbdt.guide_every=0, gbdt.batch=1)")
        if self.init not in ("none", "additive"):
            raise ConfigError(f"gbdt.init={self.init!r}: choose none or additive")
        if not 0 < self.init_share < 1 or (self.init == "additive" and self.guide_every):
            raise ConfigError(f"gbdt.init_share={self.init_share}: use a share in (0, 1); "
                              "gbdt.init=additive boosts the random trees only "
                              "(gbdt.guide_every=0)")


@dataclass(frozen=True)
class TrainConfig:
    # Chosen on validation AUC at the default privacy (combined eps 1, label eps 2) on the
    # default population (bench/tune_defaults.py, bench/RESULTS.md "Defaults after issue 17"):
    # larger Poisson batches carry more signal per unit of DP noise; 4 epochs of 512 were
    # undertrained (val AUC still rising) and lr 0.02 with 16 stale batches per trip diverged.
    epochs: int = 12
    batch_size: int = 2048
    lr: float = 0.01
    weight_decay: float = 0.0
    # Batches per Flower round trip: each trip costs ~100 ms, while staleness grows with it
    # (every silo corrects the same stale residual, so K silos overshoot together).
    chunk_batches: int = 4
    # Start with one batch per trip and double up to chunk_batches: staleness hurts most early,
    # when the model moves fastest; the warm-up costs only log2(chunk_batches) extra trips.
    chunk_warmup: bool = True
    # Delay compensation of the stale gradients within a chunk (clients/silo/trainer.py
    # `compensated`): each silo corrects a row's gradient for its own drift since it sent the
    # row's contribution, times this factor times the number of silos (the others drift
    # alike); 0 replays the gradients as sent. Applies in `sum` mode without DP-SGD, where it
    # was measured better (bench/RESULTS.md "Stale gradients": non-private UCI, chunks of 4 and
    # 16 match chunks of 1 with it, lose 0.011 and 0.050 without); under DP-SGD staleness cost
    # at most 0.002 and the correction moved seeds by -0.003..+0.005, so it is off there.
    delay_compensation: float = 1.0
    # Without DP, score the epoch of the best validation log loss (issue 20 item 5: no silent
    # divergence); false keeps the last epoch, as a deployment without early stopping does
    # (the red team's overfit run, tests/test_attacks.py). DP runs keep the last epoch anyway.
    keep_best: bool = True

    def __post_init__(self) -> None:
        positive("train.epochs", self.epochs)
        finite("train.delay_compensation", self.delay_compensation, ", e.g. 0 or 1")
        if self.delay_compensation < 0:
            raise ConfigError(f"train.delay_compensation={self.delay_compensation}: must be "
                              ">= 0 (0: off, 1: as many silos as drift)")
        positive("train.batch_size", self.batch_size)
        positive("train.chunk_batches", self.chunk_batches)
        if not 0 < self.lr < 1:
            raise ConfigError(f"train.lr={self.lr}: use a learning rate in (0, 1), e.g. 0.003")
        finite("train.weight_decay", self.weight_decay, ", e.g. 0 or 1e-4")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay}: must be >= 0")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.7
    val: float = 0.15

    @property
    def test(self) -> float:
        return 1.0 - self.train - self.val

    def __post_init__(self) -> None:
        if not (0 < self.train < 1 and 0 < self.val < 1 and self.train + self.val < 0.96):
            raise ConfigError(
                f"split.train={self.train}, split.val={self.val}: both in (0, 1) with at "
                "least 5 % left for the test set, e.g. 0.7 and 0.15"
            )


@dataclass(frozen=True)
class ScoreConfig:
    base_score: float = 650.0
    base_odds: float = 30.0
    pdo: float = 50.0

    def __post_init__(self) -> None:
        for key in ("base_score", "base_odds", "pdo"):
            finite(f"score.{key}", getattr(self, key), " (defaults: 650, 30, 50)")
        if self.pdo <= 0 or self.base_odds <= 0:
            raise ConfigError(
                f"score.pdo={self.pdo}, score.base_odds={self.base_odds}: both must be > 0"
            )
        if not 300 <= self.base_score <= 850:
            raise ConfigError(f"score.base_score={self.base_score}: must lie in 300..850")


MAX_REASONS = 8


@dataclass(frozen=True)
class ExplainConfig:
    # Reason codes per person (0 = none, the default). Switching them on REVEALS each silo's
    # exact points per person to the authority, which secure sum otherwise hides
    # (docs/threat-model.md); each silo must also allow them in its own policy.json. They are
    # made in `sum` mode without transcript noise only, and skipped with a warning otherwise.
    reasons: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.reasons <= MAX_REASONS:
            raise ConfigError(f"explain.reasons={self.reasons}: use 0 (none) to {MAX_REASONS}")


@dataclass(frozen=True)
class PsiConfig:
    # Processes for the authority's blinding (one pool for the whole alignment); silos blind
    # in their own. PSI is CPU-bound: on 2 cores, 1 and 2 take the same time at 10^6.
    workers: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"psi.workers={self.workers}: use 1 to 64 processes")


AGGREGATION_MODES = ("sum", "concat")


@dataclass(frozen=True)
class AggregationConfig:
    # `sum`: z = b + sum_k g_k (a scorecard). `concat`: split learning, an MLP over the silos'
    # embeddings; weaker, the authority sees each silo's embedding (docs/threat-model.md).
    mode: str = "sum"
    # Pairwise-masked secure sum: the authority decodes only sum_k g_k, never one silo's g_k.
    # Applies to `sum` mode; in `concat` mode there is no sum to protect.
    secure: bool = True

    def __post_init__(self) -> None:
        if self.mode not in AGGREGATION_MODES:
            raise ConfigError(
                f"aggregation.mode={self.mode!r}: choose one of {', '.join(AGGREGATION_MODES)}"
            )

    @property
    def secure_sum(self) -> bool:
        """Whether contributions travel masked: secure aggregation in force in `sum` mode."""
        return self.secure and self.mode == "sum"


@dataclass(frozen=True)
class StorageConfig:
    # Encryption at rest of every person-level file (party tables, identifier maps,
    # checkpoints, scores). "auto": a keystore `<parties>.keys` beside the party tables,
    # created on first use; a directory: that keystore (`fedscore keys init DIR`); "none":
    # plaintext, for inspecting files by hand.
    keystore: str = "auto"

    def __post_init__(self) -> None:
        if not self.keystore.strip():
            raise ConfigError('storage.keystore is empty: use "auto", "none" or a keystore '
                              "directory (fedscore keys init DIR)")


TOPOLOGIES = ("vertical", "horizontal")

@dataclass(frozen=True)
class AuthorityConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    gbdt: GbdtConfig = field(default_factory=GbdtConfig)
    scorecard: ScorecardConfig = field(default_factory=ScorecardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    psi: PsiConfig = field(default_factory=PsiConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Opening conditions (server/eligibility.py): who may be scored at all.
    eligibility: EligibilityConfig = field(default_factory=EligibilityConfig)
    # "vertical": silos hold different facts about the same people (the default).
    # "horizontal": `regions` institutions hold all facts about disjoint customers.
    topology: str = "vertical"
    regions: int = 5
    horizontal: HorizontalConfig = field(default_factory=HorizontalConfig)
    # How long to wait for all silos to join, and for any one reply; how many times a message
    # that got no reply (its SuperNode gone or unreachable) is sent again before the run stops.
    join_timeout: float = 120.0
    reply_timeout: float = 600.0
    retries: int = 2

    def __post_init__(self) -> None:
        for name in ("join_timeout", "reply_timeout"):
            finite(name, getattr(self, name), " of seconds, e.g. 120")
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive number of "
                                  "seconds")
        if self.retries < 0:
            raise ConfigError(f"retries={self.retries}: must be 0 or more")
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology={self.topology!r}: choose one of "
                              f"{', '.join(TOPOLOGIES)}")
        if not 2 <= self.regions <= 64:
            raise ConfigError(f"regions={self.regions}: use 2 to 64 regions")
        # The gbdt keys left unset take the defaults of the mode the privacy settings choose
        # (GBDT_DEFAULTS), so config.json and the run key record what was run.
        object.__setattr__(self, "gbdt", self.gbdt.resolved(self.privacy.dp_sgd))
        if not self.model.hidden:  # likewise model.hidden (MLP_HIDDEN)
            object.__setattr__(self, "model", replace(self.model, hidden=default_hidden(
                self.privacy.dp_sgd, self.topology, self.aggregation.mode)))
        if self.model.kind == "gbdt":
            _check_gbdt(self)
        if self.model.kind == "scorecard":
            _check_scorecard(self)
        if self.aggregation.mode == "concat" and self.privacy.transcript_dp:
            raise ConfigError(
                "privacy.transcript_sigma > 0 needs aggregation.mode=sum: transcript noise is "
                "defined on one clipped contribution per person, not on embeddings"
            )


def _check_gbdt(cfg: AuthorityConfig) -> None:
    """What model.kind=gbdt cannot do in this wiring, refused before any engine starts."""
    if cfg.topology != "vertical":
        raise ConfigError(f"model.kind=gbdt with topology={cfg.topology}: the trees are "
                          "vertical only (silos hold different facts about the same people); "
                          "use topology=vertical, or model.kind=mlp for the horizontal topology")
    if cfg.privacy.dp_sgd and cfg.gbdt.protection == "he":
        raise ConfigError(
            f"model.kind=gbdt with privacy.epsilon={cfg.privacy.epsilon:g} trains DP random "
            "trees, which send the silos no gradients: gbdt.protection=he has nothing to "
            "encrypt; leave gbdt.protection at rr (unused there) or set privacy.epsilon=inf")
    if cfg.privacy.dp_sgd and cfg.gbdt.binning == "quantile":
        raise ConfigError(
            f"gbdt.binning=quantile with privacy.epsilon={cfg.privacy.epsilon:g}: the DP trees "
            "draw their splits over bins fixed before any data is read; edges at each silo's "
            "quantiles would follow its people's values, a release no DP accounting covers. "
            "Use gbdt.binning=uniform (the default at a finite epsilon) or "
            "privacy.epsilon=inf")
    if cfg.privacy.dp_sgd and (cfg.gbdt.depth or 0) > 10:
        raise ConfigError(f"gbdt.depth={cfg.gbdt.depth}: the DP trees are complete trees; use "
                          "a depth of 1 to 10, e.g. 6")
    if cfg.privacy.transcript_dp:
        raise ConfigError("model.kind=gbdt sends no contributions to noise: set "
                          "privacy.transcript_sigma=0")


def _check_scorecard(cfg: AuthorityConfig) -> None:
    """What model.kind=scorecard cannot do, refused before any engine starts."""
    if cfg.topology != "vertical":
        raise ConfigError(f"model.kind=scorecard with topology={cfg.topology}: the scorecard is "
                          "vertical only (silos hold different facts about the same people); "
                          "use topology=vertical, or model.kind=mlp for the horizontal topology")
    if cfg.privacy.transcript_dp:
        raise ConfigError("model.kind=scorecard sends no contributions to noise: set "
                          "privacy.transcript_sigma=0")
