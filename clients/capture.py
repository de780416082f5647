"""Record every message payload a party sends or receives, for the leak canary test.

Off unless FEDSCORE_CAPTURE_DIR is set. Payloads are appended raw (array bytes and config
values) to one file per process, so a test can scan everything that crossed the wire.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message

CAPTURE_ENV = "FEDSCORE_CAPTURE_DIR"


def enabled() -> bool:
    return bool(os.environ.get(CAPTURE_ENV))


def payload_bytes(msg: Message) -> bytes:
    """Everything a message carries: array buffers, config values, error reasons."""
    if msg.has_error():
        return msg.error.reason.encode()
    parts: list[bytes] = []
    for record in msg.content.values():
        for key, value in record.items():
            parts.append(key.encode())
            data = getattr(value, "data", None)  # an Array's serialised buffer
            if isinstance(data, bytes):
                parts.append(data)
            elif isinstance(value, bytes):
                parts.append(value)
            else:
                parts.append(repr(value).encode())
    return b"\n".join(parts)


def record(side: str, msg: Message) -> None:
    directory = Path(os.environ[CAPTURE_ENV])
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{side}-{os.getpid()}.bin", "ab") as fh:
        fh.write(payload_bytes(msg) + b"\n")


def capture_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower ClientApp mod: records the message in and the reply out."""
    record("silo-in", msg)
    reply = call_next(msg, context)
    record("silo-out", reply)
    return reply
