"""How time and memory grow with N: one default private run per population size.

Each size runs `fedscore run` (and then `fedscore report`) in a fresh process, as a user would.
A sampler reads the proportional set size (PSS, shared pages split between the processes that
share them) of that process and all its descendants (Ray's raylet, GCS and silo workers
included) every 0.25 s; the peak of that sum is the run's peak memory. Phase times come from
the run's own metrics.json ("baselines" is everything after scoring: the join, the baselines,
the oracle and the audit). Writes scaling.csv, scaling.md and scaling.png (log-log, with the
fitted growth exponent of each phase) into --out.

    .venv/bin/python bench/scaling.py --out /tmp/scaling [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from simulations.run.deploy import process_tree

PHASES = ("generate", "validate", "psi", "train", "score", "baselines", "report", "total")


def tree_pss_mb(root: int) -> float:
    """Sum of PSS over `root` and its descendants, in MB (0 for processes that vanished)."""
    total = 0
    for pid, _ in process_tree([root]):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd`; returns (wall seconds, peak PSS of its process tree in MB)."""
    env = {**os.environ, "FLWR_HOME": str(cwd / ".flwr"), "COLUMNS": "120"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, peak[0]


def measure(n: int, out: Path, extra: list[str]) -> dict:
    work = out / f"n={n}"
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "simulations.cli"]
    wall, peak = run_measured([*cli, "run", "--out", str(work / "run"), "--users", str(n),
                               *extra], work)
    report_wall, report_peak = run_measured([*cli, "report", str(work / "run")], work)
    m = json.loads((work / "run" / "metrics.json").read_text())
    s = m["seconds"]
    row = {
        "n": n, "wall": round(wall, 1), "peak_mb": round(peak), "report_peak_mb":
        round(report_peak), "auc": m["all_test_auc"], "oracle_auc": m["oracle_auc"],
        "generate": s.get("generate", 0.0), "validate": s.get("validate", 0.0),
        "psi": s.get("psi", 0.0), "train": s.get("train", 0.0), "score": s.get("score", 0.0),
        "baselines": round(sum(v for k, v in s.items()
                               if k.startswith("baseline") or k in ("join", "oracle", "audit")),
                           3),
        "report": round(report_wall, 1), "total": round(wall + report_wall, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def exponent(ns: list[int], values: list[float]) -> float | None:
    """Slope of log(value) on log(n): 1 is linear growth."""
    pairs = [(n, v) for n, v in zip(ns, values, strict=True) if v > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def write_outputs(rows: list[dict], out: Path) -> None:
    ns = [r["n"] for r in rows]
    with (out / "scaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fits = {k: exponent(ns, [r[k] for r in rows]) for k in (*PHASES, "peak_mb")}
    lines = ["| N | " + " | ".join(f"{p} s" for p in PHASES) + " | peak MB | AUC | oracle |",
             "|" + " --- |" * (len(PHASES) + 4)]
    for r in rows:
        lines.append(f"| {r['n']:,} | " + " | ".join(f"{r[p]:.1f}" for p in PHASES)
                     + f" | {r['peak_mb']:,} | {r['auc']:.4f} | {r['oracle_auc']:.4f} |")
    # Fixed costs (engine start, imports) flatten the slope at small N; the slope between the
    # two largest sizes says more about how the cost grows from there.
    tail = {k: exponent(ns[-2:], [r[k] for r in rows[-2:]]) for k in fits}
    for name, slopes in (("exponent (all sizes)", fits), ("exponent (two largest)", tail)):
        cells = ["-" if slopes[k] is None else f"{slopes[k]:.2f}" for k in (*PHASES, "peak_mb")]
        lines.append(f"| {name} | " + " | ".join(cells) + " | | |")
    if len(rows) >= 2:
        last = rows[-1]
        grow = 10_000_000 / last["n"]
        t7 = last["total"] * grow ** (tail["total"] or 1)
        m7 = last["peak_mb"] * grow ** (tail["peak_mb"] or 1)
        lines.append(f"\nAt N = 10^7, by the two largest sizes' exponents: about "
                     f"{t7 / 60:.0f} min and {m7 / 1024:.1f} GB peak.")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, fits, out / "scaling.png")


def _plot(rows: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for phase in PHASES:
        values = [max(r[phase], 1e-3) for r in rows]
        label = phase if fits[phase] is None else f"{phase} (slope {fits[phase]:.2f})"
        ax_t.plot(ns, values, marker="o", label=label)
    ax_t.set(xscale="log", yscale="log", xlabel="people (N)", ylabel="seconds",
             title="Time per phase")
    ax_t.legend(fontsize=7)
    ax_m.plot(ns, [r["peak_mb"] for r in rows], marker="o",
              label=f"run, whole process tree (slope {fits['peak_mb'] or 0:.2f})")
    ax_m.plot(ns, [r["report_peak_mb"] for r in rows], marker="s", label="report")
    ax_m.set(xscale="log", yscale="log", xlabel="people (N)", ylabel="peak PSS, MB",
             title="Peak memory")
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--set", dest="assignments", action="append", default=[],
                    help="passed to every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [x for a in args.assignments for x in ("--set", a)]
    rows = [measure(int(n), args.out.resolve(), extra) for n in args.sizes.split(",")]
    write_outputs(rows, args.out)


if __name__ == "__main__":
    main()
