"""What every party's node needs to find its own things, silo or region alike: the defaults a
simulation hands it and its keystore.

Neither protocol nor one side's private code: the authority never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from crypto.at_rest import AUTO, Keystore, open_keystore


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
