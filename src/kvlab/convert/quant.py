"""``int8`` / ``int4``: store the layer's K/V (or MLA latent) quantized, KIVI layout (keys per channel,
values per token, the last ``residual`` tokens in full precision; ``kvlab.cache.quantized``). Same
weights; only the spec's ``kv_quant`` fields change."""

from __future__ import annotations

import dataclasses

from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import UnsupportedError

OPTIONS = {"group": 32, "residual": 32}


def quantize(work: LayerWork, kind: str, opts: dict) -> LayerWork:
    if work.spec.kv_from is not None:  # a consumer holds nothing; its producer decides the storage
        return work
    spec = dataclasses.replace(work.spec, kv_quant=kind, kv_quant_group=opts["group"],
                               kv_quant_residual=opts["residual"])
    try:
        spec.validate(f"layers[{work.index}].")
    except Exception as exc:  # e.g. sliding layers refuse kv_quant
        raise UnsupportedError(f"{kind} on a '{work.spec.type}' layer: {exc}") from None
    return LayerWork(work.index, spec, work.weights)


@register_target("int8", options=OPTIONS)
def int8(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """8-bit KV storage."""
    return quantize(work, "int8", opts)


@register_target("int4", options=OPTIONS)
def int4(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """4-bit KV storage (two codes per byte)."""
    return quantize(work, "int4", opts)
