"""The horizontal topology's section of the run configuration (`horizontal.*` keys,
docs/horizontal.md); re-exported by server/config.py."""

from __future__ import annotations

from dataclasses import dataclass

from server.config_checks import ConfigError, finite, positive

STRATEGIES = ("fedavg", "fedprox")
HORIZONTAL_DP = ("sample", "user")
CLIPPING_SIDES = ("server", "client")


@dataclass(frozen=True)
class HorizontalConfig:
    """The horizontal topology (docs/horizontal.md): regions hold all features of their own
    customers and train the whole model locally; the server averages the models."""

    # Federated rounds; each region trains `local_epochs` over its own customers per round.
    rounds: int = 10
    local_epochs: float = 1.0
    # Each round restarts a region's Adam from the global model, so a larger step than the
    # vertical default pays: at eps 1 on the default population, lr 0.003 / 0.01 / 0.03 gave
    # AUC 0.817 / 0.823 / 0.841 (10 rounds of 1 epoch, bench/RESULTS.md).
    lr: float = 0.03
    # fedavg, or fedprox with a proximal term mu/2 |w - w_global|^2 on every local step.
    strategy: str = "fedavg"
    proximal_mu: float = 0.1
    # "sample": DP-SGD inside each region (one accountant per region for the whole run);
    # "user": Flower's DP wrapper clips each region's update and noises the average, so a
    # whole region's contribution is protected (our accountant over rounds).
    dp: str = "sample"
    clipping: str = "server"
    # user-level DP: the clipping bound of a region's model update (L2).
    update_clip: float = 1.0

    def __post_init__(self) -> None:
        positive("horizontal.rounds", self.rounds)
        if not 0 < self.local_epochs <= 100:
            raise ConfigError(f"horizontal.local_epochs={self.local_epochs}: use a number of "
                              "epochs in (0, 100], e.g. 1 or 0.5")
        for key, value, allowed in (("strategy", self.strategy, STRATEGIES),
                                    ("dp", self.dp, HORIZONTAL_DP),
                                    ("clipping", self.clipping, CLIPPING_SIDES)):
            if value not in allowed:
                raise ConfigError(f"horizontal.{key}={value!r}: choose one of "
                                  f"{', '.join(allowed)}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"horizontal.lr={self.lr}: use a learning rate in (0, 1), e.g. 0.03")
        finite("horizontal.proximal_mu", self.proximal_mu, ", e.g. 0.1")
        finite("horizontal.update_clip", self.update_clip, ", e.g. 1.0")
        if self.proximal_mu < 0:
            raise ConfigError(f"horizontal.proximal_mu={self.proximal_mu}: must be >= 0")
        if not self.update_clip > 0:
            raise ConfigError(f"horizontal.update_clip={self.update_clip}: must be > 0")
