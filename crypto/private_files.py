"""Secret files: created once with mode 0600 (never through a symlink), refused when others can
read them or when their length is wrong. Their contents never reach a log or an exception.
Private directories: 0700, ours, and not a symlink (`ensure_private_dir`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that others can read, or one reached through a symlink."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionError(f"{what} {path} is a symbolic link; replace it with the file itself")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise PermissionError(f"{what} {path} is readable by others (mode {mode:o}); "
                              f"run `chmod 600 {path}`")


class PrivateDirError(PermissionError):
    """A directory meant for one user's secrets that someone else made or can enter."""


def ensure_private_dir(path: Path, what: str = "private directory") -> Path:
    """`path` as a directory only the current user can use: created 0700 when missing, and
    refused when it is a symlink, owned by another user, or open to group or others.

    A directory in a shared place (the system temp dir) that someone else made first could
    otherwise collect our sockets, Ray's session files and Flower's state; we never repair such
    a directory (chmod would not evict what the other user already put there)."""
    path = Path(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)  # mkdir never follows a symlink at `path` itself
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PrivateDirError(f"{what} {path} is a symbolic link; remove it (someone may have "
                              "planted it) and run again")
    if not stat.S_ISDIR(info.st_mode):
        raise PrivateDirError(f"{what} {path} is not a directory; remove it and run again")
    if info.st_uid != os.getuid():
        raise PrivateDirError(f"{what} {path} belongs to another user (uid {info.st_uid}); "
                              "it may be a trap: remove it or set TMPDIR to a directory of "
                              "your own")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise PrivateDirError(f"{what} {path} is open to other users (mode {mode:o}); remove "
                              f"it (others may have left files in it) or run `chmod 700 {path}`")
    return path


def write_private(path: Path, secret: bytes) -> None:
    """Create `path` holding `secret`, readable by its owner only; fails if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)


def replace_private(path: Path, data: bytes) -> None:
    """Write `path` (new or replaced) readable by its owner only, never through a symlink: a
    link planted at `path` makes the open fail instead of writing our secret where it points."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its mode through O_TRUNC
        fh.write(data)


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
