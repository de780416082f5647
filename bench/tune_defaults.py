"""Training defaults that reach the privacy-utility target (issue 17): test AUC >= oracle - 0.03
at the default privacy (combined eps_model 1, label DP by randomised response at eps 2).

Two steps, each running its cells in ONE federation per population (simulations.run.experiment's
`run_cells`: the engine starts once and PSI runs once), privacy.* left at the defaults:

  grid     the product of the --batch, --epochs, --lr and --chunk values on one population
           (plus, with --with-defaults, the current defaults as a reference cell). Cells are
           ranked on VALIDATION AUC (metrics.json: history.federated, last row), never on test
           AUC; both are reported, with val_gap = the oracle's AUC on the cell's own
           validation people minus the model's (every run draws its split from its own secret
           run key, so cells see different people; the gap takes out how hard a draw is, and
           is the less noisy way to compare cells). A finished cell (metrics.json present) is
           not run again, so a second call with more values into the same --out only runs the
           new cells (the parties are reused, PSI runs again once).

  confirm  the current defaults against a candidate (--candidate key=value,...) over several
           population seeds (population.seed and the training seed both = the seed), and the
           candidate without label DP (privacy.label_epsilon=inf) so the cost of label DP is
           visible; with --alternative, a second candidate (and it without label DP); with
           --lp2st, also the candidate under privacy.label_mechanism=lp2st when
           that key exists. Reports the mean test AUC, oracle, gap, training seconds and
           round trips per variant.

    .venv/bin/python bench/tune_defaults.py grid --out /tmp/tune/grid --with-defaults \
        --batch 2048 4096 --epochs 8 12 --lr 0.01 0.02
    .venv/bin/python bench/tune_defaults.py confirm --out /tmp/tune/confirm --seeds 1,2,3 \
        --candidate train.batch_size=2048,train.epochs=12,train.lr=0.01,train.chunk_batches=4 \
        --alternative train.batch_size=4096,train.epochs=16,train.lr=0.01,train.chunk_batches=8

(bench/RESULTS.md, "Defaults after issue 17", lists every call that produced its tables.)
Each writes OUT/table.csv and OUT/table.md (rebuilt from the run directories, so an
interrupted call loses nothing) and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import pandas as pd

from simulations.run.config import known_keys, make_config, parse_assignments

log = logging.getLogger("tune_defaults")

TRAIN_KEYS = ("train.batch_size", "train.epochs", "train.lr", "train.chunk_batches")
SHORT = {"train.batch_size": "b", "train.epochs": "e", "train.lr": "lr",
         "train.chunk_batches": "c"}
TARGET_GAP = 0.03


def cell_name(values: dict[str, object]) -> str:
    return "_".join(f"{SHORT.get(k, k.replace('.', '-'))}{v}" for k, v in values.items())


def markdown(table: pd.DataFrame) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def row_of(run_dir: Path) -> dict | None:
    """One table row from a finished run directory (config.json + metrics.json)."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    fed = m["history"]["federated"]
    row: dict = {"cell": run_dir.name, "seed": cfg["population.seed"]}
    row.update({SHORT[k]: cfg[k] for k in TRAIN_KEYS})
    row["label_eps"] = cfg["privacy.label_epsilon"]
    if "privacy.label_mechanism" in cfg:
        row["label_mech"] = cfg["privacy.label_mechanism"]
    val_oracle = validation_oracle(run_dir)
    row.update(
        val_auc=fed[-1]["val_auc"],
        val_oracle=val_oracle,
        val_gap=val_oracle - fed[-1]["val_auc"],
        val_curve=" ".join(f"{h['val_auc']:.3f}" for h in fed),
        test_auc=m["all_test_auc"],  # beside the oracle: every test person
        oracle=m["oracle_auc"],
        gap=m["gap_to_oracle"],
        central_dp=m["baseline_central_dp_auc"] if m["baseline_central_dp_auc"] is not None
        else math.nan,
        central=m["baseline_central_auc"],
        sigma_joint=m.get("joint_noise_multiplier", m["noise_multiplier"]),
        steps=m["training_steps"],
        trips=m["round_trips"],
        train_s=m["seconds"]["train"],
        total_s=m["seconds"]["total"],
    )
    return row


def validation_oracle(run_dir: Path) -> float:
    """The oracle's AUC on the run's own validation people. Every run draws its split from its
    own secret run key, so cells see different validation (and test) people; the gap to the
    oracle on the same people takes out how hard each draw happens to be. Cached in
    val_oracle.json beside the run's files (this script's own addition)."""
    cache = run_dir / "val_oracle.json"
    if cache.exists():
        return json.loads(cache.read_text())["val_oracle_auc"]
    from crypto.at_rest import Keystore
    from server.scores_file import read_scores
    from simulations.analysis.baselines import join_parties
    from simulations.data.paths import Parties, run_keystore, run_parties
    from simulations.run.rundir import oracle_auc

    parties = Parties(run_parties(run_dir))
    keystore = run_keystore(run_dir)
    store = Keystore(keystore) if keystore is not None else None
    scores = read_scores(run_dir, keystore, with_split=True)
    ref_hash = json.loads((run_dir / "authority.json").read_text())["subject_ref"]
    joined = join_parties(parties, scores, ref_hash.removeprefix("hmac-"), store)
    val = joined.positions("val")
    value = oracle_auc(parties, joined.ids[val], joined.y[val], store)
    cache.write_text(json.dumps({"val_oracle_auc": value}) + "\n")
    return value


def collect(out: Path) -> pd.DataFrame:
    rows = [r for d in sorted((out / "runs").glob("*")) if d.is_dir() and (r := row_of(d))]
    return pd.DataFrame(rows)


def run_federation_cells(cells: dict[str, dict], out: Path, parties: Path, users: int,
                         seed: int) -> None:
    """Run the unfinished `cells` (name -> overrides) on one population in one federation."""
    from simulations.run.engine import configure_environment, quiet_engine_logs
    from simulations.run.experiment import run_cells

    todo = {name: values for name, values in cells.items()
            if not (out / "runs" / name / "metrics.json").exists()}
    for name in todo:
        if (out / "runs" / name).exists():
            raise SystemExit(f"{out / 'runs' / name} is unfinished; move it aside and rerun")
    if not todo:
        return
    configure_environment()
    quiet_engine_logs()
    names = list(todo)
    configs = [(make_config(todo[n], users, seed), out / "runs" / n, False) for n in names]
    t0 = time.perf_counter()

    def done(i: int, error: str) -> None:
        row = row_of(out / "runs" / names[i]) if not error else None
        if row:
            log.info("%-40s val %.4f test %.4f gap %.4f train %.1f s, %d trips (%.0f s so far)",
                     names[i], row["val_auc"], row["test_auc"], row["gap"], row["train_s"],
                     row["trips"], time.perf_counter() - t0)
        else:
            log.error("%s failed: %s", names[i], error)

    log.info("seed %d: %d cells in one federation: %s", seed, len(names), ", ".join(names))
    errors = run_cells(configs, parties, on_done=done)
    log.info("seed %d: %d cells in %.0f s (%d failed)", seed, len(names),
             time.perf_counter() - t0, sum(bool(e) for e in errors))


def write_tables(out: Path, table: pd.DataFrame) -> None:
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(markdown(table))


# ---- grid -----------------------------------------------------------------------------------


def grid(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fixed = parse_assignments(args.assignments)
    if any(k.startswith("privacy.") for k in fixed):
        raise SystemExit("the grid keeps privacy.* at the defaults; drop the privacy --set")
    cells: dict[str, dict] = {}
    if args.with_defaults:
        cells["defaults"] = dict(fixed)
    for b, e, lr, c in itertools.product(args.batch, args.epochs, args.lr, args.chunk):
        values = {"train.batch_size": b, "train.epochs": e, "train.lr": lr,
                  "train.chunk_batches": c}
        cells[cell_name(values)] = {**fixed, **values}
    run_federation_cells(cells, out, args.parties or out / "parties", args.users, args.seed)
    table = collect(out)
    if table.empty:
        return
    table = table.sort_values("val_auc", ascending=False)
    write_tables(out, table)
    cols = ["cell", "val_auc", "val_gap", "test_auc", "oracle", "gap", "central_dp",
            "sigma_joint", "trips", "train_s", "val_curve"]
    print(markdown(table[cols]))


# ---- confirm ---------------------------------------------------------------------------------


def confirm(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    candidate = parse_assignments(args.candidate.split(",")) if args.candidate else {}
    variants: dict[str, dict] = {"defaults": {}, "candidate": candidate,
                                 "candidate_label_inf": {**candidate,
                                                         "privacy.label_epsilon": "inf"}}
    if args.alternative:
        alternative = parse_assignments(args.alternative.split(","))
        variants["alternative"] = alternative
        variants["alternative_label_inf"] = {**alternative, "privacy.label_epsilon": "inf"}
    if args.lp2st:
        if "privacy.label_mechanism" in known_keys():
            variants["candidate_lp2st"] = {**candidate, "privacy.label_mechanism": "lp2st"}
        else:
            log.warning("privacy.label_mechanism is not a config key yet: no LP-2ST variant")
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(variants)}")
        variants = {v: values for v, values in variants.items() if v in args.variants}
    for seed in args.seeds:
        cells = {f"{v}_seed={seed}": values for v, values in variants.items()}
        run_federation_cells(cells, out, out / "parties" / f"seed={seed}", args.users, seed)
    table = collect(out)
    if table.empty:
        return
    table["variant"] = table["cell"].str.replace(r"_seed=\d+$", "", regex=True)
    write_tables(out, table)
    cols = ["cell", "val_auc", "val_gap", "test_auc", "oracle", "gap", "central_dp",
            "sigma_joint", "trips", "train_s"]
    print(markdown(table[cols]))
    summary = table.groupby("variant", sort=False).agg(
        seeds=("seed", "count"), val_auc=("val_auc", "mean"), val_gap=("val_gap", "mean"),
        test_auc=("test_auc", "mean"),
        test_sd=("test_auc", "std"), oracle=("oracle", "mean"), gap=("gap", "mean"),
        gap_max=("gap", "max"), central_dp=("central_dp", "mean"),
        trips=("trips", "mean"), train_s=("train_s", "mean"), total_s=("total_s", "mean"),
    ).reset_index()
    summary["meets_target"] = summary["gap_max"] <= TARGET_GAP
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="a grid of training settings on one population")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--parties", type=Path, help="parties directory (default OUT/parties)")
    g.add_argument("--users", type=int, default=100_000)
    g.add_argument("--seed", type=int, default=0, help="population and training seed")
    g.add_argument("--batch", type=int, nargs="+", default=[2048, 4096])
    g.add_argument("--epochs", type=int, nargs="+", default=[8, 12])
    g.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.02])
    g.add_argument("--chunk", type=int, nargs="+", default=[16])
    g.add_argument("--with-defaults", action="store_true",
                   help="also run the current defaults as a reference cell")
    g.add_argument("--set", dest="assignments", action="append", default=[],
                   help="a non-privacy key=value for every cell")
    c = sub.add_parser("confirm", help="defaults against a candidate over seeds")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--users", type=int, default=100_000)
    c.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    c.add_argument("--candidate", required=True, help="key=value,key=value")
    c.add_argument("--alternative", help="a second candidate, key=value,key=value")
    c.add_argument("--variants", nargs="+",
                   help="run only these variants (e.g. alternative_label_inf); the tables "
                        "still cover every finished cell in OUT")
    c.add_argument("--lp2st", action="store_true",
                   help="also the candidate under privacy.label_mechanism=lp2st, if it exists")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    (grid if args.command == "grid" else confirm)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
