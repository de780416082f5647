"""`fedscore tune`: hyperparameter tuning on private labels, its privacy cost accounted."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.tune_privacy import DISTRIBUTIONS, RunsLaw
from server.tune_score import CLIP
from simulations.cli.output import console, fmt, run_cells_with_progress
from simulations.cli.parsing import data_source
from simulations.data.paths import check_new_dir
from simulations.run.config import (
    check_delta,
    check_guardrails,
    parse_assignments,
    warn_unused,
)
from simulations.run.grid import parse_grid
from simulations.run.sweep import is_done
from simulations.run.tune import plan_tune, planned_people, run_tune
from simulations.run.tune_spec import DEFAULT_MEAN_RUNS, DEFAULT_SCORE_NOISE, TuneError, TuneSpec

TUNE_HELP = """\
A tune trains a random number K of runs, each on a candidate of the grid drawn at random, and
releases only the run with the lowest noisy validation log-loss (the authority's DP score, on
each run's ledger). K and the candidates come from the authority's secret stream, never from
the seed. The tuned model's epsilon is Papernot and Steinke's (ICLR 2022: Theorem 2 for the
truncated negative binomial, Theorem 6 for Poisson), and each run's epsilon target is the
largest that keeps that total within --epsilon:

  fedscore tune --out T --grid train.lr=0.01,0.03 --epsilon 2 --mean-runs 3
  fedscore tune --out T --data uci --grid train.lr=0.01,0.03 --epsilon 2

Repeat the command to continue a tune (finished runs are kept). summary.json is the release
(the chosen run, its noisy score, the total epsilon); tune_runs.csv is the authority's own record
of every run, not a release.

"""


def tune_command(args: argparse.Namespace) -> int:
    check_new_dir(args.out, "--out")
    out = args.out.resolve()
    assignments = parse_assignments(args.assignments)
    if args.data:  # real data: the plan counts its people before anything runs
        assignments["data"] = data_source(args.data, args.users)
    try:
        law = RunsLaw(args.distribution, args.mean_runs, args.shape)
    except ValueError as exc:
        raise TuneError(f"--distribution/--mean-runs/--shape: {exc}") from None
    spec = TuneSpec(grid=parse_grid(args.grid), epsilon=args.epsilon, law=law,
                    score_noise=args.score_noise, users=args.users, data_seed=args.data_seed,
                    assignments=tuple(sorted(assignments.items())))
    warn_unused([spec.sweep(1.0).config(cell) for cell in spec.cells(range(len(spec.points())))],
                "--set")

    def check(cfg) -> None:  # each candidate at the planned epsilon, before anything runs
        people = planned_people(cfg)
        source = "population.users" if cfg.generated else "the people every party holds"
        check_delta(cfg, people, source)
        check_guardrails(cfg, people, source)

    with console.status("planning the budget (each run's epsilon for the total)"):
        plan = plan_tune(out, spec, check=check)
    _print_plan(plan)
    cells = plan.cells()
    todo = sum(not is_done(out, c) for c in cells)
    summary = run_cells_with_progress(
        lambda on_cell, on_phase: run_tune(out, plan, on_cell, on_phase),
        title=f"Tune: {todo} of {len(cells)} runs to run", noun="run", todo=todo,
        command_line=args.command_line)
    if not summary:
        console.print("[bold red]some runs failed[/] (tune_runs.csv says why); the same command "
                      "runs them again; nothing is released until every run finished",
                      highlight=False)
        return 1
    _print_summary(out, summary)
    return 0 if summary["within_budget"] else 1


def _print_plan(plan) -> None:
    spec = plan.spec
    view = Table(title="fedscore tune: the plan", show_header=False)
    view.add_column("", style="bold")
    view.add_column("")
    view.add_row("total epsilon (asked)", f"{spec.epsilon:g} at delta {plan.delta:.2e}")
    view.add_row("planned total", f"{plan.planned_total:.4f} (RDP, Papernot-Steinke "
                 + ("Thm 6)" if spec.law.poisson else "Thm 2)"))
    view.add_row("each run's epsilon target", f"{plan.run_epsilon:g} (RDP accountant)")
    view.add_row("number of runs K", f"{plan.k} drawn ({spec.law.describe()}; from the "
                 "authority's secret stream)")
    view.add_row("candidates", f"{len(spec.points())} (each run draws one at random)")
    view.add_row("selection score", f"validation log-loss, clipped, Gaussian noise multiplier "
                 f"{spec.score_noise:g} (std {_score_std(plan):.3f} on the mean)")
    view.add_row("planned on", f"{plan.n_train:,} training people")
    Console().print(view)
    for i, cell in enumerate(plan.cells()):
        console.print(f"  run {i}: {cell.point_name}", highlight=False)


def _score_std(plan) -> float:
    cfg = plan.config(plan.spec.cells([0])[0])
    val = max(1, round(cfg.authority.split.val * planned_people(cfg)))
    return plan.spec.score_noise * CLIP / val


def _print_summary(out: Path, summary: dict) -> None:
    eps = summary["epsilon"]
    view = Table(title="fedscore tune: the release", show_header=False)
    view.add_column("", style="bold")
    view.add_column("")
    chosen = summary["chosen"]
    if chosen is None:
        view.add_row("chosen run", "none: K = 0 runs were drawn; nothing is released")
    else:
        view.add_row("chosen run", chosen["run"])
        view.add_row("noisy validation log-loss", f"{chosen['noisy_val_loss']:.4f} "
                     f"(noise std {chosen['score_noise_std']:.4f})")
        view.add_row("test AUC (experiment's)", fmt(chosen["test_auc"]))
    view.add_row("tuned model's epsilon", f"{eps['total']:.4f} (asked {eps['asked']:g}; from "
                 "the runs' ledgers)")
    if eps.get("label_against_silos") is not None:
        view.add_row("label epsilon against silos", f"{eps['label_against_silos']:g} (they "
                     "see every run: composed over K)")
    Console().print(view)
    if not summary["within_budget"]:
        console.print(f"[bold red]the ledgers' total {eps['total']:.4f} passes --epsilon "
                      f"{eps['asked']:g}[/] (the population differed from the plan's)",
                      highlight=False)
    Console().print(f"release: {out}/summary.json; every run: {out}/tune_runs.csv",
                    soft_wrap=True, highlight=False)


def add_tune_parser(sub: argparse._SubParsersAction, *, users_help: str) -> None:
    tune = sub.add_parser("tune", help="pick among candidate settings on private labels, the "
                                       "selection's privacy cost accounted",
                          epilog=TUNE_HELP)
    tune.add_argument("--out", type=Path, required=True, help="tune directory")
    tune.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="the candidates: a config key and its values (repeat for more keys)")
    tune.add_argument("--epsilon", type=float, required=True,
                      help="the tuned, released model's total epsilon (every run and the "
                           "selection)")
    tune.add_argument("--mean-runs", type=float, default=DEFAULT_MEAN_RUNS,
                      help="E[K], the mean number of runs")
    tune.add_argument("--distribution", choices=DISTRIBUTIONS, default="logarithmic",
                      help="K's law (logarithmic: the cheapest truncated one; poisson may "
                           "draw no run, then nothing is released)")
    tune.add_argument("--shape", type=float, default=1.0,
                      help="--distribution negbin: its shape eta >= 0")
    tune.add_argument("--score-noise", type=float, default=DEFAULT_SCORE_NOISE,
                      help="noise multiplier of the validation score (higher: cheaper, "
                           "coarser choice)")
    tune.add_argument("--users", type=int, default=None, help=users_help)
    tune.add_argument("--data", default=None, metavar="uci|FILE.csv|DIR",
                      help="real data instead of the generator, as for `fedscore run --data` "
                           "(the plan counts the people every party holds)")
    tune.add_argument("--data-seed", type=int, default=0, help="the population's seed")
    tune.add_argument("--set", dest="assignments", action="append", default=[],
                      metavar="KEY=VALUE", help="override a config key for every run")
