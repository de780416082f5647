"""The message schema between the authority and the silos.

It lives in clients/protocol/, the door: a silo deploys without the authority's code, and
`server/` imports it from here.

After alignment no message carries an identifier: only row positions 0..M-1 of the shared order,
contributions and gradients.

Message types (Flower "<category>.<action>"):
  query.hello        -> silo name, table size                       (discovery + validation)
  query.psi_blind    -> b*H(y) for the silo's rows                  (PSI step 1)
  query.psi_finish   a*H(x) -> b*(a*H(x))                           (PSI step 3)
  query.align        silo rows + shared positions + model spec      (alignment, model init)
                     + the run's kind and target epsilon (clients/protocol/run_mode.py)
  train.step         [grad for the previous plan] [new plan] [eval positions]
                     -> contributions for the new plan and the eval positions
  query.peers        every silo's masking public key (relayed, secure sum only)
  query.resume       run key + round -> the silo restores its own checkpoint of that round
  query.correct      position + field + value -> the silo records a correction of its record
  query.score        request id + positions [+ cohort] -> contributions (masked under secure
                     sum), with reason codes when asked; [+ drift] the PSI of the silo's points
  query.gbdt_start, train.gbdt_level, train.gbdt_split, query.gbdt_route
                     model.kind=gbdt: the trees' messages (clients/protocol/gbdt.py)

The last step of training and `query.score` can ask for reason codes ("explain": k): each silo
then also sends, per person, g_k(x) - g_k(typical person) and its k features that raise the
default logit most with their shares (clients/silo/explain.py). That is a deliberate disclosure of
per-silo contributions (docs/threat-model.md); `explain.reasons=0` keeps secure sum whole.

With secure aggregation, contributions travel as uint64 fixed-point shares masked pairwise
(crypto.masking): the authority can decode only their sum.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Literal, overload

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

HELLO = "query.hello"
PSI_BLIND = "query.psi_blind"
PSI_FINISH = "query.psi_finish"
ALIGN = "query.align"
STEP = "train.step"
RESUME = "query.resume"
PEERS = "query.peers"
CORRECT = "query.correct"
SCORE = "query.score"

# Error codes a silo uses for problems it diagnosed itself; the reason is meant for people.
INPUT_ERROR = 4001
PROTOCOL_ERROR = 4002
# The request is well formed but this silo's policy (clients/silo/policy.py), roster, answer
# journal or the run's announced mode (clients/silo/run_checks.py) does not allow it: the
# authority asked for something the silo will not release.
REFUSED = 4003
SILO_CODES = (INPUT_ERROR, PROTOCOL_ERROR, REFUSED)


class ProtocolError(ValueError):
    """A message that does not follow this schema (wrong shape, missing field, stale plan)."""


def arrays(**values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in values.items()})


def make_content(
    config: dict | None = None, **values: np.ndarray | None
) -> RecordDict:
    """Content with an optional "config" record and an "arrays" record of the given arrays."""
    content = RecordDict()
    if config:
        content["config"] = ConfigRecord(config)
    present = {k: v for k, v in values.items() if v is not None}
    if present:
        content["arrays"] = arrays(**present)
    return content


def get_config(msg: Message) -> dict:
    return dict(msg.content["config"]) if "config" in msg.content else {}


# Typed reads of records and config values. Flower types a RecordDict entry as any record kind
# and a config value as any config type; these check the runtime type, so a peer (or a stale
# node state) with the wrong kind fails as a ProtocolError naming the key instead of somewhere
# later. An absent key still raises KeyError, as plain indexing does.


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    record = content[key]
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(f"record {key!r} is a {type(record).__name__}, not a ConfigRecord")
    return record


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"record {key!r} is a {type(record).__name__}, not an ArrayRecord")
    return record


def _wrong_type(key: str, value: object, expected: str) -> ProtocolError:
    return ProtocolError(f"config {key!r} is a {type(value).__name__}, expected {expected}")


def config_int(config: Mapping[str, object], key: str) -> int:
    value = config[key]
    if not isinstance(value, int):  # bool included: int(True) was always accepted
        raise _wrong_type(key, value, "an int")
    return int(value)


def config_float(config: Mapping[str, object], key: str) -> float:
    value = config[key]
    if not isinstance(value, int | float):  # an int is a valid float setting (`--set lr=1`)
        raise _wrong_type(key, value, "a number")
    return float(value)


def config_bytes(config: Mapping[str, object], key: str) -> bytes:
    value = config[key]
    if not isinstance(value, bytes):
        raise _wrong_type(key, value, "bytes")
    return value


def config_floats(config: Mapping[str, object], key: str) -> list[float]:
    value = config[key]
    if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
        raise _wrong_type(key, value, "a list of numbers")
    return [float(v) for v in value]


def _arrays(content: RecordDict) -> ArrayRecord | None:
    return array_record(content, "arrays") if "arrays" in content else None


@overload
def get_array(msg: Message, key: str, dtype: type | None = ..., ndim: int | None = ...,
              required: Literal[True] = ...) -> np.ndarray: ...


@overload
def get_array(msg: Message, key: str, dtype: type | None = ..., ndim: int | None = ...,
              required: bool = ...) -> np.ndarray | None: ...


def get_array(
    msg: Message,
    key: str,
    dtype: type | None = None,
    ndim: int | None = None,
    required: bool = True,
) -> np.ndarray | None:
    """Read array `key`, checking dtype and rank so a malformed peer fails loudly here."""
    record = _arrays(msg.content)
    if record is None or key not in record:
        if required:
            raise ProtocolError(f"message {msg.metadata.message_type} lacks array {key!r}")
        return None
    value = record[key].numpy()
    if dtype is not None and value.dtype != np.dtype(dtype):
        raise ProtocolError(
            f"array {key!r} has dtype {value.dtype}, expected {np.dtype(dtype)}"
        )
    if ndim is not None and value.ndim != ndim:
        raise ProtocolError(f"array {key!r} has {value.ndim} dimensions, expected {ndim}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ProtocolError(f"array {key!r} holds NaN or infinite values")
    return value


def content_digest(content: RecordDict, *, skip: tuple[str, ...] = ()) -> bytes:
    """SHA-256 over a message's config entries and arrays in a canonical order (name, type,
    shape, bytes, each length-prefixed): equal for equal content however it travelled.
    `skip` leaves out config keys that legitimately vary (a reply's timing)."""
    h = hashlib.sha256(b"fedscore/content/v1")

    def put(data: bytes) -> None:
        h.update(struct.pack(">Q", len(data)))
        h.update(data)

    config = dict(content["config"]) if "config" in content else {}
    for key in sorted(k for k in config if k not in skip):
        value = config[key]
        put(key.encode())
        put(type(value).__name__.encode())
        put(bytes(value) if isinstance(value, bytes) else repr(value).encode())
    record = _arrays(content)
    if record is not None:
        for key in sorted(record):
            array = np.ascontiguousarray(record[key].numpy())
            put(key.encode())
            put(array.dtype.str.encode())
            put(repr(array.shape).encode())
            put(array.tobytes())
    return h.digest()


def error_reply(msg: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=msg)


def split_batches(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Cut a concatenated batch plan (or per-row values) back into batches."""
    if int(sizes.sum()) != len(flat):
        raise ProtocolError(
            f"batch sizes add to {int(sizes.sum())} but {len(flat)} values were sent"
        )
    return np.split(flat, np.cumsum(sizes)[:-1])
