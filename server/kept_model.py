"""What the authority keeps of a tree or scorecard run to score people again after it
(`fedscore score`, `fedscore dispute`, `fedscore serve`; server/rescore_kept.py uses it).

An MLP run's model lives in the silos' checkpoints plus the authority's bias and calibration
(authority.json). A tree run's model is mostly the authority's: each split's (silo, column,
bin) and every node's value; a scorecard's is each silo's coefficients over its WoE columns.
Both are written at the end of the run, beside the scores, in `model.json.enc` (bound to the
run key, encrypted with the authority's keystore) or `model.json` (0600) without one. Nothing
in it is new to the authority, and nothing in it is a silo's threshold: the bins' edges and
the WoE tables stay with the silos (clients/silo/kept_state.py).

Tree file: base margin, each silo's column count, per tree its splits [node, silo, column,
bin] and every node's value by heap index (a leaf's released value, an inner node's value as
the run credited it: server/gbdt_reasons.py), and the silos' feature names when they
consented to reason codes. Scorecard file: per silo its coefficients (the fitted, uncalibrated
ones the run sent with `query.scorecard_score`) and the intercept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from crypto.at_rest import Keystore, write_encrypted
from crypto.private_files import replace_private
from server import gbdt
from server.gbdt_reasons import FeatureNames
from server.scores_file import _read_private, record_run

KEPT_FILE = "model.json"
KINDS = ("gbdt", "scorecard")


class KeptModelError(ValueError):
    """A kept model that is missing or does not fit its run."""


def kept_context(run_key: str) -> bytes:
    return f"fedscore/{run_key}/authority/{KEPT_FILE}".encode()


def tree_record(base_margin: float, trees: Sequence[gbdt.Tree],
                values: Sequence[np.ndarray], widths: Mapping[str, int],
                names: Mapping[str, FeatureNames]) -> dict:
    """A tree model as the file holds it; `values[t]` tree t's node values by heap index."""
    if len(trees) != len(values):
        raise ValueError("one array of node values per tree")
    return {
        "kind": "gbdt", "base_margin": float(base_margin),
        "widths": {s: int(w) for s, w in widths.items()},
        "trees": [{"splits": [[int(n), s.silo, int(s.feature), int(s.bin)]
                              for n, s in sorted(tree.splits.items())],
                   "values": [float(v) for v in np.asarray(value, dtype=np.float64)]}
                  for tree, value in zip(trees, values, strict=True)],
        "names": {s: {"features": list(n.features), "columns": [int(c) for c in n.columns]}
                  for s, n in names.items()},
    }


def scorecard_record(coef: Mapping[str, np.ndarray], intercept: float) -> dict:
    return {"kind": "scorecard", "intercept": float(intercept),
            "coef": {s: [float(c) for c in np.asarray(v, dtype=np.float64)]
                     for s, v in coef.items()}}


def write_kept(out_dir: Path, record: dict, store: Keystore | None, run_key: str) -> None:
    data = json.dumps(record).encode()
    if store is None:
        replace_private(out_dir / KEPT_FILE, data)
        return
    record_run(store, out_dir, run_key)
    write_encrypted(store, out_dir / f"{KEPT_FILE}.enc", data, kept_context(run_key))


def unsupported_record(kind: str, why: str) -> dict:
    """What a run keeps when scoring after it is not possible, and why (read_kept says so)."""
    return {"kind": kind, "unsupported": why}


def read_kept(out_dir: Path, keystore: str | Path | None, kind: str) -> dict:
    """The kept model of a `kind` run; KeptModelError when the run did not keep one."""
    if (out_dir / KEPT_FILE).exists():
        data = (out_dir / KEPT_FILE).read_bytes()
    elif (out_dir / f"{KEPT_FILE}.enc").exists():
        data = _read_private(out_dir, keystore, f"{KEPT_FILE}.enc", kept_context)
    else:
        raise KeptModelError(f"{out_dir} keeps no {kind} model ({KEPT_FILE}): it was made by "
                             "an older fedscore that scored its people only once; run it again")
    record = json.loads(data)
    if record.get("unsupported"):
        raise KeptModelError(f"{out_dir} cannot be scored after the run: {record['unsupported']}")
    if record.get("kind") != kind:
        raise KeptModelError(f"{out_dir}/{KEPT_FILE} holds a {record.get('kind')!r} model, "
                             f"not the run's {kind!r}")
    return record


def trees_of(record: dict) -> tuple[list[gbdt.Tree], list[np.ndarray]]:
    """The trees (splits; leaves with their values) and each tree's node values by heap
    index, from a tree record."""
    trees, values = [], []
    for saved in record["trees"]:
        value = np.asarray(saved["values"], dtype=np.float64)
        splits = {int(n): gbdt.Split(silo=str(s), feature=int(f), bin=int(b))
                  for n, s, f, b in saved["splits"]}
        leaves = _leaves(splits, len(value))
        trees.append(gbdt.Tree(splits=splits, leaves={n: float(value[n]) for n in leaves}))
        values.append(value)
    return trees, values


def _leaves(splits: Mapping[int, gbdt.Split], size: int) -> list[int]:
    """The heap indices of a tree's leaves: the children of its splits that are no splits
    themselves (the root alone without splits)."""
    if not splits:
        return [0]
    leaves = [c for n in splits for c in (2 * n + 1, 2 * n + 2) if c not in splits]
    if max(leaves) >= size:
        raise KeptModelError("a kept tree has a leaf without a value")
    return sorted(leaves)


def names_of(record: dict) -> dict[str, FeatureNames]:
    return {s: FeatureNames([str(f) for f in n["features"]],
                            np.asarray(n["columns"], dtype=np.int64))
            for s, n in record.get("names", {}).items()}
