"""Cross-layer KV sharing: where each part of the mechanism lives.

* Config: a layer's ``kv_from`` (a base ``LayerSpec`` option; a spec lists it in ``SUPPORTED_OPTIONS``
  to accept it) and the ``"kv_sharing": {"every": k} | {"last": n}`` shorthand, expanded by
  ``kvlab.config_options`` (``share_every``: CLA-k; ``share_last``: Gemma 4's rule).
* Runtime: a consumer module builds no K/V projections and reads ``ctx.shared[kv_from]`` (what its
  producer published in the same forward); its cache layer is a ``SharedCacheLayer`` holding 0 bytes,
  made by ``shared_cache_layer`` below.
* Planner: a consumer's ``cache_bytes`` is 0 (the base ``LayerSpec.cache_bytes`` says so for every technique).
"""

from __future__ import annotations

from kvlab.cache.base import CacheLayer, SharedCacheLayer
from kvlab.config_options import apply_kv_sharing, share_every, share_last

__all__ = ["apply_kv_sharing", "share_every", "share_last", "shared_cache_layer"]


def shared_cache_layer(spec, built: list[CacheLayer]) -> CacheLayer | None:
    """The cache layer of a consumer (``spec.kv_from`` set): a 0-byte view of its producer's; None for a
    producer (the module then builds its own)."""
    return None if spec.kv_from is None else SharedCacheLayer(built[spec.kv_from])
