"""Technique registry: ``type`` name -> (spec class, attention module class).

Each file in ``kvlab/attention/`` registers its technique with ``@register_spec`` on its spec class and
``@register_module`` on its module class; the registry imports every file of that package on first use,
so a new technique is one new file. The cache layer is created by the module (``module.new_cache_layer``)
and the planner rule lives on the spec (``spec.own_cache_bytes``), so nothing else learns technique names.
Registration checks the contract (docs/architecture.md): a spec missing its planner rule, a module
missing ``new_cache_layer``, or a spec left without a module fails here, loudly, not later silently.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from kvlab.config import LayerSpec
from kvlab.config_options import BASE_OPTIONS, SPEC_TYPES, TECHNIQUE_LOADERS, spec_class
from kvlab.plugins import import_submodules


@dataclass
class Technique:
    name: str
    spec_cls: type[LayerSpec]
    module_cls: type  # the attention nn.Module: ``module(spec, cfg, layer_idx)``
    aliases: tuple[str, ...] = ()


_SPECS: dict[str, tuple[type[LayerSpec], tuple[str, ...]]] = {}
_MODULES: dict[str, type] = {}
_loaded = False


def register_spec(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator for a ``LayerSpec`` subclass: registers technique ``name`` (and its aliases)."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, LayerSpec)):
            raise TypeError(f"technique '{name}': the spec must subclass kvlab.config.LayerSpec")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(f"technique '{name}': {cls.__name__} does not define {missing} (the planner rule)")
        unknown = set(cls.SUPPORTED_OPTIONS) - set(BASE_OPTIONS)
        if unknown:
            raise TypeError(f"technique '{name}': SUPPORTED_OPTIONS names unknown options {sorted(unknown)}")
        cls.type = name
        _SPECS[name] = (cls, aliases)
        for key in (name, *aliases):
            SPEC_TYPES[key] = cls
        return cls

    return wrap


def register_module(name: str):
    """Class decorator for the attention ``nn.Module`` implementing technique ``name``."""

    def wrap(cls):
        if name not in _SPECS:
            raise TypeError(f"technique '{name}': register its spec (@register_spec) before its module")
        if not callable(getattr(cls, "new_cache_layer", None)):
            raise TypeError(f"technique '{name}': {cls.__name__} has no new_cache_layer(batch, dtype, device, built)")
        _MODULES[name] = cls
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove technique ``name`` (tests that register a toy technique clean up with this)."""
    _, aliases = _SPECS.pop(name)
    _MODULES.pop(name, None)
    for key in (name, *aliases):
        SPEC_TYPES.pop(key, None)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_submodules("kvlab.attention")
    orphans = sorted(set(_SPECS) - set(_MODULES))
    if orphans:
        raise TypeError(f"technique '{orphans[0]}': a spec without a module (@register_module)")


TECHNIQUE_LOADERS.append(_load_all)


def get_technique(name: str, where: str = "type") -> Technique:
    cls = spec_class(name, where)  # loads the technique files; unknown names -> ConfigError
    return Technique(cls.type, cls, _MODULES[cls.type], _SPECS[cls.type][1])


def techniques() -> dict[str, Technique]:
    _load_all()
    return {name: get_technique(name) for name in _SPECS}
