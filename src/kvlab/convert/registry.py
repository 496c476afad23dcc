"""Conversion targets: ``name -> function``. Each file of this package that defines a target registers it
with ``@register_target("name")``; the registry imports every file on first use (as ``kvlab.registry``
does for attention techniques), so a new target is one new file.

A target is a function ``(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork``: it takes one
layer's spec and attention weights (as converted so far by the earlier steps of that layer) and returns
the new spec and weights. ``env`` carries the source model's config, weights and calibration statistics,
the whole plan, and the layers converted so far (cross-layer targets read their producers there; a
target that makes one choice for the whole model computes it once and keeps it in ``env.shared``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvlab.config import LayerSpec, ModelConfig
from kvlab.errors import ConfigError
from kvlab.plugins import import_submodules


def layer_weights(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s attention entries of a model state dict, without the ``layers.{i}.self_attn.`` prefix."""
    prefix = f"layers.{i}.self_attn."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class LayerWork:
    """One layer being converted: its spec and its attention's state entries (names without the
    ``layers.{i}.self_attn.`` prefix)."""

    index: int
    spec: LayerSpec
    weights: dict[str, torch.Tensor]


@dataclass
class ConvertEnv:
    """What a target may read besides its own layer."""

    config: ModelConfig  # the source config
    stats: list  # per-layer ``LayerStats`` (kvlab.convert.calibrate), or [] when not calibrated
    done: list[LayerWork] = field(default_factory=list)  # layers already converted (0 .. i-1)
    seed: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the source model's state dict
    plan: list = field(default_factory=list)  # every layer's steps (kvlab.convert.spec.Step); [] = this layer alone
    shared: dict = field(default_factory=dict)  # model-wide choices, computed once by the first layer needing them

    def source_layer(self, i: int) -> LayerWork:
        """Layer ``i`` of the source, as it enters its first step."""
        return LayerWork(i, self.config.layers[i], layer_weights(self.state, i))


@dataclass
class Target:
    name: str
    fn: Callable[[LayerWork, dict, ConvertEnv], LayerWork]
    options: dict  # option name -> default (also the accepted names, and their types)
    needs_calibration: bool = False
    doc: str = ""


_TARGETS: dict[str, Target] = {}
_loaded = False


def register_target(name: str, options: dict | None = None, needs_calibration: bool = False):
    """Function decorator registering conversion target ``name`` with its options and their defaults."""

    def wrap(fn):
        _TARGETS[name] = Target(name, fn, dict(options or {}), needs_calibration, (fn.__doc__ or "").strip())
        return fn

    return wrap


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_submodules("kvlab.convert")


def get_target(name: str, where: str = "--to") -> Target:
    _load_all()
    if name not in _TARGETS:
        raise ConfigError(f"{where}: unknown target {name!r} (known: {', '.join(sorted(_TARGETS))})")
    return _TARGETS[name]


def targets() -> dict[str, Target]:
    _load_all()
    return dict(_TARGETS)
