"""One horizontal run: regions train the whole model, the server averages, the experiment
compares.

Under user-level DP the regions send no metrics (they would be outside the guarantee): this
layer evaluates each round's global model (a DP release) on the union of the regions'
validation customers instead. Its own baselines draw their samples and noise from the
experiment's secret (`simulation` in the keystore, else in the parties' `simulation/` folder),
as every party does: the public seed only chooses the data, the split and the initialisation.

Shares the run directory's contract with the vertical topology (config.json, authority.json,
ledger.jsonl, metrics.json, curves.json, manifest.json), so `fedscore report`, `fedscore ledger
verify` and sweeps work on it. Only this layer sees every region's labels and the truth; it
reads each region's predictions from the region's own folder.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from clients.protocol.accounting import epsilon
from clients.protocol.model import BottomModel
from clients.protocol.region import LocalSpec, global_model
from clients.region.app import PREDICTIONS_DIR, make_region_app
from clients.region.data import listed_regions, load_region, read_region_table, region_split
from clients.region.trainer import Plan, predict_logits, train_round
from crypto.at_rest import read_party_file
from crypto.secret_random import SecretRandom, digest
from server.config import AuthorityConfig
from server.horizontal import local_spec, make_regions_app, server_random
from server.metrics import auc, summary
from server.scoring import TIERS, tier_counts, to_score, to_tier
from simulations.analysis.audit import membership_audit, per_example_loss
from simulations.analysis.baselines import one_thread
from simulations.analysis.curves import build_curves
from simulations.analysis.references import Split, central_references
from simulations.data.regions import prepare_regions
from simulations.run.engine import run_federation
from simulations.run.rundir import Progress, Run, oracle_auc, write_results

SPLIT_NAMES = np.array(["train", "val", "test"])
EXPERIMENT_PARTY = "simulation"


@dataclass
class Pooled:
    """Every region's customers side by side (the experiment's view, never a party's)."""

    x: np.ndarray
    y: np.ndarray
    split: np.ndarray  # 0 train, 1 val, 2 test
    region: np.ndarray  # index into `names`
    ids: np.ndarray
    names: list[str]
    spend: np.ndarray  # raw spend level, for describing the regions

    def rows(self, split: int, region: int | None = None) -> np.ndarray:
        sel = self.split == split
        if region is not None:
            sel &= self.region == region
        return np.flatnonzero(sel)


def pooled(run: Run, cfg: AuthorityConfig) -> Pooled:
    root = run.parties.root
    store = run.keystore
    names = listed_regions(root)
    parts = []
    for k, name in enumerate(names):
        data = load_region(root / name, name, store)
        spend = read_region_table(root / name, name, store)["spend_level"].to_numpy()
        # The experiment layer replays each region's secret split from its keystore, where
        # the region keeps its secret (clients/region/app.py `region_random`).
        secret = SecretRandom.load_or_create(run.keystore_dir or root / name, name)
        split = region_split(len(data), secret, cfg.seed, cfg.split.train, cfg.split.val)
        parts.append((data, split, np.full(len(data), k), spend))
    return Pooled(
        x=np.concatenate([p[0].x for p in parts]),
        y=np.concatenate([p[0].y for p in parts]).astype(np.float64),
        split=np.concatenate([p[1] for p in parts]),
        region=np.concatenate([p[2] for p in parts]),
        ids=np.concatenate([p[0].ids.to_numpy() for p in parts]),
        names=names, spend=np.concatenate([p[3] for p in parts]).astype(np.float64),
    )


def check_regions(run: Run) -> dict[str, int]:
    root = run.parties.root
    return {name: len(load_region(root / name, name, run.keystore))
            for name in listed_regions(root)}


def run_horizontal(run: Run, progress: Progress | None = None) -> dict:
    """Generate (or reuse) the regions, run the federation, and finish the run directory."""
    cfg = run.cfg
    auth = cfg.authority
    run.reused = run.timer("generate", prepare_regions, cfg.population, auth.regions,
                           run.parties.root, run.keystore)
    run.timer("validate", check_regions, run)
    run_key = secrets.token_hex(8)
    t = time.perf_counter()
    keystore = run.keystore_dir
    run_federation(
        make_regions_app(auth, run.out_dir, run_key, progress,
                         on_result=lambda r: run.authority.update(r),
                         random=server_random(keystore, run.parties.root),
                         declared_people=cfg.population.users),
        make_region_app(run.parties.root, keystore, plaintext=keystore is None),
        silos=auth.regions,
    )
    if not run.authority:
        raise RuntimeError("the horizontal federation ended without a result; see the log")
    round_models = run.authority.pop("round_models", {})
    (run.out_dir / "authority.json").write_text(json.dumps(run.authority, indent=2) + "\n")
    return finish_horizontal(run, time.perf_counter() - t, round_models)


def experiment_random(run: Run) -> SecretRandom:
    """The experiment's own secret (its baselines' samples and noise): in the keystore, else in
    the parties' `simulation/` folder beside the generator's truth."""
    return SecretRandom.load_or_create(run.keystore_dir or run.parties.root / "simulation",
                                       EXPERIMENT_PARTY)


def _predictions(run: Run, data: Pooled, run_key: str) -> np.ndarray:
    store = run.keystore
    p = np.empty(len(data.y))
    for k, name in enumerate(data.names):
        base = run.parties.root / name / PREDICTIONS_DIR / f"{run_key}.parquet"
        path = base if base.exists() else base.with_name(base.name + ".enc")
        frame = pd.read_parquet(io.BytesIO(read_party_file(path, name, store)))
        rows = np.flatnonzero(data.region == k)
        if len(frame) != len(rows):
            raise ValueError(f"{name}'s predictions do not match its table; rerun")
        p[rows] = frame["probability"].to_numpy(dtype=np.float64)
    return p


def train_pooled(x: np.ndarray, y: np.ndarray, spec: LocalSpec, epochs: float, name: str,
                 random: SecretRandom) -> tuple[BottomModel, float | None]:
    """The same model and local trainer on one table for `epochs` epochs in one go (the
    central baselines and each region alone); returns the model and the epsilon spent.
    Samples and noise come from `random` (the experiment's secret), bound to the baseline."""
    one = replace(spec, rounds=1, local_epochs=epochs, proximal_mu=0.0, user_level=False)
    model = global_model(x.shape[1], one)
    plan = Plan.make(len(y), one)
    x, y = x.astype(np.float32), y.astype(np.float32)
    stream = ("baseline", name, str(one.to_config()), digest(x), digest(y))
    with one_thread():
        result = train_round(model, x, y, one, plan, [], random, stream)
    eps = epsilon(one.accountant, result.history, plan.delta) if one.dp else None
    return model, eps


def evaluate_rounds(data: Pooled, round_models: dict[int, dict], spec: LocalSpec
                    ) -> dict[int, dict[str, float]]:
    """Validation loss and AUC of each round's global model on the union of the regions'
    validation customers: the experiment's view, used when the regions send no metrics."""
    rows = data.rows(1)
    x, y = data.x[rows], data.y[rows]
    out = {}
    for round_, state in sorted(round_models.items()):
        model = global_model(x.shape[1], spec)
        model.load_state_dict(state)
        z = predict_logits(model, x)
        out[int(round_)] = {"val_loss": float(np.mean(np.logaddexp(0.0, z) - y * z)),
                            "val_auc": auc(y, z)}
    return out


def finish_horizontal(run: Run, federation_seconds: float,
                      round_models: dict[int, dict] | None = None) -> dict:
    cfg, auth, timer = run.cfg, run.cfg.authority, run.timer
    authority = run.authority
    seconds = timer.seconds
    seconds.update(authority["seconds"])
    seconds["engine"] = round(federation_seconds - sum(authority["seconds"].values()), 3)
    data = timer("join", pooled, run, auth)
    p = _predictions(run, data, authority["run_key"])
    test, train = data.rows(2), data.rows(0)
    score = to_score(p, auth.score)
    tier = to_tier(score)
    scores = pd.DataFrame({"split": SPLIT_NAMES[data.split], "probability": p,
                           "score": score, "tier": np.array([t.key for t in TIERS])[tier]})

    spec = local_spec(auth)
    history = [dict(h) for h in authority["history"]]
    if round_models:
        central_eval = timer("evaluate_rounds", evaluate_rounds, data, round_models, spec)
        for h in history:
            h.update(central_eval.get(int(h["round"]), {}))
    secret = experiment_random(run)
    epochs = auth.horizontal.rounds * auth.horizontal.local_epochs
    private = spec.dp or authority["dp"] == "user"
    non_private = replace(spec, epsilon=float("inf"))
    central, _ = timer("baseline_central", train_pooled, data.x[train], data.y[train],
                       non_private, epochs, "central", secret)
    central_p = _sigmoid(predict_logits(central, data.x))
    central_dp_p = None
    if private:
        dp_spec = replace(spec, epsilon=auth.privacy.epsilon)
        central_dp, _ = timer("baseline_central_dp", train_pooled, data.x[train],
                              data.y[train], dp_spec, epochs, "central_dp", secret)
        central_dp_p = _sigmoid(predict_logits(central_dp, data.x))
    alone = {}
    for k, name in enumerate(data.names):
        rows = data.rows(0, k)
        model, _ = timer(f"baseline_{name}", train_pooled, data.x[rows], data.y[rows], spec,
                         epochs, name, secret)
        alone[name] = _sigmoid(predict_logits(model, data.x))
    refs = timer("references", central_references, data.x, data.y,
                 Split(data.rows(0), data.rows(1), data.rows(2)), auth.seed)
    oracle_test = timer("oracle", oracle_auc, run.parties, data.ids[test], data.y[test],
                        run.keystore)
    audit = timer("audit", _audit, data, p, authority)
    curves = build_curves(scores, data.y)
    per_region = _per_region(data, p, alone)
    seconds["total"] = round(time.perf_counter() - run.t0, 3)

    fed = summary(data.y[test], p[test])
    best = max(alone, key=lambda n: auc(data.y[test], alone[n][test]))
    metrics = {
        **fed,
        "topology": "horizontal",
        "strategy": authority["strategy"],
        "dp_level": authority["dp"],
        "oracle_auc": oracle_test,
        "baseline_central_auc": auc(data.y[test], central_p[test]),
        "baseline_central_dp_auc": (auc(data.y[test], central_dp_p[test])
                                    if central_dp_p is not None else None),
        **{f"baseline_{name}_auc": r.metrics["auc"] for name, r in refs.items()},
        # The best single party alone: here a region (sweeps and reports read this key).
        "baseline_best_silo_auc": auc(data.y[test], alone[best][test]),
        "baseline_best_silo": best,
        "baseline_best_region_auc": auc(data.y[test], alone[best][test]),
        "baseline_best_region": best,
        "gap_to_oracle": oracle_test - fed["auc"],
        "gap_to_central": auc(data.y[test], central_p[test]) - fed["auc"],
        "tiers": tier_counts(tier),
        "test_default_rate_by_tier": {
            t.key: (float(data.y[test][tier[test] == i].mean())
                    if (tier[test] == i).any() else None) for i, t in enumerate(TIERS)},
        "regions": per_region,
        "region_skew": cfg.population.region_skew,
        "seconds": seconds,
        "people": {"aligned": len(p), "scored": len(p), "ineligible": 0,
                   "train": len(train), "test": len(test)},
        "round_trips": authority["round_trips"],
        "aggregation_mode": authority["strategy"],
        "epsilon": authority["epsilon"],
        # What each epsilon protects and against whom: under sample-level DP one per region
        # (not a bound on the global model), under user-level DP one for all regions.
        "epsilon_scope": authority.get("epsilon_scope"),
        "adjacency": authority.get("adjacency"),
        **{k: authority[k] for k in ("delta", "accountant", "noise_multiplier", "sample_rate",
                                     "max_grad_norm", "training_steps",
                                     "stopped_by_budget_cap")},
        "audit": audit,
        "baselines": {
            "central": summary(data.y[test], central_p[test]),
            "central_dp": (summary(data.y[test], central_dp_p[test])
                           if central_dp_p is not None else None),
            **{name: r.metrics for name, r in refs.items()},
            f"{best}_only": summary(data.y[test], alone[best][test]),
        },
        # Rounds on the report's epoch axis: round r has seen r * local_epochs epochs.
        # Under user-level DP the validation figures are the experiment's (pooled validation
        # customers, each round's released global model), not the regions'.
        "history": {"federated": [
            {**h, "epoch": h["round"] * auth.horizontal.local_epochs}
            for h in history]},
        "history_evaluated_by": "experiment" if round_models else "regions",
        "data": "generated",
    }
    return write_results(run, metrics, curves)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _per_region(data: Pooled, p: np.ndarray, alone: dict[str, np.ndarray]) -> list[dict]:
    """What differs between regions, and how the global model and each region's own model
    do on that region's test customers."""
    out = []
    for k, name in enumerate(data.names):
        mine = data.region == k
        test = data.rows(2, k)
        out.append({
            "region": name,
            "customers": int(mine.sum()),
            "default_rate": float(data.y[mine].mean()),
            "median_spend_level": float(np.nanmedian(data.spend[mine])),
            "auc_global": auc(data.y[test], p[test]),
            "auc_alone": auc(data.y[test], alone[name][test]),
        })
    return out


def _audit(data: Pooled, p: np.ndarray, authority: dict) -> dict:
    """Membership inference on the released probabilities: training against test customers."""
    loss = per_example_loss(data.y, p)
    result = membership_audit(loss[data.rows(0)], loss[data.rows(2)], authority["delta"] or
                              1.0 / max(1, len(p)))
    eps = authority["epsilon"]
    spent = [v for v in eps["model"].values() if v is not None]
    if eps.get("user") is not None:
        spent.append(eps["user"])
    return {**result.to_dict(), "accounted_epsilon": max(spent) if spent else None}
