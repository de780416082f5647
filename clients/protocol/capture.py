"""Record every message payload a party sends or receives, for the leak canary and the red team.

Off unless FEDSCORE_CAPTURE_DIR is set. Two forms, both under that directory:

- raw: payloads appended (array bytes and config values) to one `<side>-<pid>.bin` file per
  process, so a test can scan everything that crossed the wire (tests/test_leak_canary.py);
- structured: one `messages/<time>-<pid>-<seq>-<side>.npz` (the arrays, as sent) and `.json`
  (message type, side, silo, node ids, round, config values, error) per message, so an attack
  can replay exactly what one party received (simulations/analysis/redteam.py, `read_messages`).

Sides: `silo-in` / `silo-out` (recorded in the silo's ClientApp, which knows its silo name) and
`authority-out` / `authority-in` (recorded by the authority's federation).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from clients.protocol.schema import federation_silos

CAPTURE_ENV = "FEDSCORE_CAPTURE_DIR"
MESSAGES_DIR = "messages"
_SEQUENCE = itertools.count()


def enabled() -> bool:
    return bool(os.environ.get(CAPTURE_ENV))


def payload_bytes(msg: Message) -> bytes:
    """Everything a message carries: array buffers, config values, error reasons."""
    if msg.has_error():
        return (msg.error.reason or "").encode()  # Flower allows an error without a reason
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


def record(side: str, msg: Message, silo: str | None = None) -> None:
    directory = Path(os.environ[CAPTURE_ENV])
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{side}-{os.getpid()}.bin", "ab") as fh:
        fh.write(payload_bytes(msg) + b"\n")
    _record_structured(directory / MESSAGES_DIR, side, msg, silo)


def _json_value(value: object) -> object:
    """A config value as JSON: bytes as {"hex": ...}, lists element by element."""
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return {"float": repr(value)}
    return value


def _record_structured(directory: Path, side: str, msg: Message, silo: str | None) -> None:
    meta = msg.metadata
    info: dict = {
        "side": side,
        "direction": "in" if side.endswith("-in") else "out",
        "silo": silo,
        "message_type": meta.message_type,
        "message_id": meta.message_id,
        "reply_to": meta.reply_to_message_id,
        "src_node": int(meta.src_node_id),
        "dst_node": int(meta.dst_node_id),
        "pid": os.getpid(),
        "time_ns": time.time_ns(),
    }
    arrays: dict[str, np.ndarray] = {}
    if msg.has_error():
        info["error"] = {"code": int(msg.error.code), "reason": msg.error.reason}
    else:
        config: dict = {}
        for name, rec in msg.content.items():
            for key, value in rec.items():
                label = key if name in ("config", "arrays") else f"{name}.{key}"
                if hasattr(value, "numpy"):
                    arrays[label] = value.numpy()
                else:
                    config[label] = _json_value(value)
        info["config"] = config
        info["round"] = config.get("round")
        info["arrays"] = sorted(arrays)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{info['time_ns']}-{os.getpid()}-{next(_SEQUENCE):06d}-{side}"
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    (directory / f"{stem}.npz").write_bytes(buf.getvalue())
    # The .json goes last: a reader takes a message as complete once its .json exists.
    tmp = directory / f"{stem}.json.partial"
    tmp.write_text(json.dumps(info))
    tmp.replace(directory / f"{stem}.json")


def _silo_of(context: Context) -> str | None:
    """The silo this node serves, as clients/silo/state.py names it (node config `silo`, else
    the simulation's partition-id over the federation's silos)."""
    node = context.node_config
    if "silo" in node:
        return str(node["silo"])
    if "partition-id" in node:
        root = context.node_config.get("data-dir") or context.run_config.get("data-dir")
        silos = federation_silos(Path(str(root)) if root else None)
        pid = int(node["partition-id"])
        return silos[pid] if 0 <= pid < len(silos) else None
    return None


def capture_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower ClientApp mod: records the message in and the reply out."""
    silo = _silo_of(context)
    record("silo-in", msg, silo)
    reply = call_next(msg, context)
    record("silo-out", reply, silo)
    return reply
