"""What the commands print with: the console, the phases' labels and progress, numbers."""

from __future__ import annotations

import threading

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

console = Console(stderr=True)

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
