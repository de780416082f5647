"""The run's published scores: `scores.parquet`, or `scores.parquet.enc` bound to the run.

Kept apart from the run (server/authority.py; server/run_results.py writes the scores) so tools
that only read or revise scores (fedscore score, dispute, drift) do not import the training
stack.

Which run a directory holds is the authority's record, not a file beside the ciphertext: when
it writes a run's encrypted files, the authority records the run key in its keystore,
`<keystore>/runs/<run id>.json`, where the run id is a digest of the run directory's path
relative to the keystore. A reader takes the run key from there, so another run's scores
copied in (with anything else of that run's directory) fail authentication. Copying a run
together with its keystore, keeping their relative places, keeps it readable; moving the run
alone does not (move it back, or keep it beside its keystore).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from crypto.at_rest import AtRestError, Keystore, read_encrypted, write_encrypted
from crypto.private_files import ensure_private_dir, write_atomic, write_private

log = logging.getLogger(__name__)

PEPPER_FILE = "pepper.key"
SCORES_FILE = "scores.parquet"
RUNS_DIR = "runs"


def run_id(keystore: Path, out_dir: Path) -> str:
    """The name of a run's record in the keystore: the run directory's place relative to the
    keystore (stable when both are copied together), digested to a file name."""
    where = os.path.relpath(Path(out_dir).resolve(), Path(keystore).resolve())
    return hashlib.sha256(where.encode()).hexdigest()[:32]


def record_path(keystore: Path, out_dir: Path) -> Path:
    return Path(keystore) / RUNS_DIR / f"{run_id(keystore, out_dir)}.json"


def record_run(store: Keystore, out_dir: Path, run_key: str) -> None:
    """Record in the authority's keystore that `out_dir` holds run `run_key`. Fields other
    writers add to the record are kept."""
    path = record_path(store.path, out_dir)
    ensure_private_dir(path.parent, "the keystore's run records")
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("run_key") not in (None, run_key):
        # A new run in a directory that held another one (claim_run_dir refuses a non-empty
        # one, so the old run was deleted): the keystore now vouches for the new run.
        log.info("run record %s: a new run replaces the one recorded", path.name)
    record.update({"run_key": run_key, "run_dir": str(Path(out_dir).resolve())})
    write_atomic(path, json.dumps(record, indent=2) + "\n")


def recorded_run_key(store: Keystore, out_dir: Path) -> str:
    """The run key the authority recorded for `out_dir` (record_run)."""
    path = record_path(store.path, out_dir)
    try:
        run_key = json.loads(path.read_text())["run_key"]
    except FileNotFoundError:
        raise AtRestError(
            f"the keystore {store.path} has no record of a run in {out_dir}: encrypted run "
            "files are read where their run wrote them, with the keystore it used (a run moved "
            "away from its keystore: move it back, or copy both keeping their relative places)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AtRestError(f"the run record {path} is damaged; restore the keystore from "
                          "backup") from None
    if not isinstance(run_key, str) or not run_key:
        raise AtRestError(f"the run record {path} is damaged; restore the keystore from backup")
    return run_key


def scores_context(run_key: str) -> bytes:
    return f"fedscore/{run_key}/authority/{SCORES_FILE}".encode()


def write_scores(out_dir: Path, scores: pd.DataFrame, store: Keystore | None, run_key: str
                 ) -> None:
    """scores.parquet, or scores.parquet.enc bound to this run when a keystore is in use."""
    if store is None:
        scores.to_parquet(out_dir / SCORES_FILE, index=False)
        return
    buf = io.BytesIO()
    scores.to_parquet(buf, index=False)
    record_run(store, out_dir, run_key)
    write_encrypted(store, out_dir / f"{SCORES_FILE}.enc", buf.getvalue(),
                    scores_context(run_key))


def read_scores(out_dir: Path, keystore: str | Path | None, with_split: bool = False
                ) -> pd.DataFrame:
    """The scores a run wrote, decrypting them with the keystore at `keystore` when they are
    encrypted. `with_split` adds the authority's private split per position (the experiment
    layer's evaluation; the published scores carry none)."""
    encrypted = out_dir / f"{SCORES_FILE}.enc"
    if not encrypted.exists():
        scores = pd.read_parquet(out_dir / SCORES_FILE)
    else:
        data = _read_private(out_dir, keystore, f"{SCORES_FILE}.enc", scores_context)
        scores = pd.read_parquet(io.BytesIO(data))
    if with_split:
        scores["split"] = read_split(out_dir, keystore)
    return scores


# The authority's private record of who was trained, validated and tested. Not a release: the
# split is drawn from the authority's secret randomness and never shown to silos or in scores.
SPLIT_FILE = "split.npy"


def split_context(run_key: str) -> bytes:
    return f"fedscore/{run_key}/authority/{SPLIT_FILE}".encode()


def write_split(out_dir: Path, names: np.ndarray, store: Keystore | None, run_key: str) -> None:
    buf = io.BytesIO()
    np.save(buf, names.astype(np.int8), allow_pickle=False)
    if store is None:
        write_private(out_dir / SPLIT_FILE, buf.getvalue())
        return
    record_run(store, out_dir, run_key)
    write_encrypted(store, out_dir / f"{SPLIT_FILE}.enc", buf.getvalue(), split_context(run_key))


def read_split(out_dir: Path, keystore: str | Path | None) -> pd.Categorical:
    """The split name per position ("train", "val", "test")."""
    if (out_dir / SPLIT_FILE).exists():
        data = (out_dir / SPLIT_FILE).read_bytes()
    else:
        data = _read_private(out_dir, keystore, f"{SPLIT_FILE}.enc", split_context)
    codes = np.load(io.BytesIO(data), allow_pickle=False)
    return pd.Categorical.from_codes(codes, ("train", "val", "test"))


def _read_private(out_dir: Path, keystore: str | Path | None, name: str, context) -> bytes:
    encrypted = out_dir / name
    if not keystore:
        raise AtRestError(f"{encrypted} is encrypted; give the keystore it was written with")
    store = Keystore(Path(keystore))
    # The run key comes from the authority's record, never from the run directory: a file
    # there (the old run_key.txt) could be copied in along with another run's scores.
    return read_encrypted(store, encrypted, context(recorded_run_key(store, out_dir)))


def gated(scores: pd.DataFrame, gate: pd.DataFrame, eligible: np.ndarray) -> pd.DataFrame:
    """`status` (scored / ineligible) and the reasons; no score, tier or points for people who
    fail the opening conditions."""
    out = scores.copy()
    out["status"] = pd.Categorical.from_codes((~eligible).astype(np.int8),
                                              ["scored", "ineligible"])
    out["ineligible_reason"] = gate["reason"].to_numpy()
    out["ineligible_reason_zh"] = gate["reason_zh"].to_numpy()
    out["score"] = pd.array(np.where(eligible, out["score"], 0), dtype="Int16")
    out.loc[~eligible, "score"] = pd.NA
    hidden = ["probability", "tier"] + [c for c in out if c.startswith(("points_", "reason_"))]
    out.loc[~eligible, hidden] = np.nan
    return out
