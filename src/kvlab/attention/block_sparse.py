"""Block-sparse causal attention: Longformer (local + global blocks) and BigBird (local + global +
random blocks).

Time is cut into blocks of ``block`` real tokens (block index = RoPE position // block, so left padding
does not shift the pattern). A query in block ``i`` sees, causally, the keys of

- its ``local_blocks`` most recent blocks (its own included: blocks ``i - local_blocks + 1 .. i``),
- the first ``global_blocks`` blocks (global tokens; being the first tokens of a causal sequence, they
  already see everything before them, so "global queries" need no extra rule),
- ``random_blocks`` blocks drawn from the rest of the history ``[global_blocks, i - local_blocks]`` by a
  hash of ``(i, j, seed)`` (BigBird), the same draw whatever the sequence length, so cached decoding
  equals the full forward.

Cache: without random blocks a future query only sees the local window and the global tokens, so the
cache is ``WindowKVCacheLayer`` (ring of ``local_blocks * block`` slots + ``global_blocks * block`` sink
slots): bytes stop growing. With random blocks any past block may be drawn later: every key is kept
(``KVCacheLayer``) and the saving is compute only; the label says so.

Kernels: ``torch.compile(flex_attention)`` with a ``BlockMask`` where it runs (inference on CPU; no CPU
backward in torch 2.13), else SDPA with the dense boolean mask. ``backend`` picks ("auto" uses flex for
grad-free forwards of at least ``FLEX_MIN_QUERIES`` queries); a traced forward records which ran
(``trace[(layer, "backend")]``, see ``ForwardContext``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlab.attention._common import EMPTY_STEP, ForwardContext, grouped_sdpa
from kvlab.attention.full import FullAttention, FullSpec, KVCacheLayer
from kvlab.attention.sliding import WindowKVCacheLayer
from kvlab.cache.base import CacheLayer
from kvlab.config_options import check_ints
from kvlab.errors import ConfigError
from kvlab.registry import register_module, register_spec
from kvlab.sharing import shared_cache_layer

log = logging.getLogger(__name__)

FLEX_MIN_QUERIES = 256  # below this, compile time and block overhead outweigh the sparse kernel


@register_spec("block_sparse", aliases=("bigbird", "longformer", "sparse"))
@dataclass(kw_only=True)
class BlockSparseSpec(FullSpec):
    block: int = 64
    local_blocks: int = 3  # recent blocks seen, the query's own included
    global_blocks: int = 1  # first blocks seen by every query
    random_blocks: int = 0  # BigBird: extra past blocks per query block (0 = Longformer)
    seed: int = 0
    backend: str = "auto"  # "auto" | "dense" | "flex"

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = FullSpec.SUPPORTED_OPTIONS - {"kv_quant"}
    EXAMPLES: ClassVar[dict[str, dict]] = {
        "longformer_gqa": {"layers": [{"type": "block_sparse", "n_heads": 4, "n_kv_heads": 2, "block": 3,
                                       "local_blocks": 2, "global_blocks": 1}], "_seq": 20},
        "bigbird_shared": {"layers": [{"type": "block_sparse", "n_heads": 4, "block": 2, "local_blocks": 2,
                                       "global_blocks": 1, "random_blocks": 1, "seed": 3},
                                      {"type": "block_sparse", "n_heads": 4, "block": 2, "local_blocks": 2,
                                       "global_blocks": 1, "random_blocks": 1, "seed": 3, "kv_from": 0}],
                           "_seq": 20},
    }

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, block=self.block, local_blocks=self.local_blocks)
        check_ints(where, low=0, global_blocks=self.global_blocks, random_blocks=self.random_blocks)
        if self.backend not in ("auto", "dense", "flex"):
            raise ConfigError(f"{where}backend: must be 'auto', 'dense' or 'flex', got {self.backend!r}")

    def accepts_kv_from(self, producer) -> bool:
        """A block-sparse consumer reads a producer with the very same pattern (it reuses its mask)."""
        fields = ("block", "local_blocks", "global_blocks", "random_blocks", "seed")
        return isinstance(producer, BlockSparseSpec) and all(
            getattr(producer, f) == getattr(self, f) for f in fields)

    @property
    def bounded(self) -> bool:
        """True when the cache holds only the window and the global tokens (no random blocks)."""
        return self.random_blocks == 0

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        if tokens == 0:
            return 0
        slots = min(tokens, self.local_blocks * self.block) + self.global_blocks * self.block \
            if self.bounded else tokens
        return 2 * batch * self.n_kv_heads * self.head_dim * slots * elem_bytes

    def attended_pairs(self, seq_len: int) -> int:
        """Per query block ``i`` with ``q`` queries: ``q (q + 1) / 2`` on the diagonal block plus
        ``q * block`` per earlier block seen (local, global outside the window, random)."""
        b, total = self.block, 0
        for i in range(-(-seq_len // b)):
            q = min(b, seq_len - i * b)
            local = min(self.local_blocks - 1, i)
            older = max(0, i - self.local_blocks + 1)  # blocks 0 .. i - local_blocks
            glob = min(self.global_blocks, older)
            rand = min(self.random_blocks, older - glob)
            total += q * (q + 1) // 2 + q * b * (local + glob + rand)
        return total

    def label(self) -> str:
        name = "BigBird" if self.random_blocks else "Longformer"
        base = f"{name}-{self.block}x{self.local_blocks}+{self.global_blocks}g"
        if self.random_blocks:
            base += f"+{self.random_blocks}r (compute saving only)"
        return self.grouped_label(base)

    def attention_pattern(self, seq: int):
        ctx = ForwardContext(1, seq, 0, None, torch.device("cpu"))
        return block_sparse_mask(self, ctx, torch.arange(seq))[0, 0], self.label()


def random_block_table(n_query_blocks: int, n_key_blocks: int, local: int, glob: int, count: int,
                       seed: int, device=None) -> torch.Tensor:
    """Bool ``[n_query_blocks, n_key_blocks]``: the ``count`` random blocks of each query block, drawn
    from ``[glob, i - local]`` by ranking a hash of ``(i, j, seed)`` -- independent of sequence length."""
    i = torch.arange(n_query_blocks, device=device)[:, None]
    j = torch.arange(n_key_blocks, device=device)[None, :]
    candidate = (j >= glob) & (j <= i - local)
    if count == 0 or n_key_blocks == 0:
        return candidate & False
    h = torch.bitwise_xor(i * 73856093, j * 19349663) ^ (seed * 83492791 + 12345)
    score = (h % 1000003).double() + j.double() * 1e-7  # distinct scores: a deterministic top-k
    score = score.masked_fill(~candidate, -1.0)
    top = score.topk(min(count, n_key_blocks), dim=-1).indices
    chosen = torch.zeros_like(candidate).scatter_(1, top, True)
    return chosen & candidate


def block_sparse_mask(spec: BlockSparseSpec, ctx: ForwardContext, key_steps: torch.Tensor) -> torch.Tensor:
    """Mask ``[B|1, 1, S, T]`` (True = attend) of the block pattern for keys at ``key_steps``
    (``[T]`` or per row ``[B, T]``); padding keys and empty slots are rejected, a padded query sees
    itself only."""
    pad = torch.zeros(1, 1, dtype=torch.long, device=key_steps.device) if ctx.pad_offset is None \
        else ctx.pad_offset[:, None]  # [B|1, 1]
    ksteps = key_steps if key_steps.dim() == 2 else key_steps[None, :]  # [B|1, T]
    qpos = (ctx.query_steps[None, :] - pad)[:, :, None]  # [B|1, S, 1]
    kpos = (ksteps - pad)[:, None, :]  # [B|1, 1, T]
    b = spec.block
    qb, kb = qpos.div(b, rounding_mode="floor").clamp_min(0), kpos.div(b, rounding_mode="floor").clamp_min(0)
    # [B|1, S, T] bool, local and global blocks, compared by broadcasting (no [S, T] integer intermediate)
    pattern = (kb > qb - spec.local_blocks) | (kb < spec.global_blocks)
    if spec.random_blocks:  # block table -> tokens, two index_selects per row: no [S, T] integer intermediates
        n_blocks = max(int(qb.max()), int(kb.max())) + 1 if kb.numel() and qb.numel() else 1
        table = random_block_table(n_blocks, n_blocks, spec.local_blocks, spec.global_blocks,
                                   spec.random_blocks, spec.seed, key_steps.device)  # [blocks, blocks]
        pattern = pattern | torch.stack([table.index_select(0, qb[r % qb.shape[0], :, 0]).index_select(1, kb[r, 0])
                                         for r in range(kb.shape[0])])  # [B|1, S, T]
    allowed = (kpos <= qpos) & (kpos >= 0) & pattern
    allowed = allowed | (ksteps[:, None, :] == ctx.query_steps[None, :, None])  # a query sees itself
    return allowed.unsqueeze(1)


_compiled_flex: dict[bool, object] = {}  # dynamic -> compiled flex_attention
_dynamic_flex_failed = False
FLEX_RECOMPILE_LIMIT = 256  # static kernels: one per shape; dynamo's default (8) would then run flex eagerly,
# materialising the S x T scores (21 s and gigabytes at 8K)


def _flex(dynamic: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[dynamic]


def flex_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float | None) -> torch.Tensor:
    """Compiled FlexAttention with a ``BlockMask`` built from the dense bool ``mask [B|1, 1, S, T]``:
    fully masked blocks are skipped. Forward only on CPU. A dynamic-shape kernel serves every length with
    one compilation; where inductor cannot build it (it fails for some head shapes), one static kernel
    per shape, with dynamo's recompile limit raised so that no length falls back to eager flex."""
    global _dynamic_flex_failed
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]  # [B|1, S, T]
    rows = dense.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b if rows > 1 else 0, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, rows, None, q.shape[2], k.shape[2], device=q.device)
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": k.shape[1] != q.shape[1]}
    if not _dynamic_flex_failed:
        try:
            return _flex(True)(q, k, v, **kwargs)
        except Exception as err:  # an inductor codegen failure: static kernels from now on
            _dynamic_flex_failed = True
            log.info("dynamic-shape flex attention failed to compile (%s); static kernels per shape",
                     str(err).splitlines()[0] if str(err) else type(err).__name__)
    limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    with torch._dynamo.config.patch(recompile_limit=limit,
                                    accumulated_recompile_limit=max(limit, torch._dynamo.config.accumulated_recompile_limit)):
        return _flex(False)(q, k, v, **kwargs)


@register_module("block_sparse")
class BlockSparseAttention(FullAttention):
    """Full attention's projections with a block-sparse mask; flex or dense-mask kernel."""

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        spec = self.spec
        shared = shared_cache_layer(spec, built)
        if shared is not None:
            return shared
        if spec.bounded:
            return WindowKVCacheLayer(batch, self.n_kv_heads, self.head_dim, spec.local_blocks * spec.block,
                                      spec.global_blocks * spec.block, dtype, device)
        return KVCacheLayer(batch, self.n_kv_heads, self.head_dim, dtype, device)

    def keys_values(self, k, v, ctx: ForwardContext, cache):
        if cache is None:
            return k, v, block_sparse_mask(self.spec, ctx, ctx.query_steps)
        if isinstance(cache, KVCacheLayer):  # random blocks: every key kept
            k, v = cache.append(k, v)
            return k, v, block_sparse_mask(self.spec, ctx, torch.arange(k.shape[2], device=k.device))
        return self._window_keys(k, v, ctx, cache)

    def _window_keys(self, k, v, ctx: ForwardContext, cache: WindowKVCacheLayer):
        """Global (sink) slots + ring + new keys, with per-row steps; a global token still in the ring
        is rejected there (it is read from its global slot). A decode step writes its key first and then
        attends to the slots as they are (one view, no copy): the ring holds ``local_blocks * block``
        steps, and the slot it overwrites is older than the block-aligned local window."""
        start, batch = ctx.start, k.shape[0]
        decode = ctx.seq_len == 1
        if decode:
            cache.write(k, v, start, ctx.pad_offset)
        held = start + decode  # steps in the cache now
        pad = torch.zeros(batch, dtype=torch.long, device=k.device) if ctx.pad_offset is None else ctx.pad_offset
        ring = cache.key_steps() if decode else cache.key_steps()[: min(cache.length, cache.window)]  # [R]
        ring = ring[None, :].expand(batch, -1)
        n_glob = cache.sinks
        keys, values, steps = [], [], []
        if n_glob:
            gsteps = pad[:, None] + torch.arange(n_glob, device=k.device)[None, :]  # [B, G]
            steps.append(torch.where(gsteps < held, gsteps, torch.full_like(gsteps, EMPTY_STEP)))
            keys.append(cache.sink_k)
            values.append(cache.sink_v)
            ring = torch.where(ring - pad[:, None] < n_glob, torch.full_like(ring, EMPTY_STEP), ring)
        if decode:  # [B, Hkv, G + W, D]: the global slots, then the ring
            return cache.slots_k, cache.slots_v, block_sparse_mask(self.spec, ctx, torch.cat([*steps, ring], 1))
        keys += [cache.ring_k[:, :, : ring.shape[1]], k]
        values += [cache.ring_v[:, :, : ring.shape[1]], v]
        steps += [ring, ctx.query_steps[None, :].expand(batch, -1)]
        mask = block_sparse_mask(self.spec, ctx, torch.cat(steps, dim=1))
        k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        cache.write(k, v, start, ctx.pad_offset)
        return k_all, v_all, mask

    def use_flex(self, q: torch.Tensor) -> bool:
        backend = self.spec.backend
        if backend == "dense":
            return False
        grad_free = not (torch.is_grad_enabled() and (q.requires_grad or self.q_proj.weight.requires_grad))
        if backend == "flex":
            return grad_free
        return grad_free and q.shape[2] >= FLEX_MIN_QUERIES

    def attend(self, q, k, v, mask, ctx: ForwardContext):
        if self.use_flex(q):
            try:
                out = flex_sdpa(q, k, v, mask, self.scale)
                ctx.record(self.layer_idx, "backend", "flex")
                return out
            except Exception as err:  # compile unavailable (no compiler, unsupported shape): fall back
                log.info("block_sparse layer %d: flex attention unavailable (%s); dense mask used",
                         self.layer_idx, err)
        ctx.record(self.layer_idx, "backend", "dense")
        return grouped_sdpa(q, k, v, mask, causal=True, scale=self.scale)
