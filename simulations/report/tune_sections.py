"""The sections of a tune's report (`fedscore report TUNE_DIR`, a `fedscore tune --out`
directory): the candidates, how many runs drew each, the released run and the tuned epsilon
(simulations/run/tune.py). Then the released run's own sections, as for a run.

Only what the tune releases is shown: the candidates and the draws are data-independent (the
authority's secret stream, not the data), the chosen run is what Papernot and Steinke's theorem
covers. The other runs' scores and AUCs (tune_runs.csv) are the authority's own record and stay
out of the report, which is meant to be published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from simulations.report.blocks import Cards, Note, Section, Table, fmt
from simulations.report.load import ReportError, load_run
from simulations.report.run_sections import headline_run, run_sections

# simulations/run/tune_spec.py's file names (the report layer sits below the run layer).
TUNE_FILE = "tune.json"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class TuneData:
    directory: Path
    tune: dict  # tune.json: the spec and its plan
    summary: dict | None  # summary.json, the release; None until every run finished


def is_tune(directory: Path) -> bool:
    return (Path(directory) / TUNE_FILE).is_file()


def load_tune(directory: Path) -> TuneData:
    directory = Path(directory)
    try:
        tune = json.loads((directory / TUNE_FILE).read_text())
        path = directory / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{directory}: its tune files cannot be read ({exc}); repeat the "
                          "tune's command to finish it") from None
    if "plan" not in tune or "grid" not in tune:
        raise ReportError(f"{directory / TUNE_FILE} has no plan: not a tune `fedscore tune` "
                          "wrote")
    return TuneData(directory, tune, summary)


def tune_sections(data: TuneData) -> list[Section]:
    sections = [_tune_section(data)]
    chosen = (data.summary or {}).get("chosen")
    if chosen and Path(chosen["directory"]).is_dir():
        run = load_run(Path(chosen["directory"]))
        sections += [headline_run(run), *run_sections(run)]
    return sections


def _candidates(data: TuneData) -> pd.DataFrame:
    """Every candidate of the grid, with how many of the K runs drew it."""
    grid: dict[str, list] = data.tune["grid"]
    keys = sorted(grid)
    points = pd.MultiIndex.from_product([grid[k] for k in keys], names=keys).to_frame(
        index=False).astype(str)
    drawn = pd.Series(data.tune["plan"]["runs"], dtype=int).value_counts()
    points["runs drawn"] = [int(drawn.get(i, 0)) for i in range(len(points))]
    chosen = ((data.summary or {}).get("chosen") or {}).get("candidate") or {}
    points["released"] = [bool(chosen) and all(str(row[k]) == str(chosen.get(k)) for k in keys)
                          for _, row in points.iterrows()]
    return points


def _tune_section(data: TuneData) -> Section:
    plan, summary = data.tune["plan"], data.summary
    blocks: list = []
    if summary is None:
        blocks.append(Note(f"The tune has not finished ({plan['k']} runs planned): nothing is "
                           "released yet. Repeat its command to finish it."))
    else:
        eps, chosen = summary["epsilon"], summary.get("chosen")
        blocks.append(Cards([
            ("released run", chosen["run"] if chosen else "none (K = 0)"),
            ("tuned ε (accounted)", fmt(eps["total"])),
            ("asked ε", fmt(eps["asked"])),
            ("test AUC of the released run", fmt(chosen["test_auc"]) if chosen else "–"),
        ]))
    blocks.append(Table("tune_candidates", "Candidates and the runs drawn", _candidates(data),
                        note=("Each of the K runs drew a candidate at random from the "
                              "authority's secret stream; only the run with the lowest noisy "
                              "validation loss is released. The other runs' results are the "
                              "authority's record (tune_runs.csv), not part of this report.")))
    blocks.append(Table("tune_epsilon", "The tuned model's privacy", _epsilon_frame(data)))
    return Section("tune", "Tuning on private labels", blocks)


def _epsilon_frame(data: TuneData) -> pd.DataFrame:
    tune, plan = data.tune, data.tune["plan"]
    law = tune["law"]
    rows = [("asked total ε", tune["epsilon"]),
            ("planned total ε", plan["planned_total"]),
            ("each run's ε target (RDP)", plan["run_epsilon"]),
            ("δ", plan["delta"]),
            ("number of runs K", plan["k"]),
            ("law of K", f"{law['distribution']}, mean {law['mean']:g}"),
            ("score noise multiplier", tune["score_noise"]),
            ("training people planned on", plan["n_train"]),
            ("data", tune["assignments"].get("data") or "generated")]
    if data.summary is not None:
        eps = data.summary["epsilon"]
        chosen = data.summary.get("chosen") or {}
        rows = [("accounted total ε (from the runs' ledgers)", eps["total"]),
                ("within the asked total", data.summary["within_budget"]), *rows,
                ("theorem", eps.get("theorem")),
                ("label ε against the silos (K runs composed)", eps.get("label_against_silos")),
                ("released run's noisy validation loss", chosen.get("noisy_val_loss")),
                ("its noise std", chosen.get("score_noise_std"))]
    frame = pd.DataFrame(rows, columns=["quantity", "value"])
    frame["value"] = [fmt(v) if not isinstance(v, str) else v for v in frame["value"]]
    return frame
