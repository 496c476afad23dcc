"""Hugging Face interop: one file per model family (``hf/<family>.py``), each registering
``model_type`` names with ``@register_family``. A family turns an HF ``config.json`` dict into a kvlab
``ModelConfig`` (used by both the loader and the planner) and, when kvlab can run it, maps the
checkpoint's tensor names onto kvlab's. Families are pure mappings: reading files and building the
model is ``kvlab.loading``'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvlab.config import ModelConfig
from kvlab.errors import ConfigError, KvlabError, UnsupportedError
from kvlab.plugins import import_submodules


@dataclass
class Family:
    model_types: tuple[str, ...]
    to_config: Callable[[dict], ModelConfig]
    # HF state dict -> kvlab state dict (same tensors, kvlab names). None: plannable, not loadable.
    convert_state: Callable[[dict[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]] | None = None


_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_family(*model_types: str, convert_state=None):
    """Decorator for a ``to_config(hf_dict) -> ModelConfig`` function."""

    def wrap(fn):
        family = Family(model_types, fn, convert_state)
        for name in model_types:
            _FAMILIES[name] = family
        return fn

    return wrap


def get_family(hf: dict, where: str = "config.json") -> Family:
    global _loaded
    if not _loaded:
        _loaded = True
        import_submodules("kvlab.hf")
    model_type = hf.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: no 'model_type' field; not a Hugging Face config")
    if isinstance(hf.get("text_config"), dict) and model_type not in _FAMILIES:
        return get_family(hf["text_config"], where)
    if model_type not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise UnsupportedError(f"{where}: model family '{model_type}' is not supported (supported: {known})")
    return _FAMILIES[model_type]


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """kvlab config of an HF config dict; field errors name the HF field."""
    family = get_family(hf, where)
    try:
        config = family.to_config(hf)
        experts = hf_get(hf, "n_routed_experts", "num_experts", "num_local_experts", default=0) or 0
        if experts > 1:  # kvlab builds dense MLPs only: the planner must not count these weights as dense
            config.extras["moe_experts"] = int(experts)
        return config
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as exc:
        if isinstance(exc, KvlabError):
            raise
        raise ConfigError(f"{where}: invalid value ({exc})") from None


def hf_get(hf: dict, *names, default=None):
    """First present, non-null field among ``names``."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    return default


def hf_flag(hf: dict, name: str, default: bool = False) -> bool:
    """A boolean HF field: absent or null -> ``default``; anything but true/false (``"false"``, 1) is refused
    rather than read as truthy."""
    value = hf.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"config.json: {name}: must be true or false, got {value!r}")
    return value


def hf_rope(hf: dict):
    """RopeConfig from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    from kvlab.config import RopeConfig

    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    partial = params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor", 1.0)
    scaling = params or hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return RopeConfig(theta=float(theta), partial=float(partial), scaling=scaling,
                      max_position=hf.get("max_position_embeddings"))


def hf_dtype(hf: dict) -> str:
    return "float32"  # kvlab computes in fp32 on CPU; pass dtype= to load in another
