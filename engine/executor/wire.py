"""msgpack wire format for everything that crosses the engine's ZMQ ports.

A message is ``{"v": WIRE_VERSION, "kind": <str>, "body": <plain data>}``. The
body of a dataclass is a map of exactly its fields; decoding checks the
version, the kind, the field names and every value's type against the
dataclass annotations, then builds the dataclass (so its ``__post_init__``
checks run too, as SamplingParams's do), and raises WireError on any
mismatch or failed check -- a malformed or foreign message is rejected, never
executed. No pickle anywhere. The message types of the engine's two queues
are in protocol.py.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import msgpack

WIRE_VERSION = 3  # 2: SchedulerOutput.grammar_mask, SamplingParams.structured_outputs; 3: peer KV export/import


class WireError(ValueError):
    """A message that is not valid for this protocol version."""


def to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def encode(kind: str, body: Any) -> bytes:
    return msgpack.packb({"v": WIRE_VERSION, "kind": kind, "body": to_plain(body)}, use_bin_type=True)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(value: Any, tp: Any, where: str) -> Any:
    """Validate ``value`` against annotation ``tp``; rebuild dataclasses and tuples."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _check(value, option, where)
            except WireError:
                continue
        raise WireError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is not None:
            raise WireError(f"{where}: expected null, got {type(value).__name__}")
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise WireError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        checked = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map, got {type(value).__name__}")
        args = typing.get_args(tp)
        if not args:
            return value
        return {_check(k, args[0], f"{where} key"): _check(v, args[1], f"{where}[{k!r}]")
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp in (int, str, bool, bytes):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise WireError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise WireError(f"{where}: unsupported annotation {tp}")


def from_plain(cls: type, data: Any, where: str | None = None) -> Any:
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected a map, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{where}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)  # a dataclass's own __post_init__ validation runs here
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}: {exc}") from exc


def decode(data: bytes, expected: Mapping[str, type | None]) -> tuple[str, Any]:
    """Parse one message; ``expected`` maps each allowed kind to its body's
    dataclass (or None for a body-less message)."""
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"not a msgpack message: {exc}") from exc
    if not isinstance(msg, dict) or set(msg) != {"v", "kind", "body"}:
        raise WireError("message must be a map with exactly v, kind and body")
    if msg["v"] != WIRE_VERSION:
        raise WireError(f"wire version {msg['v']!r} != {WIRE_VERSION}; engine and workers must match")
    kind = msg["kind"]
    if kind not in expected:
        raise WireError(f"unexpected message kind {kind!r}; expected one of {sorted(expected)}")
    cls = expected[kind]
    return kind, (from_plain(cls, msg["body"]) if cls is not None else msg["body"])
