"""The silo's messages before training: discovery, PSI, alignment, the peers' masking keys and
resuming a run.

`query.hello` names the silo (and proves its identity for the authority's challenge);
`query.psi_blind` and `query.psi_finish` are its two PSI steps, each taken once per run;
`query.align` takes the authority's alignment, pins the run's announced mode (kind and epsilon,
clients/silo/run_checks.py) and starts the run's model at round 0 (under secure aggregation with
a signed masking key); `query.peers` agrees a pairwise secret with
every other silo from the relayed, signed keys; `query.resume` restores a round from the silo's
own checkpoints.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message

from clients.node import Node
from clients.protocol import messages as m
from clients.protocol.schema import silo_salt
from clients.protocol.tables import SiloDataError
from clients.silo import kept_state, run_checks
from clients.silo.registry import handlers
from clients.silo.state import (
    checkpoint_dir,
    read_file,
    save_round,
    silo_dir,
    silo_identity,
    silo_matrix,
    silo_name,
    silo_policy,
    silo_random,
    silo_roster,
    trainer_module,
    write_file,
)
from clients.silo.training import forget_steps
from crypto.masking import MaskingError, PairwiseKeys, check_ring
from crypto.psi import PsiKey, hash_to_points
from crypto.roster import (
    ROSTER_FILE,
    Roster,
    RosterError,
    hello_statement,
    masking_statement,
    sign,
)


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
    # Before anything is kept: the run key's mode, pinned by its first announcement.
    run_checks.check_same_mode(checkpoint_dir(node, str(cfg["run"])), str(cfg["run"]),
                               run_checks.announced(cfg))
    forget_steps(node.context)
    node.state["align"] = m.arrays(pos2row=pos2row)
    model = _start_model(node, cfg, data.x.shape[1])
    run_key = str(model["run"])
    directory = checkpoint_dir(node, run_key)
    directory.mkdir(parents=True, exist_ok=True)
    write_file(node, directory, "alignment.npy", _npy_bytes(pos2row))
    (directory / "model.json").write_text(json.dumps(model))
    save_round(node, 0)
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
                       outputs=int(cfg.get("outputs", 1)), kind=run_checks.announced(cfg).kind)
    if len(rows) != len(positions) or (rows < 0).any() or (rows >= n_rows).any():
        raise m.ProtocolError("alignment rows do not fit this silo's table")
    _check_alignment(rows, positions, size)
    pos2row = np.full(size, -1, dtype=np.int64)
    pos2row[positions] = rows
    return pos2row


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


def _start_model(node: Node, cfg: dict, inputs: int) -> dict:
    """A fresh bottom model for the run the authority announces, kept in the node's state;
    returns its description (without the weights)."""
    model_lib = trainer_module()
    from clients.protocol.model import ModelSpec  # imports torch: see trainer_module

    spec = ModelSpec.from_config(cfg)
    salt = silo_salt(silo_name(node))
    run_key = str(cfg["run"])
    if not run_key.isalnum():
        raise m.ProtocolError("malformed run key")
    trainer = model_lib.SiloTrainer(inputs, spec, salt, random=silo_random(node),
                                    run_key=run_key)
    model = {**spec.to_config(), "inputs": inputs, "salt": salt, "run": run_key,
             "secure": bool(cfg.get("secure", False)),
             **run_checks.announced(cfg).to_config()}  # the mode, pinned for the run
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
    write_file(node, directory, "mask.key", keys.secret, private=True)
    node.state["mask"] = ConfigRecord({"secret": keys.secret})
    # Signed with the identity key the roster pins: the authority relays this key but
    # cannot swap it for one of its own without every other silo noticing.
    me = silo_name(node)
    return {"mask_public": keys.public,
            "mask_signature": sign(silo_identity(node), masking_statement(
                roster.fingerprint, run_key, me, keys.public))}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


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
    directory = checkpoint_dir(node, run_key)
    (directory / "peers.json").write_text(json.dumps(
        {s: {"key": p.hex(), "signature": signatures.get(s, b"").hex()}
         for s, p in publics.items()}))
    return Message(m.make_content({"peers": len(record)}), reply_to=msg)


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


@handlers.query("resume")
def resume(msg: Message, node: Node) -> Message:
    cfg = m.get_config(msg)
    round_ = int(cfg["round"])
    directory = checkpoint_dir(node, str(cfg["run"]))
    name = f"round-{round_}.pt"
    if not any((directory / n).exists() for n in (name, f"{name}.enc")):
        raise SiloDataError(
            f"silo {silo_name(node)} has no checkpoint of round {round_} for "
            f"this run (looked in {directory}); the run cannot resume, start a new one"
        )
    pos2row = np.load(io.BytesIO(read_file(node, directory, "alignment.npy")),
                      allow_pickle=False)
    model = json.loads((directory / "model.json").read_text())
    forget_steps(node.context)
    node.state["align"] = m.arrays(pos2row=pos2row)
    blob = read_file(node, directory, name)
    node.state["model"] = ConfigRecord({**model, "blob": blob})
    kept_state.restore(node, directory)  # a tree or scorecard run's start and tables
    if model.get("secure"):
        keys = PairwiseKeys(read_file(node, directory, "mask.key"))
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
