"""The server of the horizontal topology: Flower's FedAvg (or FedProx) over the regions.

Every region trains the whole model on its own customers; the server averages the models with
Flower's own strategy, unweighted (each region's reply weighs 1). Two kinds of privacy:

- sample-level (`horizontal.dp=sample`, the default): DP-SGD inside each region, one Opacus
  accountant per region for the whole run (clients/region_trainer.py). The server learns each
  region's history at the end and writes it to the ledger.
- user-level (`horizontal.dp=user`): Flower's DP strategy wrapper clips each region's model
  update (on the server, or on the region with `fixedclipping_mod`) and adds Gaussian noise of
  std sigma * C / R to the average. A neighbouring federation differs in one region's whole
  data, so this protects every customer of a region at once. Every region takes part in every
  round (no sampling amplification): R rounds of the Gaussian mechanism, composed by our own
  accountant and written to the ledger as party "regions", budget "user".

Secure aggregation: Flower 1.41's SecAgg+ is a workflow of the legacy `flwr.server` API
(`DefaultWorkflow` + `flwr.server.strategy`); it does not drive the Message-API strategies used
here (`flwr.serverapp.strategy.FedAvg`/`FedProx`), so it is not offered (docs/horizontal.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
)
from flwr.serverapp.strategy.strategy import Strategy

from clients.accounting import calibrate_sigma, epsilon
from clients.region_app import PREDICT, PRIVACY
from clients.region_data import input_columns
from clients.region_trainer import LocalSpec, global_model
from server import ledger
from server.config import AuthorityConfig
from server.federation import FederationError

log = logging.getLogger(__name__)

Progress = Callable[..., None]
USER_PARTY = "regions"
MODEL_FILE = "global_model.pt"


class StrictGrid(Grid):
    """The engine's grid, but a region that fails or stays silent stops the run with its
    reason: Flower's strategies would otherwise average whoever answered."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self.inner = grid
        self.timeout = timeout

    def set_run(self, run) -> None:  # pragma: no cover - the engine sets the inner grid's run
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self.inner.send_and_receive(sent, timeout=timeout or self.timeout))
        for reply in replies:
            if reply.has_error():
                raise FederationError(f"a region failed: {reply.error.reason}")
        if len(replies) < len(sent):
            raise FederationError(f"{len(sent) - len(replies)} region(s) did not answer within "
                                  f"{timeout or self.timeout:.0f} s (reply_timeout)")
        return replies


def local_spec(cfg: AuthorityConfig) -> LocalSpec:
    h = cfg.horizontal
    sample_dp = h.dp == "sample" and cfg.privacy.dp_sgd
    return LocalSpec(
        hidden=cfg.model.hidden, lr=h.lr, batch_size=cfg.train.batch_size,
        local_epochs=h.local_epochs, rounds=h.rounds, seed=cfg.seed,
        proximal_mu=h.proximal_mu if h.strategy == "fedprox" else 0.0,
        epsilon=cfg.privacy.epsilon if sample_dp else math.inf, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant, max_grad_norm=cfg.privacy.max_grad_norm,
        cap=cfg.privacy.cap,
    )


def user_delta(cfg: AuthorityConfig, people: int) -> float:
    """delta of the user-level budget: privacy.delta, else 1/N over all customers (smaller
    than 1/R, so no region-sized loophole)."""
    return cfg.privacy.delta or 1.0 / people


def user_sigma(cfg: AuthorityConfig, delta: float) -> float:
    """The noise multiplier that keeps R full-participation rounds within privacy.epsilon."""
    return calibrate_sigma(cfg.privacy.epsilon, delta, 1.0, cfg.horizontal.rounds,
                           cfg.privacy.accountant)


def build_strategy(cfg: AuthorityConfig, sigma_user: float) -> Strategy:
    h, r = cfg.horizontal, cfg.regions
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": r,
                  "min_evaluate_nodes": r, "min_available_nodes": r, "weighted_by_key": "weight"}
    base: Strategy = (FedProx(**common, proximal_mu=h.proximal_mu) if h.strategy == "fedprox"
                      else FedAvg(**common))
    if h.dp != "user" or not cfg.privacy.dp_sgd:
        return base
    wrapper = (DifferentialPrivacyServerSideFixedClipping if h.clipping == "server"
               else DifferentialPrivacyClientSideFixedClipping)
    return wrapper(base, noise_multiplier=sigma_user, clipping_norm=h.update_clip,
                   num_sampled_clients=r)


def _broadcast(grid: Grid, kind: str, content: RecordDict, timeout: float) -> list[Message]:
    messages = [Message(content, dst_node_id=node, message_type=kind)
                for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages, timeout=timeout))


def run_regions(grid: Grid, cfg: AuthorityConfig, out_dir: Path, run_key: str,
                progress: Progress | None = None) -> dict:
    """The whole horizontal run; returns what the authority measured (authority.json)."""
    t0 = time.perf_counter()
    grid = StrictGrid(grid, cfg.reply_timeout)
    h = cfg.horizontal
    spec = local_spec(cfg)
    plan = ConfigRecord({**spec.to_config(), "split.train": cfg.split.train,
                         "split.val": cfg.split.val})
    # Wait for every region, then learn their sizes (aggregates only) for the user delta.
    _wait_for(grid, cfg.regions, cfg.join_timeout)
    privacy = _privacy(grid, plan, cfg.reply_timeout)
    people = sum(int(p["n_train"]) for p in privacy.values())
    user_dp = h.dp == "user" and cfg.privacy.dp_sgd
    delta_user = user_delta(cfg, people) if user_dp else None
    sigma_user = user_sigma(cfg, delta_user) if user_dp else 0.0
    strategy = build_strategy(cfg, sigma_user)
    history: list[dict] = []

    def after_round(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if progress and round_ > 0:
            progress("train", round_, h.rounds)
        return None

    if progress:
        progress("train", 0, h.rounds)
    initial = ArrayRecord(global_model(len(input_columns()), spec).state_dict())
    result = strategy.start(grid, initial, num_rounds=h.rounds, timeout=cfg.reply_timeout,
                            train_config=plan, evaluate_config=plan, evaluate_fn=after_round)
    for round_ in range(1, h.rounds + 1):
        row: dict = {"round": round_}
        for source in (result.train_metrics_clientapp, result.evaluate_metrics_clientapp):
            row.update({k: float(v) for k, v in dict(source.get(round_, {})).items()
                        if k not in ("weight", "num-examples")})
        history.append(row)
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    privacy = _privacy(grid, plan, cfg.reply_timeout)
    content = RecordDict({"arrays": result.arrays,
                          "config": ConfigRecord({**dict(plan), "run_key": run_key})})
    _broadcast(grid, PREDICT, content, cfg.reply_timeout)
    # The released model: DP-trained (or not, as configured), so it may leave the server.
    torch.save(result.arrays.to_torch_state_dict(), out_dir / MODEL_FILE)
    eps = _write_ledger(out_dir, cfg, privacy, sigma_user, delta_user)
    return {
        "topology": "horizontal",
        "strategy": h.strategy,
        "dp": h.dp if cfg.privacy.dp_sgd else "off",
        "rounds": h.rounds,
        "run_key": run_key,
        "regions": sorted(privacy),
        "n_train": {r: int(p["n_train"]) for r, p in privacy.items()},
        "history": history,
        "epsilon": eps,
        "delta": (delta_user if user_dp else
                  max((float(p["delta"]) for p in privacy.values()), default=0.0)),
        "accountant": cfg.privacy.accountant,
        "noise_multiplier": ({USER_PARTY: sigma_user} if user_dp else
                             {r: float(p["noise_multiplier"]) for r, p in privacy.items()}),
        "sample_rate": ({USER_PARTY: 1.0} if user_dp else
                        {r: float(p["sample_rate"]) for r, p in privacy.items()}),
        "max_grad_norm": h.update_clip if user_dp else cfg.privacy.max_grad_norm,
        "training_steps": {r: _steps(p) for r, p in privacy.items()},
        "stopped_by_budget_cap": any(row.get("stopped", 0) > 0 for row in history),
        "round_trips": 2 * h.rounds + 3,
        "seconds": {"train": round(train_seconds, 3),
                    "predict": round(time.perf_counter() - t1, 3)},
    }


def _wait_for(grid: Grid, regions: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < regions:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(list(grid.get_node_ids()))} of {regions} regions joined within "
                f"{timeout:.0f} s (join_timeout)")
        time.sleep(0.2)


def _privacy(grid: Grid, plan: ConfigRecord, timeout: float) -> dict[str, dict]:
    replies = _broadcast(grid, PRIVACY, RecordDict({"config": plan}), timeout)
    out = {}
    for reply in replies:
        cfg = dict(reply.content["config"])
        out[str(cfg["region"])] = cfg
    return out


def _steps(p: dict) -> int:
    flat = list(p["history"])
    return int(sum(flat[i + 2] for i in range(0, len(flat), 3)))


def _write_ledger(out_dir: Path, cfg: AuthorityConfig, privacy: dict[str, dict],
                  sigma_user: float, delta_user: float | None) -> dict:
    """One ledger line per (region, noise setting), and the user-level line; the epsilons they
    carry are what metrics.json reports."""
    book = ledger.Ledger(out_dir)
    kind = cfg.privacy.accountant
    model: dict[str, float | None] = {}
    for region in sorted(privacy):
        p = privacy[region]
        flat = list(p["history"])
        history = [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2]))
                   for i in range(0, len(flat), 3)]
        if not history:
            model[region] = None
            continue
        done: list[tuple[float, float, int]] = []
        for sigma, q, steps in history:
            done.append((sigma, q, steps))
            book.append(party=region, budget="model", mechanism="poisson_gaussian",
                        noise_multiplier=sigma, sample_rate=q, steps=steps,
                        round=cfg.horizontal.rounds, epsilon=epsilon(kind, done,
                                                                     float(p["delta"])),
                        delta=float(p["delta"]), accountant=kind)
        model[region] = epsilon(kind, done, float(p["delta"]))
    user = None
    if delta_user is not None:
        rounds = cfg.horizontal.rounds
        user = epsilon(kind, [(sigma_user, 1.0, rounds)], delta_user)
        book.append(party=USER_PARTY, budget="user", mechanism="gaussian",
                    noise_multiplier=sigma_user, sample_rate=1.0, steps=rounds, round=rounds,
                    epsilon=user, delta=delta_user, accountant=kind)
    return {"model": model, "label": None, "user": user}


def make_regions_app(cfg: AuthorityConfig, out_dir: Path, run_key: str,
                     progress: Progress | None = None,
                     on_result: Callable[[dict], None] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_regions(grid, cfg, out_dir, run_key, progress)
        if on_result is not None:
            on_result(result)

    return app
