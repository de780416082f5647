"""Baselines that only the experiment layer can compute: it sees every party's table.

`central`: the same model (one bottom model per silo, summed, plus a bias), the same
initialisation, split, epochs and batch plan, trained in one process on the joined data with no
staleness. `payments_only`: the payments silo's bottom model alone. Both are calibrated and
scored exactly like the federated model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from clients.model import ModelSpec, build
from clients.schema import AUTHORITY, SILOS, feature_names
from clients.silo_data import load_silo
from crypto.identity import keyed_refs
from server.authority import PEPPER_FILE
from server.config import AuthorityConfig
from server.labels import load_labels
from server.metrics import summary
from server.scoring import Platt
from server.training import batch_plan
from simulations.paths import Parties


@dataclass
class JoinedData:
    """The aligned people in the federated run's position order, with every silo's features."""

    xs: dict[str, np.ndarray]
    y: np.ndarray
    split: pd.Series  # "train" / "val" / "test" per position
    ids: np.ndarray  # E.164, for joining with the generator's truth; never written out

    def positions(self, name: str) -> np.ndarray:
        return np.flatnonzero((self.split == name).to_numpy())


def join_parties(parties: Parties, scores: pd.DataFrame) -> JoinedData:
    """Rebuild the federated run's rows from the party tables through the keyed references."""
    auth_ids, labels = load_labels(parties.party(AUTHORITY))
    pepper = parties.party(AUTHORITY).joinpath(PEPPER_FILE).read_bytes()
    rows = pd.Index(keyed_refs(auth_ids.to_numpy(), pepper)).get_indexer(scores["subject_ref"])
    if (rows < 0).any():
        raise ValueError("scores.parquet names people the authority's table does not hold")
    ids = auth_ids.to_numpy()[rows]
    xs = {}
    for silo in SILOS:
        data = load_silo(parties.party(silo), silo, feature_names(silo))
        silo_rows = pd.Index(data.ids.to_numpy()).get_indexer(ids)
        xs[silo] = data.x[silo_rows]
    return JoinedData(xs=xs, y=labels[rows].astype(np.float64),
                      split=scores["split"].astype(str), ids=ids)


@dataclass
class BaselineResult:
    metrics: dict
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_central(
    data: JoinedData, silos: tuple[str, ...], cfg: AuthorityConfig
) -> BaselineResult:
    """Train the summed bottom models of `silos` jointly; metrics on the test positions."""
    t0 = time.perf_counter()
    spec = ModelSpec(cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.seed)
    # Same salts as the silos use, so the central and federated models start identical.
    parts = [build(data.xs[s].shape[1], spec, SILOS.index(s) + 1) for s in silos]
    xs = [torch.from_numpy(data.xs[s]) for s in silos]
    y = torch.from_numpy(data.y).float()
    train, val, test = (data.positions(n) for n in ("train", "val", "test"))
    prior = float(data.y[train].mean())
    bias = torch.nn.Parameter(torch.tensor([np.log(prior / (1 - prior))], dtype=torch.float32))
    opt_bias = torch.optim.Adam([bias], lr=cfg.train.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def logits(idx: np.ndarray) -> torch.Tensor:
        return bias + sum(model(x[idx]) for (model, _), x in zip(parts, xs, strict=True))

    history = []
    for epoch in range(cfg.train.epochs):
        for model, _ in parts:
            model.train()
        for batch in batch_plan(train, cfg.train.batch_size, epoch, cfg.seed):
            for _, opt in parts:
                opt.zero_grad(set_to_none=True)
            opt_bias.zero_grad(set_to_none=True)
            loss_fn(logits(batch), y[batch]).backward()
            for _, opt in parts:
                opt.step()
            opt_bias.step()
        with torch.no_grad():
            z_val = logits(val).numpy()
        history.append({"epoch": epoch + 1, **_val_metrics(data.y[val], z_val),
                        "seconds": time.perf_counter() - t0})
    with torch.no_grad():
        z = logits(np.arange(len(data.y))).numpy().astype(np.float64)
    calibrate = Platt.fit(z[val], data.y[val])
    metrics = summary(data.y[test], calibrate(z[test]))
    return BaselineResult(metrics=metrics, history=history, seconds=time.perf_counter() - t0)


def _val_metrics(y: np.ndarray, z: np.ndarray) -> dict:
    s = summary(y, 1 / (1 + np.exp(-z)))
    return {"val_auc": s["auc"], "val_loss": s["log_loss"]}
