"""The ``--to`` grammar: what to turn each layer into.

::

    SPEC  := STEP ('+' STEP)*         the same steps for every layer, applied left to right
           | FILE.json | FILE.yaml    a per-layer plan: {"layers": [SPEC, SPEC, ...]} (one per layer)
    STEP  := NAME [':' OPT (',' OPT)*]
    OPT   := KEY '=' VALUE            an integer, a float, true / false or a word

Names (``kvlab convert --help`` lists every target's options): ``keep``; ``gqa-K`` (K KV heads) and
``mqa`` (one), both ``gqa:kv=K,merge=fit|mean``; ``mla:rank=R,rope=D``; ``sliding:window=W,sinks=S``;
``block_sparse:block=B,local=L,global=G``; ``deltanet``; ``share:every=K`` (or ``share:from=J`` in a
plan); ``int8`` / ``int4`` (KIVI storage, composable: ``mqa+int8``, ``mla:rank=64+int4``).
Examples: ``mqa``, ``gqa-1:merge=mean``, ``sliding:window=1024,sinks=4``, ``mla:rank=80,rope=16+int8``.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvlab.config import read_config_file
from kvlab.convert.registry import get_target
from kvlab.errors import ConfigError

Step = tuple[str, dict]  # (target name, options)

_ALIASES = {"mqa": ("gqa", {"kv": 1}), "full": ("keep", {})}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _value(text: str, where: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if not text or not re.fullmatch(r"[A-Za-z0-9_.\-]+", text):
        raise ConfigError(f"{where}: bad option value {text!r}")
    return text


def parse_step(text: str, where: str = "--to") -> Step:
    """``"mla:rank=64,rope=16"`` -> ``("mla", {"rank": 64, "rope": 16})`` with defaults filled in."""
    head, _, tail = text.strip().partition(":")
    head = head.strip()
    opts: dict = {}
    match = re.fullmatch(r"gqa-([0-9]+)", head)
    if match:
        head, opts = "gqa", {"kv": int(match.group(1))}
    elif head in _ALIASES:
        head, opts = _ALIASES[head][0], dict(_ALIASES[head][1])
    if not _WORD.fullmatch(head or ""):
        raise ConfigError(f"{where}: bad step {text!r} (expected NAME[:KEY=VALUE,...])")
    target = get_target(head, where)
    for part in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, raw = part.partition("=")
        key = key.strip()
        if not eq or key not in target.options:
            known = ", ".join(target.options) or "none"
            raise ConfigError(f"{where}: {head}: unknown option {part!r} (options: {known})")
        value = _value(raw.strip(), where)
        default = target.options[key]
        if default is not None and not isinstance(value, type(default)) and \
                not (isinstance(default, float) and isinstance(value, int)):
            raise ConfigError(f"{where}: {head}.{key}: expected {type(default).__name__}, got {raw.strip()!r}")
        opts[key] = value
    return head, {**target.options, **opts}


def parse_layer_spec(text: str, where: str = "--to") -> list[Step]:
    """One layer's steps, ``"mqa+int8"`` -> ``[("gqa", {...}), ("int8", {...})]``."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: expected a non-empty step string, got {text!r}")
    return [parse_step(part, where) for part in text.split("+")]


def format_steps(steps: list[Step]) -> str:
    """The canonical string of one layer's steps (only options that differ from the defaults)."""
    parts = []
    for name, opts in steps:
        defaults = get_target(name).options
        extra = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items()
                 if defaults.get(k) != v]
        parts.append(name + (":" + ",".join(extra) if extra else ""))
    return "+".join(parts)


def load_plan_file(path: str | Path) -> dict:
    """A plan file: ``{"layers": [step string per layer], ...}``."""
    data = read_config_file(path)
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError(f"{path}: layers: expected a list with one step string per layer")
    return data


def resolve_spec(spec: str, n_layers: int) -> tuple[list[list[Step]], dict]:
    """Per-layer steps for ``--to SPEC`` (a step string or a plan file) and the plan file's data."""
    looks_like_file = spec.endswith((".json", ".yaml", ".yml")) or Path(spec).is_file()
    if looks_like_file:
        data = load_plan_file(spec)
        if len(data["layers"]) != n_layers:
            raise ConfigError(f"{spec}: layers: the plan has {len(data['layers'])} entries but the model "
                              f"has {n_layers} layers")
        return [parse_layer_spec(s, f"{spec}: layers[{i}]") for i, s in enumerate(data["layers"])], data
    steps = parse_layer_spec(spec)
    return [list(steps) for _ in range(n_layers)], {}
