"""A finished run's or sweep's results as pandas objects, for notebooks and scripts
(`fedscore.load_run`, `fedscore.load_sweep`).

The files are read by the report's readers (report/load.py) and the scores by the authority's
own reader (server/scores_file.py), so the Python API, the report and the CLI agree on what a
run directory holds and refuse the same broken ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from crypto.at_rest import AtRestError
from server.scores_file import read_scores
from simulations.data.paths import run_keystore
from simulations.report.load import Curves, ReportError, RunData, detect_kind
from simulations.report.load import load_run as read_run_dir
from simulations.report.load import load_sweep as read_sweep_dir

# What every ledger line carries: its number (server/ledger.py), the party, budget and round
# of the step, and the epsilon it spent.
LEDGER_COLUMNS = ("seq", "party", "budget", "round", "epsilon")


@dataclass(frozen=True)
class RunResults:
    """One finished run directory. The small JSON files are read and checked when the run is
    loaded; the frames are built on first use and kept; the scores are decrypted only when
    `scores` is first read (they are the one large, encrypted file)."""

    path: Path
    keystore: Path | None = field(default=None, repr=False)
    _data: RunData = field(repr=False, compare=False, kw_only=True)

    @property
    def config(self) -> dict:
        """config.json: every configuration key of the run (dotted names), as a dict."""
        return self._data.config

    @property
    def manifest(self) -> dict:
        """manifest.json: versions, hashes and files of the run, as a dict."""
        return self._data.manifest

    @cached_property
    def metrics(self) -> pd.Series:
        """metrics.json flattened into one Series indexed by dotted names (`auc`,
        `seconds.train`, `tiers.good`, ...); `to_frame().T` gives a row to concatenate across
        runs."""
        row = pd.json_normalize(self._data.metrics, sep=".").iloc[0]
        return row.rename(self.path.name)

    @cached_property
    def ledger(self) -> pd.DataFrame:
        """ledger.jsonl, one row per privacy-ledger entry (party, budget, mechanism, epsilon,
        delta, ...) in the order they were spent; no rows for a run without differential
        privacy, which writes no ledger."""
        if self._data.ledger is None:
            return pd.DataFrame(columns=list(LEDGER_COLUMNS))
        return pd.DataFrame(self._data.ledger)

    @cached_property
    def curves(self) -> Curves:
        """curves.json as frames: `roc` (fpr, tpr), `ks`, `histogram`, `calibration`,
        `contributions`, `reasons`; a part the run did not compute is None."""
        if self._data.curves is None:
            raise ReportError(f"{self.path / 'curves.json'} is missing; a finished run writes "
                              "it: restore it from the run or re-run it")
        return self._data.curves

    @cached_property
    def scores(self) -> pd.DataFrame:
        """The published scores (one row per scored person: probability, score, tier,
        reasons...), decrypted with the run's keystore when they rest encrypted."""
        try:
            return read_scores(self.path, self.keystore)
        except (AtRestError, FileNotFoundError) as exc:
            raise ReportError(f"the scores of {self.path} cannot be read ({exc}); pass "
                              "load_run(path, keystore=...) the keystore the run was "
                              "written with") from None


def load_run(path: str | Path, keystore: str | Path | None = None) -> RunResults:
    """Load the finished run in `path` (the `--out` of `fedscore run`, or a sweep's
    `runs/<cell>`). `keystore` overrides the one the run records (`<parties>.keys` by
    default), e.g. after moving it. A ReportError names the fix for a directory that is not a
    finished run."""
    run_dir = Path(path).resolve()
    if detect_kind(run_dir) == "sweep":
        raise ReportError(f"{run_dir} is a sweep directory; load one of its runs, "
                          f"e.g. {run_dir / 'runs'}/<cell>, or read its summary.csv")
    if not (run_dir / "metrics.json").is_file():
        raise ReportError(f"{run_dir} is not a finished run (no metrics.json): it is still "
                          f"running or was interrupted; resume it with "
                          f"`fedscore run --resume {run_dir}`")
    data = read_run_dir(run_dir)
    store = Path(keystore) if keystore is not None else _recorded_keystore(run_dir)
    return RunResults(run_dir, store, _data=data)


def _recorded_keystore(run_dir: Path) -> Path | None:
    try:
        return run_keystore(run_dir)
    except (FileNotFoundError, KeyError):
        # No run.json (a `flwr run .` run): scores only readable with an explicit keystore.
        return None


@dataclass(frozen=True)
class SweepResults:
    """A sweep directory (`fedscore sweep --out`): sweep.json as `config`, sweep.csv (one row
    per cell) as `runs`, summary.csv (per grid point: means, intervals, paired differences) as
    `summary`; `run(name)` loads one cell as a RunResults."""

    path: Path
    config: dict
    runs: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)

    def run(self, name: str, keystore: str | Path | None = None) -> RunResults:
        """The cell `name` (sweep.csv's `run` column), e.g. `eps=1_seed=0`."""
        if name not in set(self.runs["run"].astype(str)):
            raise ReportError(f"{self.path} has no cell {name!r}; its cells are listed in "
                              "the `run` column of sweep.csv")
        return load_run(self.path / "runs" / name, keystore)


def load_sweep(path: str | Path) -> SweepResults:
    """Load the sweep in `path`, checked as `fedscore report` checks it."""
    sweep_dir = Path(path).resolve()
    if detect_kind(sweep_dir) != "sweep":
        raise ReportError(f"{sweep_dir} is a run directory; load it with load_run")
    data = read_sweep_dir(sweep_dir)
    return SweepResults(sweep_dir, data.config, data.runs, data.summary)
