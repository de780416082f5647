"""Guardrails: a DP configuration that cannot learn, said before training.

The sampling alone (people in training, batch size, epochs) decides how many noisy DP-SGD
steps a run takes and how much subsampling amplifies; `sampling_guardrails` judges it before
the engine starts, and `PrivacyPlan.guardrails` (server/privacy.py) adds the noise it
calibrated. Kept apart from the plan so that configuration checks need no accountant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Below MIN_DP_STEPS noisy steps DP-SGD rarely gets anywhere (a 1,000-row table at eps 1 with
# 4 full-batch steps scored AUC 0.55, issue 20); below MIN_STEPS_TO_LEARN it cannot learn at all
# and is refused before the engine starts (privacy.guardrails=warn runs it anyway).
MIN_DP_STEPS = 50
MIN_STEPS_TO_LEARN = 5
# Above this sample rate subsampling amplifies almost nothing: each step costs its full share.
MAX_SAMPLE_RATE = 0.5
# A joint noise multiplier above this, or a per-party noise std on the averaged gradient above
# this share of the clipping bound, leaves little signal in each step. Measured on a 1,000-row
# table at eps 1 (docs/real-data.md): batch 32, 88 steps, 2.81 / 32 = 0.088 reached AUC 0.62
# against 0.78 without DP; the default run (70,000 in training) has 5.45 / 2048 = 0.003.
MAX_NOISE_MULTIPLIER = 10.0
MAX_NOISE_PER_BATCH = 0.05
# The default delta is 1/(10 N); a larger one lets the guarantee fail for more people.
MAX_DELTA_TIMES_N = 0.1
SMALLEST_BATCH = 16


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How DP-SGD samples training people: Poisson batches of expected size `batch_size`."""

    n_train: int
    batch_size: int
    epochs: int

    @property
    def q(self) -> float:
        return min(1.0, self.batch_size / self.n_train)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.q))

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def expected_batch(self) -> int:
        return max(1, round(self.q * self.n_train))


@dataclass(frozen=True, kw_only=True)
class Guardrail:
    """One reason a DP configuration may not learn: `check` names the figure, `level` is
    "warn" or "refuse", `message` says what and what would work. `detail`: figures computed
    from the authority's labels (the trees' rule on randomised labels reads the default
    rate), for the operator's console only (a refusal before the engine, `fedscore data
    check`): never logged nor recorded, since they are statistics of the labels no
    accountant covers. `message` never carries them."""

    check: str
    level: str
    message: str
    detail: str = ""

    def as_dict(self) -> dict:
        """What a run records (authority.json, metrics.json): never `detail`."""
        return {k: v for k, v in asdict(self).items() if k != "detail"}

    def for_operator(self) -> str:
        """The message, and the label figures behind it when there are any."""
        return f"{self.message} ({self.detail})" if self.detail else self.message


def sampling_guardrails(sampling: Sampling, delta: float) -> list[Guardrail]:
    """What the sampling alone says (no calibration needed: also checked before the engine)."""
    out = []
    fix = _batch_advice(sampling)
    if sampling.steps < MIN_DP_STEPS:
        level = "refuse" if sampling.steps < MIN_STEPS_TO_LEARN else "warn"
        out.append(Guardrail(check="steps", level=level, message=(
            f"only {sampling.steps} DP-SGD steps ({sampling.steps_per_epoch} per epoch over "
            f"{sampling.epochs} epochs, {sampling.n_train:,} people in training, "
            f"train.batch_size={sampling.batch_size}): with under {MIN_DP_STEPS} noisy steps "
            f"the model {'cannot learn' if level == 'refuse' else 'learns little'}; {fix}")))
    if sampling.q > MAX_SAMPLE_RATE:
        out.append(Guardrail(check="sample_rate", level="warn", message=(
            f"Poisson sample rate {sampling.q:.2f}: each step takes most of the training set, "
            f"so subsampling amplifies almost no privacy and each step costs its full share of "
            f"the budget; {fix}")))
    if delta * sampling.n_train > MAX_DELTA_TIMES_N * (1 + 1e-9):
        out.append(Guardrail(check="delta", level="warn", message=(
            f"delta {delta:.1e} is {delta * sampling.n_train:.2f}/N for N = "
            f"{sampling.n_train:,} people in training: the guarantee may fail for that many "
            f"people in expectation; use privacy.delta=0 for the default 1/(10 N) = "
            f"{MAX_DELTA_TIMES_N / sampling.n_train:.1e}")))
    return out


def _batch_advice(sampling: Sampling) -> str:
    """A batch size (a power of two, sample rate at most MAX_SAMPLE_RATE) that gives at least
    MIN_DP_STEPS steps, or the epochs needed at the smallest batch."""
    batch = SMALLEST_BATCH
    while batch * 2 <= sampling.n_train * MAX_SAMPLE_RATE and \
            Sampling(n_train=sampling.n_train, batch_size=batch * 2,
                     epochs=sampling.epochs).steps >= MIN_DP_STEPS:
        batch *= 2
    better = Sampling(n_train=sampling.n_train, batch_size=batch, epochs=sampling.epochs)
    if better.steps >= MIN_DP_STEPS and better.q <= MAX_SAMPLE_RATE:
        return (f"use train.batch_size={batch} for {better.steps_per_epoch} steps per epoch "
                f"({better.steps} in all)")
    epochs = math.ceil(MIN_DP_STEPS / better.steps_per_epoch)
    return (f"use train.batch_size={batch} and train.epochs={epochs} for "
            f"{epochs * better.steps_per_epoch} steps ({better.steps_per_epoch} per epoch), or "
            f"train on more people ({sampling.n_train:,} is very few for DP-SGD)")
