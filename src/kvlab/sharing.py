"""Cross-layer KV sharing patterns: set ``kv_from`` on a list of layer-spec dicts.

* ``share_every(layers, k)``: CLA-k (cross-layer attention). Layers are grouped in runs of ``k``; the
  first layer of each run produces K/V, the other ``k - 1`` read it (layer ``i`` reads ``i - i % k``).
* ``share_last(layers, n)``: Gemma 4's rule. Each of the last ``n`` layers reuses the K/V of the last
  earlier layer (before those ``n``) of the same attention type that is not itself a consumer.

Both return new dicts (the input is not modified) and leave the shape checks to ``ModelConfig``
validation: a consumer must have its producer's ``n_kv_heads``/``head_dim`` (and window). A config
may name a pattern with a top-level ``"kv_sharing": {"every": k}`` or ``{"last": n}``
(``apply_kv_sharing``, used by ``ModelConfig.from_dict``).
"""

from __future__ import annotations

import copy

from kvlab.errors import ConfigError


def _check_count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: must be a positive integer, got {value!r}")
    return value


def _check_layers(layers: object) -> list[dict]:
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise ConfigError("layers: kv_sharing needs an explicit list of layer-spec objects")
    return [copy.deepcopy(layer) for layer in layers]  # one copy each, even if the list repeats a dict


def _producer(layers: list[dict], i: int) -> int:
    """The layer that really holds layer ``i``'s K/V (follows an existing ``kv_from``)."""
    src = layers[i].get("kv_from")
    return i if src is None else src


def share_every(layers: list[dict], k: int, where: str = "kv_sharing.every") -> list[dict]:
    """CLA-k: layer ``i`` reads the K/V of layer ``i - i % k`` (``k = 1`` shares nothing)."""
    _check_count(k, where)
    out = _check_layers(layers)
    for i, layer in enumerate(out):
        if i % k and layer.get("kv_from") is None:
            layer["kv_from"] = _producer(out, i - i % k)
    return out


def _kind(layer: dict, where: str) -> str:
    from kvlab.registry import get_technique

    if "type" not in layer:
        raise ConfigError(f"{where}type: missing (the attention technique, e.g. 'full')")
    return get_technique(layer["type"], where=f"{where}type").name  # aliases -> one name


def share_last(layers: list[dict], n: int, where: str = "kv_sharing.last") -> list[dict]:
    """Gemma 4: each of the last ``n`` layers reuses the last non-consumer layer of its type before them."""
    _check_count(n, where)
    out = _check_layers(layers)
    first = len(out) - n
    if first < 1:
        raise ConfigError(f"{where}: {n} consumer layers leave no producer among {len(out)} layers")
    producers: dict[str, int] = {}
    for i in range(first):
        if out[i].get("kv_from") is None:
            producers[_kind(out[i], f"layers[{i}].")] = i
    for i in range(first, len(out)):
        kind = _kind(out[i], f"layers[{i}].")
        if kind not in producers:
            raise ConfigError(f"{where}: layer {i} ('{kind}') has no earlier '{kind}' layer to reuse "
                              f"(the last {n} layers all consume)")
        out[i]["kv_from"] = producers[kind]
    return out


_PATTERNS = {"every": share_every, "last": share_last}


def apply_kv_sharing(sharing: object, layers: list[dict]) -> list[dict]:
    """Expand a config's ``"kv_sharing": {"every": k} | {"last": n}`` into ``kv_from`` fields."""
    if not isinstance(sharing, dict) or len(sharing) != 1 or next(iter(sharing)) not in _PATTERNS:
        raise ConfigError(f"kv_sharing: expected {{\"every\": k}} or {{\"last\": n}}, got {sharing!r}")
    (name, value), = sharing.items()
    return _PATTERNS[name](layers, value, where=f"kv_sharing.{name}")
