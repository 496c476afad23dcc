"""``sliding:window=W,sinks=S``: the same weights attending only the last ``W`` tokens plus the first
``S`` (StreamingLLM sinks); the cache is a ring buffer of ``W + S`` slots. Which layers keep full
attention (the hybrid) is the budget search's job (``--kv-budget``), from measured sensitivity."""

from __future__ import annotations

from kvlab.attention.sliding import SlidingSpec
from kvlab.convert.heads import check_plain_attention
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import UnsupportedError


def retype(spec, cls, **fields):
    """A spec of class ``cls`` with every common field of ``spec`` kept, plus ``fields``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls) if f.init}
    common = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init and f.name in names}
    return cls(**{**common, **fields})


@register_target("sliding", options={"window": 1024, "sinks": 4})
def sliding(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Sliding window of ``window`` tokens plus ``sinks`` sink tokens."""
    check_plain_attention(work, "sliding")
    if work.spec.kv_quant:
        raise UnsupportedError(f"layers[{work.index}]: sliding layers cannot be quantized; put int8/int4 "
                               "on full or MLA layers")
    spec = retype(work.spec, SlidingSpec, window=opts["window"], sinks=opts["sinks"])
    return LayerWork(work.index, spec, work.weights)
