"""What the commands print with: the console, the phases' labels and progress, numbers."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from simulations.run.rundir import Interrupted

console = Console(stderr=True)

T = TypeVar("T")

PHASE_LABELS = {
    "generate": "Generate population",
    "import": "Import real data into party folders",
    "validate": "Validate party tables",
    "connect": "Start engine, connect silos",
    "psi": "Align identities (ECDH PSI)",
    "train": "Federated training",
    "score": "Calibrate and score",
    "join": "Join tables for baselines",
    "baselines": "Baselines: central, central DP, each party alone",
    "references": "References: central gradient boosting, central WoE scorecard",
    "baseline_central": "Baseline: central model",
    "baseline_central_dp": "Baseline: central model, DP",
    "oracle": "Oracle AUC from the generator's truth",
    "audit": "Membership-inference audit",
}


class PhaseProgress:
    """Adapts the pipeline's progress(phase, done, total, **info) calls to a rich display."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def __call__(self, phase: str, done: float, total: float | None, **info: object) -> None:
        with self.lock:
            label = PHASE_LABELS.get(phase, phase)
            if "epoch" in info:
                label = f"{label} (epoch {info['epoch']})"
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(label, total=total)
            task = self.tasks[phase]
            if total is None:
                self.progress.update(task, description=label)
            else:
                self.progress.update(task, completed=done, total=total, description=label)


def fmt(value: object, digits: int = 4) -> str:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return "-" if number != number else f"{number:.{digits}f}"


def progress_bar(*, eta: bool = False) -> Progress:
    """The commands' progress display on the console: a spinner, the phase, a bar, done of
    total and the time taken, with an estimate of the time left (`eta`) where the steps are
    alike (a sweep's cells)."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False)


def run_cells_with_progress(run: Callable[[Callable, Callable], T], *, title: str, noun: str,
                            todo: int, command_line: Sequence[str]) -> T:
    """`run(on_cell, on_phase)` for a command that runs cells one after another (a sweep's
    cells, a tune's runs): a bar over the cells with an estimate of the time left, the current
    cell's phase, each failed cell named as it fails. Ctrl-C stops with the command that
    continues it (finished cells are kept)."""
    with progress_bar(eta=True) as progress:
        overall = progress.add_task(title, total=todo)
        phase = progress.add_task("starting", total=None)

        def on_phase(name: str, done: float, total: float | None, **info: object) -> None:
            label = PHASE_LABELS.get(name, name.replace("_", " "))
            if "epoch" in info:
                label = f"{label} (epoch {info['epoch']})"
            progress.update(phase, description=label)

        def on_cell(status: str, cell: Any) -> None:
            progress.advance(overall)
            if status != "done" and cell is not None:
                console.print(f"[red]{noun} {cell.name} failed:[/] {status}", highlight=False)

        try:
            return run(on_cell, on_phase)
        except KeyboardInterrupt as exc:
            raise Interrupted(shlex.join(["fedscore", *command_line])) from exc
