"""What a silo node holds, and where it keeps it.

The node's name, directory, keystore, secret streams and prepared table come from its own
config (never from a message); beside them the operator's policy, the silo's identity key and
roster, its checkpoint files in `<silo dir>/checkpoints/<run key>/`, the journal of what it
answered, and the run's trainer, restored from the node's `context.state` for each message.
The message handlers (alignment.py, training.py, after_run.py) share these.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, RecordDict

from clients.node import Node, node_store, parties_root
from clients.protocol import messages as m
from clients.protocol.schema import federation_silos
from clients.protocol.tables import SiloDataError
from clients.silo import corrections
from clients.silo.data import SiloMatrix, load_silo
from clients.silo.enrolment import identity_dir
from clients.silo.policy import SiloPolicy
from crypto.at_rest import Keystore, read_encrypted, write_encrypted
from crypto.masking import PairwiseKeys
from crypto.private_files import open_append, replace_private
from crypto.roster import ROSTER_FILE, Roster, RosterError, identity_key, public_hex
from crypto.secret_random import SecretRandom

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from clients.silo.trainer import SiloTrainer


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


# ---- what the silo holds for itself: its policy, identity and roster -------------------------


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


# ---- the silo's own checkpoints: <silo dir>/checkpoints/<run key>/ ---------------------------
# A silo keeps its last two rounds: the authority's newest checkpoint may be one round behind.


def checkpoint_dir(node: Node, run_key: str) -> Path:
    if not run_key.isalnum():
        raise m.ProtocolError("malformed run key")
    return silo_dir(node) / "checkpoints" / run_key


def save_round(node: Node, round_: int) -> None:
    cfg = m.config_record(node.state, "model")
    directory = checkpoint_dir(node, str(cfg["run"]))
    write_file(node, directory, f"round-{round_}.pt", m.config_bytes(cfg, "blob"))
    for old in directory.glob("round-*.pt*"):
        if int(old.name.split("-")[1].split(".")[0]) < round_ - 1:
            old.unlink(missing_ok=True)


def write_file(node: Node, directory: Path, name: str, data: bytes,
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


def read_file(node: Node, directory: Path, name: str) -> bytes:
    encrypted = directory / f"{name}.enc"
    if not encrypted.exists():
        return (directory / name).read_bytes()
    store = silo_store(node)
    if store is None:
        raise SiloDataError(f"{encrypted} is encrypted; start the silo with its keystore "
                            "(node config keystore=DIR)")
    aad = _file_context(directory, silo_name(node), name)
    return read_encrypted(store, encrypted, aad)


def _file_context(directory: Path, silo: str, name: str) -> bytes:
    return f"fedscore/{directory.name}/{silo}/{name}".encode()  # directory name = run key


# ---- the answer journal: what the silo released, so that it never answers twice --------------


class RefusedError(Exception):
    """A request this silo will not answer: it conflicts with one it answered already."""


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
        # Never through a planted link (one to an empty file would make the silo forget
        # what it answered), and only we may write it. 0644 as before (digests only): a
        # journal of a run made before stays usable on resume.
        with open_append(self.path, "the silo's answer journal", public=True) as fh:
            fh.write(f"{kind} {key} {message.hex()} {reply.hex()}\n".encode("ascii"))
            fh.flush()
            os.fsync(fh.fileno())
        self.entries[(kind, str(key))] = (message.hex(), reply.hex())


def silo_journal(node: Node) -> Journal:
    directory = checkpoint_dir(node, str(node.state["model"]["run"]))
    directory.mkdir(parents=True, exist_ok=True)
    tag = "plaintext"
    if "mask" in node.state:  # named by a digest of the public key, never the secret
        secret = m.config_bytes(m.config_record(node.state, "mask"), "secret")
        public = PairwiseKeys(secret).public
        tag = hashlib.sha256(public).hexdigest()[:16]
    return Journal(directory / JOURNAL_FILE.format(tag=tag))


# Named as the per-key journals (answers-<tag>.log): digests only, plaintext at rest.
RUN_JOURNAL_FILE = "answers-run.log"


def run_journal(node: Node) -> Journal:
    """What this silo answered once per RUN, whatever masking key: the contribution summary.
    A re-align under secure sum makes a new masking key and so a new `silo_journal`; the
    summary's count must not start again with it (a second summary, over a group one person
    apart, is that person's contribution outside the run's accounting)."""
    directory = checkpoint_dir(node, str(node.state["model"]["run"]))
    directory.mkdir(parents=True, exist_ok=True)
    return Journal(directory / RUN_JOURNAL_FILE)


def reply_digest(reply: RecordDict) -> bytes:
    return m.content_digest(reply, skip=("seconds",))


# ---- the run's model and alignment, in the node's state --------------------------------------


def trainer_module() -> ModuleType:
    """torch and Opacus, imported by the messages that train. Under the deployment engine every
    message runs in a fresh process, and importing them costs seconds that PSI never needs."""
    import torch  # here, not at the top: see the docstring

    from clients.silo import trainer

    torch.set_num_threads(1)  # one core per silo: silos run side by side
    return trainer


def silo_trainer(node: Node) -> SiloTrainer:
    if "model" not in node.state:
        raise m.ProtocolError("no model yet: the authority must send query.align first")
    cfg = m.config_record(node.state, "model")
    model = trainer_module()
    from clients.protocol.model import ModelSpec  # imports torch: see trainer_module

    trainer = model.SiloTrainer(m.config_int(cfg, "inputs"), ModelSpec.from_config(dict(cfg)),
                                m.config_int(cfg, "salt"), random=silo_random(node),
                                run_key=str(cfg["run"]))
    trainer.load_bytes(m.config_bytes(cfg, "blob"))
    return trainer


def save_trainer(context: Context, trainer: SiloTrainer) -> None:
    m.config_record(context.state, "model")["blob"] = trainer.to_bytes()


def rows_at(context: Context, positions: np.ndarray) -> np.ndarray:
    pos2row = m.array_record(context.state, "align")["pos2row"].numpy()
    if len(positions) and (positions.min() < 0 or positions.max() >= len(pos2row)):
        raise m.ProtocolError(f"positions outside 0..{len(pos2row) - 1}")
    rows = pos2row[positions]
    if (rows < 0).any():
        raise m.ProtocolError("positions this silo does not hold were requested")
    return rows
