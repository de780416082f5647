"""A SuperNode that runs only the app bundle its silo operator pinned.

Under the deployment engine the SuperLink ships each run's Flower App Bundle (FAB) to the
SuperNodes, and every silo-side check lives in that bundle's ClientApp: a SuperNode that ran any
bundle would let the authority replace those checks. Flower's own answer, `--trusted-entities`,
verifies signatures that only the Flower platform attaches (a `valid_license` mark from an app
published there), so a locally built app can never pass it. The silo operator therefore pins
the SHA-256 of the bundle they reviewed, and the SuperNode refuses any other one before storing
or running it.

FAB builds are reproducible (Flower fixes every zip entry's date), so an operator computes the
pin from the source they reviewed:

  python -m simulations.run.app_pin hash [APP_DIR]                       # prints the pin
  python -m simulations.run.app_pin supernode --app-pin-file PIN -- <flower-supernode arguments>

The check runs in the SuperNode process, outside the bundle: a bundle cannot switch it off.
It reuses Flower's refusal path for unverified bundles (the first message of the run is answered
with Flower's "The FAB could not be verified" error; the bundle is neither stored nor run).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("simulations.run.app_pin")  # also when run as __main__

PIN_ENTITY = "fedscore-app-pin"  # the name our pin takes among Flower's trusted entities
# Flower checks this mark before asking its verifier; ours is the pin check below.
VERIFIED_MARK = "valid_license"
_PIN = re.compile(r"[0-9a-f]{64}")


class AppPinError(ValueError):
    """A malformed pin, or a pin file that cannot be read."""


def build_app(root: Path) -> bytes:
    """The FAB that `flwr run root` ships, byte for byte (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk  # Flower's CLI internals: `deploy` only

    return build_fab_from_disk(Path(root))


def app_hash(fab: bytes) -> str:
    """A bundle's pin: the SHA-256 Flower itself names the bundle by."""
    return hashlib.sha256(fab).hexdigest()


def pin_of(root: Path) -> str:
    return app_hash(build_app(root))


def checked_pin(pin: str) -> str:
    pin = pin.strip().lower()
    if not _PIN.fullmatch(pin):
        raise AppPinError("an app pin is the 64 hex digits "
                          "`python -m simulations.run.app_pin hash` prints")
    return pin


def read_pin(path: Path) -> str:
    try:
        return checked_pin(Path(path).read_text())
    except OSError as exc:
        raise AppPinError(f"cannot read the app pin {path}: {exc.strerror}") from None


def matches(pin: str, hash_str: str, content: bytes) -> bool:
    """The bundle is the pinned one: its content hashes to the pin, and it is named by it (the
    SuperNode later hands the ClientApp the bundle stored under that name)."""
    return hmac.compare_digest(app_hash(content), pin) and hmac.compare_digest(hash_str, pin)


def install(pin: str) -> None:
    """Make this process's Flower SuperNode run only the bundle pinned by `pin`."""
    # Flower's SuperNode internals, patched in the one process that becomes a SuperNode.
    from flwr.supercore.fab import Fab
    from flwr.supernode import start_client_internal as sci

    pin = checked_pin(pin)
    original = sci._pull_and_store_message

    def pinned_pull(**kwargs: Any) -> int | None:
        get_fab: Callable[[str, int], Fab] = kwargs["get_fab"]

        def checked_get_fab(fab_hash: str, run_id: int) -> Fab:
            fab = get_fab(fab_hash, run_id)
            if matches(pin, fab.hash_str, fab.content):
                log.info("run %s: the app bundle matches the pinned one", run_id)
            else:
                # The bundle's own hash is public (Flower logs it too); a prefix identifies it.
                log.error("run %s: REFUSED an app bundle that is not the pinned one (bundle "
                          "%s…, pin %s…); it will not be stored or run", run_id,
                          app_hash(fab.content)[:12], pin[:12])
            # Let Flower's trusted-entity path ask our verifier (below) either way.
            return Fab(fab.hash_str, fab.content, {VERIFIED_MARK: "pin"})

        kwargs["get_fab"] = checked_get_fab
        kwargs["trusted_entities"] = {PIN_ENTITY: pin}
        return original(**kwargs)

    def verify(fab: Fab, trusted_entities: dict[str, str]) -> bool:
        return matches(pin, fab.hash_str, fab.content)

    # Flower calls its private function by keyword; the wrapper passes every one through.
    sci._pull_and_store_message = pinned_pull  # type: ignore[assignment]
    sci._verify_fab = verify


def _log_to_stderr() -> None:
    """Our own lines only: a root handler would also print Flower's DEBUG records (it logs
    every poll of its runtime API)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run.app_pin",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hash", help="print the pin of the app in APP_DIR")
    h.add_argument("app_dir", nargs="?", type=Path, default=Path.cwd())
    node = sub.add_parser("supernode", help="run flower-supernode, refusing unpinned apps")
    how = node.add_mutually_exclusive_group(required=True)
    how.add_argument("--app-pin", help="the pin (64 hex digits)")
    how.add_argument("--app-pin-file", type=Path, help="a file holding the pin")
    node.add_argument("supernode_args", nargs=argparse.REMAINDER,
                      help="-- then flower-supernode's own arguments")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(pin_of(args.app_dir))
        return 0
    try:
        pin = read_pin(args.app_pin_file) if args.app_pin_file else checked_pin(args.app_pin)
    except AppPinError as exc:
        parser.error(str(exc))
    rest = list(args.supernode_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    _log_to_stderr()
    install(pin)
    from flwr.supernode.cli import flower_supernode  # after install: it must see the patch

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
