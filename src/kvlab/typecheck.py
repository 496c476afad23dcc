"""The one type check of kvlab's configs (model, layer, RoPE and training configs): every dataclass field
holds what its annotation says. A bool is not an int, a string is not a bool, floats are finite and ints
lie within +-``MAX_INT``; messages name the field (``layers[3].qkv_bias: must be true or false``)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from typing import Any

from kvlab.errors import ConfigError

MAX_INT = 2**48  # no config integer is larger (a context of 2^48 tokens is far past any model)

_HINTS: dict[type, dict] = {}


def check_field_types(obj: Any, where: str = "") -> None:
    """Every dataclass field of ``obj`` holds what its annotation says: a bool is not an int, a string is
    not a bool, floats are finite, ints lie within +-``MAX_INT``. The one type check of every config."""
    cls = type(obj)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    for f in fields(obj):
        if f.name in _HINTS[cls]:
            _check_value(getattr(obj, f.name), _HINTS[cls][f.name], f"{where}{f.name}")


_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          dict: "an object", list: "a list"}


def _check_value(value: Any, hint: Any, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                _check_value(value, option, where)
                return
            except ConfigError:
                if len(options) == 1:
                    raise
        names = " or ".join(_KINDS.get(typing.get_origin(o) or o, getattr(o, "__name__", str(o))) for o in options)
        raise ConfigError(f"{where}: must be {names}{' or null' if type(None) in args else ''}, got {value!r}")
    base = origin or hint
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and abs(value) > MAX_INT:
            raise ConfigError(f"{where}: {value} is too large (at most {MAX_INT})")
    elif base in _KINDS:
        ok = isinstance(value, base)
    elif isinstance(base, type) and dataclasses.is_dataclass(base):
        ok = isinstance(value, base)
        if not ok:
            raise ConfigError(f"{where}: expected an object, got {value!r}")
    else:
        return
    if not ok:
        raise ConfigError(f"{where}: must be {_KINDS[base]}, got {value!r}")
