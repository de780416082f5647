"""Vertical federated training: z = b + sum_k g_k(x_k) (`sum`), or an MLP over the silos'
embeddings (`concat`, server/top.py).

One Flower round trip per chunk of batches, never per mini-batch (each trip costs ~100 ms).
A `train.step` message carries the gradient for the previous chunk and the plan of the next:

    authority                                   silo k
    plan_c (positions of K batches)  ------->   g_k(x[plan_c])  at current weights
              <-------  contributions
    z = b + sum_k g_k ; dL/dz per row
    grad_c + plan_{c+1}              ------->   replay plan_c with grad_c (K optimiser steps),
                                                then contributions for plan_{c+1}

This is block-coordinate descent with staleness bounded by the chunk size: a batch's gradient
was computed from contributions made before the chunk's earlier batches were applied.

With DP-SGD, batches are Poisson samples (each training row independently with probability q),
every party clips per-sample gradients and adds noise (Opacus), and every party's accountant
advances one step per batch. The authority checks the budget cap before each chunk and refuses
the steps that would pass it.

Epoch selection (issue 20 item 5, no silent divergence): in a non-private run (no DP-SGD, no
transcript noise) the authority evaluates every epoch's weights on its validation people and
keeps the epoch with the best validation log loss: it keeps a copy of its head, and tells the
silos in the next `train.step` (`keep`) to keep a copy of their blocks, taken before that
step's gradients move them. After the last epoch's evaluation, one more read (`restore` when
an earlier epoch was better) puts every party back on the kept weights, and everything after
training (calibration, scores, reasons, the saved models) uses them. A DP run keeps its last
epoch: choosing on validation labels would be a selection on private labels that its ledger
does not account; it only warns when the last epoch's validation loss is clearly above the
best (a diagnostic on the validation curve, which is itself outside the ledger).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from clients.protocol import messages as m
from clients.protocol.accounting import History
from clients.protocol.model import ModelSpec
from crypto.masking import FRACTION_BITS, MAX_CONTRIBUTION, decode, ring_sum
from crypto.secret_random import SecretRandom
from server.checkpoint import TrainState
from server.config import TrainConfig
from server.explanations import Explained, parse
from server.federation import Federation, FederationError
from server.metrics import auc, log_loss
from server.privacy import PrivacyPlan
from server.top import BiasHead, MlpHead

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass
class TrainResult:
    bias: float
    logits: np.ndarray  # z for every position, after training
    history: list[dict] = field(default_factory=list)
    round_trips: int = 0
    steps: int = 0
    stopped_by_cap: bool = False
    silo_seconds: dict[str, float] = field(default_factory=dict)
    # Per silo: mean, mad, q10, q50, q90 of its contributions over everyone (sum mode only).
    contributions: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per silo: its reason codes for everyone, when asked for (server/explanations.py).
    explained: dict[str, Explained] = field(default_factory=dict)
    # Which epoch's weights the result holds, and why (`kept_record`).
    kept: dict = field(default_factory=dict)
    # A tree or scorecard run's model, to score again after the run (server/kept_model.py).
    kept_model: dict = field(default_factory=dict)


# A DP run's last validation loss this far above its best (relative) is worth a warning.
DIVERGENCE_MARGIN = 0.05


def selects_epoch(spec: ModelSpec) -> bool:
    """Whether a run may choose its epoch on validation labels: only without DP-SGD and
    without transcript noise (eps_model infinite: nothing to account the choice against)."""
    return not spec.dp and spec.transcript_sigma == 0


def improves(loss: float, best: float | None) -> bool:
    """Whether an epoch's validation log loss beats the best so far (the first of equals
    stays: an epoch must do strictly better to replace it)."""
    return best is None or loss < best


def kept_record(history: list[dict], selected: bool, kept_epoch: int) -> dict:
    """What the result says of the epoch it holds: the kept epoch, its and the last epoch's
    validation loss, and the rule that chose it; marks the kept row of `history`."""
    last: dict = history[-1] if history else {"epoch": 0, "val_loss": None}
    if not selected:
        kept_epoch = int(last["epoch"])
    for row in history:
        if row["epoch"] == kept_epoch:
            row["kept"] = True
    kept_row = next((r for r in history if r["epoch"] == kept_epoch), last)
    return {
        "epoch": kept_epoch, "val_loss": kept_row["val_loss"],
        "last_epoch": int(last["epoch"]), "last_val_loss": last["val_loss"],
        "rule": ("best validation log loss (a non-private run: the choice costs no budget)"
                 if selected else
                 "last epoch: a DP run does not choose its epoch on validation labels (a "
                 "selection on private labels its ledger does not account)"),
    }


def diverged(history: list[dict], margin: float = DIVERGENCE_MARGIN) -> dict | None:
    """The best row when the last epoch's validation loss is more than `margin` (relative)
    above it, else None."""
    if len(history) < 2:
        return None
    best = min(history, key=lambda r: r["val_loss"])
    if history[-1]["val_loss"] > best["val_loss"] * (1 + margin):
        return best
    return None


def batch_plan(
    train: np.ndarray, batch_size: int, rng: np.random.Generator, poisson: bool = False
) -> list[np.ndarray]:
    """One epoch of mini-batches over the training positions, drawn from `rng` (the
    authority's secret stream for that epoch: nobody else can predict who is sampled).

    Without DP: a shuffled partition. With DP: round(1/q) Poisson samples, q = batch / N, drawn
    as a Binomial size and then a uniform subset of that size (the same distribution as
    independent coin flips per row, without materialising N coins per step).
    """
    if not poisson:
        order = rng.permutation(train)
        return np.array_split(order, max(1, int(np.ceil(len(order) / batch_size))))
    q = min(1.0, batch_size / len(train))
    steps = max(1, round(1 / q))
    sizes = rng.binomial(len(train), q, size=steps)
    return [np.sort(rng.choice(train, size=s, replace=False)) for s in sizes]


def chunk_sizes(cfg: TrainConfig) -> Iterator[int]:
    """Batches per round trip: doubling from 1 to chunk_batches with warm-up, else constant."""
    size = 1 if cfg.chunk_warmup else cfg.chunk_batches
    while True:
        yield size
        size = min(2 * size, cfg.chunk_batches)


def _summed(replies: dict, key: str, expected: int, secure: bool) -> np.ndarray:
    """sum_k g_k for `expected` rows: float contributions, or masked uint64 shares of which
    only the ring sum can be decoded (secure aggregation)."""
    parts = []
    for silo, reply in replies.items():
        try:
            part = m.get_array(reply, key, np.uint64 if secure else np.float32, 1)
        except m.ProtocolError as exc:
            mode = "masked uint64 shares" if secure else "float32 contributions"
            raise FederationError(f"silo {silo!r} did not send {mode}: {exc}") from None
        if len(part) != expected:
            raise FederationError(
                f"silo {silo!r} sent {len(part)} contributions for {expected} rows; "
                "its model or alignment is out of step"
            )
        if not secure and len(part) and np.abs(part).max() > MAX_CONTRIBUTION:
            # In plaintext the authority sees each silo's part, so it can name the one that
            # shifted people's logits beyond what an honest silo (clipping) ever sends.
            raise FederationError(
                f"silo {silo!r} sent contributions beyond the declared bound "
                f"+-{MAX_CONTRIBUTION:g} (largest {np.abs(part).max():.3g}); an honest silo "
                "clips every contribution, so its replies are refused"
            )
        parts.append(part)
    if secure:
        total = decode(ring_sum(parts))
        # Every silo clips to +-MAX_CONTRIBUTION, so an honest sum stays within silos x bound.
        # Masks from the wrong round or run do not cancel: the "sum" is then uniform over
        # about +-2^39. Either way, fail loudly rather than train on it; under secure sum no
        # single silo can be named (the authority sees only the sum).
        if len(total) and np.abs(total).max() > plausible_bound(len(parts)):
            raise FederationError(
                "the secure sum did not decode to a plausible value (beyond "
                f"{len(parts)} silos x {MAX_CONTRIBUTION:g}): a silo's masks are from another "
                "round or run, its share is malformed, or a silo sent contributions beyond the "
                "declared bound; restart the silos or resume from the checkpoint"
            )
        return total
    return np.sum(np.asarray(parts, dtype=np.float64), axis=0)


def plausible_bound(silos: int) -> float:
    """The largest |sum| honest silos send: each clips to MAX_CONTRIBUTION, plus rounding."""
    return silos * (MAX_CONTRIBUTION + 2.0 ** -FRACTION_BITS)


def _stacked(replies: dict, key: str, expected: int, silos: tuple[str, ...], width: int
             ) -> np.ndarray:
    """[e_1, ..., e_K] side by side, in the federation's silo order (`concat` mode)."""
    parts = []
    for silo in silos:
        try:
            part = m.get_array(replies[silo], key, np.float32, 2)
        except m.ProtocolError as exc:
            raise FederationError(f"silo {silo!r} did not send embeddings: {exc}") from None
        if part.shape != (expected, width):
            raise FederationError(
                f"silo {silo!r} sent embeddings of shape {part.shape}, expected "
                f"{(expected, width)}; its model or alignment is out of step"
            )
        parts.append(part)
    return np.concatenate(parts, axis=1)


def chunk_schedule(batches_per_epoch: int, cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """(epoch, first batch, end batch) of every round trip, fixed before training starts so a
    resumed run continues at exactly the chunk it stopped before."""
    sizes = chunk_sizes(cfg)
    out = []
    for epoch in range(cfg.epochs):
        start = 0
        while start < batches_per_epoch:
            stop = min(batches_per_epoch, start + next(sizes))
            out.append((epoch, start, stop))
            start = stop
    return out


@dataclass(frozen=True)
class TrainJob:
    """Everything one training run is about, fixed before its first round: who trains, on
    which labels and positions, with which model, privacy plan and secret streams. What may
    differ between calls of the same job (progress display, a state to resume from, the
    checkpoint callback) are `train`'s keyword arguments."""

    fed: Federation
    # The labels the gradients may see (randomised under label DP), and the authority's clean
    # labels, which only validation reads: two arrays, so no code path mixes them up.
    y_train_view: np.ndarray
    y: np.ndarray
    train_pos: np.ndarray
    val_pos: np.ndarray
    n_positions: int
    cfg: TrainConfig
    spec: ModelSpec
    privacy: PrivacyPlan
    # Batch plans and the head's DP noise come from the authority's secret streams for this
    # run key, never from the public seed.
    random: SecretRandom
    run_key: str
    prior: float = 0.5  # a DP estimate of the training default rate: it starts the bias
    secure: bool = False
    mode: str = "sum"
    top_hidden: tuple[int, ...] = (16,)
    explain: int = 0  # reason codes to ask the silos for at the end (0: none)


def train(
    job: TrainJob,
    *,
    progress: Progress | None = None,
    state: TrainState | None = None,
    on_round: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train `job` from `state` (a fresh start when None); `on_round` receives the state after
    every round trip, for checkpoints."""
    trips = _Trips(job, state)
    schedule = chunk_schedule(len(trips.plan_of(0)), job.cfg)
    epoch_batches: dict[int, list[np.ndarray]] = {}
    for index in range(trips.state.next_chunk, len(schedule)):
        if trips.state.stopped_by_cap:
            break
        epoch, first, end = schedule[index]
        if epoch not in epoch_batches:
            epoch_batches = {epoch: trips.plan_of(epoch)}
        # Validation after the previous epoch, in the chunk that starts the next one.
        evaluate = epoch > 0 and first == 0
        if not trips.chunk(index, epoch, epoch_batches[epoch][first:end], evaluate):
            break
        if on_round:
            on_round(trips.checkpoint_state())
        if progress:
            progress("train", index + 1, len(schedule), epoch=epoch + 1)
    return trips.finish()


class _Trips:
    """The round trips of one `train` call: the head, the state they advance, and the
    exchange with the silos. A class rather than closures inside `train`, so each step of a
    round (send, one chunk, the final read) is a short method of its own."""

    def __init__(self, job: TrainJob, state: TrainState | None) -> None:
        self.job = job
        self.concat = job.mode == "concat"
        self.head: BiasHead | MlpHead = (
            MlpHead(job.prior, job.spec, job.privacy.rho, len(job.fed.silos), job.top_hidden,
                    job.random, job.run_key)
            if self.concat else BiasHead(job.prior, job.spec, job.privacy.rho, job.random,
                                         job.run_key)
        )
        if state is None:
            state = TrainState(silo_seconds=dict.fromkeys(job.fed.silos, 0.0))
        else:
            self.head.load_bytes(state.top)
        self.state = state
        self.select = selects_epoch(job.spec) and job.cfg.keep_best
        self.everyone = np.arange(job.n_positions, dtype=np.int64)
        self.t0 = time.perf_counter()

    def plan_of(self, epoch: int) -> list[np.ndarray]:
        job = self.job
        return batch_plan(job.train_pos, job.cfg.batch_size,
                          job.random.generator("plan", job.run_key, epoch), job.spec.dp)

    def inputs(self, replies: dict, key: str, expected: int) -> np.ndarray:
        if self.concat:
            return _stacked(replies, key, expected, self.job.fed.silos, self.job.spec.outputs)
        return _summed(replies, key, expected, self.job.secure)

    def consider(self, row: dict) -> None:
        """An epoch's validation row: the best so far is kept (non-private runs only). The
        head is at that epoch's weights now; the silos are told in the next step."""
        state = self.state
        if not self.select or not improves(row["val_loss"], state.best_loss):
            return
        state.best_epoch, state.best_loss = int(row["epoch"]), float(row["val_loss"])
        state.kept_top = self.head.to_bytes()
        state.keep_pending = True

    def send(self, plan: np.ndarray | None, eval_pos: np.ndarray | None, summary: bool = False,
             reasons: int = 0, restore: bool = False) -> dict:
        """One round trip: the previous chunk's gradient out, `plan`'s contributions back."""
        job, state = self.job, self.state
        config = {"round": state.trip + 1, "summary": summary, "explain": reasons}
        # Only when set: a run that selects nothing sends exactly the messages it always did.
        if state.keep_pending:
            config["keep"] = True
        if restore:
            config["restore"] = True
        extras: dict[str, np.ndarray | None] = {"plan": plan, "eval": eval_pos}
        if state.done_grad is not None:
            extras.update(done_plan=state.done_plan, done_sizes=state.done_sizes)
        if self.concat:  # each silo gets its own embedding's gradient
            contents = {silo: m.make_content(config, **extras,
                                             grad=_grad_for(state.done_grad, k, job.spec))
                        for k, silo in enumerate(job.fed.silos)}
        else:
            shared = m.make_content(config, **extras, grad=state.done_grad)
            contents = dict.fromkeys(job.fed.silos, shared)
        replies = job.fed.exchange(m.STEP, contents)
        state.keep_pending = False
        state.trip += 1
        job.privacy.record_releases(state.trip, job.n_positions, plan, eval_pos)
        for silo, reply in replies.items():
            state.silo_seconds[silo] += float(m.get_config(reply).get("seconds", 0.0))
        if state.done_grad is not None:
            job.privacy.record_round(state.trip - 1, _reported_histories(replies),
                                     final=plan is None)
        return replies

    def chunk(self, index: int, epoch: int, chunk: list[np.ndarray], evaluate: bool) -> bool:
        """Round trip `index` of the schedule; False when a budget refuses it outright."""
        job, state, privacy = self.job, self.state, self.job.privacy
        allowed = privacy.allow(len(chunk))
        if allowed < len(chunk):
            privacy.refuse(len(chunk) - allowed, allowed, state.trip + 1)
            state.stopped_by_cap = True
            chunk = chunk[:allowed]
            if not chunk:
                return False
        # Silos compute contributions for EVERY aligned person when validating, so they never
        # learn who is validated or tested.
        plan = np.concatenate(chunk).astype(np.int64)
        sizes = [len(b) for b in chunk]
        eval_pos = self.everyone if evaluate else None
        if not privacy.allow_releases(job.n_positions, plan, eval_pos):
            privacy.refuse(len(sizes), 0, state.trip + 1, budget="transcript")
            state.stopped_by_cap = True
            return False
        replies = self.send(plan, eval_pos)
        if evaluate:
            z_val = self.head.logits(self.inputs(replies, "eval", job.n_positions))[job.val_pos]
            state.history.append(_history_row(z_val, job.y[job.val_pos], epoch - 1, self.t0))
            self.consider(state.history[-1])
        grads = self.head.gradients(self.inputs(replies, "plan", len(plan)),
                                    job.y_train_view[plan].astype(np.float64), sizes)
        privacy.spend(len(sizes))
        state.done_plan, state.done_sizes, state.done_grad = (
            plan, np.asarray(sizes, dtype=np.int64), grads
        )
        state.steps += len(sizes)
        state.next_chunk = index + 1
        return True

    def checkpoint_state(self) -> TrainState:
        """The state with what a checkpoint needs besides it: the head and the accountants."""
        state, privacy = self.state, self.job.privacy
        state.top = self.head.to_bytes()
        state.privacy_spent, state.privacy_round_steps = privacy.spent, privacy.round_steps
        state.transcript_releases = privacy.releases.copy()
        state.transcript_sampled = privacy.sampled.copy()
        return state

    def finish(self) -> TrainResult:
        """Apply the last chunk and read every position's contribution at the final weights
        (the last epoch's evaluation); when the run selects its epoch, one more read at the
        kept weights (`restore` when an earlier epoch was better). The final read asks the
        silos for reason codes and, in sum mode, five aggregates of their contributions (for
        the report's per-silo points); not under transcript DP, whose releases are all noised."""
        job, state, n = self.job, self.state, self.job.n_positions
        summary = not self.concat and job.spec.transcript_sigma == 0
        replies = self.send(None, self.everyone, summary=summary and not self.select,
                            reasons=0 if self.select else job.explain)
        logits = self.head.logits(self.inputs(replies, "eval", n))
        history = [*state.history, _history_row(logits[job.val_pos], job.y[job.val_pos],
                                                len(state.history), self.t0)]
        if self.select:
            self.consider(history[-1])
            restore = state.best_epoch != history[-1]["epoch"]
            if restore:
                log.info("keeping epoch %d of %d (best validation log loss %.4f; last %.4f)",
                         state.best_epoch, history[-1]["epoch"], state.best_loss,
                         history[-1]["val_loss"])
                self.head.load_bytes(state.kept_top)
            # The last gradients were applied by the read above: none to send again.
            state.done_plan = state.done_sizes = state.done_grad = None
            state.keep_pending = False
            replies = self.send(None, self.everyone, summary=summary, reasons=job.explain,
                                restore=restore)
            logits = self.head.logits(self.inputs(replies, "eval", n))
            _check_restored(logits[job.val_pos], job.y[job.val_pos], state.best_loss)
        else:
            _warn_if_diverged(history)
        explained = ({s: parse(replies[s], s, n, job.explain) for s in job.fed.silos}
                     if job.explain else {})
        contributions = {silo: {k.removeprefix("summary."): float(v)
                                for k, v in m.get_config(reply).items()
                                if k.startswith("summary.")}
                         for silo, reply in replies.items()}
        return TrainResult(
            bias=self.head.bias, logits=logits, history=history, round_trips=state.trip,
            steps=state.steps, stopped_by_cap=state.stopped_by_cap,
            silo_seconds=state.silo_seconds,
            contributions={s: c for s, c in contributions.items() if c}, explained=explained,
            kept=kept_record(history, self.select, state.best_epoch),
        )


def _check_restored(z_val: np.ndarray, y_val: np.ndarray, kept_loss: float | None) -> None:
    """The final read at the kept weights must give back the kept epoch's validation loss: a
    party that kept or restored the wrong weights shows here."""
    loss = log_loss(y_val, 1 / (1 + np.exp(-z_val)))
    if kept_loss is not None and abs(loss - kept_loss) > 1e-6:
        log.warning("the kept weights read back at validation log loss %.6f, not the kept "
                    "epoch's %.6f: a party's kept block is out of step", loss, kept_loss)
    else:
        log.info("scored at the kept weights (validation log loss %.6f)", loss)


def _warn_if_diverged(history: list[dict]) -> None:
    """A DP run keeps its last epoch; say so when the validation curve turned up (what the
    warning reads is the run's validation curve: diagnostics outside the ledger)."""
    best = diverged(history)
    if best is not None:
        log.warning(
            "validation log loss rose from %.4f (epoch %d) to %.4f (epoch %d): training went "
            "past its best, and a DP run keeps its last epoch (choosing one on validation "
            "labels would be an unaccounted selection); lower train.epochs or train.lr",
            best["val_loss"], best["epoch"], history[-1]["val_loss"], history[-1]["epoch"])


def _grad_for(grads: np.ndarray | None, k: int, spec: ModelSpec) -> np.ndarray | None:
    """Silo k's columns of d loss / d [e_1, ..., e_K]."""
    if grads is None:
        return None
    return np.ascontiguousarray(grads[:, k * spec.outputs:(k + 1) * spec.outputs])


def _reported_histories(replies: dict) -> dict[str, History]:
    out = {}
    for silo, reply in replies.items():
        steps = m.get_array(reply, "accountant", np.float64, 2, required=False)
        out[silo] = [] if steps is None else [(s, q, int(n)) for s, q, n in steps]
    return out


def _history_row(z: np.ndarray, y: np.ndarray, epoch: int, t0: float) -> dict:
    p = 1 / (1 + np.exp(-z))
    row = {
        "epoch": epoch + 1,
        "val_auc": auc(y, p),
        "val_loss": log_loss(y, p),
        "seconds": time.perf_counter() - t0,
    }
    log.info("epoch %d: val AUC %.4f, loss %.4f", row["epoch"], row["val_auc"], row["val_loss"])
    return row

