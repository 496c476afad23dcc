"""``block_sparse:block=B,local=L,global=G``: the same weights with a Longformer-style pattern (the last
``L`` blocks of ``B`` tokens plus the first ``G`` blocks); the cache holds only those."""

from __future__ import annotations

from kvlab.attention.block_sparse import BlockSparseSpec
from kvlab.convert.heads import check_plain_attention
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.convert.sliding import retype
from kvlab.errors import UnsupportedError


@register_target("block_sparse", options={"block": 64, "local": 8, "global": 1})
def block_sparse(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Local + global block-sparse attention with the layer's weights (expected to need healing)."""
    check_plain_attention(work, "block_sparse")
    if work.spec.kv_quant:
        raise UnsupportedError(f"layers[{work.index}]: block-sparse layers cannot be quantized")
    spec = retype(work.spec, BlockSparseSpec, block=opts["block"], local_blocks=opts["local"],
                  global_blocks=opts["global"])
    return LayerWork(work.index, spec, work.weights)
