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
MAX_ELEMENTS = 2**40  # elements of one weight matrix: sizes whose product overflows this are refused

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


def check_feature_sizes(cfg) -> None:
    """Bounds on the sizes inside the dict-valued features, before anything is built."""
    hc, ple = cfg.hyper_connections or {}, cfg.per_layer_embeddings or {}
    for name, value, high in (("hyper_connections.streams", hc.get("streams", 1), 256),
                              ("hyper_connections.sinkhorn_iters", hc.get("sinkhorn_iters", 1), 10_000),
                              ("per_layer_embeddings: vocab x n_layers x dim",
                               ple.get("vocab", cfg.vocab_size) * cfg.n_layers * ple.get("dim", 0), MAX_ELEMENTS)):
        if value > high:
            raise ConfigError(f"{name}: {value:,} is more than kvlab builds ({high:,})")


def check_layer_sizes(cfg, where: str, spec) -> None:
    """Refuse sizes whose weight matrices would overflow ``MAX_ELEMENTS`` before anything is built."""
    head_dim = spec.head_dim if spec.head_dim is not None else cfg.d_model // spec.n_heads
    for name, product in (("vocab_size x d_model", cfg.vocab_size * cfg.d_model),
                          ("d_model x mlp_hidden", cfg.d_model * (spec.mlp_hidden or cfg.mlp_hidden)),
                          (f"{where}n_heads x head_dim x d_model", spec.n_heads * head_dim * cfg.d_model)):
        if product > MAX_ELEMENTS:
            raise ConfigError(f"{name}: {product:,} elements in one weight matrix, more than kvlab "
                              f"builds ({MAX_ELEMENTS:,})")
