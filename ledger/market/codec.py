"""Domain facts <-> plain JSON, by their type hints. Pure: no I/O.

The marketplace's facts are frozen dataclasses of `domain` (UUIDs, datetimes, ints, strs,
bools, IntEnums, nested dataclasses, tuples and frozensets of those, optional values). Each
is stored as a JSON object any reader can parse:

- UUID: canonical string; datetime: ISO 8601 with its offset (naive datetimes are refused);
- int: a JSON number when |n| < 2**53, else a decimal string (JSON numbers lose precision
  past 2**53 in many readers, and amounts have 18 decimals); bool: true/false;
- IntEnum: the member's name (readable, and stable: members are never renamed);
- nested dataclass: an object; tuple and frozenset: an array (a frozenset sorted by its
  encoded form, so equal sets encode equally).

`decode(cls, encode(fact)) == fact` for every fact (tested by property tests).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import datetime
from enum import IntEnum
from typing import Any
from uuid import UUID

JSON_SAFE_INT_MAX = 2**53 - 1
"""Largest integer written as a JSON number; larger ones are written as decimal strings."""


class CodecError(ValueError):
    """A stored state does not fit the fact type it claims to be (a bug or a tampered log)."""


_HINTS: dict[type[Any], tuple[tuple[str, Any], ...]] = {}
_DEFAULTED: dict[type[Any], frozenset[str]] = {}


def _defaulted(cls: type[Any]) -> frozenset[str]:
    """The fields of `cls` with a default: a state written before such a field was added
    may lack it (the default is the value it always had)."""
    found = _DEFAULTED.get(cls)
    if found is None:
        found = frozenset(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        _DEFAULTED[cls] = found
    return found


def _hints(cls: type[Any]) -> tuple[tuple[str, Any], ...]:
    """(field name, resolved type) of a dataclass, in field order; computed once per class."""
    found = _HINTS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        _HINTS[cls] = found
    return found


def encode(fact: Any) -> dict[str, Any]:
    """The JSON object (as a dict) of a dataclass instance."""
    if not dataclasses.is_dataclass(fact) or isinstance(fact, type):
        raise TypeError(f"not a dataclass instance: {fact!r}")
    return {name: _encode_value(getattr(fact, name)) for name, _ in _hints(type(fact))}


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, int):
        return value if -JSON_SAFE_INT_MAX <= value <= JSON_SAFE_INT_MAX else str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: times are stored with their offset")
        return value.isoformat()
    if isinstance(value, tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, frozenset):
        encoded = [_encode_value(v) for v in value]
        return sorted(encoded, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return encode(value)
    raise TypeError(f"cannot encode {type(value).__name__}: {value!r}")


def decode(cls: type[Any], state: dict[str, Any]) -> Any:
    """The instance of dataclass `cls` that `state` (from `encode`) records."""
    if not isinstance(state, dict):
        raise CodecError(f"{cls.__name__}: expected an object, got {type(state).__name__}")
    values: dict[str, Any] = {}
    for name, hint in _hints(cls):
        if name not in state:
            if name in _defaulted(cls):
                continue
            raise CodecError(f"{cls.__name__}: field {name!r} is missing")
        try:
            values[name] = _decode_value(hint, state[name])
        except (TypeError, ValueError, KeyError) as e:
            raise CodecError(f"{cls.__name__}.{name}: {e}") from e
    extra = set(state) - set(values)
    if extra:
        raise CodecError(f"{cls.__name__}: unknown fields {sorted(extra)}")
    return cls(**values)


def _decode_value(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        real = [a for a in arms if a is not type(None)]
        if len(real) != 1:
            raise TypeError(f"cannot decode a union of several types: {hint}")
        return _decode_value(real[0], value)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"only tuple[X, ...] is supported, got {hint}")
        return tuple(_decode_value(args[0], v) for v in _list(value))
    if origin is frozenset:
        (arg,) = typing.get_args(hint)
        return frozenset(_decode_value(arg, v) for v in _list(value))
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(hint, type) and issubclass(hint, IntEnum):
        if not isinstance(value, str):
            raise TypeError(f"expected a {hint.__name__} name, got {value!r}")
        return hint[value]
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)
    if hint is UUID:
        return UUID(_str(value))
    if hint is datetime:
        moment = datetime.fromisoformat(_str(value))
        if moment.tzinfo is None:
            raise ValueError(f"time without offset: {value!r}")
        return moment
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return decode(hint, value)
    raise TypeError(f"cannot decode {hint}")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected an array, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
