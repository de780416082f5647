"""Configuration: unknown keys, wrong types and impossible values stop with a clear message."""

from __future__ import annotations

import pytest

from server.config import AuthorityConfig, ConfigError
from server.config_keys import parse_flat
from server.server_app import PATH_KEYS
from simulations.run.config import ExperimentConfig, make_config, parse_assignments


def test_defaults_round_trip_through_flat_keys():
    cfg = make_config()
    assert make_config(cfg.flat()) == cfg == ExperimentConfig()


def test_overrides_and_shortcuts():
    cfg = make_config({"train.epochs": "3", "model.hidden": "8,4"}, users=5000, seed=9)
    assert cfg.authority.train.epochs == 3
    assert cfg.authority.model.hidden == (8, 4)
    assert cfg.population.users == 5000
    assert cfg.population.seed == cfg.authority.seed == 9


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*train\.epochs"):
        make_config({"train.epoch": "3"})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.epochs", "three", "whole number"),
        ("train.epochs", "2.5", "whole number"),
        ("train.lr", "fast", "number"),
        ("train.lr", "nan", "number"),
        ("model.hidden", "32,x", "comma-separated"),
        ("population.users", "many", "whole number"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(key, value, expected):
    with pytest.raises(ConfigError, match=rf"{key}=.*{expected}"):
        make_config({key: value})


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("train.epochs", "0", "train.epochs"),
        ("train.lr", "2", "train.lr"),
        ("split.train", "0.95", "split.train"),
        ("score.pdo", "-1", "score.pdo"),
        ("population.users", "10", "users"),
        ("population.default_rate", "0.9", "default_rate"),
    ],
)
def test_impossible_values_name_the_field(key, value, field):
    with pytest.raises(ConfigError, match=field):
        make_config({key: value})


def test_assignments_need_an_equals_sign():
    assert parse_assignments(["a=1", "a=2"]) == {"a": "2"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["train.epochs"])


def test_flower_run_config_path_keys_are_ignored_but_others_checked():
    cfg = parse_flat(AuthorityConfig, {"data-dir": "x", "train.epochs": 2}, ignore=["data-dir"])
    assert cfg.train.epochs == 2
    with pytest.raises(ConfigError, match="unknown"):
        parse_flat(AuthorityConfig, {"data-dir": "x"})


def test_flower_app_config_matches_the_defaults():
    import tomllib
    from pathlib import Path

    from server.config_keys import to_flat

    root = Path(__file__).resolve().parents[1]
    app_config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    flat: dict = {}

    def walk(prefix: str, table: dict) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", app_config["config"])
    for key in PATH_KEYS:
        flat.pop(key)
    assert parse_flat(AuthorityConfig, flat) == AuthorityConfig()
    assert set(flat) == set(to_flat(AuthorityConfig()))


def test_engine_workers_one_per_core_at_most_one_per_silo(monkeypatch):
    import os

    from simulations.run.engine import WORKERS_ENV, engine_workers

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert engine_workers(3) == min(3, cores)
    assert engine_workers(1) == 1
    monkeypatch.setenv(WORKERS_ENV, "5")
    assert engine_workers(3) == 5
    monkeypatch.setenv(WORKERS_ENV, "zero")
    with pytest.raises(ValueError, match="whole number"):
        engine_workers(3)


def test_the_bottom_mlp_is_smaller_by_default_under_dp_sgd_only() -> None:
    """model.hidden unset: 16 under DP-SGD in the vertical sum model (measured better at eps 1
    on UCI and the generated population), 32,16 elsewhere; a value set is kept (0: linear);
    config.json (and so the run key) records the resolved layers."""
    from server.config import PrivacyConfig

    assert AuthorityConfig().model.hidden == (16,)
    assert AuthorityConfig(privacy=PrivacyConfig(epsilon=float("inf"))).model.hidden == (32, 16)
    for other in ({"aggregation.mode": "concat"}, {"topology": "horizontal"}):
        assert parse_flat(AuthorityConfig, other).model.hidden == (32, 16)
    assert parse_flat(AuthorityConfig, {"model.hidden": ""}).model.hidden == (16,)
    assert parse_flat(AuthorityConfig, {"model.hidden": "8,4"}).model.hidden == (8, 4)
    assert parse_flat(AuthorityConfig, {"privacy.epsilon": "inf",
                                        "model.hidden": "0"}).model.hidden == (0,)


@pytest.mark.parametrize("layers", ["0,16", "16,0", "0,0", "-1"])
def test_a_zero_width_is_only_accepted_alone(layers: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden=0 alone"):
        parse_flat(AuthorityConfig, {"model.hidden": layers})


def test_model_hidden_zero_is_one_linear_map() -> None:
    """hidden (0,): each silo's contribution is w . x + b (no ReLU), so scaling every input
    doubles the contribution's change; it travels in ModelSpec's config unchanged."""
    import torch

    from clients.protocol.model import BottomModel, ModelSpec

    spec = ModelSpec.from_config(ModelSpec((0,), 0.01, 0.0, 0).to_config())
    assert spec.hidden == (0,)
    model = BottomModel(3, spec.hidden)
    assert [type(m).__name__ for m in model.net] == ["Linear"]
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
        model.net[0].bias.fill_(0.25)
        x = torch.tensor([[1.0, 1.0, 2.0], [-3.0, 0.0, 0.0]])
        assert torch.allclose(model(x), torch.tensor([0.25, -2.75]))
        assert torch.allclose(model(2 * x) - model(torch.zeros(2, 3)), 2 * (model(x) - 0.25))
