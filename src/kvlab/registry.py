"""Technique registry: ``type`` name -> (spec class, attention module class).

Each file in ``kvlab/attention/`` registers its technique with ``@register_spec`` on its spec class and
``@register_module`` on its module class; the registry imports every file of that package on first use,
so a new technique is one new file. The cache layer is created by the module (``module.new_cache_layer``)
and the planner rule lives on the spec (``spec.cache_bytes``), so nothing else learns technique names.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from kvlab.errors import ConfigError


@dataclass
class Technique:
    name: str
    spec_cls: type
    module_cls: type | None = None  # None: plannable but not yet runnable in kvlab
    aliases: tuple[str, ...] = ()


_TECHNIQUES: dict[str, Technique] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register_spec(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator for a ``LayerSpec`` subclass: registers technique ``name``."""

    def wrap(cls):
        cls.type = name
        _TECHNIQUES[name] = Technique(name, cls, aliases=aliases)
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


def register_module(name: str):
    """Class decorator for the attention ``nn.Module`` implementing technique ``name``."""

    def wrap(cls):
        _TECHNIQUES[name].module_cls = cls
        return cls

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import kvlab.attention as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"kvlab.attention.{info.name}")


def get_technique(name: str, where: str = "type") -> Technique:
    _load_all()
    name = _ALIASES.get(name, name)
    if name not in _TECHNIQUES:
        known = ", ".join(sorted(_TECHNIQUES))
        raise ConfigError(f"{where}: unknown technique {name!r} (known: {known})")
    return _TECHNIQUES[name]


def techniques() -> dict[str, Technique]:
    _load_all()
    return dict(_TECHNIQUES)
