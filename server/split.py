"""Train / validation / test split of the aligned rows, stratified by label, decided by the
authority alone (it holds the labels)."""

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


SPLIT_NAMES = ("train", "val", "test")


def stratified_split(y: np.ndarray, cfg: SplitConfig, seed: int) -> Split:
    rng = np.random.default_rng([seed, 0x5917])
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_train = round(cfg.train * len(idx))
        n_val = round(cfg.val * len(idx))
        cuts = np.split(idx, [n_train, n_train + n_val])
        for part, chunk in zip(parts, cuts, strict=True):
            if len(chunk) < MIN_PER_CLASS:
                raise SplitError(
                    f"only {len(idx)} aligned people with label {cls}: each split needs at "
                    f"least {MIN_PER_CLASS} of each class; raise --users (or the default rate)"
                )
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return Split(train=train, val=val, test=test)
