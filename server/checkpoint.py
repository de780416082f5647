"""The authority's checkpoint: everything needed to continue a run after a crash.

Written after every round, atomically (temporary file + rename), without pickle: arrays in an
.npz, everything else as JSON. It records the ledger's length at that point, so a resumed run
drops ledger lines written after it and neither double-counts nor loses a step.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crypto.at_rest import Keystore, decrypt, encrypt
from crypto.private_files import write_atomic

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "authority.npz"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another configuration."""


@dataclass
class TrainState:
    """Where training stands after a round."""

    next_chunk: int = 0
    trip: int = 0
    steps: int = 0
    stopped_by_cap: bool = False
    history: list[dict] = field(default_factory=list)
    silo_seconds: dict[str, float] = field(default_factory=dict)
    privacy_spent: int = 0
    privacy_round_steps: int = 0
    # Arrays: the chunk whose gradients the silos have not applied yet, and the bias model.
    done_plan: np.ndarray | None = None
    done_sizes: np.ndarray | None = None
    done_grad: np.ndarray | None = None
    transcript_releases: np.ndarray | None = None
    transcript_sampled: np.ndarray | None = None
    top: bytes = b""
    # Epoch selection (non-private runs, server/training.py): the best validation log loss so
    # far, its epoch and head, and whether the silos have yet to be told to keep that epoch.
    best_epoch: int = 0
    best_loss: float | None = None
    keep_pending: bool = False
    kept_top: bytes = b""

    _ARRAYS = ("done_plan", "done_sizes", "done_grad", "transcript_releases",
               "transcript_sampled")

    def meta(self) -> dict:
        out = asdict(self)
        for key in (*self._ARRAYS, "top", "kept_top"):
            out.pop(key)
        return out


@dataclass
class RunState:
    """What a run fixed before training: identity alignment, split and the labels gradients see."""

    run_key: str
    config: dict
    authority_rows: np.ndarray
    silo_rows: dict[str, np.ndarray]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y_view: np.ndarray
    overlap: dict[str, int] = field(default_factory=dict)
    prior: float = 0.5  # the DP estimate of the training default rate that starts the bias


RUN_FILE = "run.npz"  # written once: alignment, split, labels the gradients see


def remove(out_dir: Path) -> None:
    """Delete the checkpoint once the run's results are written: it holds the labels."""
    directory = out_dir / CHECKPOINT_DIR
    for name in (CHECKPOINT_FILE, RUN_FILE):
        (directory / name).unlink(missing_ok=True)
    if directory.exists() and not any(directory.iterdir()):
        directory.rmdir()


def path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE


def _write_npz(target: Path, store: Keystore | None = None, **arrays: np.ndarray) -> None:
    """Atomic; encrypted and bound to the file's name when a keystore is given."""
    target.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    data = buf.getvalue()
    if store is not None:
        data = encrypt(store, data, _context(target))
    write_atomic(target, data)


def _read_npz(source: Path, store: Keystore | None = None) -> dict[str, np.ndarray]:
    data = source.read_bytes()
    if store is not None:
        data = decrypt(store, data, _context(source))
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _context(path: Path) -> bytes:
    return f"fedscore/authority/checkpoint/{path.name}".encode()


def save_run(out_dir: Path, run: RunState, store: Keystore | None = None) -> None:
    """The parts of a run fixed before training, once."""
    meta = {"run_key": run.run_key, "config": run.config, "silos": list(run.silo_rows),
            "overlap": run.overlap, "prior": run.prior}
    _write_npz(
        out_dir / CHECKPOINT_DIR / RUN_FILE,
        store,
        meta=np.array(json.dumps(meta)),
        authority_rows=run.authority_rows,
        train_pos=run.train, val_pos=run.val, test_pos=run.test, y_view=run.y_view,
        **{f"silo_rows__{s}": rows for s, rows in run.silo_rows.items()},
    )


def save(out_dir: Path, state: TrainState, ledger_offset: int,
         store: Keystore | None = None) -> None:
    """Training state after a round (small: the run's fixed parts are in run.npz)."""
    meta = {"train": state.meta(), "ledger_offset": ledger_offset}
    arrays = {"top": np.frombuffer(state.top, dtype=np.uint8),
              "kept_top": np.frombuffer(state.kept_top, dtype=np.uint8)}
    for key in TrainState._ARRAYS:
        value = getattr(state, key)
        if value is not None:
            arrays[key] = value
    _write_npz(path(out_dir), store, meta=np.array(json.dumps(meta)), **arrays)


def load(out_dir: Path, config: dict, store: Keystore | None = None
         ) -> tuple[RunState, TrainState, int]:
    """The run and training state of `out_dir`, checked against `config`."""
    source, run_source = path(out_dir), out_dir / CHECKPOINT_DIR / RUN_FILE
    if not source.exists() or not run_source.exists():
        raise CheckpointError(
            f"{out_dir} has no checkpoint ({source}); it never finished a training round, "
            "so start a new run instead of resuming"
        )
    fixed = _read_npz(run_source, store)
    run_meta = json.loads(str(fixed.pop("meta")))
    if run_meta["config"] != config:
        changed = sorted(k for k in set(run_meta["config"]) | set(config)
                         if run_meta["config"].get(k) != config.get(k))
        raise CheckpointError(
            f"the checkpoint in {out_dir} was made with another configuration "
            f"(differs in {', '.join(changed)}); resume with the run's own config.json"
        )
    run = RunState(
        run_key=run_meta["run_key"],
        config=run_meta["config"],
        authority_rows=fixed["authority_rows"],
        silo_rows={s: fixed[f"silo_rows__{s}"] for s in run_meta["silos"]},
        train=fixed["train_pos"], val=fixed["val_pos"], test=fixed["test_pos"],
        y_view=fixed["y_view"],
        overlap=run_meta.get("overlap", {}),
        prior=float(run_meta.get("prior", 0.5)),
    )
    arrays = _read_npz(source, store)
    meta = json.loads(str(arrays.pop("meta")))
    state = TrainState(**meta["train"])
    state.top = arrays["top"].tobytes()
    state.kept_top = arrays["kept_top"].tobytes() if "kept_top" in arrays else b""
    for key in TrainState._ARRAYS:
        setattr(state, key, arrays.get(key))
    return run, state, int(meta["ledger_offset"])
