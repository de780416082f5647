"""The authority's checkpoint: everything needed to continue a run after a crash.

Written after every round, atomically (temporary file + rename), without pickle: arrays in an
.npz, everything else as JSON. It records the ledger's length at that point, so a resumed run
drops ledger lines written after it and neither double-counts nor loses a step.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

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
    privacy_history: list[list[float]] = field(default_factory=list)
    privacy_spent: int = 0
    privacy_round_steps: int = 0
    # Arrays: the chunk whose gradients the silos have not applied yet, and the bias model.
    done_plan: np.ndarray | None = None
    done_sizes: np.ndarray | None = None
    done_grad: np.ndarray | None = None
    top: bytes = b""

    _ARRAYS = ("done_plan", "done_sizes", "done_grad")

    def meta(self) -> dict:
        out = asdict(self)
        for key in (*self._ARRAYS, "top"):
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


def remove(out_dir: Path) -> None:
    """Delete the checkpoint once the run's results are written: it holds the labels."""
    target = path(out_dir)
    target.unlink(missing_ok=True)
    if target.parent.exists() and not any(target.parent.iterdir()):
        target.parent.rmdir()


def path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_DIR / CHECKPOINT_FILE


def save(out_dir: Path, run: RunState, state: TrainState, ledger_offset: int) -> None:
    target = path(out_dir)
    target.parent.mkdir(exist_ok=True)
    meta = {
        "run_key": run.run_key,
        "config": run.config,
        "silos": list(run.silo_rows),
        "overlap": run.overlap,
        "train": state.meta(),
        "ledger_offset": ledger_offset,
    }
    arrays = {
        "authority_rows": run.authority_rows,
        "train_pos": run.train, "val_pos": run.val, "test_pos": run.test,
        "y_view": run.y_view,
        "top": np.frombuffer(state.top, dtype=np.uint8),
        **{f"silo_rows__{s}": rows for s, rows in run.silo_rows.items()},
    }
    for key in TrainState._ARRAYS:
        value = getattr(state, key)
        if value is not None:
            arrays[key] = value
    tmp = target.with_suffix(".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps(meta)), **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def load(out_dir: Path, config: dict) -> tuple[RunState, TrainState, int]:
    """The run and training state of `out_dir`, checked against `config`."""
    source = path(out_dir)
    if not source.exists():
        raise CheckpointError(
            f"{out_dir} has no checkpoint ({source}); it never finished a training round, "
            "so start a new run instead of resuming"
        )
    with np.load(source, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays.pop("meta")))
    if meta["config"] != config:
        changed = sorted(k for k in set(meta["config"]) | set(config)
                         if meta["config"].get(k) != config.get(k))
        raise CheckpointError(
            f"the checkpoint in {out_dir} was made with another configuration "
            f"(differs in {', '.join(changed)}); resume with the run's own config.json"
        )
    run = RunState(
        run_key=meta["run_key"],
        config=meta["config"],
        authority_rows=arrays["authority_rows"],
        silo_rows={s: arrays[f"silo_rows__{s}"] for s in meta["silos"]},
        train=arrays["train_pos"], val=arrays["val_pos"], test=arrays["test_pos"],
        y_view=arrays["y_view"],
        overlap=meta.get("overlap", {}),
    )
    state = TrainState(**meta["train"])
    state.top = arrays["top"].tobytes()
    for key in TrainState._ARRAYS:
        setattr(state, key, arrays.get(key))
    return run, state, int(meta["ledger_offset"])
