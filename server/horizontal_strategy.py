"""The horizontal server's Flower strategies: FedAvg or FedProx aggregating the regions'
replies in an order fixed by their content, and Flower's fixed-clipping DP wrappers with their
noise drawn from the server's secret stream (server/horizontal.py runs them; its docstring
says what each kind of privacy protects)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)
from flwr.serverapp.strategy.strategy import Strategy
from flwr.supercore.differential_privacy import compute_stdv

from clients.protocol.dp_sgd import secret_gaussian
from crypto.secret_random import SecretRandom
from server.config import AuthorityConfig


def _reply_key(msg: Message) -> str:
    if msg.has_error():
        return ""
    h = hashlib.sha256()
    for name, record in sorted(msg.content.array_records.items()):
        for key, array in record.items():
            h.update(f"{name}/{key}".encode())
            h.update(array.data)
    return h.hexdigest()


# The mixins below reach the strategy they are mixed into through super(): mypy needs such a
# base spelled out; at run time it stays object, so the classes' MRO is what it was.
if TYPE_CHECKING:
    _MixedIntoFedAvg = FedAvg
    _MixedIntoClipping = DifferentialPrivacyServerSideFixedClipping
else:
    _MixedIntoFedAvg = _MixedIntoClipping = object


class _InContentOrder(_MixedIntoFedAvg):
    """Aggregate the replies in an order fixed by their content, not by their arrival: a float
    sum depends on its order, and the server's noise stream is bound to the aggregate."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return super().aggregate_train(server_round, sorted(replies, key=_reply_key))


class OrderedFedAvg(_InContentOrder, FedAvg):
    pass


class OrderedFedProx(_InContentOrder, FedProx):
    pass


def arrays_digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


class _SecretNoise(_MixedIntoClipping):
    """Flower's fixed-clipping wrappers with their Gaussian noise drawn from the server's secret
    stream instead of numpy's global generator (which a known seed or state would replay).

    Round r's noise is the stream ("user-dp-noise", run, r, digest of the clipped aggregate):
    the same aggregate gets the same noise again, a different one independent noise. Each
    coordinate has std sigma * C / R, as Flower's `compute_stdv`."""

    random: SecretRandom
    stream: tuple
    _round: int = 0

    def _keep(self, random: SecretRandom, stream: tuple) -> None:
        self.random, self.stream = random, stream

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        self._round = server_round
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        arrays = aggregated_arrays.to_numpy_ndarrays()
        rng = self.random.generator("user-dp-noise", *self.stream, self._round,
                                    arrays_digest(arrays))
        noised = [a + secret_gaussian(rng, a.shape, std).numpy().astype(a.dtype)
                  for a in arrays]
        return ArrayRecord({k: Array(np.asarray(v))
                            for k, v in zip(aggregated_arrays.keys(), noised, strict=True)})


class SecretServerSideClipping(_SecretNoise, DifferentialPrivacyServerSideFixedClipping):
    def __init__(self, *args, random: SecretRandom, stream: tuple, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep(random, stream)


class SecretClientSideClipping(_SecretNoise, DifferentialPrivacyClientSideFixedClipping):
    def __init__(self, *args, random: SecretRandom, stream: tuple, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep(random, stream)






def build_strategy(cfg: AuthorityConfig, sigma_user: float, random: SecretRandom | None = None,
                   stream: tuple = ()) -> Strategy:
    h, r = cfg.horizontal, cfg.regions
    user_dp = h.dp == "user" and cfg.privacy.dp_sgd
    # Under user-level DP the regions send no validation metrics (outside the guarantee): the
    # experiment evaluates each round's global model itself.
    common: dict[str, Any] = {
        "fraction_train": 1.0, "fraction_evaluate": 0.0 if user_dp else 1.0,
        "min_train_nodes": r, "min_evaluate_nodes": 0 if user_dp else r,
        "min_available_nodes": r, "weighted_by_key": "weight"}
    base: Strategy = (OrderedFedProx(**common, proximal_mu=h.proximal_mu)
                      if h.strategy == "fedprox" else OrderedFedAvg(**common))
    if not user_dp:
        return base
    if random is None:
        raise ValueError("user-level DP needs the server's secret randomness")
    wrapper = SecretServerSideClipping if h.clipping == "server" else SecretClientSideClipping
    return wrapper(base, noise_multiplier=sigma_user, clipping_norm=h.update_clip,
                   num_sampled_clients=r, random=random, stream=stream)
