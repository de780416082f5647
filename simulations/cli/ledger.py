"""`fedscore ledger verify`: every epsilon of a run's or a sweep's ledgers, recomputed."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.ledger import LEDGER_FILE, LedgerError
from simulations.analysis.ledger_verify import TOLERANCE, consistency, verify
from simulations.cli.output import console
from simulations.run.sweep import SWEEP_FILE
from simulations.run.tune_spec import TUNE_FILE

if TYPE_CHECKING:  # imported when verifying: it loads dp-accounting
    from simulations.analysis.ledger_verify import Check


def ledger_command(args: argparse.Namespace) -> int:
    """Verify one run's ledger, or each cell's of a sweep (a directory with sweep.json: its
    cells are under runs/), with one verdict per run; exit 1 when any does not verify."""
    root = Path(args.run_dir)
    # A tune's runs are a sweep's cells (runs/), each ledger ending with its score's line.
    sweep = (root / SWEEP_FILE).exists() or (root / TUNE_FILE).exists()
    runs = sorted(d for d in (root / "runs").glob("*") if d.is_dir()) if sweep else [root]
    table = Table("run", "party", "budget", "accountant", "steps", "delta", "ledger epsilon",
                  "dp-accounting", "gap", "ok", title=f"ledger {root}")
    # Each run's problems; None: a sweep cell without a ledger, which has nothing to verify.
    verdicts = {run.name: _verify_ledger(run, table, sweep) for run in runs}
    out = Console()
    out.print(table)
    out.print(f"tolerances: RDP vs RDP {TOLERANCE['rdp']:.0%}, PRV vs PLD {TOLERANCE['prv']:.0%}")
    for name, problems in verdicts.items():
        _print_verdict(out, name, problems)
    checked = [p for p in verdicts.values() if p is not None]
    if sweep:
        failed = sum(bool(p) for p in checked)
        out.print(f"sweep {root}: {len(checked) - failed} of {len(verdicts)} cells verify, "
                  f"{failed} do not, {len(verdicts) - len(checked)} have no ledger",
                  soft_wrap=True, highlight=False)
    return 0 if checked and not any(checked) else 1


def _verify_ledger(run: Path, table: Table, in_sweep: bool) -> list[str] | None:
    """One run's ledger problems (empty: it verifies), its checks added to `table`. A sweep
    cell whose ledger is missing (None) or unreadable is one cell's verdict; a single run's
    stops the command (LedgerError)."""
    if in_sweep and not (run / LEDGER_FILE).exists():
        return _missing_ledger(run)
    try:
        with console.status(f"recomputing epsilons of {run.name} with dp-accounting"):
            checks = verify(run)
        # The ledger as the run's record: duplicates, gaps, steps against the run's own
        # count, epsilons against the target (agreeing accountants alone prove none of it).
        problems = consistency(run, checks)
    except LedgerError as exc:
        if not in_sweep:
            raise
        return [str(exc)]
    for c in checks:
        table.add_row(run.name, c.party, c.budget, c.accountant, str(c.steps), _delta(c),
                      f"{c.reported:.5f}", f"{c.independent:.5f}",
                      f"{100 * c.relative_gap:.2f} %", "[green]yes[/]" if c.ok else "[red]NO[/]")
        if not c.ok:
            problems.append(f"{c.party} {c.budget}: the ledger's epsilon {c.reported:.5f} and "
                            f"dp-accounting's {c.independent:.5f} differ by more than the "
                            "tolerance")
    return problems


def _delta(check: Check) -> str:
    """The delta of a budget's epsilon, and what of it its lines add outside the composition
    (the silos' category thresholds: dp-accounting composes at the rest)."""
    if check.accountant == "pure":
        return "0"
    if not check.extra_delta:
        return f"{check.delta:.3g}"
    return f"{check.delta:.3g} (incl. {check.extra_delta:.0e} thresholds)"


def _missing_ledger(run: Path) -> list[str] | None:
    """A sweep cell without a ledger: nothing to verify (None) unless its metrics.json reports
    any finite epsilon (the model's, the labels', the transcript's, a region's), whose record
    is then missing."""
    try:
        reported = json.loads((run / "metrics.json").read_text()).get("epsilon") or {}
    except (OSError, ValueError):
        return None  # unfinished: it may have no ledger yet
    claimed = dict(_finite_epsilons(reported))
    if not claimed:
        return None
    named = ", ".join(f"{name} {value:.4f}" for name, value in claimed.items())
    return [f"metrics.json reports epsilon ({named}) but ledger.jsonl is missing: restore it "
            "from the run, or run the cell again (move its directory away and repeat the "
            "sweep's command)"]


def _finite_epsilons(reported: object, name: str = "") -> list[tuple[str, float]]:
    """Every finite number in metrics.json's `epsilon` (nested per party or region), by name."""
    if isinstance(reported, dict):
        return [pair for key, value in reported.items()
                for pair in _finite_epsilons(value, f"{name}.{key}" if name else str(key))]
    if isinstance(reported, int | float) and not isinstance(reported, bool) \
            and math.isfinite(reported):
        return [(name, float(reported))]
    return []


def _print_verdict(out: Console, name: str, problems: list[str] | None) -> None:
    run = escape(name)
    if problems is None:
        out.print(f"[yellow]{run}: no ledger[/] (a cell without differential privacy writes "
                  "none, an unfinished one may have none yet): nothing to verify",
                  soft_wrap=True, highlight=False)
    elif not problems:
        out.print(f"[green]{run}: the ledger verifies[/]", soft_wrap=True, highlight=False)
    else:
        for problem in problems:
            out.print(f"[bold red]ledger problem:[/] {run}: {escape(problem)}", soft_wrap=True,
                      highlight=False)
        out.print(f"[bold red]{run}: the ledger does not verify[/]: it is not a faithful "
                  "record of the run's privacy spend; do not publish this run's epsilon",
                  soft_wrap=True, highlight=False)
