"""The Python API (`import fedscore`): the loader against the suite's small run, its refusals,
and the example of docs/python-api.md, executed as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import fedscore
from tests import background
from tests.conftest import scores_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"

# Appended to the docs example: what each object it loaded is, for the test to check.
DESCRIBE = """
import json as _json
print("DESCRIBE " + _json.dumps({
    name: {"type": type(value).__name__, "rows": len(value),
           "columns": list(value.index if name == "metrics" else value.columns)}
    for name, value in {"metrics": metrics, "ledger": ledger, "roc": roc,
                        "scores": scores}.items()
}))
"""


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/python-api.md should hold exactly one python example"
    return blocks[0]


def test_every_exported_name_resolves_to_its_definition():
    from simulations.report import load, results

    assert fedscore.load_run is results.load_run
    assert fedscore.ReportError is load.ReportError
    assert set(fedscore.__all__) <= set(dir(fedscore))
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = fedscore.nonsense


def test_a_directory_that_is_no_run_is_refused_with_the_fix(tmp_path: Path):
    with pytest.raises(fedscore.ReportError, match="neither a run directory"):
        fedscore.load_run(tmp_path)
    with pytest.raises(fedscore.ReportError, match="not a directory"):
        fedscore.load_run(tmp_path / "missing")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text("{}")
    with pytest.raises(fedscore.ReportError, match="is a sweep directory; load one of its runs"):
        fedscore.load_run(sweep)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    (interrupted / "manifest.json").write_text("{}")
    with pytest.raises(fedscore.ReportError, match=r"not a finished run.*fedscore run --resume"):
        fedscore.load_run(interrupted)


@pytest.mark.slow
def test_load_run_gives_the_run_files_as_pandas(small_run: Path):
    run = fedscore.load_run(small_run)
    metrics = json.loads((small_run / "metrics.json").read_text())
    assert run.metrics["auc"] == metrics["auc"]
    assert run.metrics["seconds.total"] == metrics["seconds"]["total"]
    assert run.config == json.loads((small_run / "config.json").read_text())
    # small_run has no differential privacy: no ledger file, an empty ledger with its columns.
    assert not (small_run / "ledger.jsonl").exists()
    assert run.ledger.empty
    assert {"party", "budget", "epsilon"} <= set(run.ledger.columns)
    roc = run.curves.roc
    assert roc is not None
    assert list(roc.columns) == ["fpr", "tpr"]
    assert roc["fpr"].is_monotonic_increasing
    assert roc.iloc[-1].tolist() == [1.0, 1.0]
    # The scores rest encrypted; the loader finds the run's keystore as the suite's reader does.
    assert (small_run / "scores.parquet.enc").exists()
    pd.testing.assert_frame_equal(run.scores, scores_of(small_run))


@pytest.mark.slow
def test_scores_with_the_wrong_keystore_are_refused_with_the_fix(small_run: Path,
                                                                 tmp_path: Path):
    run = fedscore.load_run(small_run, keystore=tmp_path / "no-such-keystore")
    with pytest.raises(fedscore.ReportError, match="keystore=") as err:
        _ = run.scores
    assert str(small_run) in str(err.value)


@pytest.mark.slow
def test_a_run_missing_its_metrics_is_not_finished(small_run: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    (copy / "metrics.json").unlink()
    with pytest.raises(fedscore.ReportError, match="not a finished run"):
        fedscore.load_run(copy)


# The example trains: in the background while the suite runs (joining the lane's Ray head,
# as the foreground's engine runs join theirs).
background.register("docs_example", lambda work: [background.Command(
    (), program=(sys.executable, "-c", example_code() + DESCRIBE))])


@pytest.fixture
def docs_example(background_runs) -> subprocess.CompletedProcess:
    (proc,), _ = background_runs("docs_example")
    return proc


@pytest.mark.slow
def test_the_docs_example_runs_and_loads_pandas_frames(docs_example):
    proc = docs_example
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DESCRIBE "))
    seen = json.loads(line.removeprefix("DESCRIBE "))
    assert seen["metrics"]["type"] == "Series"
    assert {"auc", "ks", "brier", "seconds.total"} <= set(seen["metrics"]["columns"])
    assert seen["ledger"]["type"] == "DataFrame"
    assert seen["ledger"]["rows"] > 0  # label DP at its default budget spends
    assert {"party", "budget", "mechanism", "epsilon"} <= set(seen["ledger"]["columns"])
    assert seen["roc"] == {"type": "DataFrame", "rows": seen["roc"]["rows"],
                           "columns": ["fpr", "tpr"]}
    assert seen["scores"]["type"] == "DataFrame"
    assert seen["scores"]["rows"] > 0
    assert {"probability", "score", "tier"} <= set(seen["scores"]["columns"])
    assert "auc" in proc.stdout  # the example's own prints
