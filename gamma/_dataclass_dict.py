"""Mappings (YAML, JSON) to config dataclasses and back, with errors that name the dotted key.

One loader for every config dataclass of gamma: the model config (:mod:`gamma.config`), dataset entries
(:mod:`gamma.data.datasets`) and the training configuration (:mod:`gamma.train.config`). An unknown key is an error
naming it, with the closest known key suggested; with ``typed=True`` every value is converted to its field's type
(``int``, ``float``, ``Literal``, unions, lists, tuples, nested dataclasses) or the error names the key and the
expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake; the message names the offending key or file."""


def suggest(key: Any, known: Sequence[Any], hints: Mapping[str, str] | None = None) -> str:
    """``" (did you mean 'x'?)"`` for the known name closest to ``key`` (or ``hints[key]``), else ``""``."""
    hint = (hints or {}).get(key)
    if hint is None:
        close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
        hint = close[0] if close else None
    return f" (did you mean {hint!r}?)" if hint else ""


def from_dict(cls: type[T], data: Any, key: str = "", *, typed: bool = True, noun: str = "key",
              hints: Mapping[str, str] | None = None, label: str = "") -> T:
    """Dataclass ``cls`` built from the mapping ``data``.

    Args:
        cls: the dataclass.
        data: its fields by name.
        key: dotted key of ``data`` in the whole configuration ("" at the top), prefixed to every key in messages.
        typed: convert every value to its field's type (nested dataclasses included); without it, values go to
            ``cls`` as they are and ``cls`` checks them.
        noun: what a key is called in the unknown-key message ("dataset key": "unknown dataset key 'x'").
        hints: suggestions for known mistakes, by unknown key (another tool's option names).
        label: leads the unknown-key message ("dataset 'live': ").

    Raises:
        ConfigError: an unknown key or, with ``typed``, a value of the wrong type; the message names the dotted key.
        ValueError, TypeError: raised by ``cls`` itself, prefixed with ``key`` when there is one.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {show(data)}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    types_of = typing.get_type_hints(cls) if typed else {}
    kwargs = {}
    for name, value in data.items():
        dotted = f"{key}.{name}" if key else str(name)
        if name not in names:
            raise ConfigError(f"{label}unknown {noun} {dotted!r}{suggest(name, names, hints)}; "
                              f"known keys{' of ' + key if key else ''}: {', '.join(names)}")
        kwargs[name] = convert(value, types_of[name], dotted) if typed else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError) or not key:
            raise
        raise ConfigError(f"{key}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-safe data (dicts, lists, scalars) of a config dataclass; ``from_dict`` reads it back."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------ typed conversion
def type_name(tp: Any) -> str:
    """An expected type as a message says it: ``"one of 'none', 'bf16'"``, ``"a list of int"``, ``"float or null"``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    """A value for a message: its type and the start of its repr (``"str 'abc'"``)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` or a ConfigError naming ``key`` and the expected type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {show(value)}"
                              f"{suggest(value, choices) if isinstance(value, str) else ''}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {type_name(tp)}, got {show(value)}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {show(value)}")
        return dict(value)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {show(value)}")


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return convert(value, arg, key)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {show(value)}")


def _convert_sequence(value: Any, tp: Any, key: str) -> list[Any] | tuple[Any, ...]:
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {show(value)}")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}")
        return tuple(convert(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item = args[0] if args else Any
    out = [convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected bool (true/false), got {show(value)}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected int, got {show(value)}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected float, got {show(value)}")


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a numeric folder or run name
    raise ConfigError(f"{key}: expected str, got {show(value)}")


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
