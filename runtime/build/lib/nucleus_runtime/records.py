"""JSON records as frozen dataclasses, their validation derived from the type hints.

A record type declares its fields with ordinary hints (`int`, `str`, `bool`, `float`, `list[X]`, `tuple[int, int]`,
`dict[str, X]`, `X | None`, nested records) and two marked strings, `RelPath` (a path that must stay inside its
folder) and `Sha256` (64 hex digits). `from_json` checks a parsed JSON value against them, field by field, and names
the first bad field in one line; invariants between fields live in the record's own `__post_init__`. So a new field
is one line in one dataclass, and every reader gets it checked before use.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Annotated, Any, TypeVar

from nucleus_runtime.errors import NucleusError

RELPATH = "relative path inside its folder"
SHA256 = "sha256 (64 hex digits)"
RelPath = Annotated[str, RELPATH]
Sha256 = Annotated[str, SHA256]

_SHA256 = re.compile(r"[0-9a-f]{64}")
T = TypeVar("T")


def _child(where: str, name: str) -> str:
    """manifest.json: profiles.batch, the path a message names (the file, then the fields within it)."""
    return f"{where}.{name}" if ":" in where else f"{where}: {name}"


class RecordError(NucleusError):
    """A JSON value that does not fit its record type; `where` is the dotted path to it."""

    def __init__(self, where: str, value: object, expected: str, fix: str):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        kind = "null" if value is None else type(value).__name__
        super().__init__(f"{where} is {shown} ({kind}); expected {expected}.", fix)


def check_relpath(relpath: object, what: str, fix: str) -> str:
    """A recorded path must be relative and stay inside its folder: no absolute path, no drive, no backslash, no
    `..`, `.` or empty component. Returns it unchanged."""
    parts = relpath.split("/") if isinstance(relpath, str) else []
    if (
        not parts
        or any(part in ("", ".", "..") for part in parts)
        or "\\" in relpath  # type: ignore[operator]
        or "\0" in relpath  # type: ignore[operator]
        or re.match(r"^[A-Za-z]:", relpath)  # type: ignore[arg-type]
    ):
        raise NucleusError(f"{what} {relpath!r} is not a relative path inside its folder.", fix)
    return relpath  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return f"a {args[1]}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(args)} values" if args[-1] is not Ellipsis else "a list"
    if origin is dict or hint is dict:
        return "an object"
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    return {int: "an integer", str: "a string", bool: "true or false", float: "a number", Any: "a value"}.get(hint, str(hint))


def _convert(hint: Any, value: Any, where: str, fix: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad() -> RecordError:
        return RecordError(where, value, _describe(hint), fix)

    if hint is Any:
        return value
    if origin is Annotated:
        if not isinstance(value, str):
            raise bad()
        if args[1] == RELPATH:
            return check_relpath(value, where, fix)
        if args[1] == SHA256 and not _SHA256.fullmatch(value):
            raise bad()
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message names the field inside it
            return _convert(options[0], value, where, fix)
        for option in options[:-1]:
            try:
                return _convert(option, value, where, fix)
            except NucleusError:
                continue
        try:
            return _convert(options[-1], value, where, fix)
        except NucleusError:
            raise bad() from None
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, where, fix)
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [_convert(args[0], v, f"{where}[{i}]", fix) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list):
            raise bad()
        if args[-1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]", fix) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad()
        return tuple(_convert(a, v, f"{where}[{i}]", fix) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        if not args:
            return dict(value)
        return {k: _convert(args[1], v, _child(where, k), fix) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if type(value) is not int:
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"{where}: record fields of type {hint!r} are not supported")


def from_json(cls: type[T], raw: Any, where: str, fix: str) -> T:
    """A record of type `cls` from parsed JSON, every field checked against its hint; unknown keys are refused.

    Raises:
        NucleusError: naming the first field that is missing, unknown or of the wrong type (or what the record's
            __post_init__ refuses).
    """
    if not isinstance(raw, dict):
        raise RecordError(where, raw, f"an object ({cls.__name__})", fix)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise NucleusError(f"{where} has unknown fields {', '.join(unknown)}.", fix)
    values = {}
    for name, field in fields.items():
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise NucleusError(f"{where} has no field '{name}'.", fix)
            continue
        values[name] = _convert(hints[name], raw[name], _child(where, name), fix)
    return cls(**values)


def to_json(record: Any) -> Any:
    """The JSON value of a record (tuples as lists, nested records as objects)."""
    return json_value(dataclasses.asdict(record))


def json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value
