"""Typed JSON records: dataclasses that read and write themselves, checked field by field.

A `Record` subclass declares its fields with type hints; `from_json` checks every value against them (a wrong
type or a missing required field is a `RecordError` naming the path, e.g. `inputs[0].shape: expected a list`)
and `to_json` writes plain JSON back. A record with an `extra: dict` field is open: keys it does not declare
are kept there and written back unchanged, so a reader that rewrites a document (bench --record) loses nothing
a newer writer added. Records without `extra` are closed: an unknown key is an error.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache

MAX_DEPTH = 64   # JSON nesting a reader accepts: far above any edgec document, far below Python's recursion limit


class RecordError(ValueError):
    """A JSON document that does not fit its record type; the message names the path."""


def depth(value, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, iteratively (a crafted document cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _name(tp) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
                "dict": "an object", "list": "a list"}.get(tp.__name__, f"an object ({tp.__name__})")
    return str(tp)


def _parse(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse(option, value, where)
            except RecordError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else \
            RecordError(f"{where}: expected {' or '.join(_name(a) for a in args if a is not type(None))}, "
                        f"got {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
        return [_parse(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _parse(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is typing.Any:
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value, where)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise RecordError(f"{where}: expected {_name(tp)}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _dump(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


class Record:
    """Base of every typed record (subclasses are dataclasses)."""

    @classmethod
    def from_json(cls, data, where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        open_record = "extra" in fields
        values, extra = {}, {}
        for key, value in data.items():
            if key in fields and key != "extra":
                values[key] = _parse(hints[key], value, f"{where}.{key}")
            elif open_record:
                extra[key] = value
            else:
                raise RecordError(f"{where}: unexpected key {str(key)[:40]!r}")
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in values and name != "extra":
                raise RecordError(f"{where}.{name} is missing")
        if open_record:
            values["extra"] = extra
        return cls(**values)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                out.update(_dump(getattr(self, f.name)))
            else:
                out[f.name] = _dump(getattr(self, f.name))
        return out


def json_schema(name: str) -> dict:
    """The JSON Schema shipped with edgec for `edgec.<name>/1` (manifest, bench, compare): core/schemas/NAME.json."""
    import json
    from importlib import resources
    return json.loads(resources.files("edgec.core").joinpath("schemas", f"{name}.json").read_text())
