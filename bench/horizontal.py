"""Issue 9's acceptance figures: the horizontal topology on the default population.

Runs `fedscore run` (as a user would, each in a fresh process) for:
  - 5 regions, non-private, and at sample-level eps = 1 (default skew 0.5);
  - region_skew 0 and 1 at eps = 1 (the skew's effect);
  - FedProx at eps = 1, skew 1;
  - user-level DP at eps = 1 and eps = 8 (server-side clipping);
  - the vertical topology at eps = 1 and non-private, for the comparison at equal epsilon;
then `fedscore compare` over all of them. Writes horizontal.csv and horizontal.md into --out.

`eps_max` is the largest epsilon the run spent, and `eps_scope` says which: under sample-level DP
each region's epsilon is per region (one customer of that region), under user-level DP one
epsilon covers a whole region's contribution (add/remove), against everyone but the server.
Every run draws its samples and noise from the parties' secrets (fresh keystores per --out), so
two --out directories give two draws of the noise; one directory reruns identically.

    .venv/bin/python bench/horizontal.py --out /tmp/horizontal [--users 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

RUNS = {
    "h_nonprivate": ["topology=horizontal", "privacy.epsilon=inf"],
    "h_eps1": ["topology=horizontal"],
    "h_eps1_skew0": ["topology=horizontal", "population.region_skew=0"],
    "h_eps1_skew1": ["topology=horizontal", "population.region_skew=1"],
    "h_eps1_skew1_fedprox": ["topology=horizontal", "population.region_skew=1",
                             "horizontal.strategy=fedprox"],
    "h_user_eps1": ["topology=horizontal", "horizontal.dp=user"],
    "h_user_eps8": ["topology=horizontal", "horizontal.dp=user", "privacy.epsilon=8"],
    "v_eps1": [],
    "v_nonprivate": ["privacy.epsilon=inf"],
}


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table, numbers to 4 decimals (no extra dependency)."""
    def cell(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--only", default="", help="comma-separated run names")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(out / ".flwr"), "COLUMNS": "120"}
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    rows = []
    for name in names:
        run = out / name
        if not (run / "metrics.json").exists():
            skew = next((s for s in RUNS[name] if s.startswith("population.")), "skew-default")
            parties = out / ("parties-h-" + skew.split("=")[-1] if name.startswith("h") else
                             "parties-v")
            cmd = [sys.executable, "-m", "simulations.cli", "run", "--out", str(run),
                   "--parties", str(parties), "--users", str(args.users)]
            for item in RUNS[name]:
                cmd += ["--set", item]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        m = json.loads((run / "metrics.json").read_text())
        eps = m["epsilon"]
        spent = [v for v in eps["model"].values() if v is not None]
        if eps.get("user") is not None:
            spent.append(eps["user"])
        rows.append({"run": name, "settings": " ".join(RUNS[name]) or "(defaults)",
                     "auc": m["auc"], "oracle_auc": m["oracle_auc"],
                     "central_auc": m["baseline_central_auc"],
                     "central_dp_auc": m["baseline_central_dp_auc"],
                     "gap_to_oracle": m["gap_to_oracle"], "gap_to_central": m["gap_to_central"],
                     "eps_max": max(spent) if spent else None,
                     "eps_scope": ("user (a whole region)" if eps.get("user") is not None
                                   else "per region (one customer)" if spent else "-"),
                     "seconds": m["seconds"]["total"],
                     "region_default_rates": " ".join(
                         f"{r['default_rate']:.3f}" for r in m.get("regions", [])),
                     "region_auc_global": " ".join(
                         f"{r['auc_global']:.3f}" for r in m.get("regions", [])),
                     "region_auc_alone": " ".join(
                         f"{r['auc_alone']:.3f}" for r in m.get("regions", []))})
    table = pd.DataFrame(rows)
    table.to_csv(out / "horizontal.csv", index=False)
    (out / "horizontal.md").write_text(markdown(table))
    print(table.drop(columns=["region_default_rates", "region_auc_global", "region_auc_alone"])
          .to_string(index=False))
    subprocess.run([sys.executable, "-m", "simulations.cli", "compare",
                    *[str(out / n) for n in names if (out / n / "metrics.json").exists()],
                    "--out", str(out / "compare"), "--force"],  # this bench's own report
                   env=env, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
