"""`fedscore run` and `fedscore deploy`: one experiment, and its summary in words;
`fedscore finish`: a `flwr run .` output completed, and the same summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server import checkpoint
from server.privacy import model_epsilon
from simulations.cli.output import PhaseProgress, console, progress_bar
from simulations.cli.parsing import data_source
from simulations.data.paths import check_new_dir, default_parties_dir
from simulations.run.config import check_delta, make_config, parse_assignments, warn_unused
from simulations.run.rundir import resume_target


def run_command(args: argparse.Namespace) -> int:
    # Here, not at the top: the experiment's baselines load scikit-learn and LightGBM (about a
    # second), which every other command, `--help` included, would otherwise pay for.
    from simulations.run.experiment import run_experiment

    overrides = parse_assignments(args.assignments)
    engine = "deployment" if args.command == "deploy" else "simulation"
    credentials = getattr(args, "credentials", None)
    if args.resume:
        if args.users is not None or args.seed is not None:
            overrides.update({"population.users": args.users} if args.users else {})
            overrides.update({"seed": args.seed} if args.seed is not None else {})
        out_dir = args.resume.resolve()
        cfg, parties, how = resume_target(out_dir, overrides)
        # A run resumes on the engine it started on, whichever command resumes it.
        engine = how.get("engine", "simulation")
        credentials = Path(how["credentials"]) if how.get("credentials") else credentials
    else:
        if args.data:
            overrides["data"] = data_source(args.data, args.users)
        cfg = make_config(overrides, args.users, args.seed)
        warn_unused([cfg], "--set")
        out_dir = args.out.resolve()
        parties = (args.parties or default_parties_dir(args.out)).resolve()
        # Input errors before anything is made or started: the paths, then delta against the
        # population to generate (real data: against its table, in run.experiment.ready_parties).
        check_new_dir(out_dir, "--out")
        check_new_dir(parties, "--parties")
        if cfg.generated:
            check_delta(cfg, cfg.population.users, "population.users")
    try:
        with progress_bar() as progress:
            metrics = run_experiment(cfg, out_dir, parties, PhaseProgress(progress),
                                     resume=args.resume is not None, engine=engine,
                                     credentials=credentials and credentials.resolve())
    except RuntimeError as exc:
        # A silo or the authority stopped (FederationError, DeploymentError, a crash): say how
        # to go on when there is a checkpoint.
        from server.run_phases import federated_done

        # Nothing to resume unless a round finished (the checkpoint) or the federated part did
        # (phases.json, authority.json: baselines and audit resume from there).
        if not checkpoint.path(out_dir).exists() and not federated_done(out_dir):
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        console.print(f"The run is checkpointed. Once the cause is fixed, resume it with:\n"
                      f"  fedscore run --resume {out_dir}", soft_wrap=True, highlight=False)
        return 2
    print_summary(metrics, out_dir, parties)
    return 0


def privacy_rows(metrics: dict) -> list[tuple[str, str]]:
    """Each budget with whom it protects against, in words (docs/threat-model.md)."""
    eps = metrics.get("epsilon") or {}
    model = model_epsilon(metrics)
    trees = metrics.get("model_kind") == "gbdt"
    card = metrics.get("model_kind") == "scorecard"
    rows = [(
        "eps_model: the combined model, its scores, reasons and metrics, against anyone who "
        "receives them",
        ("OFF (inf): the trees are released without DP" if trees else
         "OFF (inf): the scorecard is released without DP" if card else "OFF: no protection")
        if model is None else f"{model:.3f}")]
    label = eps.get("label")
    rows.append((
        "eps_label: the training labels, against each silo",
        f"{label:g}" if label is not None else
        "not spent: the DP trees send the silos nothing label-dependent" if trees and model
        else "not spent: the DP scorecard sends the silos nothing label-dependent before "
             "its DP release" if card and model
        else "OFF: every silo reads the training labels from its gradients"))
    transcript = eps.get("transcript")
    values = list((transcript or {}).values())
    rows.append((
        "eps_transcript: a person's contributions, against the authority",
        ("n/a (trees): the authority sees per-bin sums, splits and partitions" if trees
         else "n/a (DP scorecard): the authority sees every person's pre-bin of each "
              "silo column" if card and model
         else "n/a (scorecard): the authority sees per-bin sums and each silo's partial "
              "logits" if card
         else "off: the authority sees each person's summed contribution exactly")
        if not transcript
        else ("unbounded (no DP-SGD)" if None in values else f"{max(values):.3f}")))
    return rows


def print_summary(metrics: dict, out_dir: Path, parties: Path) -> None:
    table = Table(title="fedscore run", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("auc", "ks", "gini", "brier"):
        if metrics.get(key) is not None:
            table.add_row(f"{key} (scored test people)", f"{metrics[key]:.4f}")
    table.add_row("all_test_auc (all test people)", f"{metrics['all_test_auc']:.4f}")
    for row in privacy_rows(metrics):
        table.add_row(*row)
    audit = metrics.get("audit") or {}
    canary = audit.get("canary")
    if canary:
        table.add_row("audit: one-run canary lower bound on eps_model",
                      f"{canary['epsilon_lower_bound']:.3f}")
    if "epsilon_lower" in audit:
        table.add_row("audit: loss-threshold membership attack, eps >=",
                      f"{audit['epsilon_lower']:.3f} (attack AUC {audit['attack_auc']:.3f})")
    for key in ("oracle_auc", "baseline_central_auc", "baseline_central_dp_auc",
                "baseline_central_gbdt_auc", "baseline_central_scorecard_auc",
                "baseline_best_silo_auc"):
        if metrics.get(key) is not None:
            table.add_row(f"{key} (simulation-only reference, all test people)",
                          f"{metrics[key]:.4f}")
    table.add_row("delta", f"{metrics['delta']:.2e}")
    table.add_row("aligned people", f"{metrics['people']['aligned']:,}")
    table.add_row("tiers", ", ".join(f"{k} {v:,}" for k, v in metrics["tiers"].items()))
    table.add_row("round trips", str(metrics["round_trips"]))
    table.add_row("seconds (total)", f"{metrics['seconds']['total']:.1f}")
    out = Console()
    out.print(table)
    for guardrail in metrics.get("guardrails", []):  # why DP may not have learned
        out.print(f"[yellow]privacy guardrail ({guardrail['check']}):[/] {guardrail['message']}",
                  soft_wrap=True, highlight=False)
    if metrics.get("data", "generated") != "generated":
        out.print("[yellow]note:[/] the baselines above are simulation-only references: they "
                  "join every party's raw table in one place, which no party of a real "
                  "federation could do. Do not publish them as what the federation achieves.",
                  soft_wrap=True)
    # Only what the run wrote: a horizontal run writes no scores file.
    files = [name for name in ("metrics.json", "curves.json", "scores.parquet.enc",
                               "scores.parquet", "manifest.json") if (out_dir / name).exists()]
    out.print(f"results: {out_dir}  ({', '.join(files)}); "
              f"report: fedscore report {out_dir}", soft_wrap=True, highlight=False)
    out.print(f"party tables: {parties}")


def finish_command(args: argparse.Namespace) -> int:
    from simulations.run.finish import finish_flwr_run  # loads the experiment: see run_command

    data = data_source(args.data, None) if args.data else None
    with progress_bar() as progress:
        metrics, done = finish_flwr_run(args.dir, args.parties, data, PhaseProgress(progress))
    for source in done.sources:
        console.print(f"configuration: {escape(source)}", soft_wrap=True, highlight=False)
    print_summary(metrics, done.out_dir, done.parties)
    return 0


def add_finish_parser(sub: argparse._SubParsersAction) -> None:
    finish = sub.add_parser(
        "finish", help="complete a `flwr run .` output into a run directory (baselines, "
                       "oracle, audit, curves, metrics.json), so `fedscore report` reads it",
        description="A `flwr run .` writes what the authority measured into <out-dir>/<run id>/\n"
                    "(authority.json, ledger, scores). This adds what `fedscore run` adds after\n"
                    "the federation, with the same code: config.json (from the settings\n"
                    "recorded in authority.json and the parties' population.json), baselines,\n"
                    "the oracle, the audit, curves.json, manifest.json and metrics.json.\n"
                    "Interrupted or failed: run the same command again.")
    finish.add_argument("dir", type=Path, metavar="FLWR_RUN_DIR",
                        help="the directory `flwr run .` wrote: <out-dir>/<Flower run id>")
    finish.add_argument("--parties", type=Path, required=True,
                        help="the party tables the run used: its run config's data-dir")
    finish.add_argument("--data", default=None, metavar="uci|FILE.csv|DIR",
                        help="parties imported from real data: the source they were imported "
                             "from (as given to `fedscore run --data`); generated parties "
                             "record their population themselves")
