"""The run's published scores: `scores.parquet`, or `scores.parquet.enc` bound to the run.

Kept apart from server/authority.py so tools that only read or revise scores (fedscore score,
dispute, drift) do not import the training stack.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from crypto.at_rest import AtRestError, Keystore, read_encrypted, write_encrypted

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


def read_scores(out_dir: Path, keystore: str | Path | None) -> pd.DataFrame:
    """The scores a run wrote, decrypting them with the keystore at `keystore` when they are
    encrypted."""
    encrypted = out_dir / f"{SCORES_FILE}.enc"
    if not encrypted.exists():
        return pd.read_parquet(out_dir / SCORES_FILE)
    if not keystore:
        raise AtRestError(f"{encrypted} is encrypted; give the keystore it was written with")
    run_key = (out_dir / "run_key.txt").read_text().strip()
    data = read_encrypted(Keystore(Path(keystore)), encrypted, scores_context(run_key))
    return pd.read_parquet(io.BytesIO(data))
