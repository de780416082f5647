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
from simulations.run.outcome import (
    Comparison,
    Outcome,
    membership_summary,
    merge_seconds,
    write_metrics,
)
from simulations.run.rundir import Progress, Run, oracle_auc

SPLIT_NAMES = np.array(["train", "val", "test"])
EXPERIMENT_PARTY = "simulation"
PRIVACY_KEYS = ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate",
                "max_grad_norm", "training_steps", "stopped_by_budget_cap")


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


@dataclass(frozen=True)
class Predictions:
    """Each model's probabilities for every pooled customer: the federated one, the central
    baselines (without and, when the run is private, with DP) and each region's alone."""

    federated: np.ndarray
    central: np.ndarray
    central_dp: np.ndarray | None
    alone: dict[str, np.ndarray]
    references: dict[str, dict]  # each central reference's test figures, by name


def finish_horizontal(run: Run, federation_seconds: float,
                      round_models: dict[int, dict] | None = None) -> dict:
    """The regions' predictions against the baselines and the truth; writes metrics.json,
    curves.json and manifest.json. `run.authority` holds what the server measured."""
    merge_seconds(run, federation_seconds)
    data = run.timer("join", pooled, run, run.cfg.authority)
    p = _predictions(run, data, run.authority["run_key"])
    scores, tier = _scores(data, p, run.cfg.authority)
    history = _round_history(run, data, round_models)
    predictions = _baseline_predictions(run, data, p)
    test = data.rows(2)
    oracle = run.timer("oracle", oracle_auc, run.parties, data.ids[test], data.y[test],
                       run.keystore)
    audit = run.timer("audit", _audit, data, p, run.authority)
    curves = build_curves(scores, data.y)
    own = _own(run, data, predictions, "experiment" if round_models else "regions")
    outcome = _outcome(run, data, predictions, tier, oracle, audit, history, own)
    return write_metrics(run, outcome, curves)


def _scores(data: Pooled, p: np.ndarray, auth: AuthorityConfig
            ) -> tuple[pd.DataFrame, np.ndarray]:
    """The scores as the vertical topology's scores file holds them, and each tier's index."""
    score = to_score(p, auth.score)
    tier = to_tier(score)
    scores = pd.DataFrame({"split": SPLIT_NAMES[data.split], "probability": p,
                           "score": score, "tier": np.array([t.key for t in TIERS])[tier]})
    return scores, tier


def _round_history(run: Run, data: Pooled, round_models: dict[int, dict] | None
                   ) -> list[dict]:
    """The server's per-round history, on the report's epoch axis (round r has seen
    r * local_epochs epochs). Under user-level DP (`round_models`) the validation figures
    are the experiment's (pooled validation customers, each round's released global model),
    not the regions'."""
    auth = run.cfg.authority
    history = [dict(h) for h in run.authority["history"]]
    if round_models:
        evaluated = run.timer("evaluate_rounds", evaluate_rounds, data, round_models,
                              local_spec(auth))
        for h in history:
            h.update(evaluated.get(int(h["round"]), {}))
    return [{**h, "epoch": h["round"] * auth.horizontal.local_epochs} for h in history]


def _baseline_predictions(run: Run, data: Pooled, p: np.ndarray) -> Predictions:
    """Train the central baselines and each region alone on the pooled training customers,
    for as many epochs as the federation ran; each predicts every customer."""
    auth, timer = run.cfg.authority, run.timer
    spec = local_spec(auth)
    secret = experiment_random(run)
    epochs = auth.horizontal.rounds * auth.horizontal.local_epochs
    train = data.rows(0)

    def fit(name: str, rows: np.ndarray, fit_spec: LocalSpec) -> np.ndarray:
        model, _ = timer(f"baseline_{name}", train_pooled, data.x[rows], data.y[rows],
                         fit_spec, epochs, name, secret)
        return _sigmoid(predict_logits(model, data.x))

    central = fit("central", train, replace(spec, epsilon=float("inf")))
    central_dp = None
    if spec.dp or run.authority["dp"] == "user":
        central_dp = fit("central_dp", train, replace(spec, epsilon=auth.privacy.epsilon))
    alone = {name: fit(name, data.rows(0, k), spec) for k, name in enumerate(data.names)}
    refs = run.timer("references", central_references, data.x, data.y,
                     Split(data.rows(0), data.rows(1), data.rows(2)), auth.seed)
    return Predictions(p, central, central_dp, alone,
                       {name: r.metrics for name, r in refs.items()})


def _outcome(run: Run, data: Pooled, predictions: Predictions, tier: np.ndarray,
             oracle: float, audit: dict, history: list[dict], own: dict) -> Outcome:
    """metrics.json's content: the federated model on the pooled test customers against the
    baselines; `own` is what only a horizontal run has (`_own`)."""
    authority, test = run.authority, data.rows(2)

    def on_test(p: np.ndarray) -> dict[str, float]:
        return summary(data.y[test], p[test])

    fed = on_test(predictions.federated)
    central_dp = (on_test(predictions.central_dp)
                  if predictions.central_dp is not None else None)
    alone = {name: on_test(p) for name, p in predictions.alone.items()}
    # The best single party alone: here a region, chosen (and reported) on test.
    best = max(alone, key=lambda n: alone[n]["auc"])
    central = on_test(predictions.central)
    comparison = Comparison(oracle=oracle, central=central["auc"],
                            central_dp=central_dp["auc"] if central_dp else None,
                            best=best, best_auc=alone[best]["auc"],
                            references={name: m["auc"]
                                        for name, m in predictions.references.items()})
    return Outcome(
        # Every customer is scored (no opening conditions): one population, both names.
        figures=fed, all_test_figures=fed, comparison=comparison, tiers=tier_counts(tier),
        default_rate_by_tier=_default_rate_by_tier(data.y[test], tier[test]),
        people={"aligned": len(data.y), "scored": len(data.y), "ineligible": 0,
                "train": len(data.rows(0)), "test": len(test), "test_scored": len(test)},
        round_trips=authority["round_trips"], aggregation_mode=authority["strategy"],
        privacy=_privacy(authority), audit=audit, history={"federated": history},
        baselines={"central": central, "central_dp": central_dp, **predictions.references,
                   f"{best}_only": alone[best]},
        own=own,
    )


def _privacy(authority: dict) -> dict:
    """The server's accounting as metrics.json holds it."""
    return {
        **{k: authority[k] for k in PRIVACY_KEYS},
        # What each epsilon protects and against whom: under sample-level DP one per region
        # (not a bound on the global model), under user-level DP one for all regions.
        "epsilon_scope": authority.get("epsilon_scope"),
        "adjacency": authority.get("adjacency"),
    }


def _own(run: Run, data: Pooled, predictions: Predictions, evaluated_by: str) -> dict:
    """What only a horizontal run reports: the topology, the DP level, each region, and who
    evaluated the rounds' history ("experiment" under user-level DP, else "regions")."""
    return {
        "topology": "horizontal",
        "dp_level": run.authority["dp"],
        "regions": _per_region(data, predictions.federated, predictions.alone),
        "region_skew": run.cfg.population.region_skew,
        "history_evaluated_by": evaluated_by,
    }


def _default_rate_by_tier(y: np.ndarray, tier: np.ndarray) -> dict[str, float | None]:
    """Each tier's observed default rate (None for an empty tier)."""
    return {t.key: float(y[tier == i].mean()) if (tier == i).any() else None
            for i, t in enumerate(TIERS)}


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
    return membership_summary(result, max(spent) if spent else None)
