"""Issue 20's stress suite: the federated model on data the project was not tuned on
(bench/stress_data.py), against the best central reference every run computes.

For each dataset, one `fedscore run --data DIR` per privacy setting, one after another:
  inf  no DP at all: `privacy.epsilon=inf` and `privacy.label_epsilon=inf` (the acceptance:
       within 0.02 of the best central reference)
  1    the defaults (eps_model 1, label eps 2), for comparison
Every figure is a test AUC on every test person of the run's own split (metrics.json
`all_test_auc` and the `baseline_*_auc` keys, all on the same people). A run the project refuses
(text columns on a version without text categories, a privacy guardrail) is reported as such.

    PYTHONPATH=. .venv/bin/python bench/stress.py /tmp/stress               # both settings
    PYTHONPATH=. .venv/bin/python bench/stress.py /tmp/stress --privacy inf --only small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.stress_data import GENERATORS, LABELS

MAX_GAP = 0.02
FEDERATED = "all_test_auc"
# metrics.json key of each central reference (simulations/run/outcome.py Comparison.to_dict).
REFERENCES = {"central MLP": "baseline_central_auc",
              "central GBDT": "baseline_central_gbdt_auc",
              "central scorecard": "baseline_central_scorecard_auc"}
PRIVACY = {"inf": ("privacy.epsilon=inf", "privacy.label_epsilon=inf"), "1": ()}
ENGINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
              "FLWR_DISABLE_UPDATE_CHECK": "1"}


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One run of one dataset: the federated AUC against the best central reference."""

    dataset: str
    privacy: str
    rows: int
    federated: float | None = None
    reference: str | None = None
    reference_auc: float | None = None
    seconds: float = 0.0
    refused: str | None = None  # why the run did not finish
    guardrails: tuple[str, ...] = ()  # the privacy guardrails' checks that warned
    references: dict[str, float | None] = field(default_factory=dict)  # every reference's AUC

    @property
    def gap(self) -> float | None:
        if self.federated is None or self.reference_auc is None:
            return None
        return self.reference_auc - self.federated

    @property
    def passed(self) -> bool:
        return self.gap is not None and self.gap <= MAX_GAP


def best_reference(metrics: dict) -> tuple[str, float]:
    """The central reference with the highest test AUC (None entries: not computed)."""
    found = {name: metrics[key] for name, key in REFERENCES.items()
             if metrics.get(key) is not None}
    name = max(found, key=found.__getitem__)
    return name, float(found[name])


def outcome_of(dataset: str, privacy: str, rows: int, metrics: dict,
               seconds: float = 0.0) -> Outcome:
    name, auc = best_reference(metrics)
    return Outcome(dataset=dataset, privacy=privacy, rows=rows,
                   federated=float(metrics[FEDERATED]), reference=name, reference_auc=auc,
                   seconds=seconds, references={n: metrics.get(k) for n, k in REFERENCES.items()},
                   guardrails=tuple(g["check"] for g in metrics.get("guardrails") or ()))


def run_args(data: Path, out: Path, privacy: str) -> list[str]:
    """The `fedscore` arguments of one run."""
    sets = [a for s in PRIVACY[privacy] for a in ("--set", s)]
    return ["run", "--data", str(data), "--out", str(out), *sets]


def rows_of(data: Path) -> int:
    with (data / LABELS).open() as f:
        return sum(1 for _ in f) - 1


def _why(stderr: str) -> str:
    """The first problem a refusal lists (`fedscore data check`'s "  - file, column: ..."),
    else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()] or ["?"]
    problems = [line[2:] for line in lines if line.startswith("- ")]
    return (problems or lines[-1:])[0].split(";")[0][:120]


def measure(data: Path, out: Path, privacy: str) -> Outcome:
    """`fedscore run` on `data` into `out` (a fresh directory) and its outcome."""
    env = {**os.environ, **ENGINE_ENV, "FLWR_HOME": str(out.parent / ".flwr")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", *run_args(data, out, privacy)],
                          env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    rows = rows_of(data)
    if proc.returncode != 0:
        return Outcome(dataset=data.name, privacy=privacy, rows=rows, seconds=seconds,
                       refused=_why(proc.stderr))
    metrics = json.loads((out / "metrics.json").read_text())
    return outcome_of(data.name, privacy, rows, metrics, seconds)


def _auc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(outcomes: list[Outcome]) -> str:
    """A markdown table, one line per run."""
    lines = ["| dataset | rows | privacy | federated AUC | best central reference | gap | "
             f"within {MAX_GAP} | seconds |", "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        if o.refused:
            lines.append(f"| {o.dataset} | {o.rows:,} | eps {o.privacy} | refused: {o.refused} "
                         f"| | | fail | {o.seconds:.0f} |")
            continue
        warn = f" (guardrails: {', '.join(o.guardrails)})" if o.guardrails else ""
        lines.append(f"| {o.dataset} | {o.rows:,} | eps {o.privacy} | {_auc(o.federated)}{warn} "
                     f"| {o.reference} {_auc(o.reference_auc)} | {o.gap:+.4f} | "
                     f"{'pass' if o.passed else 'fail'} | {o.seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="a new directory for the data and the runs")
    parser.add_argument("--only", nargs="+", choices=list(GENERATORS), default=list(GENERATORS))
    parser.add_argument("--privacy", nargs="+", choices=list(PRIVACY), default=list(PRIVACY))
    args = parser.parse_args()
    outcomes = []
    data = {name: GENERATORS[name](args.root / "data" / name) for name in args.only}
    for privacy in args.privacy:  # every dataset at one setting before the next
        for name in args.only:
            outcome = measure(data[name], args.root / "runs" / f"{name}_eps{privacy}", privacy)
            print(table([outcome]).splitlines()[-1], flush=True)
            outcomes.append(outcome)
            (args.root / "outcomes.json").write_text(json.dumps(  # kept as the runs go
                [{**o.__dict__, "gap": o.gap, "passed": o.passed} for o in outcomes], indent=1))
    print(table(outcomes))


if __name__ == "__main__":
    main()
