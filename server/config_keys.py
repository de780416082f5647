"""Flat dotted keys ("train.epochs") for the configuration's dataclasses (server/config.py):
one parser for `fedscore run --set train.epochs=5`, Flower's `[tool.flwr.app.config]` and a
run's `config.json`, and the way back (`to_flat`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from server.config_checks import INFINITE_OK, ConfigError


def flat_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted key: type} of every leaf field of a (nested) config dataclass."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(flat_fields(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def to_flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = list(value) if isinstance(value, tuple) else value
    return out


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Turn a command-line string or a JSON/TOML value into a field's type."""
    try:
        typed = _coerce(tp, value)
    except (TypeError, ValueError, KeyError):
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}") from None
    if key not in INFINITE_OK:
        for number in typed if isinstance(typed, tuple) else (typed,):
            if isinstance(number, float) and not math.isfinite(number):
                off = " (inf is accepted only by " + ", ".join(sorted(INFINITE_OK)) + ")"
                raise ConfigError(f"{key}={value!r}: must be a finite number; see `fedscore "
                                  f"config` for its default{off}")
    return typed


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or str(value).strip().lower() in ("none", "null", ""):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner, value)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v) for v in items if str(v).strip() != "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[
            str(value).strip().lower()
        ]
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value.strip().replace("_", "")) if isinstance(value, str) else int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
        if math.isnan(number):
            raise ValueError(value)
        return number
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported field type {tp}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a comma-separated list of {_type_name(typing.get_args(tp)[0])}s"
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
    return names.get(tp, str(tp))


def unknown_key_error(key: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else "`fedscore config` lists every key"
    return ConfigError(f"unknown config key {key!r}: {hint}")


def build(cls: type, flat: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate nested dataclass `cls` from dotted keys (already coerced), defaults elsewhere."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build_section(tp, flat, f"{key}.")
        elif key in flat:
            kwargs[f.name] = flat[key]
    return cls(**kwargs)


def _build_section(cls: type, flat: dict[str, Any], prefix: str) -> Any:
    """A nested section; a section that validates with its own error type (e.g.
    EligibilityError, whose messages name the bare field) surfaces as a ConfigError naming the
    dotted key."""
    try:
        return build(cls, flat, prefix)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def parse_flat(cls: type, values: dict[str, Any], ignore: typing.Iterable[str] = ()) -> Any:
    """Validate keys, coerce values and build `cls`. Keys in `ignore` are skipped."""
    fields = flat_fields(cls)
    skip = set(ignore)
    coerced = {}
    for key, value in values.items():
        if key in skip:
            continue
        if key not in fields:
            raise unknown_key_error(key, fields)
        coerced[key] = coerce(key, fields[key], value)
    return build(cls, coerced)
