"""The silo's Flower ClientApp.

A silo is named by its node config (`silo=payments`, deployment) or by the simulation engine's
`partition-id` (0, 1, 2 -> payments, social, device). Its table lives in `<data-dir>/<silo>/`.
Model, optimiser and alignment live in the node's `context.state`, which Flower keeps on the
silo's side between messages; the prepared feature matrix is cached per process because it is
derived from the table and cheap to rebuild.

Each message is a module-level handler registered on `registry.handlers`
(`@handlers.query("hello")`, `@handlers.train("step")`, Flower's style); it reads the node
(`clients.node.Node`: Flower's context, the defaults the app was made with, the process's
tables) instead of a closure. The handlers live by concern: alignment.py (query.hello,
query.psi_blind, query.psi_finish, query.align, query.peers, query.resume), training.py
(train.step), after_run.py (query.score, query.correct), gbdt_handlers.py (the trees'
messages, `model.kind=gbdt`) and scorecard_handlers.py (`model.kind=scorecard`); state.py holds
what they share.
`make_client_app(root, keystore)` makes the ClientApp for a simulation's parties; `app` is the
deployment's (pyproject.toml names it as the Flower app's clientapp).
"""

from __future__ import annotations

from pathlib import Path

from flwr.clientapp import ClientApp

from clients.node import Defaults

# Imported for their handlers, which register on `handlers` as each module loads.
from clients.silo import (  # noqa: F401
    after_run,
    alignment,
    gbdt_handlers,
    scorecard_handlers,
    training,
)
from clients.silo.registry import handlers


def make_client_app(root: Path | None = None, keystore: Path | None = None,
                    plaintext: bool = False) -> ClientApp:
    """The silo's app; `root` is the parties directory and `keystore` the silos' keystore when
    no config names them (the simulation)."""
    return handlers.app(Defaults(root, keystore, plaintext))


app = make_client_app()
