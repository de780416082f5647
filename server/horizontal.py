"""The server of the horizontal topology: Flower's FedAvg (or FedProx) over the regions.

Every region trains the whole model on its own customers; the server averages the models with
Flower's own strategy, unweighted (each region's reply weighs 1). Two kinds of privacy:

- sample-level (`horizontal.dp=sample`, the default): DP-SGD inside each region, one Opacus
  accountant per region for the whole run (clients/region/trainer.py). The server learns each
  region's history at the end and writes it to the ledger.
- user-level (`horizontal.dp=user`): Flower's DP strategy wrapper clips each region's model
  update to C (on the server, or on the region with `fixedclipping_mod`) and adds Gaussian
  noise of std sigma * C / R to the average over the R regions. Adjacency is add/remove of one
  region's whole contribution (its clipped update present or absent): the sum of the clipped
  updates moves by at most C, so each round is a Gaussian mechanism of noise multiplier sigma.
  It protects every customer of a region at once, against whoever receives the global model
  (the regions each round, and the released model), not against the server, which sees every
  update before the noise. Every region takes part in every round (no sampling
  amplification): `rounds` Gaussian mechanisms, composed by our own accountant and written to
  the ledger as party "regions", budget "user". Regions then send their model and nothing
  else: no loss, AUC, size or step count.

The noise is never drawn from the public run seed: each region's Poisson samples and DP-SGD
noise come from its own secret, the user-level noise from the server's (crypto/secret_random.py;
Flower's wrappers draw theirs from numpy's global generator, so ours replace that one method).
The server aggregates the replies in an order fixed by their content, so the same replies give
the same bits and keeping the keystores reproduces a run.

Secure aggregation: Flower 1.42's SecAgg+ is a workflow of the legacy `flwr.server` API
(`DefaultWorkflow` + `flwr.server.strategy`); it does not drive the Message-API strategies used
here (`flwr.serverapp.strategy.FedAvg`/`FedProx`), so it is not offered (docs/horizontal.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.result import Result
from flwr.serverapp.strategy.strategy import Strategy

from clients.protocol.accounting import calibrate_sigma, epsilon
from clients.protocol.dp_constants import default_delta
from clients.protocol.region import PREDICT, PRIVACY, LocalSpec, global_model, input_columns
from crypto.secret_random import SecretRandom
from server import ledger
from server.config import AuthorityConfig
from server.federation import FederationError
from server.horizontal_strategy import build_strategy
from server.ledger_lines import RegionLine, UserLevelLine

log = logging.getLogger(__name__)

Progress = Callable[..., None]
USER_PARTY = "regions"
SERVER_PARTY = "server"
MODEL_FILE = "global_model.pt"
# What each epsilon protects, and against whom: written beside the epsilons (metrics.json and
# the ledger) so that no reader takes one for another.
SCOPE_REGION = ("per region: one customer of this region (add/remove), against whoever "
                "receives this region's models or anything computed from them (the server, "
                "every region each round, the released global model); a customer is in one "
                "region only, so their region's epsilon is their bound, and the regions' "
                "epsilons are not one budget of the federation")
SCOPE_USER = ("all regions together: a whole region's contribution (add/remove of its clipped "
              "update), against whoever receives the global model (every region each round, "
              "and the released model); not against the server, which sees each update before "
              "the noise")


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
        cap=cfg.privacy.cap, user_level=h.dp == "user" and cfg.privacy.dp_sgd,
    )


def server_random(keystore: Path | None, parties_root: Path) -> SecretRandom:
    """The server's secret streams (user-level noise): the secret lives in the server's
    keystore, else in its own folder of the parties directory, never in the published run
    directory; made on first use (0600)."""
    directory = Path(keystore) if keystore is not None else Path(parties_root) / SERVER_PARTY
    return SecretRandom.load_or_create(directory, SERVER_PARTY)


def user_delta(cfg: AuthorityConfig, declared_people: int) -> float:
    """delta of the user-level budget: privacy.delta, else 1/(10 U) with U the declared size of
    the population (public configuration, `population.users`). The regions hold at most U
    customers, so this is at most 1/(10 N) without asking any region its size (an exact size
    would be a release outside the guarantee); and far below 1/R, so no region-sized loophole."""
    return default_delta(cfg.privacy.delta, declared_people)


def user_sigma(cfg: AuthorityConfig, delta: float) -> float:
    """The noise multiplier that keeps R full-participation rounds within privacy.epsilon."""
    return calibrate_sigma(cfg.privacy.epsilon, delta, 1.0, cfg.horizontal.rounds,
                           cfg.privacy.accountant)


def _metric(record: Mapping[str, object], key: str) -> float:
    """A region's metric as a float; Flower also allows lists, which no region sends."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"metric {key!r} is a {type(value).__name__}, not a number")
    return float(value)


def plan_digest(plan: ConfigRecord) -> str:
    text = json.dumps({k: plan[k] for k in sorted(plan)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _broadcast(grid: Grid, kind: str, content: RecordDict, timeout: float) -> list[Message]:
    messages = [Message(content, dst_node_id=node, message_type=kind)
                for node in grid.get_node_ids()]
    return list(grid.send_and_receive(messages, timeout=timeout))


@dataclass(frozen=True)
class UserNoise:
    """The user-level Gaussian mechanism's noise multiplier and delta (0 and None without
    user-level DP)."""

    sigma: float = 0.0
    delta: float | None = None


def user_noise(cfg: AuthorityConfig, spec: LocalSpec, declared_people: int) -> UserNoise:
    """The user-level noise of this configuration (none under sample-level DP or no DP)."""
    if not spec.user_level:
        return UserNoise()
    delta = user_delta(cfg, declared_people)
    return UserNoise(user_sigma(cfg, delta), delta)


def run_regions(grid: Grid, cfg: AuthorityConfig, out_dir: Path, run_key: str,
                random: SecretRandom, declared_people: int,
                progress: Progress | None = None) -> dict:
    """The whole horizontal run; returns what the authority measured (authority.json), and
    under user-level DP each round's global model ("round_models", for the experiment to
    evaluate: the regions send no metrics then)."""
    t0 = time.perf_counter()
    grid = StrictGrid(grid, cfg.reply_timeout)
    spec = local_spec(cfg)
    plan = ConfigRecord({**spec.to_config(), "split.train": cfg.split.train,
                         "split.val": cfg.split.val})
    # Wait for every region and check it can read its table (under user-level DP a region
    # answers with its name only).
    _wait_for(grid, cfg.regions, cfg.join_timeout)
    _privacy(grid, plan, cfg.reply_timeout)
    noise = user_noise(cfg, spec, declared_people)
    strategy = build_strategy(cfg, noise.sigma, random, ("horizontal", plan_digest(plan)))
    result, round_models = _train(grid, cfg, spec, plan, strategy, progress)
    history = _round_history(result, cfg.horizontal.rounds)
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    privacy = _release(grid, cfg, plan, result.arrays, run_key, out_dir)
    eps = _write_ledger(out_dir, cfg, privacy, noise.sigma, noise.delta)
    return {
        "round_models": round_models,
        **_measured(cfg, spec, privacy, history),
        "run_key": run_key,
        "epsilon": eps,
        **_accounting(cfg, spec, privacy, history, noise),
        "seconds": {"train": round(train_seconds, 3),
                    "predict": round(time.perf_counter() - t1, 3)},
    }


def _train(grid: Grid, cfg: AuthorityConfig, spec: LocalSpec, plan: ConfigRecord,
           strategy: Strategy, progress: Progress | None) -> tuple[Result, dict[int, dict]]:
    """Flower's strategy over `horizontal.rounds` rounds; under user-level DP, also each
    round's global model (the experiment evaluates them: the regions send no metrics)."""
    rounds = cfg.horizontal.rounds
    round_models: dict[int, dict] = {}

    def after_round(round_: int, arrays: ArrayRecord) -> MetricRecord | None:
        if round_ > 0 and spec.user_level:
            round_models[round_] = arrays.to_torch_state_dict()
        if progress and round_ > 0:
            progress("train", round_, rounds)
        return None

    if progress:
        progress("train", 0, rounds)
    initial = ArrayRecord(global_model(len(input_columns()), spec).state_dict())
    result = strategy.start(grid, initial, num_rounds=rounds, timeout=cfg.reply_timeout,
                            train_config=plan, evaluate_config=plan, evaluate_fn=after_round)
    return result, round_models


def _round_history(result: Result, rounds: int) -> list[dict]:
    """One row per round: the regions' aggregated training and validation metrics."""
    history: list[dict] = []
    for round_ in range(1, rounds + 1):
        row: dict = {"round": round_}
        for source in (result.train_metrics_clientapp, result.evaluate_metrics_clientapp):
            metrics = dict(source.get(round_, {}))
            row.update({k: _metric(metrics, k) for k in metrics
                        if k not in ("weight", "num-examples")})
        history.append(row)
    return history


def _release(grid: Grid, cfg: AuthorityConfig, plan: ConfigRecord, arrays: ArrayRecord,
             run_key: str, out_dir: Path) -> dict[str, dict]:
    """Ask each region its privacy spent, have it predict its customers with the final model,
    and save that model; returns each region's privacy reply."""
    privacy = _privacy(grid, plan, cfg.reply_timeout)
    content = RecordDict({"arrays": arrays,
                          "config": ConfigRecord({**dict(plan), "run_key": run_key})})
    _broadcast(grid, PREDICT, content, cfg.reply_timeout)
    # The released model: DP-trained (or not, as configured), so it may leave the server.
    torch.save(arrays.to_torch_state_dict(), out_dir / MODEL_FILE)
    return privacy


def _measured(cfg: AuthorityConfig, spec: LocalSpec, privacy: dict[str, dict],
              history: list[dict]) -> dict:
    """How the run went: topology, strategy, DP level, rounds, regions and their history."""
    h = cfg.horizontal
    return {
        "topology": "horizontal",
        "strategy": h.strategy,
        "dp": h.dp if cfg.privacy.dp_sgd else "off",
        "rounds": h.rounds,
        "regions": sorted(privacy),
        # Under user-level DP no region tells its size.
        "n_train": {r: (int(p["n_train"]) if "n_train" in p else None)
                    for r, p in privacy.items()},
        "history": history,
        "round_trips": (1 if spec.user_level else 2) * h.rounds + 3,
    }


def _accounting(cfg: AuthorityConfig, spec: LocalSpec, privacy: dict[str, dict],
                history: list[dict], noise: UserNoise) -> dict:
    """The privacy accounting beside the epsilons: what each protects, delta, noise, clip."""
    user_dp = spec.user_level
    return {
        "epsilon_scope": {"model": SCOPE_REGION if spec.dp else None,
                          "user": SCOPE_USER if user_dp else None},
        "adjacency": ("add/remove of one region's whole contribution" if user_dp else
                      "add/remove of one customer of a region" if spec.dp else None),
        "delta": (noise.delta if user_dp else
                  max((float(p.get("delta", 0.0)) for p in privacy.values()), default=0.0)),
        "accountant": cfg.privacy.accountant,
        "noise_multiplier": ({USER_PARTY: noise.sigma} if user_dp else
                             {r: float(p.get("noise_multiplier", 0.0))
                              for r, p in privacy.items()}),
        "sample_rate": ({USER_PARTY: 1.0} if user_dp else
                        {r: float(p.get("sample_rate", 0.0)) for r, p in privacy.items()}),
        "max_grad_norm": cfg.horizontal.update_clip if user_dp else cfg.privacy.max_grad_norm,
        "training_steps": {r: _steps(p) for r, p in privacy.items()},
        "stopped_by_budget_cap": any(row.get("stopped", 0) > 0 for row in history),
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


def _steps(p: dict) -> int | None:
    if "history" not in p:
        return None  # user-level DP: the region does not say
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
        flat = list(p.get("history", []))
        history = [(float(flat[i]), float(flat[i + 1]), int(flat[i + 2]))
                   for i in range(0, len(flat), 3)]
        if not history:
            model[region] = None
            continue
        done: list[tuple[float, float, int]] = []
        for sigma, q, steps in history:
            done.append((sigma, q, steps))
            # Each region's customers are a population of their own (disjoint from every
            # other region's): its lines compose with each other only, never across regions.
            book.append(RegionLine(
                party=region, population=region, noise_multiplier=sigma, sample_rate=q,
                steps=steps, round=cfg.horizontal.rounds,
                epsilon=epsilon(kind, done, float(p["delta"])), delta=float(p["delta"]),
                accountant=kind, adjacency="add/remove", scope=SCOPE_REGION,
                history=tuple(done)))
        model[region] = epsilon(kind, done, float(p["delta"]))
    user = None
    if delta_user is not None:
        rounds = cfg.horizontal.rounds
        user = epsilon(kind, [(sigma_user, 1.0, rounds)], delta_user)
        book.append(UserLevelLine(
            party=USER_PARTY, noise_multiplier=sigma_user, sample_rate=1.0, steps=rounds,
            round=rounds, epsilon=user, delta=delta_user, accountant=kind,
            adjacency="add/remove", sensitivity=cfg.horizontal.update_clip, scope=SCOPE_USER,
            history=((sigma_user, 1.0, rounds),)))
    return {"model": model, "label": None, "user": user}


def make_regions_app(cfg: AuthorityConfig, out_dir: Path, run_key: str,
                     progress: Progress | None = None,
                     on_result: Callable[[dict], None] | None = None, *,
                     random: SecretRandom, declared_people: int) -> ServerApp:
    """The server; `random` is its secret (server_random), `declared_people` the public size
    of the population (the default user-level delta)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_regions(grid, cfg, out_dir, run_key, random, declared_people, progress)
        if on_result is not None:
            on_result(result)

    return app
