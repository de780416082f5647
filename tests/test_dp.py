"""DP-SGD mechanics at a party, label DP, and privacy configuration errors."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
import torch

from clients.protocol.accounting import epsilon
from clients.protocol.dp_constants import (
    PRIOR_NOISE_MULTIPLIER,
    STATISTICS_NOISE_MULTIPLIER,
    THRESHOLD_DELTA,
)
from clients.protocol.dp_sgd import (
    arm_noise,
    make_private,
    mark_empty_batch,
    noised_step,
    remove_private_hooks,
    secret_gaussian,
)
from clients.protocol.model import ModelSpec
from clients.silo.trainer import SiloTrainer
from crypto.secret_random import SecretRandom
from server.config import ConfigError, PrivacyConfig
from server.label_dp import corrected_gradient, flip_probability, randomized_response
from server.privacy import PrivacyPlan
from server.run_keys import CLIP_MARK, computed_settings
from server.run_plan import model_spec
from simulations.run.config import make_config

C = 1.0
SECRET = SecretRandom(bytes(range(32)))


def _trainer(n: int, spec: ModelSpec, salt: int, random: SecretRandom = SECRET) -> SiloTrainer:
    return SiloTrainer(n, spec, salt, random=random, run_key="r")


def _update(trainer: SiloTrainer, x: np.ndarray, g: np.ndarray) -> torch.Tensor:
    """The noisy, clipped, averaged gradient a DP step applies (before Adam)."""
    trainer.replay([x], [g])
    return torch.cat([p.grad.flatten() for p in trainer.base.parameters()])


def test_clipping_bounds_one_extreme_persons_influence():
    spec = ModelSpec(noise_multiplier=1e-6, max_grad_norm=C, sample_rate=0.01, expected_batch=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    g = np.full(64, 1e-3, np.float32)
    normal = _update(_trainer(6, spec, 1), x, g)
    x_extreme, g_extreme = x.copy(), g.copy()
    x_extreme[0] *= 1e4
    g_extreme[0] = 1e4
    extreme = _update(_trainer(6, spec, 1), x_extreme, g_extreme)
    # Replacing one person moves the summed gradient by at most 2C (plus the tiny noise).
    assert float((extreme - normal).norm()) <= 2 * C + 1e-3
    # Without clipping that person alone would move it by orders of magnitude more.
    assert float(extreme.norm()) > 0.5 * C


def test_noise_has_the_calibrated_scale():
    sigma, batch = 2.0, 50
    spec = ModelSpec(noise_multiplier=sigma, max_grad_norm=C, sample_rate=0.01,
                     expected_batch=batch)
    trainer = _trainer(6, spec, 1)
    noise = _update(trainer, np.zeros((batch, 6), np.float32), np.zeros(batch, np.float32))
    assert float(noise.std()) == pytest.approx(sigma * C / batch, rel=0.2)


def test_dp_noise_comes_from_the_secret_not_the_seed():
    """Same seed, same data: the same secret gives the same noise, another secret other noise,
    and a trainer without a secret refuses to take a DP step."""
    spec = ModelSpec(noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.01, expected_batch=8,
                     seed=7)
    x, g = np.ones((8, 6), np.float32), np.zeros(8, np.float32)
    same = [_update(_trainer(6, spec, 1), x, g) for _ in range(2)]
    other = _update(_trainer(6, spec, 1, SecretRandom(bytes(32))), x, g)
    assert torch.equal(same[0], same[1])
    assert not torch.allclose(same[0], other)
    with pytest.raises(ValueError, match="secret randomness"):
        SiloTrainer(6, spec, 1)


def test_each_step_draws_fresh_noise():
    spec = ModelSpec(noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.01, expected_batch=8)
    trainer = _trainer(6, spec, 1)
    x, g = np.ones((8, 6), np.float32), np.zeros(8, np.float32)
    first, second = _update(trainer, x, g).clone(), _update(trainer, x, g)
    assert not torch.allclose(first, second)


def test_accountant_history_survives_serialisation():
    spec = ModelSpec(noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.01, expected_batch=8)
    t = _trainer(4, spec, 2)
    t.replay([np.ones((8, 4), np.float32)] * 3, [np.zeros(8, np.float32)] * 3)
    clone = _trainer(4, spec, 2)
    clone.load_bytes(t.to_bytes())
    assert clone.history == t.history == [(1.0, 0.01, 3)]


def test_randomised_response_flips_at_the_right_rate():
    rng = np.random.default_rng(1)
    y = (rng.random(200_000) < 0.06).astype(np.int8)
    noisy = randomized_response(y, 2.0, rng)
    rho = flip_probability(2.0)
    assert np.mean(noisy != y) == pytest.approx(rho, abs=0.003)
    assert flip_probability(math.inf) == 0.0


def test_corrected_gradient_is_the_derivative_of_the_corrected_loss():
    rho = 0.2
    z = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.float64)
    p = rho + (1 - 2 * rho) * torch.sigmoid(z)
    loss = torch.nn.functional.binary_cross_entropy(p, y, reduction="sum")
    loss.backward()
    ours = corrected_gradient(z.detach().numpy(), y.numpy(), rho)
    assert np.allclose(ours, z.grad.numpy(), atol=1e-9)
    assert np.allclose(corrected_gradient(z.detach().numpy(), y.numpy(), 0.0),
                       torch.sigmoid(z).detach().numpy() - y.numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0}, "privacy.epsilon"),
        ({"epsilon": -1}, "privacy.epsilon"),
        ({"accountant": "gdp"}, "privacy.accountant"),
        ({"delta": 1.5}, "privacy.delta"),
        ({"label_epsilon": 0}, "privacy.label_epsilon"),
    ],
)
def test_bad_privacy_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(**kwargs)


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ConfigError, match="not below 1/N"):
        PrivacyConfig(delta=1e-3).delta_for(5000)
    with pytest.raises(ConfigError, match="not below 1/N"):
        PrivacyConfig(delta=1 / 5000).delta_for(5000)
    assert PrivacyConfig().delta_for(5000) == pytest.approx(1 / 50_000)


def test_combined_epsilon_meets_the_target_and_per_party_noise_is_sqrt_k_larger():
    """K parties each noising their own block at sigma: the joint mechanism's multiplier is
    sigma / sqrt(K), and the statistics before training are in the same accountant."""
    plan = PrivacyPlan(PrivacyConfig(epsilon=1.0, accountant="rdp"), ("a", "b", "c"), 20_000,
                       500, 2, ledger=None)
    assert plan.blocks == 4
    assert plan.sigma == pytest.approx(2 * plan.joint_sigma)
    plan.spend(plan.steps_planned)
    summary = plan.summary()
    plan.close()
    # Composed at the accountant's delta: the configured one less the three silos' category
    # thresholds (tests/test_threshold_delta.py).
    combined = epsilon("rdp", [(STATISTICS_NOISE_MULTIPLIER, 1.0, 3),
                               (PRIOR_NOISE_MULTIPLIER, 1.0, 1),
                               (plan.joint_sigma, plan.q, plan.steps_planned)],
                       plan.accountant_delta)
    assert summary["epsilon"]["model"] == pytest.approx(combined)
    assert 0.95 <= combined <= 1.0
    # A party's own steps alone look far cheaper: that figure bounds no release.
    per_party = summary["epsilon"]["model_per_party"]["a"]
    assert per_party < 0.6 * combined
    assert "bounds no release" in summary["epsilon"]["model_per_party"]["note"]


def test_the_clip_bounds_a_persons_whole_gradient_so_each_party_adds_the_central_noise():
    """privacy.max_grad_norm C is split over the K blocks (C / sqrt(K) each): the joint
    sensitivity is C, as in central DP, and each party's noise std (its multiplier times its
    clip) equals the central model's at the joint multiplier, not sqrt(K) times it."""
    plan = PrivacyPlan(PrivacyConfig(epsilon=1.0, max_grad_norm=5.0, accountant="rdp"),
                       ("a", "b", "c"), 20_000, 500, 1, ledger=None)
    assert plan.block_clip == pytest.approx(2.5)  # 4 blocks: 3 silos and the authority's head
    assert math.sqrt(plan.blocks * plan.block_clip**2) == pytest.approx(5.0)  # joint sensitivity
    assert plan.sigma * plan.block_clip == pytest.approx(plan.joint_sigma * 5.0)
    summary = plan.summary()
    plan.close()
    assert summary["max_grad_norm"] == pytest.approx(2.5)
    assert summary["joint_max_grad_norm"] == 5.0


def test_a_cap_below_one_steps_cost_is_refused():
    with pytest.raises(ConfigError, match="below the cost of a single step"):
        PrivacyPlan(PrivacyConfig(epsilon=1.0, cap=1e-6, accountant="rdp"), ("a",), 10_000,
                    500, 2, ledger=None)


def test_plan_refuses_steps_past_the_cap():
    plan = PrivacyPlan(PrivacyConfig(epsilon=1.0, cap=0.5, accountant="rdp"), ("a",), 10_000,
                       500, 4, ledger=None)
    allowed = plan.allow(10**6)
    assert 0 < allowed < plan.steps_planned
    plan.spend(allowed)
    assert plan.allow(1) == 0
    assert plan.summary()["epsilon"]["model"] <= 0.5
    plan.close()


def test_transcript_noise_and_clipping_at_the_silo():
    spec = ModelSpec(transcript_sigma=0.5, transcript_clip=2.0)
    trainer = _trainer(3, spec, 1)
    x = np.zeros((20_000, 3), np.float32)
    with torch.no_grad():
        trainer.base.net[-1].bias.fill_(10.0)  # every raw contribution is 10, above the clip
    released = trainer.released(x, 1, "plan", "d")
    assert np.mean(released) == pytest.approx(2.0, abs=0.05)  # clipped to 2
    assert np.std(released) == pytest.approx(0.5 * 2 * 2.0, rel=0.05)
    # The same request gets the same noise (a re-sent round releases nothing new), another
    # request other noise.
    assert np.array_equal(released, trainer.released(x, 1, "plan", "d"))
    assert not np.array_equal(released, trainer.released(x, 2, "plan", "d"))
    assert np.array_equal(SiloTrainer(3, ModelSpec(), 1).released(x[:5]), np.zeros(5))


def test_transcript_budget_composes_each_persons_releases_and_model_steps(tmp_path):
    from server.ledger import Ledger
    from simulations.analysis.ledger_verify import verify

    cfg = PrivacyConfig(epsilon=1.0, transcript_sigma=4.0, accountant="rdp")
    plan = PrivacyPlan(cfg, ("a", "b"), 1000, 100, 1, ledger=Ledger(tmp_path))
    # Person 1: released 3 times, sampled twice into a batch.
    plan.record_releases(1, 10, np.array([0, 1, 1, 2]), np.array([1, 5]))
    plan.record_releases(2, 10, np.array([3, 4]), None)  # the worst case does not move
    plan.record_releases(3, 10, None, np.arange(10))  # person 1: 4 releases
    summary = plan.summary()
    plan.close()
    assert summary["transcript_releases_max"] == 4
    assert summary["transcript_sampled_max"] == 2
    eps = summary["epsilon"]["transcript"]["a"]
    # No amplification: the silo's own statistics release, four full Gaussian releases at
    # sigma 4, and the model channel: each DP-SGD step the person was in, at the per-party
    # multiplier; at the delta left after the category thresholds' reservation.
    assert eps == pytest.approx(epsilon("rdp", [(STATISTICS_NOISE_MULTIPLIER, 1.0, 1),
                                                (4.0, 1.0, 4), (plan.sigma, 1.0, 2)],
                                        plan.delta - 2 * THRESHOLD_DELTA))
    assert eps > epsilon("rdp", [(4.0, 1.0, 4), (plan.sigma, 1.0, 2)], plan.delta)
    checks = [c for c in verify(tmp_path) if c.budget == "transcript"]
    assert [c.steps for c in checks] == [7, 7]
    assert all(c.ok for c in checks)


def test_transcript_without_dp_sgd_claims_no_bound():
    cfg = PrivacyConfig(epsilon=math.inf, transcript_sigma=4.0, accountant="rdp")
    plan = PrivacyPlan(cfg, ("a",), 1000, 100, 1, ledger=None)
    plan.record_releases(1, 10, np.array([0, 1]), None)
    assert plan.summary()["epsilon"]["transcript"]["a"] is None
    plan.close()


def test_contribution_summary_is_read_off_a_noisy_histogram():
    """The five per-silo aggregates come from one Gaussian histogram (sensitivity 1): close to
    the exact ones on many people, and a single person's extreme value moves nothing beyond a
    bin."""
    from clients.silo.training import contribution_summary

    rng = np.random.default_rng(3)
    values = rng.normal(-0.5, 1.0, 200_000)
    summary = contribution_summary(values, SECRET.generator("summary", 1))
    assert summary["summary.mean"] == pytest.approx(-0.5, abs=0.05)
    assert summary["summary.q50"] == pytest.approx(-0.5, abs=0.15)
    assert summary["summary.q90"] - summary["summary.q10"] == pytest.approx(2.56, abs=0.3)
    outlier = np.append(values, 1e9)
    again = contribution_summary(outlier, SECRET.generator("summary", 1))
    assert again["summary.mean"] == pytest.approx(summary["summary.mean"], abs=1e-3)
    assert contribution_summary(values, SECRET.generator("summary", 1)) == summary


# ---- clients/protocol/dp_sgd.py: the one Opacus wiring every trainer steps through ----------


def _private_linear(dtype: torch.dtype, sigma: float = 2.0, clip: float = 0.5, batch: int = 4):
    model = torch.nn.Linear(3, 2, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    module, dp_opt = make_private(model, opt, noise_multiplier=sigma, max_grad_norm=clip,
                                  expected_batch=batch)
    return model, module, dp_opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_batch_steps_by_exactly_the_streams_noise(dtype):
    """No sample, still a step: the gradient is the secret stream's Gaussian draw, parameter by
    parameter in order, scaled by 1 / expected_batch, and SGD moves the weights by it."""
    sigma, clip, batch = 2.0, 0.5, 4
    model, _, opt = _private_linear(dtype, sigma, clip, batch)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    mark_empty_batch(model)
    noised_step(opt, noise=np.random.default_rng(11))
    draws = np.random.default_rng(11)
    for p, b in zip(model.parameters(), before, strict=True):
        expected = (secret_gaussian(draws, tuple(p.shape), sigma * clip) / batch).to(dtype)
        assert p.grad is not None
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(b - p.detach(), expected, rtol=1e-5, atol=1e-7)
        assert float(expected.abs().max()) > 0


def test_a_dp_step_refuses_a_plain_optimiser_and_leaves_the_weights():
    """A trainer that handed its plain optimiser to the DP step would release an unclipped,
    unnoised update; it fails instead, before touching anything."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.ones(2, 3)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="make_private"):
        noised_step(opt, noise=np.random.default_rng(0))
    with pytest.raises(TypeError, match="make_private"):
        arm_noise(opt, noise=np.random.default_rng(0))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_each_stream_serves_one_step_only():
    """The stream is handed over per step: a second step without its own stream fails rather
    than draw predictable noise."""
    model, _, opt = _private_linear(torch.float64)
    opt.zero_grad(set_to_none=True)
    mark_empty_batch(model)
    noised_step(opt, noise=np.random.default_rng(1))
    opt.zero_grad(set_to_none=True)
    mark_empty_batch(model)
    with pytest.raises(RuntimeError, match="secret noise stream"):
        opt.step()


def test_removing_the_private_hooks_stops_per_sample_gradients():
    model, module, _ = _private_linear(torch.float64)
    module(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    assert all(p.grad_sample is not None for p in model.parameters())
    for p in model.parameters():
        p.grad_sample = None
    remove_private_hooks(module)
    remove_private_hooks(model)  # a plain module: nothing to remove, no error
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


@pytest.mark.parametrize("head", ["bias", "mlp"])
def test_an_empty_batch_after_a_step_is_a_noised_step_of_the_head(head):
    """The authority's head steps on every batch of a Poisson plan, an empty one after a full
    one included: one noised step each, from the head's stream at that step's index."""
    from server.top import BiasHead, MlpHead

    spec = ModelSpec(noise_multiplier=1.0, max_grad_norm=C, sample_rate=0.01, expected_batch=4)

    def make():
        if head == "bias":
            return BiasHead(0.2, spec, 0.0, SECRET, "r"), np.linspace(-1, 1, 7)
        inputs = np.linspace(-1, 1, 14).reshape(7, 2)
        return MlpHead(0.2, spec, 0.0, 2, (3,), SECRET, "r"), inputs

    h, inputs = make()
    y = np.array([0, 1, 0, 1, 1, 0, 0], dtype=np.float64)
    h.gradients(inputs, y, [3, 0, 4, 0])
    assert h.steps == 4
    # The same plan on another head with the same secret: the same weights, step for step.
    again, _ = make()
    again.gradients(inputs, y, [3, 0, 4, 0])
    assert all(torch.equal(a, b) for a, b in
               zip(h.base.parameters(), again.base.parameters(), strict=True))


def test_a_dp_mlp_runs_key_says_its_clip_is_the_joint_one():
    """Same settings, other computation since the clip split: a DP-SGD run's key changes (no
    resume or draw shared with a run made before); runs without DP-SGD and tree runs keep
    theirs."""
    dp = {"seed": 0, "privacy.epsilon": 1.0}
    assert computed_settings(dp) == {**CLIP_MARK, **dp}
    for kept in ({"seed": 0, "privacy.epsilon": math.inf},
                 {**dp, "model.kind": "gbdt"}, {**dp, "topology": "horizontal"}):
        assert computed_settings(kept) == kept


def test_the_silos_model_spec_carries_each_partys_clip_not_the_joint_bound():
    plan = SimpleNamespace(sigma=9.0, q=0.1, expected_batch=2048, block_clip=2.5)
    spec = model_spec(make_config().authority, cast(PrivacyPlan, plan), 3)
    assert (spec.max_grad_norm, spec.noise_multiplier) == (2.5, 9.0)
