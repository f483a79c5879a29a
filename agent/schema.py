"""Typed dataclasses from untrusted dicts, with errors that name the key path.

One small validator serves both the YAML configuration and every MQTT message, so
a bad value is reported the same way wherever it comes from:
``mqtt.keepalive_s: expected an integer >= 5, got 'abc'``.

Constraints ride on dataclass field metadata: ``field(default=.., metadata=rule(min=1))``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class SchemaError(ValueError):
    """Raised with the key path and what is allowed; callers wrap it in their own error type."""


def load_json(raw: bytes | str) -> Any:
    """json.loads for bytes from outside; whatever it cannot take is a ValueError with one line.

    json.loads itself raises RecursionError for arrays nested ~1,000 deep (a 2 kB message)
    and a plain ValueError for integers of more than 4,300 digits: neither is a JSONDecodeError,
    so callers catching only that would let a sender's few bytes become an internal error."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # JSONDecodeError, and the integer digit limit
        raise ValueError(str(exc).split(": value has")[0]) from None


def rule(min: float | None = None, max: float | None = None, choices: tuple | None = None,
         pattern: str | None = None, doc: str = "") -> dict:
    """Field metadata for `from_dict`: numeric bounds, allowed values, a regex for strings."""
    return {"min": min, "max": max, "choices": choices, "pattern": pattern, "doc": doc}


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _check_rules(value: Any, meta: dict, path: str) -> None:
    lo, hi, choices, pattern = (meta.get(k) for k in ("min", "max", "choices", "pattern"))
    if lo is not None and value < lo:
        raise SchemaError(f"{path}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise SchemaError(f"{path}: must be <= {hi}, got {value!r}")
    if choices is not None and value not in choices:
        raise SchemaError(f"{path}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if pattern is not None:
        if not re.fullmatch(pattern, value):
            raise SchemaError(f"{path}: {value!r} does not match {pattern}")


def _coerce(tp: Any, value: Any, path: str, meta: dict) -> Any:
    if tp is Any:  # free-form JSON: anything, null included
        return value
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise SchemaError(f"{path}: expected {_describe(inner)}, got null")
    tp = inner
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in get_args(tp):
            raise SchemaError(f"{path}: expected {_describe(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{path}[{i}]", {}) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"{path}: keys must be strings, got {k!r}")
            out[k] = _coerce(val_tp, v, f"{path}.{k}", {})
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise SchemaError(f"{path}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected a string, got {value!r}")
    else:
        raise SchemaError(f"{path}: unsupported type {tp}")
    _check_rules(value, meta, path)
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build `cls` from `data`, rejecting unknown keys, wrong types and out-of-range values.
    A class with `OPEN_TO_NEW_KEYS = True` skips keys it does not know instead (see agent/protocol.py)."""
    where = path or "(top level)"
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown and not getattr(cls, "OPEN_TO_NEW_KEYS", False):
        raise SchemaError(
            f"{path + '.' if path else ''}{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():  # only known keys are read: unknown ones are refused above, or skipped
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key_path, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{key_path}: required, missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """The JSON-ready form of a schema dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def validate(obj: Any, path: str = "") -> None:
    """Re-check an instance built in code (e.g. after CLI overrides) against its own rules."""
    from_dict(type(obj), to_dict(obj), path)


__all__ = ["SchemaError", "rule", "from_dict", "to_dict", "validate"]
