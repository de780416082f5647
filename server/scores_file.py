"""The run's published scores: `scores.parquet`, or `scores.parquet.enc` bound to the run.

Kept apart from server/authority.py so tools that only read or revise scores (fedscore score,
dispute, drift) do not import the training stack.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from crypto.at_rest import AtRestError, Keystore, read_encrypted, write_encrypted
from crypto.private_files import write_private

PEPPER_FILE = "pepper.key"
SCORES_FILE = "scores.parquet"


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
    write_encrypted(store, out_dir / f"{SCORES_FILE}.enc", buf.getvalue(),
                    scores_context(run_key))
    (out_dir / "run_key.txt").write_text(run_key + "\n")


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
    run_key = (out_dir / "run_key.txt").read_text().strip()
    return read_encrypted(Keystore(Path(keystore)), encrypted, context(run_key))
