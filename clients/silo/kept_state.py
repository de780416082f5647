"""What a silo keeps of a tree or scorecard run so that it can score people after the run
(`query.resume`, then `query.gbdt_route` or `query.scorecard_score` in a new session).

During a run the trees' and the scorecard's state lives in the node's Flower state, which ends
with the session. The silo writes it to the run's checkpoint directory
(<silo dir>/checkpoints/<run key>/, encrypted with its keystore when it has one) as it takes
it, and `query.resume` puts it back:

  gbdt.json        the run's bins, units and binning (query.gbdt_start)
  gbdt_rows.npy    the training positions the bins were fitted on
  gbdt_edges.npz   with binning=quantile, each column's bin edges: the thresholds, in the
                   silo's own units. Kept rather than fitted again, so that a later
                   correction of a training person's record (a dispute) never moves a
                   threshold: routing after the run uses the run's own.
  scorecard_woe.npz the merged bins and WoE the authority sent (train.scorecard_woe)

None of it leaves the silo; the authority keeps its part (server/kept_model.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord

from clients.node import Node
from clients.protocol import messages as m
from clients.silo.gbdt import Binning
from clients.silo.state import checkpoint_dir, read_file, write_file

START_FILE = "gbdt.json"
ROWS_FILE = "gbdt_rows.npy"
EDGES_FILE = "gbdt_edges.npz"
WOE_FILE = "scorecard_woe.npz"
START_KEYS = ("run", "bins", "units", "binning")
EDGES = "gbdt_edges"  # node state: the kept edges, after a resume
WOE_STATE, WOE_RUN = "scorecard", "scorecard_run"  # clients/silo/scorecard_handlers.py's


def keep_start(node: Node, binning: Binning) -> None:
    """The run's tree start (node state `gbdt`, `gbdt_rows`) and its bins' edges, on disk."""
    cfg = m.config_record(node.state, "gbdt")
    run = str(cfg["run"])
    directory = checkpoint_dir(node, run)
    directory.mkdir(parents=True, exist_ok=True)
    positions = m.array_record(node.state, "gbdt_rows")["positions"].numpy()
    write_file(node, directory, START_FILE,
               json.dumps({k: cfg[k] for k in START_KEYS}).encode())
    write_file(node, directory, ROWS_FILE, _npz(positions=positions))
    edges = binning.edges or ()
    write_file(node, directory, EDGES_FILE, _npz(**{f"e{f}": e for f, e in enumerate(edges)}))


def keep_woe(node: Node, run: str, packed: dict[str, np.ndarray]) -> None:
    """The WoE tables of the run as `train.scorecard_woe` sent them (packed), on disk."""
    write_file(node, checkpoint_dir(node, run), WOE_FILE, _npz(**packed))


def restore(node: Node, directory: Path) -> bool:
    """Put back what the run kept (`query.resume`); whether it kept a tree start."""
    for key in ("gbdt", "gbdt_rows", "gbdt_grad", EDGES, WOE_STATE, WOE_RUN):
        if key in node.state:
            del node.state[key]
    if not any((directory / n).exists() for n in (START_FILE, f"{START_FILE}.enc")):
        return False
    start = json.loads(read_file(node, directory, START_FILE))
    node.state["gbdt"] = ConfigRecord({**{k: start[k] for k in START_KEYS}, "tree": -1})
    node.state["gbdt_rows"] = m.arrays(**_load(read_file(node, directory, ROWS_FILE)))
    edges = _load(read_file(node, directory, EDGES_FILE))
    if edges:
        node.state[EDGES] = m.arrays(**edges)
    if any((directory / n).exists() for n in (WOE_FILE, f"{WOE_FILE}.enc")):
        node.state[WOE_STATE] = m.arrays(**_load(read_file(node, directory, WOE_FILE)))
        node.state[WOE_RUN] = ConfigRecord({"run": str(start["run"])})
    return True


def held_binning(node: Node, bins: int) -> Binning | None:
    """The run's kept quantile edges after a resume (None: use the fitted binning)."""
    if EDGES not in node.state:
        return None
    held = m.array_record(node.state, EDGES)
    return Binning(bins, tuple(held[f"e{f}"].numpy() for f in range(len(held))))


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # numpy's stubs type **kwds as if one could be allow_pickle; these are all arrays.
    np.savez(buf, **cast(dict[str, Any], arrays))
    return buf.getvalue()


def _load(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as held:
        return {k: held[k] for k in held.files}
