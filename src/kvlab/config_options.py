"""The model-level options of a config, as data: their checks and the ``kv_sharing`` shorthand.

``ModelConfig`` stores these options as plain dicts and flags; the modules that run them live above the
config (``hyper_connections.py``, ``per_layer_embeddings.py``, the ``kv_from`` branch of each attention
module). Their schemas live here, beside the config and without torch, so that data flows one way:
config -> model -> cache -> planner (``config.py`` imports nothing above itself).

Cross-layer sharing patterns set ``kv_from`` on a list of layer-spec dicts:

* ``share_every(layers, k)``: CLA-k (cross-layer attention). Layers are grouped in runs of ``k``; the
  first layer of each run produces K/V, the other ``k - 1`` read it (layer ``i`` reads ``i - i % k``).
* ``share_last(layers, n)``: Gemma 4's rule. Each of the last ``n`` layers reuses the K/V of the last
  earlier layer (before those ``n``) of the same attention type that is not itself a consumer.

Both return new dicts (the input is not modified) and leave the shape checks to ``ModelConfig``
validation. A config names a pattern with a top-level ``"kv_sharing": {"every": k}`` or ``{"last": n}``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kvlab.errors import ConfigError

HYPER_CONNECTION_DEFAULTS = {"streams": 4, "sinkhorn_iters": 20, "eps": 1e-6}

# technique name or alias -> LayerSpec subclass, filled by ``kvlab.registry`` (which also installs the
# loader that imports the technique files: the config layer imports nothing above itself)
SPEC_TYPES: dict[str, type] = {}
TECHNIQUE_LOADERS: list[Callable[[], None]] = []

# base options a technique opts into through ``SUPPORTED_OPTIONS`` (anything else must keep its default)
BASE_OPTIONS = ("kv_from", "kv_quant", "output_gate", "v_norm", "k_eq_v", "qk_norm", "qkv_bias", "o_bias")


def spec_class(name: object, where: str = "type") -> type:
    """The registered spec class of technique ``name`` (or an alias)."""
    if isinstance(name, str) and name not in SPEC_TYPES:
        for load in TECHNIQUE_LOADERS:
            load()
    if not isinstance(name, str) or name not in SPEC_TYPES:
        known = ", ".join(sorted({cls.type for cls in SPEC_TYPES.values()}))
        raise ConfigError(f"{where}: unknown technique {name!r} (known: {known})")
    return SPEC_TYPES[name]


def technique_name(name: object, where: str = "type") -> str:
    """The canonical name of technique ``name`` (aliases resolved)."""
    return spec_class(name, where).type


def check_int(where: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an integer ``>= low`` (booleans are not), else a ConfigError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{where}: must be {wanted}, got {value!r}")
    return value


def check_ints(owner: str, low: int = 1, **values: Any) -> None:
    """``check_int`` on each ``name=value`` (``None`` values are skipped); messages read ``owner + name``."""
    for name, value in values.items():
        if value is not None:
            check_int(f"{owner}{name}", value, low)


def validate_hyper_connections(hc: dict | None, where: str = "hyper_connections") -> None:
    """Check a ``hyper_connections`` config dict (None = plain residuals)."""
    if hc is None:
        return
    if not isinstance(hc, dict):
        raise ConfigError(f"{where}: expected an object like {{\"streams\": 4}} or null, got {hc!r}")
    unknown = sorted(set(hc) - set(HYPER_CONNECTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(HYPER_CONNECTION_DEFAULTS)})")
    for name in ("streams", "sinkhorn_iters"):
        check_int(f"{where}.{name}", hc.get(name, HYPER_CONNECTION_DEFAULTS[name]))
    eps = hc.get("eps", HYPER_CONNECTION_DEFAULTS["eps"])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ConfigError(f"{where}.eps: must be a non-negative number, got {eps!r}")


def validate_decoder_options(cfg) -> None:
    """Check ModelConfig's decoder-style flags and scalars (``norm_unit_offset`` ... ``logit_softcap``)."""
    for name in ("norm_unit_offset", "sandwich_norms", "layer_scalar"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name}: must be true or false, got {getattr(cfg, name)!r}")
    for name in ("embed_scale", "logit_softcap"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"{name}: must be a positive number or null, got {value!r}")


def validate_per_layer_embeddings(ple: dict | None, hyper_connections: dict | None) -> None:
    """Check ``per_layer_embeddings = {"dim": P, "vocab": V}`` (Gemma 4's PLE; None = off)."""
    if ple is None:
        return
    if not isinstance(ple, dict) or set(ple) - {"dim", "vocab"} or "dim" not in ple:
        raise ConfigError(f"per_layer_embeddings: expected {{\"dim\": P, \"vocab\": V}}, got {ple!r}")
    for key in ("dim", "vocab"):
        check_int(f"per_layer_embeddings.{key}", ple.get(key, 1))
    if hyper_connections is not None:
        raise ConfigError("per_layer_embeddings: not supported together with hyper_connections")


# ---- cross-layer sharing patterns ------------------------------------------------------------------
def _check_layers(layers: object) -> list[dict]:
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise ConfigError("layers: kv_sharing needs an explicit list of layer-spec objects")
    return [copy.deepcopy(layer) for layer in layers]  # one copy each, even if the list repeats a dict


def share_every(layers: list[dict], k: int, where: str = "kv_sharing.every") -> list[dict]:
    """CLA-k: layer ``i`` reads the K/V of layer ``i - i % k`` (``k = 1`` shares nothing)."""
    check_int(where, k)
    out = _check_layers(layers)
    for i, layer in enumerate(out):
        if i % k and layer.get("kv_from") is None:
            src = out[i - i % k].get("kv_from")  # follow an existing consumer to its producer
            layer["kv_from"] = i - i % k if src is None else src
    return out


def _technique(layer: dict, where: str, canonical: Callable[[str, str], str]) -> str:
    if "type" not in layer:
        raise ConfigError(f"{where}type: missing (the attention technique, e.g. 'full')")
    return canonical(layer["type"], f"{where}type")  # aliases -> one name


def share_last(layers: list[dict], n: int, where: str = "kv_sharing.last",
               canonical: Callable[[str, str], str] | None = None) -> list[dict]:
    """Gemma 4: each of the last ``n`` layers reuses the last non-consumer layer of its technique before
    them. ``canonical(name, where)`` maps a technique alias to its name (default: the spec table)."""
    canonical = canonical or technique_name
    check_int(where, n)
    out = _check_layers(layers)
    first = len(out) - n
    if first < 1:
        raise ConfigError(f"{where}: {n} consumer layers leave no producer among {len(out)} layers")
    producers: dict[str, int] = {}
    for i in range(first):
        if out[i].get("kv_from") is None:
            producers[_technique(out[i], f"layers[{i}].", canonical)] = i
    for i in range(first, len(out)):
        name = _technique(out[i], f"layers[{i}].", canonical)
        if name not in producers:
            raise ConfigError(f"{where}: layer {i} ('{name}') has no earlier '{name}' layer to reuse "
                              f"(the last {n} layers all consume)")
        out[i]["kv_from"] = producers[name]
    return out


_PATTERNS = {"every": share_every, "last": share_last}


def apply_kv_sharing(sharing: object, layers: list[dict], canonical: Callable[[str, str], str] | None = None
                     ) -> list[dict]:
    """Expand a config's ``"kv_sharing": {"every": k} | {"last": n}`` into ``kv_from`` fields."""
    if not isinstance(sharing, dict) or len(sharing) != 1 or next(iter(sharing)) not in _PATTERNS:
        raise ConfigError(f"kv_sharing: expected {{\"every\": k}} or {{\"last\": n}}, got {sharing!r}")
    (name, value), = sharing.items()
    if name == "last":
        return share_last(layers, value, where="kv_sharing.last", canonical=canonical)
    return share_every(layers, value, where="kv_sharing.every")


MAX_LAYERS = 10_000


def expand_layer_shorthand(layers: dict, n_layers: Any) -> list:
    """``{"repeat": spec}`` or ``{"pattern": [spec, ...]}`` (cycled) -> ``n_layers`` spec dicts."""
    if set(layers) not in ({"repeat"}, {"pattern"}):
        raise ConfigError(f"layers: expected a list, {{\"repeat\": spec}} or {{\"pattern\": [spec, ...]}}, "
                          f"got keys {sorted(layers)}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= MAX_LAYERS:
        raise ConfigError(f"n_layers: must be an integer in 1..{MAX_LAYERS} to expand layers, got {n_layers!r}")
    pattern = [layers["repeat"]] if "repeat" in layers else layers["pattern"]
    if not isinstance(pattern, list) or not pattern:
        raise ConfigError(f"layers.pattern: must be a non-empty list of layer specs, got {pattern!r}")
    for i, spec in enumerate(pattern):
        if not isinstance(spec, dict):
            where = "layers.repeat" if "repeat" in layers else f"layers.pattern[{i}]"
            raise ConfigError(f"{where}: expected a layer spec object, got {spec!r}")
    return [dict(pattern[i % len(pattern)]) for i in range(n_layers)]
