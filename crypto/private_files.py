"""Secret files: created once with mode 0600 (never through a symlink), refused when others can
read them or when their length is wrong. Their contents never reach a log or an exception."""

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


def write_private(path: Path, secret: bytes) -> None:
    """Create `path` holding `secret`, readable by its owner only; fails if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)


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
