"""An append-only, hash-chained, encrypted audit log (disputes, re-scores, corrections).

Why: a dispute changes a person's score after the run; the log is what lets anyone later show
which corrections were made, in which order, and that none was removed or edited since.

File format: UTF-8, one entry per line, each line the canonical JSON object

    {"ct": base64(ciphertext), "hash": hex, "prev": hex, "seq": n}

- `seq` counts from 0; `prev` is the previous entry's `hash` (for entry 0, a genesis hash derived
  from the log's name); `hash` = SHA-256("fedscore/audit/v1" | prev | seq as 8 bytes | ciphertext).
- The ciphertext is `crypto.at_rest.encrypt` (AES-256-GCM, or SM4-GCM with such a keystore) of
  the JSON {"seq", "prev", "record"}, with associated data binding it to this log's name, its
  sequence number and the previous hash: an entry cannot be moved to another log or position,
  nor the chain rewired, without the key.

Why SHA-256 over the ciphertext, not HMAC over the record:
- Authenticity already comes from GCM: the tag covers the ciphertext and the associated data
  (log name, seq, prev). Someone without the key who edits an entry and recomputes every later
  hash still fails at that entry's decryption. An HMAC would add a second key to manage (and to
  keep stable across the keystore's rotations) for no extra protection.
- Hashing the ciphertext leaks nothing about the record, whereas an unkeyed hash of a record
  (a phone number, a score) could be enumerated; the chain's structure (order, gaps, edits) can
  be checked by someone who holds no key.
- What no chain can show alone is that entries were cut from the end, or that the whole log
  was deleted: every append also writes an ANCHOR outside the run directory, in the authority's
  keystore (`<keystore>/audit-anchors/<run id>.json`, atomically): the head hash, the number
  of entries, and digests of the files a dispute changes (the run's scores, each silo's
  corrections). `check_anchor` (`fedscore audit`) compares the log and those files with it: a
  deleted, truncated, replaced or rolled-back log, or scores or corrections that differ from
  what the last dispute left, is reported. `verify(expect_head=...)` still checks the last hash
  against one the caller kept.

Appends take an exclusive `flock` on the file, re-read the tail under it, write one line and
fsync, so concurrent writers serialise instead of forking the chain. An incomplete last line
(an interrupted write) is reported by `verify` and refused by `append`. Neither keys nor record
contents are ever logged or put in an exception message.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crypto.at_rest import AtRestError, Keystore, decrypt, encrypt
from crypto.private_files import (
    PrivateFileError,
    check_private,
    ensure_private_dir,
    open_append,
    write_atomic,
)

log = logging.getLogger(__name__)

DOMAIN = b"fedscore/audit/v1"
FIELDS = ("ct", "hash", "prev", "seq")
_TAIL_CHUNK = 4096


class AuditLogError(ValueError):
    """An audit log that cannot be appended to or read: names the entry, the problem, the fix."""


@dataclass(frozen=True)
class Entry:
    seq: int
    prev_hash: str
    hash: str
    record: dict[str, Any]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int  # entries that verified, all of them when ok
    first_bad: int | None = None  # index of the first entry that failed
    reason: str | None = None
    head: str = ""  # hash of the last entry that verified (the genesis hash if none)

    def __bool__(self) -> bool:
        return self.ok


def genesis_hash(log_name: str) -> str:
    """The `prev` of entry 0: binds the chain's start to the log's name."""
    return hashlib.sha256(DOMAIN + b"/genesis\x00" + log_name.encode()).hexdigest()


def chain_hash(prev: str, seq: int, ciphertext: bytes) -> str:
    return hashlib.sha256(DOMAIN + bytes.fromhex(prev) + seq.to_bytes(8, "big")
                          + ciphertext).hexdigest()


def _context(log_name: str, seq: int, prev: str) -> bytes:
    # Fixed-width fields first, the free-form name last: the encoding is unambiguous.
    return DOMAIN + seq.to_bytes(8, "big") + bytes.fromhex(prev) + log_name.encode()


def _line(seq: int, prev: str, ciphertext: bytes, digest: str) -> bytes:
    obj = {"ct": base64.b64encode(ciphertext).decode("ascii"), "hash": digest, "prev": prev,
           "seq": seq}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def _encode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as it will read back; refuses what JSON would silently change."""
    if not isinstance(record, Mapping):
        raise AuditLogError(f"a record must be a mapping of field names to JSON values, got "
                            f"{type(record).__name__}; pass a dict")
    try:
        text = json.dumps(dict(record), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        kind = "NaN or infinity" if "Out of range" in str(exc) else "a value JSON cannot hold"
        raise AuditLogError(f"the record holds {kind}; convert it (e.g. to a string or None) "
                            "before appending") from None
    back = json.loads(text)
    if back != dict(record):
        raise AuditLogError("the record would not read back unchanged (non-string keys, tuples "
                            "or similar); use string keys, lists and plain JSON values")
    return back


class AuditLog:
    """The log at `path`, encrypted with `store`.

    `log_name` (default: the file's name) is bound into every entry; give the run's id (e.g.
    "run-42/audit") to keep a log from being passed off as another run's with the same keys."""

    def __init__(self, path: Path, store: Keystore, log_name: str | None = None) -> None:
        self.path = Path(path)
        self.store = store
        self.log_name = self.path.name if log_name is None else log_name
        # Outside the run directory, so deleting or rolling back the run's files cannot take
        # the record of what they were with them.
        self.anchor_path = anchor_path(store, self.log_name, self.path)

    def __repr__(self) -> str:
        return f"AuditLog({self.path}, log_name={self.log_name!r})"

    # ---- writing ----------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> Entry:
        """Append `record`; returns the entry as written (durable when this returns)."""
        body = _encode_record(record)
        # 0600, never through a planted link, created with its directory entry fsynced.
        with open_append(self.path, "audit log") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
            seq, prev = self._tail(fh)
            # A log behind its anchor (deleted, cut, replaced) must not be anchored afresh:
            # the next append would hide what was removed.
            anchor = read_anchor(self.anchor_path)
            if anchor is not None and (anchor.entries, anchor.head) != (seq, prev):
                raise AuditLogError(
                    f"{self.path}: the log does not match its anchor in the keystore (it has "
                    f"{seq} entries, the anchor records {anchor.entries}); nothing was "
                    "appended. Run `fedscore audit RUN_DIR` and restore the log from a backup")
            plaintext = json.dumps({"seq": seq, "prev": prev, "record": body},
                                   ensure_ascii=False).encode()
            ciphertext = encrypt(self.store, plaintext, _context(self.log_name, seq, prev))
            digest = chain_hash(prev, seq, ciphertext)
            fh.write(_line(seq, prev, ciphertext, digest) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            # Still under the lock: the anchor moves with the log, one writer at a time.
            write_anchor(self.anchor_path, Anchor(digest, seq + 1, guarded_digests(self.path)))
        log.info("audit log %s: appended entry %d", self.path.name, seq)
        return Entry(seq, prev, digest, body)

    def _tail(self, fh: Any) -> tuple[int, str]:
        """(next sequence number, hash to chain to), from the last line, checked."""
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0, genesis_hash(self.log_name)
        chunk = _TAIL_CHUNK
        while True:
            start = max(0, size - chunk)
            fh.seek(start)
            data = fh.read(size - start)
            if not data.endswith(b"\n"):
                raise AuditLogError(
                    f"{self.path}: the last line is incomplete (an interrupted write?); nothing "
                    "was appended. Run `verify()` (`fedscore audit RUN_DIR`) to locate it and "
                    "restore the log from a backup")
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut >= 0 or start == 0:
                last = data[cut + 1 : -1]
                break
            chunk *= 2
        entry = self._check_line(last, None, None)
        if isinstance(entry, str):
            raise AuditLogError(f"{self.path}: the last {entry}; nothing was appended. Run "
                                "`verify()` (`fedscore audit RUN_DIR`) before appending again")
        return entry.seq + 1, entry.hash

    # ---- reading ----------------------------------------------------------------------------

    def _check_line(self, raw: bytes, index: int | None, prev: str | None) -> Entry | str:
        """The entry on `raw`, or why it fails ("entry N: ..."). `index`/`prev`: what position
        and link the entry must have (None: take its own, as for the tail on append)."""
        name = "entry" if index is None else f"entry {index}"
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"{name}: not a well-formed entry line (corrupted)"
        if (not isinstance(obj, dict) or sorted(obj) != list(FIELDS)
                or not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool)
                or not all(isinstance(obj[k], str) for k in ("ct", "hash", "prev"))):
            return f"{name}: not a well-formed entry line (fields missing or of the wrong type)"
        seq, prev_field, digest = obj["seq"], obj["prev"], obj["hash"]
        try:
            ciphertext = base64.b64decode(obj["ct"], validate=True)
            if obj["ct"] != base64.b64encode(ciphertext).decode("ascii"):
                raise ValueError
            canonical = _line(seq, prev_field, ciphertext, digest)
            bytes.fromhex(prev_field)
        except (binascii.Error, ValueError):
            return f"{name}: not a well-formed entry line (bad base64 or hex)"
        if canonical != raw:
            return f"{name}: the line is not in canonical form (it was edited)"
        if index is not None and seq != index:
            return (f"{name}: carries sequence number {seq} (entries were deleted, inserted or "
                    "reordered)")
        if prev is not None and prev_field != prev:
            return (f"{name}: its previous-entry hash does not match the entry before it (an "
                    "earlier entry was deleted, changed or reordered)")
        if len(prev_field) != 64 or chain_hash(prev_field, seq, ciphertext) != digest:
            return f"{name}: its hash does not match its content (the entry was modified)"
        try:
            plain = decrypt(self.store, ciphertext, _context(self.log_name, seq, prev_field))
        except AtRestError as exc:
            return f"{name}: cannot be decrypted and authenticated ({exc})"
        try:
            body = json.loads(plain)
            if body["seq"] != seq or body["prev"] != prev_field:
                raise ValueError
            record = body["record"]
        except (ValueError, KeyError, TypeError):
            return f"{name}: its decrypted content disagrees with its line"
        return Entry(seq, prev_field, digest, record)

    def _scan(self, expect_head: str | None) -> tuple[VerifyResult, list[Entry]]:
        head = genesis_hash(self.log_name)
        if not self.path.exists():
            raise AuditLogError(f"no audit log at {self.path}; check the run directory")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1]  # the piece after the last newline is b"" unless truncated
        entries: list[Entry] = []
        for i, raw in enumerate(complete):
            checked = self._check_line(raw, i, head)
            if isinstance(checked, str):
                return VerifyResult(False, i, i, checked, head), entries
            entries.append(checked)
            head = checked.hash
        n = len(entries)
        if lines[-1]:
            reason = f"entry {n}: truncated last line (no line end; an interrupted write?)"
            return VerifyResult(False, n, n, reason, head), entries
        if expect_head is not None and head != expect_head:
            reason = (f"entry {n}: missing; the log ends after {n} entries with a head hash that "
                      "differs from the expected one (entries were cut from the end, or the log "
                      "was replaced)")
            return VerifyResult(False, n, n, reason, head), entries
        return VerifyResult(True, n, None, None, head), entries

    def verify(self, expect_head: str | None = None) -> VerifyResult:
        """Check every entry (format, order, chain, hash, decryption) and, with `expect_head`,
        that the log still ends where it did when that head was recorded."""
        result, _ = self._scan(expect_head)
        if result.ok:
            log.info("audit log %s: %d entries verified", self.path.name, result.entries)
        else:
            log.warning("audit log %s: verification failed: %s", self.path.name, result.reason)
        return result

    def entries(self) -> list[dict[str, Any]]:
        """The records in order; raises `AuditLogError` unless the whole log verifies."""
        result, entries = self._scan(None)
        if not result.ok:
            raise AuditLogError(f"{self.path}: {result.reason}; restore the log from a backup")
        return [e.record for e in entries]


# ---- the anchor ---------------------------------------------------------------------------------

ANCHOR_DIR = "audit-anchors"
ANCHOR_VERSION = 1


@dataclass(frozen=True)
class Anchor:
    """What the log and the files a dispute changes were after the last append."""

    head: str
    entries: int
    digests: dict[str, str | None] = field(default_factory=dict)


def anchor_path(store: Keystore, log_name: str, log_path: Path) -> Path:
    """`<keystore>/audit-anchors/<run id>.json`. The run id is the log's name (the run key)
    with a digest of the log's place: two runs of one configuration share a run key."""
    run = log_name.split("/", 1)[0]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run)[:64] or "log"
    where = hashlib.sha256(str(Path(log_path).resolve()).encode()).hexdigest()[:12]
    return Path(store.path) / ANCHOR_DIR / f"{safe}-{where}.json"


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes (the files guarded are ciphertext), None when it is absent."""
    if not path.exists():
        return None
    h = hashlib.sha256(DOMAIN + b"/anchor-file\x00")
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def guarded_files(log_path: Path) -> dict[str, Path]:
    """The files a dispute changes, by name: the run's scores (beside the log) and each silo's
    corrections (in the parties directory that the run's run.json names)."""
    run_dir = Path(log_path).parent
    out: dict[str, Path] = {}
    for name in ("scores.parquet.enc", "scores.parquet"):
        if (run_dir / name).exists():
            out["scores"] = run_dir / name
            break
    else:
        out["scores"] = run_dir / "scores.parquet.enc"
    try:
        parties = Path(json.loads((run_dir / "run.json").read_text())["parties"])
    except (OSError, ValueError, KeyError, TypeError):
        return out
    if parties.is_dir():
        for silo in sorted(d for d in parties.iterdir() if d.is_dir()):
            for name in ("corrections.json.enc", "corrections.json"):
                if (silo / name).exists():
                    out[f"corrections/{silo.name}"] = silo / name
                    break
    return out


def guarded_digests(log_path: Path) -> dict[str, str | None]:
    return {name: file_digest(path) for name, path in guarded_files(log_path).items()}


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Atomically (temporary file, fsync, rename): a crash leaves the old anchor or the new."""
    ensure_private_dir(path.parent, "the keystore's audit anchors")
    body = json.dumps({"version": ANCHOR_VERSION, "head": anchor.head, "entries": anchor.entries,
                       "digests": anchor.digests}, sort_keys=True, indent=2) + "\n"
    write_atomic(path, body)


def read_anchor(path: Path) -> Anchor | None:
    if not path.exists() and not path.is_symlink():
        return None
    try:
        check_private(path, "the audit anchor")  # what vouches for the log: ours alone
    except PrivateFileError as exc:
        raise AuditLogError(f"{exc}; or restore the keystore from a backup") from None
    try:
        raw = json.loads(path.read_text())
        return Anchor(str(raw["head"]), int(raw["entries"]), dict(raw.get("digests", {})))
    except (ValueError, KeyError, TypeError):
        raise AuditLogError(f"the audit anchor {path} is damaged; restore the keystore from a "
                            "backup") from None


@dataclass(frozen=True)
class AnchorCheck:
    """The log and the guarded files against the anchor: `problems` empty when they agree."""

    anchored: bool
    entries: int
    head: str
    problems: list[str]

    def __bool__(self) -> bool:
        return not self.problems


def check_anchor(audit: AuditLog, expect_head: str | None = None) -> AnchorCheck:
    """Whether the log is whole (the chain verifies) and is the log the anchor recorded, and
    whether the scores and corrections are what the last dispute left."""
    anchor = read_anchor(audit.anchor_path)
    problems: list[str] = []
    if not audit.path.exists():
        if anchor is not None and anchor.entries > 0:
            problems.append(f"the audit log is missing, but its anchor records {anchor.entries} "
                            f"entries: the log was deleted; restore {audit.path.name} from a "
                            "backup")
        elif expect_head is not None and expect_head != genesis_hash(audit.log_name):
            problems.append("the audit log is missing, but a head hash was expected: the log "
                            "was deleted; restore it from a backup")
        head = anchor.head if anchor else genesis_hash(audit.log_name)
        if anchor is not None:
            problems += _file_problems(audit, anchor)
        return AnchorCheck(anchor is not None, 0, head, problems)
    result, entries = audit._scan(expect_head)
    if not result.ok:
        problems.append(str(result.reason))
    if anchor is None:
        problems.append(f"the audit log has {result.entries} entries but no anchor in the "
                        "keystore: it cannot be shown complete (was the keystore replaced, or "
                        "the log copied from elsewhere?)")
        return AnchorCheck(False, result.entries, result.head, problems)
    n = len(entries)
    if result.ok and n < anchor.entries:
        problems.append(f"the audit log has {n} entries, its anchor records {anchor.entries}: "
                        "entries were cut from the end or the log was rolled back")
    elif result.ok and n == anchor.entries and result.head != anchor.head:
        problems.append("the audit log's head differs from its anchor: the log was replaced")
    elif result.ok and n > anchor.entries:
        if anchor.entries and entries[anchor.entries - 1].hash != anchor.head:
            problems.append("the audit log's anchored entries differ from its anchor: the log "
                            "was replaced")
        else:
            problems.append(f"the audit log has {n - anchor.entries} entries after its anchor "
                            "(a dispute interrupted before anchoring?); check them and the "
                            "scores")
    problems += _file_problems(audit, anchor)
    return AnchorCheck(True, n, result.head, problems)


def _file_problems(audit: AuditLog, anchor: Anchor) -> list[str]:
    now = guarded_digests(audit.path)
    out = []
    for name in sorted(set(anchor.digests) | set(now)):
        if anchor.digests.get(name) != now.get(name):
            what = "scores" if name == "scores" else f"{name.split('/', 1)[-1]}'s corrections"
            if now.get(name) is None:
                out.append(f"the {what} are missing, but the last dispute left them (anchored): "
                           "deleted; restore them from a backup")
            else:
                out.append(f"the {what} differ from what the last dispute left (anchored): "
                           "rolled back or replaced; restore them from a backup")
    return out
