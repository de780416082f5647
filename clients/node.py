"""What every party's node needs, silo or region alike: the defaults a simulation hands it, its
keystore, the tables its process has loaded, and the way its ClientApp is put together from
module-level handlers that turn the party's own diagnoses into error replies.

Neither protocol nor one side's private code: the authority never imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from clients.protocol import capture
from clients.protocol import messages as m
from crypto.at_rest import AUTO, Keystore, open_keystore

T = TypeVar("T")


@dataclass(frozen=True)
class Defaults:
    """What the simulation hands every party's node (silo or region) when no config names them:
    the parties directory and the keystore for the party's files at rest."""

    root: Path | None = None
    keystore: Path | None = None
    plaintext: bool = False  # the run asked for storage.keystore=none


def node_store(context: Context, defaults: Defaults, parties_root: Path) -> Keystore | None:
    """A party's keystore: node config `keystore=DIR` (deployment), else the one the
    simulation gives, else the run's `storage.keystore` ("auto": beside the parties
    directory, created on first use; `flwr run` on one machine)."""
    if "keystore" in context.node_config:
        return Keystore(Path(str(context.node_config["keystore"])))
    if defaults.plaintext:
        return None
    if defaults.keystore is not None:
        return Keystore.open_or_init(defaults.keystore)
    setting = str(context.run_config.get("storage.keystore", AUTO))
    return open_keystore(setting, parties_root)


class TableCache:
    """The party tables this process has loaded, prepared: derived from files on disk and cheap
    to rebuild, so kept per process and never sent anywhere. One entry per table (`identity`),
    at its newest `version` (say, the files' modification times): a new version replaces the
    old one. The engine may route any party's message to any worker process, so every party's
    table is kept (a few MB per 100k people)."""

    def __init__(self) -> None:
        self._tables: dict[Hashable, tuple[Hashable, Any]] = {}

    def get(self, identity: Hashable, version: Hashable, load: Callable[[], T]) -> T:
        held = self._tables.get(identity)
        if held is not None and held[0] == version:
            return held[1]
        self._tables.pop(identity, None)  # a stale version goes even when loading fails
        table = load()
        self._tables[identity] = (version, table)
        return table


# The process's tables, shared by every app in it. Never carried by an app: the engine sends
# the app to its workers with each message, and each worker keeps its own tables.
TABLES = TableCache()


@dataclass(frozen=True)
class Node:
    """What a handler reads besides its message: Flower's context for this node (its node and
    run config, and `state`, what Flower keeps for the run between messages), the defaults its
    app was made with, and the process's tables. Made afresh for every message."""

    context: Context
    defaults: Defaults
    tables: TableCache = field(default=TABLES, compare=False, repr=False)

    @property
    def state(self) -> RecordDict:
        return self.context.state


def parties_root(node: Node) -> Path | None:
    """Where the node's party directories live: node config `data-dir` (deployment), else the
    run config's, else the directory the simulation gave the app; None if nobody said."""
    config = node.context
    root = config.node_config.get("data-dir") or config.run_config.get("data-dir")
    return Path(str(root)) if root else node.defaults.root


Handler = Callable[[Message, Node], Message]


@dataclass(frozen=True)
class Guard:
    """How a party answers the errors it diagnoses itself, instead of failing the message:
    bad input of its own (a table, a policy) with INPUT_ERROR and the reason as is; a request
    it will not answer with REFUSED, logged; a malformed or out-of-order request with
    PROTOCOL_ERROR. The last two name the party: its node config `party=...`, else
    `partition <partition-id>` (`unnamed` without one)."""

    party: str
    log: logging.Logger
    input_errors: tuple[type[Exception], ...]
    protocol_errors: tuple[type[Exception], ...]
    refusals: tuple[type[Exception], ...] = ()
    unnamed: object = "?"

    def who(self, context: Context) -> object:
        node = context.node_config
        return node.get(self.party, f"partition {node.get('partition-id', self.unnamed)}")

    def answer(self, handler: Handler, msg: Message, node: Node) -> Message:
        try:
            return handler(msg, node)
        except self.input_errors as exc:
            return m.error_reply(msg, m.INPUT_ERROR, str(exc))
        except self.refusals as exc:
            who = self.who(node.context)
            self.log.warning("%s %s refused a %s: %s", self.party, who,
                             msg.metadata.message_type, exc)
            return m.error_reply(msg, m.REFUSED, f"{self.party} {who}: {exc}")
        except self.protocol_errors as exc:
            return m.error_reply(msg, m.PROTOCOL_ERROR, f"{self.party} {self.who(node.context)}: "
                                                        f"{exc}")


def _answer(guard: Guard, handler: Handler, defaults: Defaults, msg: Message,
            context: Context) -> Message:
    """One message, in whichever process the engine runs it: the node is made here, so its
    tables are this process's."""
    return guard.answer(handler, msg, Node(context, defaults))


class Handlers:
    """A party's message handlers, registered as on Flower's ClientApp (`@handlers.query("hello")`,
    `@handlers.train("step")`, `@handlers.evaluate()`) by module-level functions taking the
    message and the `Node`; `app(defaults)` makes the ClientApp that answers them, with the
    capture mod when capture is on, every handler behind `guard`. A simulation makes apps for
    its own parties directory and keystore; a deployment's defaults are empty."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._handlers: list[tuple[str, str | None, Handler, list[Mod] | None]] = []

    def _register(self, category: str, action: str | None,
                  mods: list[Mod] | None) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self._handlers.append((category, action, handler, mods))
            return handler

        return register

    def train(self, action: str | None = None, *,
              mods: list[Mod] | None = None) -> Callable[[Handler], Handler]:
        return self._register("train", action, mods)

    def evaluate(self, action: str | None = None, *,
                 mods: list[Mod] | None = None) -> Callable[[Handler], Handler]:
        return self._register("evaluate", action, mods)

    def query(self, action: str | None = None, *,
              mods: list[Mod] | None = None) -> Callable[[Handler], Handler]:
        return self._register("query", action, mods)

    def app(self, defaults: Defaults) -> ClientApp:
        app = ClientApp(mods=[capture.capture_mod] if capture.enabled() else None)
        for category, action, handler, mods in self._handlers:
            register = getattr(app, category)
            decorate = register(mods=mods) if action is None else register(action, mods=mods)
            decorate(partial(_answer, self.guard, handler, defaults))
        return app
