"""`concat` aggregation: split learning with an MLP head over the silos' embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.protocol.model import ModelSpec
from crypto.secret_random import SecretRandom
from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat
from server.top import MlpHead


@pytest.mark.slow
def test_concat_without_staleness_equals_central_concat(concat_run: tuple[Path, Path, str]):
    """One batch per trip: per-silo embedding gradients must reproduce central training of the
    same bottoms-plus-head model step for step."""
    metrics = json.loads((concat_run[0] / "metrics.json").read_text())
    fed, central = metrics["history"]["federated"], metrics["history"]["central"]
    assert len(fed) == len(central) == 2
    for f, c in zip(fed, central, strict=True):
        assert f["val_loss"] == pytest.approx(c["val_loss"], abs=1e-4)
    # It learnt, and on the test people it is the central model: the same AUC. (Its gap to
    # the oracle, 0.13 on this draw of the split, is two epochs' undertraining, which the
    # central model shares: it says nothing about the federation.)
    assert metrics["auc"] > 0.6
    assert metrics["gap_to_central"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_concat_is_recorded_and_does_not_claim_a_secure_sum(concat_run: tuple[Path, Path, str]):
    authority = json.loads((concat_run[0] / "authority.json").read_text())
    assert authority["aggregation_mode"] == "concat"
    assert authority["secure_aggregation"] is False
    assert set(authority["model_inputs"]) == {"payments", "social", "device"}


def test_transcript_noise_is_refused_in_concat_mode():
    with pytest.raises(ConfigError, match=r"aggregation\.mode=sum"):
        parse_flat(AuthorityConfig, {"aggregation.mode": "concat",
                                     "privacy.transcript_sigma": "1"})


def test_unknown_mode_names_the_choices():
    with pytest.raises(ConfigError, match="sum, concat"):
        parse_flat(AuthorityConfig, {"aggregation.mode": "stack"})


def test_secure_sum_applies_to_sum_mode_only():
    assert parse_flat(AuthorityConfig, {}).aggregation.secure_sum
    assert not parse_flat(AuthorityConfig, {"aggregation.mode": "concat"}).aggregation.secure_sum


def test_head_gradients_match_autograd_of_the_mean_loss():
    """d mean-BCE / d e per row, taken before the head's own step, for each batch."""
    spec = ModelSpec(seed=3, outputs=2)
    rng = np.random.default_rng(0)
    e = rng.normal(size=(12, 6)).astype(np.float32)
    y = rng.integers(0, 2, size=12).astype(np.float64)
    secret = SecretRandom(bytes(32))
    head = MlpHead(0.3, spec, 0.0, 3, (5,), secret, "r")
    reference = MlpHead(0.3, spec, 0.0, 3, (5,), secret, "r")
    grads = head.gradients(e, y, [7, 5])
    # The first batch's gradient is at the initial weights: recompute it with autograd.
    x = torch.from_numpy(e[:7]).requires_grad_()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        reference.base(x), torch.from_numpy(y[:7]).float())
    loss.backward()
    np.testing.assert_allclose(grads[:7], x.grad.numpy(), rtol=1e-5, atol=1e-7)
    # The head stepped after the first batch, so the second batch sees different weights.
    assert not np.allclose(head.logits(e), reference.logits(e))
