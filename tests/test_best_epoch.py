"""Issue 20 item 5 for the vertical MLP: the epoch whose weights are scored (server/training.py)
and a silo's kept block (clients/silo/trainer.py). Fast: no engine."""

from __future__ import annotations

import numpy as np

from clients.protocol.model import ModelSpec
from clients.silo.trainer import SiloTrainer
from crypto.secret_random import SecretRandom
from server.checkpoint import RunState, TrainState, load, save, save_run
from server.training import _warn_if_diverged, diverged, improves, kept_record, selects_epoch


def _curve(*losses: float) -> list[dict]:
    return [{"epoch": e + 1, "val_auc": 0.8, "val_loss": loss} for e, loss in enumerate(losses)]


def test_the_first_of_the_best_epochs_is_kept():
    best, kept = None, 0
    for row in _curve(0.20, 0.17, 0.16, 0.16, 0.19):
        if improves(row["val_loss"], best):
            best, kept = row["val_loss"], row["epoch"]
    assert (kept, best) == (3, 0.16)


def test_the_record_names_the_kept_epoch_and_marks_its_row():
    history = _curve(0.20, 0.16, 0.19)
    record = kept_record(history, True, 2)
    assert (record["epoch"], record["val_loss"]) == (2, 0.16)
    assert (record["last_epoch"], record["last_val_loss"]) == (3, 0.19)
    assert [row.get("kept", False) for row in history] == [False, True, False]
    assert "best validation log loss" in record["rule"]


def test_a_dp_run_keeps_its_last_epoch_and_says_why():
    history = _curve(0.20, 0.16, 0.19)
    record = kept_record(history, False, 0)
    assert record["epoch"] == 3
    assert history[-1]["kept"]
    assert "kept" not in history[1]
    assert "private labels" in record["rule"]


def test_divergence_is_a_fixed_relative_margin_above_the_best():
    assert diverged(_curve(0.20, 0.16, 0.19))["epoch"] == 2
    assert diverged(_curve(0.20, 0.16, 0.165)) is None  # within 5 %
    assert diverged(_curve(0.20, 0.18, 0.16)) is None
    assert diverged(_curve(0.2)) is None


def test_a_dp_run_that_went_past_its_best_names_the_settings_to_lower(caplog):
    _warn_if_diverged(_curve(0.20, 0.16, 0.165))
    assert not caplog.records
    _warn_if_diverged(_curve(0.20, 0.16, 0.19))
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "epoch 2" in record.getMessage()
    assert "train.epochs" in record.getMessage()
    assert "train.lr" in record.getMessage()


def test_only_a_run_without_dp_noise_selects_its_epoch():
    assert selects_epoch(ModelSpec())
    assert not selects_epoch(ModelSpec(noise_multiplier=1.0, expected_batch=64))
    assert not selects_epoch(ModelSpec(transcript_sigma=0.5))


def test_a_silo_keeps_its_block_through_its_saved_state():
    """The kept weights travel in the trainer's bytes (every round's checkpoint), so a silo
    restarted from them restores the same block an uninterrupted one would."""
    spec = ModelSpec(hidden=(4,), lr=0.05, seed=0)
    trainer = SiloTrainer(3, spec, random=SecretRandom(b"k" * 32), run_key="r")
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    before = trainer.contributions(x)
    trainer.keep()
    for _ in range(5):
        trainer.replay([x], [np.ones(40, dtype=np.float32)])
    assert not np.allclose(trainer.contributions(x), before)
    again = SiloTrainer(3, spec, random=SecretRandom(b"k" * 32), run_key="r")
    again.load_bytes(trainer.to_bytes())
    again.restore()
    np.testing.assert_array_equal(again.contributions(x), before)
    fresh = SiloTrainer(3, spec, random=SecretRandom(b"k" * 32), run_key="r")
    fresh.load_bytes(fresh.to_bytes())
    assert fresh.kept is None


def test_the_authority_checkpoint_holds_the_best_epoch_state(tmp_path):
    state = TrainState(best_epoch=4, best_loss=0.159, keep_pending=True, kept_top=b"head",
                       top=b"top")
    run = RunState(run_key="r", config={}, authority_rows=np.arange(3), silo_rows={},
                   train=np.arange(1), val=np.arange(1), test=np.arange(1), y_view=np.zeros(3))
    save_run(tmp_path, run)
    save(tmp_path, state, 0)
    _, loaded, _ = load(tmp_path, {})
    assert (loaded.best_epoch, loaded.best_loss, loaded.keep_pending) == (4, 0.159, True)
    assert (loaded.kept_top, loaded.top) == (b"head", b"top")
