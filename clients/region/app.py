"""A region's Flower ClientApp (horizontal topology).

A region is named by node config `region=...` (deployment) or by the simulation's
`partition-id` (0.. in the order of `<data-dir>/regions.json`). Messages:

  train               global model + the local plan -> the model after one local round,
                      {"weight": 1, "num-examples", "steps", "stopped"} (+ "train_loss"
                      without DP); under user-level DP {"weight": 1} only
  evaluate            global model -> validation loss and AUC on the region's own customers;
                      refused under user-level DP
  query.privacy       -> the region's accountant history for the whole run, and its plan;
                      under user-level DP the region's name only
  query.predict       final global model + run key -> the region writes default
                      probabilities for all its customers into its own folder
                      (`predictions/<run key>.parquet[.enc]`) and replies with its name only

No message carries an identifier or a customer's row: only model weights and aggregates. Each
reply weighs 1, so FedAvg averages regions without weighting them by size (a size-weighted
average changes a region's sensitivity and is not what Flower's DP wrappers account for).

Under user-level DP (`horizontal.dp=user`) the clipped and noised average is the guarantee, so
a region sends its model and nothing else: an exact loss, AUC, size or step count would be a
release about the whole region outside the accountant.

The Poisson samples and DP-SGD noise come from the region's own secret
(crypto/secret_random.py), found like a silo's: in the region's keystore (`node_store`), else in
the region's own data directory.

The handlers are module-level functions registered on `handlers`, as a silo's are
(clients/node.py); `make_region_app(root, keystore)` makes the ClientApp for a simulation.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients.node import Defaults, Guard, Handlers, Node, node_store, parties_root
from clients.protocol import messages as m
from clients.protocol.metrics import auc
from clients.protocol.model import BottomModel
from clients.protocol.region import PREDICT, PRIVACY, LocalSpec, global_model
from clients.region.data import (
    RegionData,
    RegionDataError,
    listed_regions,
    load_region,
    region_split,
)
from clients.region.trainer import Plan, predict_logits, round_stream, train_round
from crypto.at_rest import Keystore, write_party_file
from crypto.secret_random import SecretRandom

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"

# The same defaults as a silo's: the parties directory, the keystore, plaintext or not.
RegionDefaults = Defaults


def region_name(node: Node) -> str:
    config = node.context.node_config
    if "region" in config:
        return str(config["region"])
    if "partition-id" in config and node.defaults.root is not None:
        pid = int(config["partition-id"])
        names = listed_regions(node.defaults.root)
        if not 0 <= pid < len(names):
            raise RegionDataError(f"partition-id {pid} has no region; run {len(names)} "
                                  "supernodes")
        return names[pid]
    raise RegionDataError("this node has no region: start it with --node-config 'region=...'")


def region_dir(node: Node) -> Path:
    base = parties_root(node)
    if base is None:
        raise RegionDataError("no data directory: set node config or run config 'data-dir'")
    return base / region_name(node)


def region_store(node: Node) -> Keystore | None:
    return node_store(node.context, node.defaults, region_dir(node).parent)


def region_random(node: Node) -> SecretRandom:
    """The region's secret streams: the secret lives in the region's keystore when it has one
    (found as a silo's is, `node_store`), else in its own data directory; made on first use."""
    store = region_store(node)
    directory = store.path if store is not None else region_dir(node)
    return SecretRandom.load_or_create(directory, region_name(node))


def region_data(node: Node, seed: int, train: float,
                val: float) -> tuple[RegionData, np.ndarray]:
    """The region's inputs and labels, and its split codes (0 train, 1 val, 2 test)."""
    directory = region_dir(node)
    name = region_name(node)
    version = max((p.stat().st_mtime for p in directory.glob("customers.*")), default=0.0)

    def load() -> tuple[RegionData, np.ndarray]:
        data = load_region(directory, name, region_store(node))
        return data, region_split(len(data), region_random(node), seed, train, val)

    return node.tables.get(("region", f"{directory.resolve()}|{seed}|{train}|{val}"), version,
                           load)


def _model_from(msg: Message, n_inputs: int, spec: LocalSpec) -> BottomModel:
    if "arrays" not in msg.content:
        raise m.ProtocolError("the message carries no model (an 'arrays' record)")
    model = global_model(n_inputs, spec)
    model.load_state_dict(m.array_record(msg.content, "arrays").to_torch_state_dict())
    return model


def _history(context: Context) -> list[tuple[float, float, int]]:
    if "privacy" not in context.state:
        return []
    flat = m.config_floats(m.config_record(context.state, "privacy"), "history")
    return [(flat[i], flat[i + 1], int(flat[i + 2]))
            for i in range(0, len(flat), 3)]


def _save_history(context: Context, history: list, plan: Plan) -> None:
    flat = [float(v) for h in history for v in h]
    context.state["privacy"] = ConfigRecord({
        "history": flat, "plan": [plan.sample_rate, float(plan.steps_per_round),
                                  plan.noise_multiplier, plan.delta]})


def _plan(context: Context, n_train: int, spec: LocalSpec) -> Plan:
    """The plan is fixed at the first round and kept for the whole run."""
    if "privacy" in context.state and "plan" in context.state["privacy"]:
        q, steps, sigma, delta = m.config_floats(m.config_record(context.state, "privacy"), "plan")
        return Plan(float(q), int(steps), float(sigma), float(delta))
    return Plan.make(n_train, spec)


def _val_auc(y: np.ndarray, z: np.ndarray) -> float:
    """The region's validation AUC; NaN when its validation people hold one class only."""
    return auc(y, z) if 0 < int((y > 0.5).sum()) < len(y) else float("nan")


def clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` when the server asked for client-side clipping (user-level
    DP); a plain pass otherwise."""
    config = msg.content.config_records
    if any(KEY_CLIPPING_NORM in record for record in config.values()):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


handlers = Handlers(Guard(
    "region", log,
    input_errors=(RegionDataError,),
    protocol_errors=(m.ProtocolError, KeyError, ValueError),
    unnamed=None,
))


def make_region_app(root: Path | None = None, keystore: Path | None = None,
                    plaintext: bool = False) -> ClientApp:
    """A region's app; `root` is the parties directory and `keystore` the regions' keystore
    when no config names them (the simulation)."""
    return handlers.app(RegionDefaults(root, keystore, plaintext))


def _setup(msg: Message, node: Node) -> tuple[LocalSpec, RegionData, np.ndarray]:
    torch.set_num_threads(1)  # one core per region: regions run side by side
    cfg = dict(msg.content["config"]) if "config" in msg.content else {}
    try:
        spec = LocalSpec.from_config(cfg)
        train, val = m.config_float(cfg, "split.train"), m.config_float(cfg, "split.val")
    except KeyError as exc:
        raise m.ProtocolError(f"the plan lacks {exc}") from None
    data, split = region_data(node, spec.seed, train, val)
    return spec, data, split


@handlers.train(mods=[clipping_mod])
def train(msg: Message, node: Node) -> Message:
    spec, data, split = _setup(msg, node)
    cfg = dict(msg.content["config"])
    # FedProx's strategy sends its mu with the round; it overrides the plan's.
    spec_mu = m.config_float(cfg, "proximal-mu") if "proximal-mu" in cfg else spec.proximal_mu
    spec = LocalSpec(**{**spec.__dict__, "proximal_mu": spec_mu})
    rows = split == 0
    model = _model_from(msg, data.x.shape[1], spec)
    plan = _plan(node.context, int(rows.sum()), spec)
    x, y = data.x[rows], data.y[rows]
    stream = round_stream(cfg, model, x, y)
    result = train_round(model, x, y, spec, plan, _history(node.context),
                         region_random(node), stream)
    _save_history(node.context, result.history, plan)
    metrics: dict = {"weight": 1.0}
    if not spec.user_level:
        # Under user-level DP the clipped, noised average is the only release about the
        # region; its size, steps (q = batch / size) or loss would be others, outside it.
        metrics.update({"num-examples": int(rows.sum()), "steps": result.steps,
                        "stopped": int(result.stopped)})
    if not spec.dp and not spec.user_level:
        # Under DP the model is the only release about the training customers; their
        # average loss would be another, outside the accountant.
        metrics["train_loss"] = result.loss
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@handlers.evaluate()
def evaluate(msg: Message, node: Node) -> Message:
    spec, data, split = _setup(msg, node)
    if spec.user_level:
        raise m.ProtocolError("under user-level DP a region sends no validation metrics "
                              "(an exact loss or AUC is outside the guarantee); evaluate "
                              "the released global model instead")
    rows = split == 1
    model = _model_from(msg, data.x.shape[1], spec)
    z = predict_logits(model, data.x[rows])
    y = data.y[rows].astype(np.float64)
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    content = RecordDict({"metrics": MetricRecord({
        "weight": 1.0, "num-examples": int(rows.sum()), "val_loss": loss,
        "val_auc": _val_auc(y, z)})})
    return Message(content, reply_to=msg)


@handlers.query(PRIVACY.split(".", 1)[1])
def privacy(msg: Message, node: Node) -> Message:
    spec, _data, split = _setup(msg, node)
    if spec.user_level:
        # No size, plan or history: the size (and q, delta, which follow from it) would
        # be exact aggregates about the region outside the user-level guarantee.
        reply: dict = {"region": region_name(node)}
        return Message(m.make_content(reply), reply_to=msg)
    plan = _plan(node.context, int((split == 0).sum()), spec)
    history = _history(node.context)
    reply = {"region": region_name(node), "n_train": int((split == 0).sum()),
             "history": [float(v) for h in history for v in h],
             "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
             "delta": plan.delta}
    return Message(m.make_content(reply), reply_to=msg)


@handlers.query(PREDICT.split(".", 1)[1])
def predict(msg: Message, node: Node) -> Message:
    spec, data, split = _setup(msg, node)
    run_key = str(msg.content["config"]["run_key"])
    if not run_key.isalnum():
        raise m.ProtocolError("run_key must be letters and digits")
    model = _model_from(msg, data.x.shape[1], spec)
    z = predict_logits(model, data.x)
    frame = pd.DataFrame({"split": np.array(["train", "val", "test"])[split],
                          "probability": 1.0 / (1.0 + np.exp(-z))})
    directory = region_dir(node) / PREDICTIONS_DIR
    directory.mkdir(exist_ok=True)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_party_file(directory / f"{run_key}.parquet", region_name(node),
                     buf.getvalue(), region_store(node))
    reply = {"region": region_name(node)}
    return Message(m.make_content(reply), reply_to=msg)
