"""The project's one writer and checker of files and directories that hold secrets or records.

- Secret files: created once with mode 0600 (never through a symlink), refused when others can
  read them or when their length is wrong. Their contents never reach a log or an exception.
- Private directories: 0700, ours, and not a symlink (`ensure_private_dir`).
- `check_private`: the one permission check of a private file or directory (symlink, owner,
  mode), used by every module that reads a secret.
- `write_atomic`: a file replaced whole or not at all (unpredictable temporary name, fsync,
  rename, directory fsync); `open_append`: an append-only file (the audit log, the ledger).

This module imports nothing of the project (crypto/ is a leaf), so every package may use it."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# write_atomic(public=True): records anyone on the machine may read, as the umask made them.
PUBLIC_MODE = 0o644


class PrivateFileError(PermissionError):
    """A private file or directory that is a symlink, someone else's, or open to others."""


class PrivateDirError(PrivateFileError):
    """A directory meant for one user's secrets that someone else made or can enter."""


def check_private(path: Path, what: str, *, directory: bool = False) -> None:
    """Refuse a private file (or, with `directory`, a private directory) that is reached
    through a symlink (whose target's mode is what matters, and which may point anywhere),
    that is not a regular file (a directory), that another user owns, or that group or others
    may use. Raises `PrivateDirError` for a directory, `PrivateFileError` for a file."""
    _check_info(os.lstat(path), Path(path), what, directory)


def _check_info(info: os.stat_result, path: Path, what: str, directory: bool,
                public: bool = False) -> None:
    """check_private's rules on `info`; `public`: others may read the file (not write it)."""
    error = PrivateDirError if directory else PrivateFileError
    kind = "directory" if directory else "file"
    if stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {path} is a symbolic link; remove it (someone may have planted "
                    f"it) and put the {kind} itself there")
    if directory and not stat.S_ISDIR(info.st_mode):
        raise error(f"{what} {path} is not a directory; remove it and run again")
    if not directory and not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {path} is not a regular file; remove it and run again")
    if info.st_uid != os.getuid():
        raise error(f"{what} {path} belongs to another user (uid {info.st_uid}); it may be a "
                    "trap: remove it, or copy it and make it yours (in the temp directory: set "
                    "TMPDIR to a directory of your own)")
    mode = stat.S_IMODE(info.st_mode)
    if public and mode & 0o022:
        raise error(f"{what} {path} is writable by other users (mode {mode:o}); run "
                    f"`chmod 644 {path}`")
    if public:
        return
    if mode & 0o077 and directory:
        raise error(f"{what} {path} is open to other users (mode {mode:o}); remove it (others "
                    f"may have left files in it) or run `chmod 700 {path}`")
    if mode & 0o077:
        raise error(f"{what} {path} is readable by other users (mode {mode:o}); run "
                    f"`chmod 600 {path}`")


def ensure_private_dir(path: Path, what: str = "private directory", *, parents: bool = False,
                       claim_empty: bool = False) -> Path:
    """`path` as a directory only the current user can use: created 0700 when missing, and
    refused when it is a symlink, owned by another user, or open to group or others.

    A directory in a shared place (the system temp dir) that someone else made first could
    otherwise collect our sockets, Ray's session files and Flower's state; we never repair such
    a directory (chmod would not evict what the other user already put there). `claim_empty`:
    an EMPTY directory of ours that is too open is made 0700 instead (`fedscore keys init DIR`
    on a directory the user just made): nothing can be in it to evict. `parents`: create
    missing parent directories (with the default mode: they hold no secret themselves)."""
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)  # mkdir never follows a symlink at `path` itself
    if claim_empty:
        info = os.lstat(path)
        if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
                and stat.S_IMODE(info.st_mode) & 0o077 and not any(path.iterdir())):
            os.chmod(path, 0o700, follow_symlinks=False)
    check_private(path, what, directory=True)
    return path


def write_private(path: Path, secret: bytes) -> None:
    """Create `path` holding `secret`, readable by its owner only; fails if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)


def replace_private(path: Path, data: bytes) -> None:
    """Write `path` (new or replaced) readable by its owner only, never through a symlink: a
    link planted at `path` makes the open fail instead of writing our secret where it points."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its mode through O_TRUNC
        fh.write(data)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a new file, a rename) durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, public: bool = False, sync: bool = True
                 ) -> None:
    """`data` (str: UTF-8) into `path` whole or not at all: a reader or a crash sees the old
    file or the new one, never half of one.

    The temporary file beside `path` has an unpredictable name and is made with O_EXCL, so a
    link planted in advance cannot redirect the write; the rename replaces whatever is at
    `path` (a planted link included) instead of writing where it points. The file is 0600, or
    0644 when `public` (a report, a run's metrics, public keys), whatever the umask.
    `sync`: fsync the file before the rename and the directory after (durable when this
    returns); off only for large files a run can write again (party tables)."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), PUBLIC_MODE if public else 0o600)
            fh.write(raw)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def open_append(path: Path, what: str, *, public: bool = False) -> Iterator[BinaryIO]:
    """`path` open for reading and appending (every write lands at the end), created when
    missing (its directory entry fsynced at once), never through a symlink, and refused
    (`PrivateFileError`) when it is not a regular file of ours that only we can read, or with
    `public` (a privacy ledger anyone may check) only we can write. Created 0600, or 0644 when
    `public`. The caller flushes and fsyncs what it writes: when is its decision."""
    path = Path(path)
    mode = PUBLIC_MODE if public else 0o600
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | _NOFOLLOW
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
            os.fchmod(fd, mode)  # whatever the umask
            created = True
        except FileExistsError:  # O_EXCL also meets a planted link here, even a dangling one
            fd = os.open(path, flags)
            created = False
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise PrivateFileError(f"{what} {path} is a symbolic link; remove it (someone may "
                                   "have planted it) and put the file itself there") from None
        raise
    with os.fdopen(fd, "r+b") as fh:
        _check_info(os.fstat(fd), path, what, directory=False, public=public)
        if created:
            fsync_dir(path.parent)
        yield fh


def load_or_create_secret(path: Path, size: int, what: str) -> bytes:
    """The `size`-byte secret at `path`, made from the OS's entropy on first use.

    Parties starting together may race to create it: O_EXCL lets one win, the others read it."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another party made it first
            write_private(path, secrets.token_bytes(size))
    check_private(path, what)
    secret = path.read_bytes()
    if len(secret) != size:
        raise ValueError(f"{what} {path} holds {len(secret)} bytes, expected {size}; restore it "
                         "from backup")
    return secret
