"""fedscore's Python API: run an experiment or a sweep, and load a finished run into pandas.

    import fedscore

    cfg = fedscore.make_config({"train.epochs": 1}, users=1_000, seed=0)
    fedscore.run_experiment(cfg, out, fedscore.default_parties_dir(out))
    run = fedscore.load_run(out)
    run.metrics["auc"], run.ledger, run.curves.roc, run.scores
    fedscore.load_sweep(sweep_dir).summary   # a sweep: per grid point, paired differences

A walk-through is in docs/python-api.md. This package only re-exports: each name lives in
simulations/ (run/ for running, report/ for reading results). Names load on first use, so
`import fedscore` stays quick and reading results never imports the training engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.data.paths import default_parties_dir as default_parties_dir
    from simulations.report.load import Curves as Curves
    from simulations.report.load import ReportError as ReportError
    from simulations.report.results import RunResults as RunResults
    from simulations.report.results import SweepResults as SweepResults
    from simulations.report.results import load_run as load_run
    from simulations.report.results import load_sweep as load_sweep
    from simulations.run.config import ExperimentConfig as ExperimentConfig
    from simulations.run.config import make_config as make_config
    from simulations.run.experiment import run_experiment as run_experiment
    from simulations.run.grid import SweepSpec as SweepSpec
    from simulations.run.sweep import run_sweep as run_sweep

# public name -> the module that defines it
_EXPORTS = {
    "make_config": "simulations.run.config",
    "ExperimentConfig": "simulations.run.config",
    "default_parties_dir": "simulations.data.paths",
    "run_experiment": "simulations.run.experiment",
    "SweepSpec": "simulations.run.grid",
    "run_sweep": "simulations.run.sweep",
    "load_run": "simulations.report.results",
    "RunResults": "simulations.report.results",
    "load_sweep": "simulations.report.results",
    "SweepResults": "simulations.report.results",
    "Curves": "simulations.report.load",
    "ReportError": "simulations.report.load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedscore' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
