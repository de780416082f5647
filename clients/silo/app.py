"""The silo's Flower ClientApp.

A silo is named by its node config (`silo=payments`, deployment) or by the simulation engine's
`partition-id` (0, 1, 2 -> payments, social, device). Its table lives in `<data-dir>/<silo>/`.
Model, optimiser and alignment live in the node's `context.state`, which Flower keeps on the
silo's side between messages; the prepared feature matrix is cached per process because it is
derived from the table and cheap to rebuild.

Each message is a module-level handler registered on `handlers` (`@handlers.query("hello")`,
`@handlers.train("step")`, Flower's style); it reads the node (`clients.node.Node`: Flower's
context, the defaults the app was made with, the process's tables) instead of a closure.
`make_client_app(root, keystore)` makes the ClientApp for a simulation's parties; `app` is the
deployment's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.node import Defaults, Guard, Handlers, Node, node_store, parties_root
from clients.protocol import messages as m
from clients.protocol.dp_constants import STATISTICS_NOISE_MULTIPLIER
from clients.protocol.schema import federation_silos, silo_salt
from clients.protocol.tables import SiloDataError
from clients.silo import corrections
from clients.silo.data import SiloMatrix, load_silo
from clients.silo.enrolment import identity_dir
from clients.silo.policy import PolicyError, PolicyRefusalError, SiloPolicy
from crypto.at_rest import Keystore, read_encrypted, write_encrypted
from crypto.masking import (
    MaskingError,
    PairwiseKeys,
    check_ring,
    clip_contribution,
    mask_context,
    masked_share,
)
from crypto.private_files import replace_private
from crypto.psi import PsiError, PsiKey, hash_to_points
from crypto.roster import (
    ROSTER_FILE,
    Roster,
    RosterError,
    hello_statement,
    identity_key,
    masking_statement,
    public_hex,
    sign,
)
from crypto.secret_random import SecretRandom, digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from clients.silo.trainer import SiloTrainer

log = logging.getLogger(__name__)


def silo_name(node: Node) -> str:
    config = node.context.node_config
    if "silo" in config:
        return str(config["silo"])
    if "partition-id" in config:
        pid = int(config["partition-id"])
        silos = federation_silos(node.defaults.root)
        if not 0 <= pid < len(silos):
            raise SiloDataError(f"partition-id {pid} has no silo; run {len(silos)} supernodes")
        return silos[pid]
    raise SiloDataError("this node has no silo: start the SuperNode with --node-config 'silo=...'")


def silo_dir(node: Node) -> Path:
    base = parties_root(node)
    if base is None:
        raise SiloDataError("no data directory: set node config or run config 'data-dir'")
    return base / silo_name(node)


def silo_store(node: Node) -> Keystore | None:
    return node_store(node.context, node.defaults, silo_dir(node).parent)


def silo_random(node: Node) -> SecretRandom:
    """The silo's secret streams (DP noise, transcript noise, noisy statistics): the secret
    lives in the silo's keystore, or in its own directory without one (0600)."""
    store = silo_store(node)
    where = store.path if store is not None else silo_dir(node)
    return SecretRandom.load_or_create(where, silo_name(node))


def silo_matrix(node: Node) -> SiloMatrix:
    """The silo's prepared table, with the corrections it accepted after disputes."""
    directory = silo_dir(node)
    silo = silo_name(node)
    mtime = max((p.stat().st_mtime for p in directory.glob("features.*")), default=0.0)
    fixes = corrections.path(directory)
    version = (mtime, fixes.stat().st_mtime if fixes else 0.0)

    def load() -> SiloMatrix:
        store = silo_store(node)
        matrix = load_silo(directory, silo, store)
        items = corrections.load(directory, silo, store)
        return corrections.apply(matrix, directory, silo, store, items)

    return node.tables.get(("silo", str(directory.resolve()), silo), version, load)


# ---- the silo's own checkpoints: <silo dir>/checkpoints/<run key>/ ---------------------------
# A silo keeps its last two rounds: the authority's newest checkpoint may be one round behind.


def _checkpoint_dir(node: Node, run_key: str) -> Path:
    if not run_key.isalnum():
        raise m.ProtocolError("malformed run key")
    return silo_dir(node) / "checkpoints" / run_key


def _save_round(node: Node, round_: int) -> None:
    cfg = m.config_record(node.state, "model")
    directory = _checkpoint_dir(node, str(cfg["run"]))
    _write_file(node, directory, f"round-{round_}.pt", m.config_bytes(cfg, "blob"))
    for old in directory.glob("round-*.pt*"):
        if int(old.name.split("-")[1].split(".")[0]) < round_ - 1:
            old.unlink(missing_ok=True)


def _write_file(node: Node, directory: Path, name: str, data: bytes,
                private: bool = False) -> None:
    """A checkpoint file, atomically; `name.enc`, bound to the run and silo, when the silo has a
    keystore. `private` files (keys) are 0600 when they stay in plaintext."""
    store = silo_store(node)
    if store is not None:
        context_ = _file_context(directory, silo_name(node), name)
        write_encrypted(store, directory / f"{name}.enc", data, context_)
    elif private:
        replace_private(directory / name, data)
    else:
        tmp = directory / f"{name}.partial"
        tmp.write_bytes(data)
        tmp.replace(directory / name)


def _read_file(node: Node, directory: Path, name: str) -> bytes:
    encrypted = directory / f"{name}.enc"
    if not encrypted.exists():
        return (directory / name).read_bytes()
    store = silo_store(node)
    if store is None:
        raise SiloDataError(f"{encrypted} is encrypted; start the silo with its keystore "
                            "(node config keystore=DIR)")
    aad = _file_context(directory, silo_name(node), name)
    return read_encrypted(store, encrypted, aad)


SUMMARY_QUANTILES = (0.1, 0.5, 0.9)
# The summary's histogram: fixed bins over a declared range of contributions (logit units).
SUMMARY_EDGES = np.linspace(-8.0, 8.0, 65)


def contribution_summary(values: np.ndarray, rng: np.random.Generator | None
                         ) -> dict[str, float]:
    """Five numbers about this silo's contributions over everyone scored, for the report's
    per-silo points: their mean, mean absolute deviation and 10/50/90 % quantiles.

    All five are read off ONE differentially private histogram: contributions clipped to the
    declared range and counted in fixed bins, each count with Gaussian noise of std
    STATISTICS_NOISE_MULTIPLIER (one person moves one count by one: L2 sensitivity 1), drawn
    from the silo's secret stream `rng`; the authority accounts it as one Gaussian release.
    Without DP-SGD (`rng` None) the model claims no epsilon and the counts are exact."""
    counts = np.histogram(np.clip(values.astype(np.float64), SUMMARY_EDGES[0], SUMMARY_EDGES[-1]),
                          bins=SUMMARY_EDGES)[0].astype(np.float64)
    if rng is not None:
        counts = np.maximum(counts + rng.normal(0.0, STATISTICS_NOISE_MULTIPLIER, len(counts)),
                            0.0)
    centres = (SUMMARY_EDGES[:-1] + SUMMARY_EDGES[1:]) / 2
    total = max(counts.sum(), 1.0)
    mean = float(counts @ centres / total)
    cdf = np.cumsum(counts) / total
    q10, q50, q90 = (float(centres[min(int(np.searchsorted(cdf, q)), len(centres) - 1)])
                     for q in SUMMARY_QUANTILES)
    return {"summary.mean": mean, "summary.mad": float(counts @ np.abs(centres - mean) / total),
            "summary.q10": q10, "summary.q50": q50, "summary.q90": q90}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _file_context(directory: Path, silo: str, name: str) -> bytes:
    return f"fedscore/{directory.name}/{silo}/{name}".encode()  # directory name = run key


# ---- what the silo holds for itself: policy, roster, identity, answer journal ----------------


class RefusedError(Exception):
    """A request this silo will not answer: it conflicts with one it answered already."""


def silo_policy(node: Node) -> SiloPolicy:
    """The operator's policy in the silo's directory (strict defaults without one)."""
    return SiloPolicy.load(silo_dir(node))


def silo_identity(node: Node) -> Ed25519PrivateKey:
    """The silo's long-term identity key: in its keystore, else in its own directory."""
    store = silo_store(node)
    silo = silo_name(node)
    where = store.path if store is not None else identity_dir(silo_dir(node).parent,
                                                               silo, None)
    return identity_key(where, silo)


def silo_roster(node: Node) -> Roster:
    """The roster in the silo's own directory, checked to pin this silo's own identity key."""
    directory = silo_dir(node)
    try:
        roster = Roster.load(directory / ROSTER_FILE)
    except RosterError as exc:
        raise SiloDataError(str(exc)) from None
    me = silo_name(node)
    if roster.silos.get(me) != public_hex(silo_identity(node)):
        raise SiloDataError(f"the roster in {directory} does not pin this silo's identity key "
                            f"for {me!r}; enrol the silo again")
    return roster


def _checked_peers(roster: Roster, run_key: str, me: str, own_public: bytes,
                   publics: dict[str, bytes], signatures: dict[str, bytes]) -> None:
    """A relayed peer list is exactly the roster's silos, every key signed by its silo's
    identity key for this run, and this silo's entry is its own key. Anything else lets the
    authority put a key of its own in a peer's place and unmask this silo's shares."""
    if set(publics) != set(roster.silos):
        missing = sorted(set(roster.silos) - set(publics))
        extra = sorted(set(publics) - set(roster.silos))
        raise RosterError(f"the peer list is not the federation's roster (missing "
                          f"{', '.join(missing) or 'none'}; not in the roster "
                          f"{', '.join(extra) or 'none'})")
    if publics[me] != own_public:
        raise RosterError("the relayed key for this silo is not its own")
    if len(set(publics.values())) != len(publics):
        raise RosterError("two silos were relayed the same masking key")
    for silo, public in publics.items():
        if silo not in signatures:
            raise RosterError(f"the masking key of silo {silo!r} comes without its signature")
        roster.verify(silo, masking_statement(roster.fingerprint, run_key, silo, public),
                      signatures[silo])


JOURNAL_FILE = "answers-{tag}.log"


class Journal:
    """What this silo released under one masking key of a run, one line per answer: (kind,
    key) -> digest of the message and of the reply. Append-only and fsynced, in the run's
    checkpoint directory, so it survives `query.resume` and restarts: a DIFFERENT message for
    an answered (round, kind) is refused (its masks would repeat, or two answers would differ
    by an exact contribution); the same message may be answered again only with the same
    reply. A new `query.align` makes a new masking key, whose masks share nothing with the old
    ones, and so starts a new journal (the run key is derived from the configuration, so a
    run repeated on the same parties has the same run key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], tuple[str, str]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 4:
                    self.entries[(parts[0], parts[1])] = (parts[2], parts[3])

    def check(self, kind: str, key: object, message: bytes, *, once: bool = False) -> None:
        seen = self.entries.get((kind, str(key)))
        if seen is None:
            return
        if once:
            raise RefusedError(f"{kind} {key} was answered already; each is answered once")
        if seen[0] != message.hex():
            raise RefusedError(f"{kind} {key} was answered already for a different message; "
                               "answering again would reuse its masks")

    def record(self, kind: str, key: object, message: bytes, reply: bytes) -> None:
        seen = self.entries.get((kind, str(key)))
        if seen is not None:
            if seen != (message.hex(), reply.hex()):
                raise RefusedError(f"{kind} {key}: the repeated message would get a different "
                                   "reply; refused (it would release the difference)")
            return
        with open(self.path, "a", encoding="ascii") as fh:
            fh.write(f"{kind} {key} {message.hex()} {reply.hex()}\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[(kind, str(key))] = (message.hex(), reply.hex())


def _journal(node: Node) -> Journal:
    directory = _checkpoint_dir(node, str(node.state["model"]["run"]))
    directory.mkdir(parents=True, exist_ok=True)
    tag = "plaintext"
    if "mask" in node.state:  # named by a digest of the public key, never the secret
        secret = m.config_bytes(m.config_record(node.state, "mask"), "secret")
        public = PairwiseKeys(secret).public
        tag = hashlib.sha256(public).hexdigest()[:16]
    return Journal(directory / JOURNAL_FILE.format(tag=tag))


def _reply_digest(reply: RecordDict) -> bytes:
    return m.content_digest(reply, skip=("seconds",))


def _check_alignment(rows: np.ndarray, positions: np.ndarray, size: int) -> None:
    """One position per person and one person per position: otherwise an authority aligning
    one row at many positions makes any group of "distinct" positions one person (min_group),
    and a negative position would wrap around to another person's slot."""
    if len(positions) and (positions.min() < 0 or positions.max() >= size):
        raise m.ProtocolError(f"alignment positions outside 0..{size - 1}")
    if len(np.unique(positions)) != len(positions):
        raise m.ProtocolError("the alignment gives one position twice")
    if len(np.unique(rows)) != len(rows):
        raise m.ProtocolError("the alignment maps one of this silo's rows to several positions")


def _check_group(policy: SiloPolicy, what: str, positions: np.ndarray) -> None:
    """An aggregate over a few people, or over one person listed many times, is that person's
    exact contribution: refuse below the policy's minimum group of distinct people."""
    distinct = len(np.unique(positions))
    if distinct != len(positions):
        raise PolicyRefusalError("min_group", f"{what} over positions listed more than once "
                            f"({len(positions)} positions, {distinct} distinct)", policy.path)
    policy.check_group(what, distinct)


def _masked(node: Node, values: np.ndarray, round_: int,
            purpose: str, binding: bytes) -> np.ndarray:
    if "mask" not in node.state:
        raise m.ProtocolError("secure aggregation without pairwise keys: send query.peers first")
    record = m.config_record(node.state, "mask")
    shared = {k.removeprefix("peer."): m.config_bytes(record, k) for k in record
              if k.startswith("peer.")}
    if not shared:
        raise m.ProtocolError("secure aggregation needs at least two silos")
    run_key = str(node.state["model"]["run"])
    try:
        return masked_share(values, silo_name(node), shared,
                            mask_context(run_key, round_, purpose, binding))
    except MaskingError as exc:
        raise m.ProtocolError(str(exc)) from None


def _model() -> ModuleType:
    """torch and Opacus, imported by the messages that train. Under the deployment engine every
    message runs in a fresh process, and importing them costs seconds that PSI never needs."""
    import torch

    from clients.silo import trainer

    torch.set_num_threads(1)  # one core per silo: silos run side by side
    return trainer


def _trainer(node: Node) -> SiloTrainer:
    if "model" not in node.state:
        raise m.ProtocolError("no model yet: the authority must send query.align first")
    cfg = m.config_record(node.state, "model")
    model = _model()
    from clients.protocol.model import ModelSpec

    trainer = model.SiloTrainer(m.config_int(cfg, "inputs"), ModelSpec.from_config(dict(cfg)),
                                m.config_int(cfg, "salt"), random=silo_random(node),
                                run_key=str(cfg["run"]))
    trainer.load_bytes(m.config_bytes(cfg, "blob"))
    return trainer


def _save_trainer(context: Context, trainer: SiloTrainer) -> None:
    m.config_record(context.state, "model")["blob"] = trainer.to_bytes()


def _rows(context: Context, positions: np.ndarray) -> np.ndarray:
    pos2row = m.array_record(context.state, "align")["pos2row"].numpy()
    if len(positions) and (positions.min() < 0 or positions.max() >= len(pos2row)):
        raise m.ProtocolError(f"positions outside 0..{len(pos2row) - 1}")
    rows = pos2row[positions]
    if (rows < 0).any():
        raise m.ProtocolError("positions this silo does not hold were requested")
    return rows


# ---- the silo's messages: query.hello, query.psi_blind, query.psi_finish, query.align,
# query.peers, query.resume, query.correct, query.score and train.step ------------------------

handlers = Handlers(Guard(
    "silo", log,
    input_errors=(SiloDataError, PolicyError),
    refusals=(PolicyRefusalError, RefusedError, RosterError),
    protocol_errors=(m.ProtocolError, PsiError),
))


def make_client_app(root: Path | None = None, keystore: Path | None = None,
                    plaintext: bool = False) -> ClientApp:
    """The silo's app; `root` is the parties directory and `keystore` the silos' keystore when
    no config names them (the simulation)."""
    return handlers.app(Defaults(root, keystore, plaintext))


@handlers.query("hello")
def hello(msg: Message, node: Node) -> Message:
    data = silo_matrix(node)
    me = silo_name(node)  # from this node's own config, never from a message
    reply: dict = {"silo": me, "rows": len(data.x), "inputs": data.x.shape[1]}
    challenge = m.get_config(msg).get("challenge")
    if challenge is not None:
        # Prove this silo's identity for this challenge only (a replay answers nothing).
        if not isinstance(challenge, bytes) or len(challenge) < 16:
            raise m.ProtocolError("a hello challenge is at least 16 random bytes")
        # An unenrolled silo (no roster: a PSI benchmark's throwaway parties) answers
        # unsigned; an authority holding a roster refuses that, and secure sum needs one.
        if (silo_dir(node) / ROSTER_FILE).exists():
            roster = silo_roster(node)
            reply["fingerprint"] = roster.fingerprint
            reply["signature"] = sign(silo_identity(node),
                                      hello_statement(roster.fingerprint, challenge, me))
    return Message(m.make_content(reply), reply_to=msg)


def _psi_claim(msg: Message, node: Node, step: str) -> None:
    """Persist that this run took PSI step `step` ("blind" or "finish"), refusing a second
    time: <silo dir>/checkpoints/psi-<run id>.<step>, created exclusively. Repeating
    either step would let the authority probe identifiers one by one."""
    directory = silo_dir(node) / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with open(directory / f"psi-{int(msg.metadata.run_id)}.{step}", "x"):
            pass
    except FileExistsError:
        raise m.ProtocolError(
            f"psi_{step} was already answered in this run; a silo takes each PSI step "
            "once per run (a second one would make it a membership oracle)") from None


@handlers.query("psi_blind")
def psi_blind(msg: Message, node: Node) -> Message:
    # The authority declares the size of its own set up front; psi_finish answers at most
    # that many points, once. An operator may cap it (node config psi-max-authority-size).
    declared = m.get_config(msg).get("set_size")
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        raise m.ProtocolError("psi_blind must declare the authority's set size (set_size)")
    cap = node.context.node_config.get("psi-max-authority-size")
    if cap is not None and declared > int(cap):
        raise m.ProtocolError(f"the authority declared {declared} identifiers; this silo "
                              f"answers at most {int(cap)} (psi-max-authority-size)")
    data = silo_matrix(node)
    _psi_claim(msg, node, "blind")
    key = PsiKey()
    node.state["psi"] = ConfigRecord({"secret": key.secret, "set_size": declared})
    # Own hash outputs: on the curve by construction, so no peer-point check.
    points = key.blind(hash_to_points(data.ids.to_numpy()), from_peer=False)
    return Message(m.make_content(points=points), reply_to=msg)


@handlers.query("psi_finish")
def psi_finish(msg: Message, node: Node) -> Message:
    if "psi" not in node.state:
        raise m.ProtocolError("psi_finish without psi_blind")
    state = m.config_record(node.state, "psi")
    del node.state["psi"]  # the blinding key is single-use, even when refused below
    points = m.get_array(msg, "points", np.uint8, 2)
    declared = m.config_int(state, "set_size")
    if len(points) > declared:
        raise m.ProtocolError(f"psi_finish sent {len(points)} points after declaring "
                              f"{declared}")
    _psi_claim(msg, node, "finish")
    # The authority's points: canonical, on the curve (not the twist), not low order.
    points = PsiKey(m.config_bytes(state, "secret")).blind(points)
    return Message(m.make_content(points=points), reply_to=msg)


@handlers.query("align")
def align(msg: Message, node: Node) -> Message:
    """Take the authority's alignment (position -> this silo's row) and start the run's model
    at round 0; under secure aggregation, answer with a masking key signed by the silo."""
    data = silo_matrix(node)
    cfg = m.get_config(msg)
    pos2row = _alignment(msg, node, cfg, len(data.x))
    _forget_steps(node.context)
    node.state["align"] = m.arrays(pos2row=pos2row)
    model = _start_model(node, cfg, data.x.shape[1])
    run_key = str(model["run"])
    directory = _checkpoint_dir(node, run_key)
    directory.mkdir(parents=True, exist_ok=True)
    _write_file(node, directory, "alignment.npy", _npy_bytes(pos2row))
    (directory / "model.json").write_text(json.dumps(model))
    _save_round(node, 0)
    reply: dict = {"inputs": data.x.shape[1]}
    if model["secure"]:
        reply.update(_masking_key(node, directory, run_key))
    return Message(m.make_content(reply), reply_to=msg)


def _alignment(msg: Message, node: Node, cfg: dict, n_rows: int) -> np.ndarray:
    """The alignment the authority sent, as position -> row (-1 where this silo holds no
    one), once the silo's policy allows the model it announces."""
    rows = m.get_array(msg, "rows", np.int64, 1)
    positions = m.get_array(msg, "positions", np.int64, 1)
    size = int(cfg["positions"])
    policy = silo_policy(node)
    policy.check_model(secure=bool(cfg.get("secure", False)),
                       outputs=int(cfg.get("outputs", 1)))
    if len(rows) != len(positions) or (rows < 0).any() or (rows >= n_rows).any():
        raise m.ProtocolError("alignment rows do not fit this silo's table")
    _check_alignment(rows, positions, size)
    pos2row = np.full(size, -1, dtype=np.int64)
    pos2row[positions] = rows
    return pos2row


def _start_model(node: Node, cfg: dict, inputs: int) -> dict:
    """A fresh bottom model for the run the authority announces, kept in the node's state;
    returns its description (without the weights)."""
    model_lib = _model()
    from clients.protocol.model import ModelSpec

    spec = ModelSpec.from_config(cfg)
    salt = silo_salt(silo_name(node))
    run_key = str(cfg["run"])
    if not run_key.isalnum():
        raise m.ProtocolError("malformed run key")
    trainer = model_lib.SiloTrainer(inputs, spec, salt, random=silo_random(node),
                                    run_key=run_key)
    model = {**spec.to_config(), "inputs": inputs, "salt": salt, "run": run_key,
             "secure": bool(cfg.get("secure", False))}
    node.state["model"] = ConfigRecord({**model, "blob": trainer.to_bytes()})
    return model


def _masking_key(node: Node, directory: Path, run_key: str) -> dict:
    """A new masking key for the run, kept in the checkpoint directory and the node's state;
    its public half for the reply, signed with the silo's identity key."""
    roster = silo_roster(node)
    try:
        check_ring(len(roster.silos))
    except MaskingError as exc:
        raise SiloDataError(str(exc)) from None
    keys = PairwiseKeys()
    _write_file(node, directory, "mask.key", keys.secret, private=True)
    node.state["mask"] = ConfigRecord({"secret": keys.secret})
    # Signed with the identity key the roster pins: the authority relays this key but
    # cannot swap it for one of its own without every other silo noticing.
    me = silo_name(node)
    return {"mask_public": keys.public,
            "mask_signature": sign(silo_identity(node), masking_statement(
                roster.fingerprint, run_key, me, keys.public))}


@handlers.query("peers")
def peers(msg: Message, node: Node) -> Message:
    """Agree a pairwise secret with every other silo from its relayed public key."""
    if "mask" not in node.state:
        raise m.ProtocolError("peers before align, or secure aggregation is off")
    config = m.get_config(msg)
    publics = {k.removeprefix("peer."): bytes(v) for k, v in config.items()
               if k.startswith("peer.")}
    signatures = {k.removeprefix("sig."): bytes(v) for k, v in config.items()
                  if k.startswith("sig.")}
    me = silo_name(node)
    keys = PairwiseKeys(m.config_bytes(m.config_record(node.state, "mask"), "secret"))
    run_key = str(node.state["model"]["run"])
    _checked_peers(silo_roster(node), run_key, me, keys.public, publics,
                   signatures)
    record = {f"peer.{s}": keys.shared_with(pub) for s, pub in publics.items() if s != me}
    node.state["mask"] = ConfigRecord({"secret": keys.secret, **record})
    directory = _checkpoint_dir(node, run_key)
    (directory / "peers.json").write_text(json.dumps(
        {s: {"key": p.hex(), "signature": signatures.get(s, b"").hex()}
         for s, p in publics.items()}))
    return Message(m.make_content({"peers": len(record)}), reply_to=msg)


@handlers.query("resume")
def resume(msg: Message, node: Node) -> Message:
    cfg = m.get_config(msg)
    round_ = int(cfg["round"])
    directory = _checkpoint_dir(node, str(cfg["run"]))
    name = f"round-{round_}.pt"
    if not any((directory / n).exists() for n in (name, f"{name}.enc")):
        raise SiloDataError(
            f"silo {silo_name(node)} has no checkpoint of round {round_} for "
            f"this run (looked in {directory}); the run cannot resume, start a new one"
        )
    pos2row = np.load(io.BytesIO(_read_file(node, directory, "alignment.npy")),
                      allow_pickle=False)
    model = json.loads((directory / "model.json").read_text())
    _forget_steps(node.context)
    node.state["align"] = m.arrays(pos2row=pos2row)
    blob = _read_file(node, directory, name)
    node.state["model"] = ConfigRecord({**model, "blob": blob})
    if model.get("secure"):
        keys = PairwiseKeys(_read_file(node, directory, "mask.key"))
        stored = json.loads((directory / "peers.json").read_text())
        if not all(isinstance(v, dict) for v in stored.values()):
            raise SiloDataError(f"{directory} holds an unsigned peer list from an older "
                                "version; start a new run")
        publics = {s: bytes.fromhex(v["key"]) for s, v in stored.items()}
        me = silo_name(node)
        # The same checks as when the keys first arrived: the file sits on disk meanwhile.
        _checked_peers(silo_roster(node), str(cfg["run"]), me, keys.public,
                       publics, {s: bytes.fromhex(v["signature"]) for s, v in stored.items()})
        node.state["mask"] = ConfigRecord({"secret": keys.secret, **{
            f"peer.{s}": keys.shared_with(p) for s, p in publics.items() if s != me}})
    return Message(m.make_content({"round": round_}), reply_to=msg)


@handlers.query("correct")
def correct(msg: Message, node: Node) -> Message:
    """Record a disputed field's corrected value for the person at one position."""
    cfg = m.get_config(msg)
    position = m.get_array(msg, "position", np.int64, 1)
    if len(position) != 1:
        raise m.ProtocolError("a correction names exactly one position")
    silo_policy(node).check_correction(str(cfg["field"]))
    data = silo_matrix(node)
    silo = silo_name(node)
    row = int(_rows(node.context, position)[0])
    from clients.silo.explain import features_of

    value = corrections.check_value(silo, str(cfg["field"]), float(cfg["value"]),
                                    features_of(data))
    held = corrections.record(silo_dir(node), silo,
                              silo_store(node), str(data.ids.iloc[row]),
                              str(cfg["field"]), value, str(cfg.get("category", "")))
    return Message(m.make_content({"corrections": held}), reply_to=msg)


@handlers.query("score")
def score(msg: Message, node: Node) -> Message:
    """Contributions for positions at the restored model: the silo's current records (its
    corrections applied), or a later cohort's (`cohort`), with reason codes when asked and,
    with `drift`, the population stability index of the silo's points against its
    contributions on the current records."""
    t0 = time.perf_counter()
    cfg = m.get_config(msg)
    request = str(cfg.get("request", ""))
    if not request.isalnum() or len(request) > 64:
        raise m.ProtocolError("a score request needs an alphanumeric request id")
    explain = int(cfg.get("explain", 0))
    if explain > 0:
        silo_policy(node).check_explain(explain)
    positions = m.get_array(msg, "positions", np.int64, 1)
    rows = _rows(node.context, positions)
    trainer = _trainer(node)
    # Each request id is answered once, remembered across restarts: its masks are
    # single-use, and a repeat after a correction would release the difference.
    journal = _journal(node)
    binding = m.content_digest(msg.content)
    journal.check("score", request, binding, once=True)
    data = silo_matrix(node)
    cohort = str(cfg.get("cohort", ""))
    x = _cohort_rows(node, data, cohort)[rows] if cohort else data.x[rows]
    values = clip_contribution(trainer.released(x, "score", request, cohort,
                                                digest(positions)))
    reply: dict = _drift(trainer, data.x[rows], values) if cfg.get("drift") else {}
    out: dict[str, np.ndarray] = {}
    if bool(node.state["model"].get("secure", False)):
        out["contributions"] = _masked(node, values, 0, f"score/{request}", binding)
    else:
        out["contributions"] = values
    if explain > 0:
        arrays, extra = _explained(trainer, data, x, explain)
        out.update(arrays)
        reply.update(extra)
    reply["seconds"] = time.perf_counter() - t0
    content = m.make_content(reply, **out)
    journal.record("score", request, binding, _reply_digest(content))
    return Message(content, reply_to=msg)


def _cohort_rows(node: Node, data: SiloMatrix, cohort: str) -> np.ndarray:
    """A later cohort's records of the silo's people, prepared as its table is."""
    from clients.silo.data import load_cohort

    return load_cohort(silo_dir(node), silo_name(node), cohort, silo_store(node), data)


def _drift(trainer: SiloTrainer, x: np.ndarray, values: np.ndarray) -> dict:
    """The population stability index of `values` against the contributions on `x`."""
    from clients.silo.drift import psi

    before = trainer.contributions(x)
    # Points fall as contributions rise: compare -g, so bins follow points' order.
    return {"drift.psi": psi(-before.astype(np.float64), -values.astype(np.float64))}


@handlers.train("step")
def step(msg: Message, node: Node) -> Message:
    """One training step: apply the gradients the authority sent for the batches released last
    step, checkpoint the round, and release contributions for the next batches (`plan`) and
    the evaluation group (`eval`); answered once per round, a lost reply from the cache."""
    t0 = time.perf_counter()
    config = m.get_config(msg)
    round_ = int(config.get("round", 0))
    if "model" not in node.state:
        raise m.ProtocolError("no model yet: the authority must send query.align first")
    # One answer per round, whatever happened since (resume, restart): a different message
    # for an answered round is refused before anything is computed.
    journal = _journal(node)
    binding = m.content_digest(msg.content)
    journal.check("step", round_, binding)
    _check_step_policy(msg, config, silo_policy(node))
    repeated = _repeated_step(msg, node.context)
    if repeated is not None:
        return repeated
    x = silo_matrix(node).x
    trainer = _trainer(node)
    _apply_gradients(msg, node, trainer, x)
    if "round" in config:
        _save_round(node, round_)
    out, reply_config = _step_releases(msg, node, trainer, x, round_, binding)
    if trainer.history:
        out["accountant"] = np.array(trainer.history, dtype=np.float64)
    # The journal holds what this silo computed and released; the test-only fault below
    # corrupts the reply after that, as a faulty transport or a bug would.
    journal.record("step", round_, binding, _reply_digest(m.make_content(reply_config, **out)))
    _maybe_misbehave(silo_name(node), round_, out)
    reply_config["seconds"] = time.perf_counter() - t0
    reply = m.make_content(reply_config, **out)
    _remember_step(node.context, round_, reply)
    return Message(reply, reply_to=msg)


def _apply_gradients(msg: Message, node: Node, trainer: SiloTrainer, x: np.ndarray) -> None:
    """Train on the batches released last step (`done_plan`, `done_sizes`) with the gradients
    the authority sent for them (`grad`), when it sent any, and keep the model."""
    width = trainer.spec.outputs
    grad = m.get_array(msg, "grad", np.float32, 1 if width == 1 else 2, required=False)
    if grad is not None and grad.ndim == 2 and grad.shape[1] != width:
        raise m.ProtocolError(f"gradients have {grad.shape[1]} columns; this silo's "
                              f"embedding has {width}")
    if grad is not None:
        done = m.get_array(msg, "done_plan", np.int64, 1)
        sizes = m.get_array(msg, "done_sizes", np.int64, 1)
        batches = [x[_rows(node.context, b)] for b in m.split_batches(done, sizes)]
        trainer.replay(batches, m.split_batches(grad, sizes))
        _save_trainer(node.context, trainer)


def _step_releases(msg: Message, node: Node, trainer: SiloTrainer, x: np.ndarray, round_: int,
                   binding: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """A step's reply arrays and config: the contributions for `plan` and `eval` (masked under
    secure aggregation), and for `eval` the summary and reason codes when asked."""
    config = m.get_config(msg)
    out: dict[str, np.ndarray] = {}
    secure = bool(node.state["model"].get("secure", False))
    reply_config: dict = {"seconds": 0.0}
    for key in ("plan", "eval"):
        positions = m.get_array(msg, key, np.int64, 1, required=False)
        if positions is not None:
            values = clip_contribution(trainer.released(x[_rows(node.context, positions)], round_,
                                                        key, digest(positions)))
            out[key] = (_masked(node, values, round_, key, binding) if secure
                        else values)
            if key == "eval" and config.get("summary") and values.ndim == 1:
                # Bound to the group it describes, as transcript noise is: a re-aligned
                # run asking the same round about a group one person apart must not get
                # the same noise twice (their difference would be that person, exact).
                noise = silo_random(node).generator(
                    "summary", trainer.run_key, round_, digest(positions)
                ) if trainer.spec.dp else None
                reply_config.update(contribution_summary(values, noise))
            if key == "eval" and int(config.get("explain", 0)) > 0:
                data = silo_matrix(node)
                why = _explained(trainer, data, data.x[_rows(node.context, positions)],
                                 int(config["explain"]))
                out.update(why[0])
                reply_config.update(why[1])
    return out, reply_config


def _check_step_policy(msg: Message, config: dict, policy: SiloPolicy) -> None:
    """What a training step may ask of this silo: aggregates (the summary, reason codes) only
    over at least `min_group` distinct people, and no more reason codes than allowed."""
    reasons = int(config.get("explain", 0))
    if reasons > 0:
        policy.check_explain(reasons)
    if not (config.get("summary") or reasons > 0):
        return
    positions = m.get_array(msg, "eval", np.int64, 1, required=False)
    if positions is not None:
        _check_group(policy, "a summary or reason codes", positions)


def _explained(trainer: SiloTrainer, data: SiloMatrix, x: np.ndarray, k: int
               ) -> tuple[dict[str, np.ndarray], dict]:
    """Reason codes for the rows `x`, as reply arrays and config entries."""
    if trainer.spec.outputs != 1:
        raise m.ProtocolError("reason codes need aggregation.mode=sum (one contribution each)")
    if trainer.spec.transcript_sigma > 0:
        raise m.ProtocolError("reason codes would release exact contributions that transcript "
                              "DP's accounting does not cover; ask for none (explain=0)")
    from clients.silo.explain import explain

    why = explain(trainer, data, x, k)
    arrays = {"explain_delta": why.delta, "reason_index": why.index,
              "reason_share": why.share}
    return arrays, {"explain.reference": why.reference, "explain.features": why.features}


SILO_FAULT = "FEDSCORE_SILO_FAULT"


def _maybe_misbehave(silo: str, round_: int, out: dict[str, np.ndarray]) -> None:
    """A faulty silo on purpose (for tests): `FEDSCORE_SILO_FAULT=silo:round:kind` makes that
    silo's reply to that step malformed: `shape` drops a contribution, `dtype` sends float64."""
    fault = os.environ.get(SILO_FAULT, "").split(":")
    if len(fault) != 3 or fault[0] != silo or fault[1] != str(round_) or "plan" not in out:
        return
    if fault[2] == "shape":
        out["plan"] = out["plan"][:-1]
    elif fault[2] == "dtype":
        out["plan"] = out["plan"].astype(np.float64)


# ---- repeated steps: the authority re-sends a step whose reply it never got ------------------


def _repeated_step(msg: Message, context: Context) -> Message | None:
    """The cached reply when this step was already applied (its reply was lost); applying it
    again would train on the same batches twice and spend privacy the ledger never sees."""
    round_ = int(m.get_config(msg).get("round", 0))
    if "last.step" not in context.state:
        return None
    last = m.config_int(m.config_record(context.state, "last.step"), "round")
    if round_ == last:
        log.warning("step %d arrived again; answering from the cache", round_)
        reply = m.make_content(dict(context.state["last.config"]))
        if "last.arrays" in context.state:
            reply["arrays"] = context.state["last.arrays"]
        return Message(reply, reply_to=msg)
    if round_ < last:
        raise m.ProtocolError(f"step {round_} is older than step {last}, already applied")
    return None


def _remember_step(context: Context, round_: int, reply: RecordDict) -> None:
    context.state["last.step"] = ConfigRecord({"round": round_})
    context.state["last.config"] = reply["config"]
    if "arrays" in reply:
        context.state["last.arrays"] = reply["arrays"]
    elif "last.arrays" in context.state:
        del context.state["last.arrays"]


def _forget_steps(context: Context) -> None:
    for key in ("last.step", "last.config", "last.arrays"):
        if key in context.state:
            del context.state[key]


app = make_client_app()
