"""Delay compensation of the chunked protocol's stale gradients (clients/silo/trainer.py)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import cast

import numpy as np
import torch

from clients.protocol.model import ModelSpec
from clients.silo.trainer import SiloTrainer, compensated
from crypto.secret_random import SecretRandom
from server.config_keys import to_flat
from server.privacy import PrivacyPlan
from server.run_keys import derive_run_key
from server.run_plan import model_spec
from simulations.run.config import make_config


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_compensation_moves_a_stale_batch_gradient_towards_the_fresh_one() -> None:
    rng = np.random.default_rng(0)
    batch = 20_000
    z = rng.normal(-1.5, 1.5, batch)
    y = (rng.random(batch) < _sigmoid(z)).astype(np.float64)
    drift = np.full(batch, 0.4)  # the silo's contributions rose since it sent them
    stale = ((_sigmoid(z) - y) / batch).astype(np.float32)
    fresh = (_sigmoid(z + drift) - y) / batch
    corrected = compensated(stale, drift.astype(np.float32), 1.0)
    # What a step sees is the batch's sum: the stale one misses the drift, the corrected one
    # recovers most of it (the curvature estimate is right in expectation over labels).
    missing = fresh.sum() - stale.sum()
    assert missing > 0
    assert abs(fresh.sum() - corrected.sum()) < 0.1 * missing
    assert corrected.dtype == np.float32


def test_no_drift_no_correction() -> None:
    grad = np.array([0.01, -0.02, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(compensated(grad, np.zeros(3, np.float32), 3.0), grad)


def _trainer(lam: float) -> SiloTrainer:
    return SiloTrainer(3, ModelSpec((8,), lr=0.05, seed=1, staleness_correction=lam), salt=1)


def _weights(t: SiloTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.base.parameters()]


def test_a_chunk_of_one_batch_is_unchanged_and_longer_chunks_are_corrected() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(64, 3)).astype(np.float32) for _ in range(3)]
    gs = [rng.normal(0, 0.02, 64).astype(np.float32) for _ in range(3)]
    plain, corrected = _trainer(0.0), _trainer(3.0)
    # The first batch of a chunk is not stale: the silo sent its contributions at exactly
    # these weights, so the correction is zero and the step is the plain one.
    plain.replay(xs[:1], gs[:1])
    corrected.replay(xs[:1], gs[:1])
    for a, b in zip(_weights(plain), _weights(corrected), strict=True):
        torch.testing.assert_close(a, b)
    plain.replay(xs, gs)
    corrected.replay(xs, gs)
    differ = [not torch.allclose(a, b) for a, b in
              zip(_weights(plain), _weights(corrected), strict=True)]
    assert any(differ)


def test_the_setting_travels_in_the_model_spec() -> None:
    spec = ModelSpec((4,), staleness_correction=2.5)
    assert ModelSpec.from_config(spec.to_config()) == spec
    legacy = spec.to_config()
    del legacy["staleness_correction"]  # a silo's spec from before the setting existed
    assert ModelSpec.from_config(legacy).staleness_correction == 0.0


def _flat(**changes: object) -> dict:
    return {**to_flat(make_config().authority), **changes}


def test_the_run_key_follows_the_setting_only_where_it_applies() -> None:
    random = SecretRandom(bytes(range(32)))

    def key(**changes: object) -> str:
        return derive_run_key(random, _flat(**changes))

    # Under DP-SGD (the default) and in concat mode compensation is off: their keys, and so
    # every secret draw of those runs, are those of before the setting existed.
    assert key() == key(**{"train.delay_compensation": 0.0})
    off = {"privacy.epsilon": float("inf"), "aggregation.mode": "concat"}
    assert key(**off) == key(**off, **{"train.delay_compensation": 0.0})
    plain = {"privacy.epsilon": float("inf")}
    assert key(**plain) != key(**plain, **{"train.delay_compensation": 0.0})


def test_the_authority_turns_it_on_in_sum_mode_without_dp_sgd() -> None:
    cfg = make_config().authority
    silent = SimpleNamespace(sigma=0.0, q=0.0, expected_batch=0, block_clip=2.5)
    noisy = SimpleNamespace(sigma=9.0, q=0.1, expected_batch=2048, block_clip=2.5)
    concat = dataclasses.replace(cfg, aggregation=dataclasses.replace(cfg.aggregation,
                                                                      mode="concat"))
    assert model_spec(cfg, cast(PrivacyPlan, silent), 3).staleness_correction == 3.0
    assert model_spec(cfg, cast(PrivacyPlan, noisy), 3).staleness_correction == 0.0
    assert model_spec(concat, cast(PrivacyPlan, silent), 3).staleness_correction == 0.0
