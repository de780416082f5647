"""`fedscore sweep`: a grid of config values x seeds, continued or extended by its command."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from simulations.cli.output import console, fmt, run_cells_with_progress
from simulations.cli.parsing import data_source
from simulations.data.mapping import MAPPING_HELP
from simulations.data.paths import check_new_dir
from simulations.run.config import check_delta, parse_assignments, warn_unused
from simulations.run.grid import (
    DEFAULT_EPSILONS,
    EPSILON_KEY,
    SweepError,
    SweepSpec,
    parse_epsilons,
    parse_grid,
    parse_reference,
    parse_seeds,
)
from simulations.run.sweep import is_done, plan_sweep, run_sweep

SWEEP_HELP = """\
A sweep runs every combination of its grid's values, for each data seed and training seed:

  fedscore sweep --out S --grid train.lr=0.003,0.01 --epsilons 1,inf --seeds 0,1,2

Repeat the command to continue it; name more values or seeds to extend it (only new cells run):

  fedscore sweep --out S --seeds 3

summary.csv holds, per grid point, the mean AUC with its 95 % Student-t interval over the runs,
and the mean difference to the reference point with its interval, paired by (data seed, seed).

"""


def sweep_command(args: argparse.Namespace) -> int:
    check_new_dir(args.out, "--out")
    out = args.out.resolve()
    assignments = parse_assignments(args.assignments)
    if args.data:
        assignments["data"] = data_source(args.data, args.users)
    asked, given = _sweep_spec(args, assignments, new=not (out / "sweep.json").exists())
    spec = plan_sweep(out, asked, given=given)
    if args.reference:  # only the summary depends on it: a sweep's reference can change
        spec = dataclasses.replace(spec, reference={**spec.reference,
                                                    **parse_reference(args.reference)})
    cells = spec.cells()
    configs = [spec.config(cell) for cell in cells]
    for cfg in configs:  # every cell's delta (a grid may vary it), before any cell starts
        if cfg.generated:  # real data: checked against its tables when they are read
            check_delta(cfg, cfg.population.users, "population.users")
    warn_unused(configs, "--set")
    todo = sum(not is_done(out, c) for c in cells)
    # The same command continues a sweep: finished cells are kept, the others resume.
    table = run_cells_with_progress(
        lambda on_cell, on_phase: run_sweep(out, spec, on_cell, on_phase),
        title=f"Sweep: {todo} of {len(cells)} cells to run", noun="cell", todo=todo,
        command_line=args.command_line)
    _print_sweep(out, table)
    failed = int((table["status"] == "failed").sum()) if "status" in table else 0
    if failed:
        console.print(f"[bold red]{failed} of {len(cells)} cells failed[/] (sweep.csv says why); "
                      "the same command runs them again", highlight=False)
        return 1
    return 0


def _sweep_spec(args: argparse.Namespace, assignments: dict[str, str], *, new: bool):
    """The sweep the options ask for, and which options were given: continuing a sweep, an
    option left out keeps the sweep's value; a new sweep takes the defaults."""
    grid = parse_grid(args.grid)
    if args.epsilons is not None:
        if EPSILON_KEY in grid:
            raise SweepError("--epsilons and --grid privacy.epsilon name the same key; give one")
        grid = {EPSILON_KEY: parse_epsilons(args.epsilons), **grid}
    elif new and not grid and EPSILON_KEY not in assignments:
        grid = {EPSILON_KEY: parse_epsilons(DEFAULT_EPSILONS)}
    given = {name for name, present in (
        ("grid", bool(grid) and (args.epsilons is not None or bool(args.grid))),
        ("seeds", args.seeds is not None), ("data_seeds", args.data_seeds is not None),
        ("users", args.users is not None), ("assignments", bool(assignments))) if present}
    spec = SweepSpec(
        grid=grid, seeds=parse_seeds(args.seeds or "0,1,2"),
        data_seeds=None if args.data_seeds is None else parse_seeds(args.data_seeds,
                                                                    "--data-seeds"),
        users=args.users, assignments=tuple(sorted(assignments.items())))
    return spec, given


def _print_sweep(out: Path, table) -> None:
    summary = pd.read_csv(out / "summary.csv")
    groups = list(summary.columns[:list(summary.columns).index("n")])
    view = Table(title=f"fedscore sweep ({len(table)} runs)")
    for col in (*groups, "n", "AUC (95 % CI)", "AUC − reference (95 % CI)", "central DP",
                "best silo", "canary audit eps max"):
        view.add_column(col, justify="right")
    for _, row in summary.iterrows():
        diff = "reference" if str(row.get("is_reference")) == "True" else _with_ci(row,
                                                                                  "auc_diff")
        view.add_row(*(f"{row[c]:g}" if c == "epsilon" else str(row[c]) for c in groups),
                     str(int(row["n"])), _with_ci(row, "auc"), diff,
                     fmt(row.get("central_dp_mean")), fmt(row.get("best_silo_mean")),
                     fmt(row.get("audit_canary_epsilon_lower_max"), 2))
    Console().print(view)
    Console().print(f"results: {out}/sweep.csv, summary.csv; report: fedscore report {out}",
                    soft_wrap=True, highlight=False)


def _with_ci(row, name: str) -> str:
    """`0.8123 [0.80, 0.82]` from summary.csv's NAME_mean, NAME_ci_low, NAME_ci_high."""
    mean, low, high = (row.get(f"{name}_{part}") for part in ("mean", "ci_low", "ci_high"))
    if fmt(mean) == "-":
        return "-"
    ci = "" if fmt(low) == "-" else f" [{low:.3f}, {high:.3f}]"
    return f"{mean:+.4f}{ci}" if name.endswith("diff") else f"{mean:.4f}{ci}"


def add_sweep_parser(sub: argparse._SubParsersAction, *, users_help: str) -> None:
    """`fedscore sweep`'s options (`users_help`: what --users sets, as `fedscore run` says it)."""
    sweep = sub.add_parser("sweep", help="one run per grid point and seed with baselines and "
                                         "an audit; repeat the command to continue or extend",
                           epilog=SWEEP_HELP + MAPPING_HELP)
    sweep.add_argument("--out", type=Path, required=True, help="sweep directory")
    sweep.add_argument("--epsilons", default=None,
                       help="eps_model per cell, comma-separated; inf = no DP (short for --grid "
                            "privacy.epsilon=...; a new sweep without a grid: "
                            f"{DEFAULT_EPSILONS})")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config key and its values (repeat for more keys; tuple values "
                            "in brackets: model.hidden=[32,16],[64])")
    sweep.add_argument("--seeds", default=None,
                       help="training seeds, comma-separated (a new sweep: 0,1,2)")
    sweep.add_argument("--data-seeds", default=None,
                       help="population seeds, comma-separated (default: each cell's training "
                            "seed)")
    sweep.add_argument("--reference", action="append", default=[], metavar="KEY=VALUE",
                       help="the grid point paired differences are taken against (default: "
                            "the largest epsilon, each other key's first value)")
    sweep.add_argument("--users", type=int, default=None,
                       help=f"{users_help}; a sweep being continued keeps its own")
    sweep.add_argument("--data", default=None, metavar="uci|FILE.csv|DIR",
                       help="real data instead of the generator (as for `fedscore run`)")
    sweep.add_argument("--set", dest="assignments", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config key for every cell")
