"""Train / validation / test split of the aligned positions, decided by the authority alone.

Each person is assigned independently (train with probability split.train, validation with
split.val, else test) from the authority's secret randomness. Not stratified: a split drawn
from the labels would tell anyone who sees which positions are trained on something about the
labels (silos see the batch plans). Independent assignment also keeps the privacy analysis
simple: adding or removing one person changes no one else's assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.config import SplitConfig

MIN_PER_CLASS = 5


class SplitError(ValueError):
    """Too few people to split."""


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def labels(self, size: int) -> np.ndarray:
        """Split name per position: 0 train, 1 val, 2 test."""
        out = np.empty(size, dtype=np.int8)
        out[self.train], out[self.val], out[self.test] = 0, 1, 2
        return out

    @classmethod
    def from_labels(cls, names: np.ndarray) -> Split:
        return cls(*(np.flatnonzero(names == i) for i in range(3)))


SPLIT_NAMES = ("train", "val", "test")


def random_split(y: np.ndarray, cfg: SplitConfig, rng: np.random.Generator) -> Split:
    """Independent assignment per person from `rng` (the authority's secret stream). The labels
    are only checked, after the draw, for enough people of each class in every part."""
    u = rng.random(len(y))
    names = np.where(u < cfg.train, 0, np.where(u < cfg.train + cfg.val, 1, 2)).astype(np.int8)
    split = Split.from_labels(names)
    for part, name in zip((split.train, split.val, split.test), SPLIT_NAMES, strict=True):
        for cls in (0, 1):
            if int((y[part] == cls).sum()) < MIN_PER_CLASS:
                raise SplitError(
                    f"fewer than {MIN_PER_CLASS} aligned people with label {cls} in the {name} "
                    "split; raise --users (or the default rate), or enlarge that split"
                )
    return split
