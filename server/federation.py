"""The authority's view of the silos: who they are, and sending them messages.

Uses `push_messages` + `pull_messages` with a short backoff of our own rather than
`send_and_receive`, which under a SuperLink sleeps 3 s between pulls; pushing first also lets
the authority compute while the silos work.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from clients.protocol import capture
from clients.protocol import messages as m
from crypto.roster import Roster, RosterError, authority_roster, hello_statement

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """A silo is missing, failed, or did not answer in time."""


def federation_roster(parties_root: Path) -> Roster:
    """The authority's roster (in the parties root), or a FederationError saying how to make
    one."""
    try:
        return authority_roster(parties_root)
    except RosterError as exc:
        raise FederationError(str(exc)) from None


# {message id: (silo or node id, the message sent)}
Pending = dict[str, tuple[object, Message]]
# The SuperLink's own replies for a message it could not deliver or whose reply is gone.
UNDELIVERABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                 ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _reason(msg: Message) -> str:
    """The readable part of an error reply (the simulation engine wraps tracebacks around it)."""
    reason = msg.error.reason
    if reason is None:  # Flower allows an error without a reason
        return f"error {msg.error.code} (no reason given)"
    if msg.error.code in m.SILO_CODES:
        return reason
    found = re.findall(r"Message: (.+?)(?:'>|$)", reason, flags=re.S)
    return found[-1].strip() if found else reason.strip().splitlines()[-1][:500]


class Federation:
    def __init__(
        self,
        grid: Grid,
        silos: Iterable[str],
        join_timeout: float = 120.0,
        reply_timeout: float = 600.0,
        retries: int = 0,
        *,
        roster: Roster | None = None,
    ) -> None:
        self.grid = grid
        # The federation's roster (crypto/roster.py): every SuperNode proves which silo it is
        # by signing a fresh challenge with that silo's identity key. Without one (benchmarks
        # on throwaway parties) a node's claimed name is taken as given.
        self.roster = roster
        self.silos = tuple(silos)
        self.join_timeout = join_timeout
        self.reply_timeout = reply_timeout
        self.retries = retries
        self.nodes: dict[str, int] = {}
        self.info: dict[str, dict] = {}

    def connect(self) -> dict[str, dict]:
        """Wait for the SuperNodes, ask each which silo it is, and check all are present."""
        deadline = time.monotonic() + self.join_timeout
        while len(node_ids := list(self.grid.get_node_ids())) < len(self.silos):
            if time.monotonic() > deadline:
                raise FederationError(
                    f"only {len(node_ids)} of {len(self.silos)} silos joined within "
                    f"{self.join_timeout:.0f} s; start one SuperNode per silo"
                )
            time.sleep(0.05)
        challenges = {n: secrets.token_bytes(32) for n in node_ids}
        replies = self._collect(self._push_to(_hello_messages(challenges)))
        if self.roster is None:
            log.warning("no roster: silos are not authenticated, their names are taken as given")
        elif set(self.roster.silos) != set(self.silos):
            raise FederationError("the roster's silos differ from the federation's "
                                  f"({', '.join(sorted(self.roster.silos))} vs "
                                  f"{', '.join(sorted(self.silos))}); enrol the silos again")
        for node_id, reply in replies.items():
            cfg = m.get_config(reply)
            silo = str(cfg["silo"])
            if self.roster is not None:
                self._authenticate(node_id, silo, cfg, challenges[node_id])
            if silo in self.nodes:
                raise FederationError(f"two SuperNodes claim silo {silo!r}; give each its own")
            self.nodes[silo] = node_id
            self.info[silo] = cfg
        missing = [s for s in self.silos if s not in self.nodes]
        if missing:
            raise FederationError(f"no SuperNode serves silo(s) {', '.join(missing)}")
        return self.info

    def _authenticate(self, node_id: int, silo: str, cfg: dict, challenge: bytes) -> None:
        """The node's claim to be `silo` holds only with that silo's signature over our fresh
        challenge, made for this roster."""
        assert self.roster is not None
        if "signature" not in cfg:
            raise FederationError(f"node {node_id} claims silo {silo!r} without proving it "
                                  "(no roster in its directory: enrol the silos)")
        if cfg.get("fingerprint") != self.roster.fingerprint:
            raise FederationError(f"node {node_id} (claiming silo {silo!r}) holds another "
                                  "roster than the authority; enrol the silos again")
        try:
            self.roster.verify(silo, hello_statement(self.roster.fingerprint, challenge, silo),
                               bytes(cfg["signature"]))
        except RosterError as exc:
            raise FederationError(f"node {node_id} is not silo {silo!r}: {exc}") from None

    def push(self, message_type: str, contents: Mapping[str, RecordDict]) -> Pending:
        """Send one message per silo; returns what `collect` needs to gather the replies."""
        msgs = {
            silo: Message(content, dst_node_id=self.nodes[silo], message_type=message_type)
            for silo, content in contents.items()
        }
        return self._push_to(msgs)

    def collect(self, pending: Pending) -> dict[str, Message]:
        return self._collect(pending)

    def exchange(self, message_type: str, contents: Mapping[str, RecordDict]) -> dict[str, Message]:
        return self.collect(self.push(message_type, contents))

    def broadcast(self, message_type: str, content: RecordDict) -> dict[str, Message]:
        return self.exchange(message_type, dict.fromkeys(self.silos, content))

    # ---- internals ---------------------------------------------------------------------------

    def _push_to(self, msgs: Mapping) -> Pending:
        keys = list(msgs)
        if capture.enabled():
            for msg in msgs.values():
                capture.record("authority-out", msg)
        ids = list(self.grid.push_messages([msgs[k] for k in keys]))
        return {i: (k, msgs[k]) for i, k in zip(ids, keys, strict=True)}

    def _collect(self, pending: Pending) -> dict:
        return dict(self.each(pending))

    def each(self, pending: Pending) -> Iterator[tuple[object, Message]]:
        """(silo, reply) for every pending message, as the replies arrive, so the caller can
        act on one silo's reply while the others still work. A message whose silo does not
        answer within `reply_timeout`, or that the SuperLink reports undeliverable (its node
        offline), is sent again when that time is up, giving the node the time to come back,
        up to `retries` times; silos answer a repeated step from their cache, so a retry never
        applies a step twice. Then the run stops with a FederationError."""
        waiting = {mid: (who, msg, 0) for mid, (who, msg) in pending.items()}
        undelivered: dict[str, tuple] = {}
        deadline = time.monotonic() + self.reply_timeout
        pause = 0.002
        while waiting or undelivered:
            arrived = []
            for reply in self.grid.pull_messages(list(waiting)) if waiting else ():
                if capture.enabled():
                    capture.record("authority-in", reply)
                mid = reply.metadata.reply_to_message_id
                who, msg, attempt = waiting.pop(mid)
                if reply.has_error():
                    if reply.error.code in UNDELIVERABLE:
                        undelivered[mid] = (who, msg, attempt)
                        continue
                    raise FederationError(f"{_name(who)}: {_reason(reply)}")
                arrived.append((who, reply))
            yield from arrived
            if time.monotonic() > deadline and (waiting or undelivered):
                waiting = self._retry({**waiting, **undelivered})
                undelivered = {}
                deadline = time.monotonic() + self.reply_timeout
                pause = 0.002
            if arrived:
                pause = 0.002
            elif waiting or undelivered:
                time.sleep(pause)
                pause = min(pause * 2, 0.01)

    def _retry(self, late: Mapping[str, tuple]) -> dict[str, tuple]:
        again = {}
        for who, msg, attempt in late.values():
            if attempt >= self.retries:
                raise FederationError(
                    f"{_name(who)} stopped answering: no reply to {msg.metadata.message_type} "
                    f"after {attempt + 1} attempt(s) of {self.reply_timeout:.0f} s each; check "
                    "that its SuperNode is running. Progress up to the last finished round is "
                    "checkpointed: restart the SuperNode and resume the run"
                )
            log.warning("%s did not answer %s within %.0f s; sending it again (retry %d of %d)",
                        _name(who), msg.metadata.message_type, self.reply_timeout, attempt + 1,
                        self.retries)
            again[(who, attempt + 1)] = Message(msg.content, dst_node_id=msg.metadata.dst_node_id,
                                                message_type=msg.metadata.message_type)
        ids = list(self.grid.push_messages(list(again.values())))
        return {i: (who, msg, attempt) for i, ((who, attempt), msg)
                in zip(ids, again.items(), strict=True)}


def _name(who: object) -> str:
    return who if isinstance(who, str) else f"node {who}"


def _hello_messages(challenges: Mapping[int, bytes]) -> dict[int, Message]:
    return {n: Message(m.make_content({"challenge": c}), dst_node_id=n, message_type=m.HELLO)
            for n, c in challenges.items()}
