"""DeepSeek V4's attention layers: CSA (compressed sparse), HCA (heavily compressed) and V4's
sliding-only layer ("v4_sliding").

All three share V4's attention block: a low-rank query (``q_a_proj`` -> weighted RMSNorm -> ``q_b_proj``
-> unweighted RMSNorm per head), ONE key head that is also the value (K = V), RoPE on the *trailing*
``rot_dim`` channels of each head with the output's rope slice de-rotated (V carries RoPE), a learned
sink logit per head and a grouped low-rank output projection (``o_a_proj`` per head group, ``o_b_proj``).
Every layer attends to a local sliding window of ``window`` steps (itself included).

CSA and HCA add a compressor: every ``compress_rate`` (m) real tokens of a row are pooled into one entry,
``entry = RMSNorm(sum_slot softmax_slot(gate + position_bias) * kv)`` per channel, rotated at the
window's first position. CSA windows overlap (an entry pools the previous window's "Ca" half and its own
window's "Cb" half, 2m slots) and a lightning indexer (its own compressor at ``index_head_dim``) scores
entries per query, ``sum_h w_h relu(q_h . k)``; each query attends to its ``index_topk`` best visible
entries (ties broken by position: the earlier entry wins). HCA attends to every complete entry.
As in the reference, top-k selection passes no gradient to the indexer (DeepSeek trains it with a
separate objective); every other parameter trains through the dense or gathered path.

Windows are aligned to each row's *real* positions (left padding is never compressed), so a padded row
equals that row alone. A chunk is attended in query blocks of ``prefill_block`` (decode: one block), each
reading its window keys (at most ``window - 1 + block``) and the prefix of entries it can see: O(S (W +
block)) for the window; HCA attends to that prefix, CSA's indexer scores it (O(S^2 / m) dot products) and
the block gathers each query's top-k (O(S k)). ``dense_reference_forward`` is the naive O(S T) reference.

Cache (per row): the window's last ``window - 1`` keys (one copy: K = V), the compressed entries (and
the indexer's keys for CSA), the not-yet-compressed remainder as a fixed ``m``-slot ring of projected
kv/gate, and for CSA the last complete window's "Ca" half (kv, gate) carried into the next entry.
Planner (no padding, T tokens, elem bytes b):
    min(T, W-1) d b + floor(T/m) (d [+ d_I]) b + ring 2 m width b [+ overlap 2 m (d + d_I) b].
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from kvlab.attention import _v4
from kvlab.attention._common import ForwardContext
from kvlab.attention._v4 import Compressor, Indexer, IndexerScorer, V4CacheLayer, rope_tail
from kvlab.attention.sliding import band_block, window_mask
from kvlab.cache.base import CacheLayer
from kvlab.config import LayerSpec
from kvlab.config_options import check_ints
from kvlab.errors import ConfigError
from kvlab.norms import RMSNorm
from kvlab.registry import register_module, register_spec
from kvlab.rope import Rotary

__all__ = ["CSASpec", "CSAttention", "Compressor", "HCASpec", "HCAttention", "Indexer",
           "IndexerScorer", "V4CacheLayer", "V4SlidingAttention", "V4SlidingSpec", "dense_reference_forward",
           "rope_tail"]
_V4 = {"n_heads": 4, "head_dim": 16, "q_lora_rank": 12, "o_groups": 2, "o_lora_rank": 8, "window": 5,
       "rope": {"theta": 10000.0, "partial": 0.5, "interleaved": True}}


# ---- specs ------------------------------------------------------------------------------------
@register_spec("v4_sliding", aliases=("dsv4_sliding",))
@dataclass(kw_only=True)
class V4SlidingSpec(LayerSpec):
    """V4's attention block over a sliding window only (K = V single head, sinks, grouped output)."""

    window: int = 128  # a query sees the last `window` steps, itself included
    q_lora_rank: int = 64
    o_groups: int = 1
    o_lora_rank: int = 64

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset()  # V4 norms q and kv itself, no biases
    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "q_lora_rank", "o_lora_rank")
    EXAMPLES: ClassVar[dict[str, dict]] = {"window_sinks_grouped_out": {"layers": [{"type": "v4_sliding", **_V4}],
                                                                         "_seq": 20}}

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, window=self.window, q_lora_rank=self.q_lora_rank, o_groups=self.o_groups,
                   o_lora_rank=self.o_lora_rank)
        if self.n_kv_heads not in (None, 1):
            raise ConfigError(f"{where}n_kv_heads: {self.type} has one shared K=V head, got {self.n_kv_heads}")
        if self.n_heads % self.o_groups:
            raise ConfigError(f"{where}o_groups: n_heads ({self.n_heads}) is not divisible by o_groups "
                              f"({self.o_groups})")

    def resolved(self, cfg) -> V4SlidingSpec:
        return replace(super().resolved(cfg), n_kv_heads=1)

    # planner
    def _window_bytes(self, tokens: int) -> int:
        return min(tokens, self.window - 1) * self.head_dim

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        return batch * elem_bytes * self._window_bytes(tokens)

    def _compressed_seen(self, seq_len: int) -> int:
        return 0

    def attended_pairs(self, seq_len: int) -> int:
        w = self.window
        window = seq_len * (seq_len + 1) // 2 if seq_len <= w else w * (w + 1) // 2 + (seq_len - w) * w
        return window + self._compressed_seen(seq_len)

    def label(self) -> str:
        return f"V4-SWA{self.window}"

    def attention_pattern(self, seq: int):
        """Window keys, then the compressed entries each query sees (drawn at the entry's last token)."""
        q, k = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        return (k <= q) & ((k > q - self.window) | self._entry_pattern(q, k)), self.label()

    def _entry_pattern(self, q, k):
        return torch.zeros(q.shape[0], k.shape[1], dtype=torch.bool)


def _floor_sum(n: int, m: int) -> int:
    """sum_{u=1..n} floor(u / m): entries visible to queries 0..n-1 summed."""
    if n <= 0:
        return 0
    q, r = divmod(n, m)
    return m * q * (q - 1) // 2 + q * (r + 1)


@register_spec("hca", aliases=("heavily_compressed_attention",))
@dataclass(kw_only=True)
class HCASpec(V4SlidingSpec):
    """Heavily compressed attention: window + every complete entry of ``compress_rate`` tokens."""

    compress_rate: int = 128

    EXAMPLES: ClassVar[dict[str, dict]] = {"rate3_after_sliding": {
        "layers": [{"type": "hca", **_V4, "compress_rate": 3}, {"type": "v4_sliding", **_V4}], "_seq": 20}}

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, compress_rate=self.compress_rate)

    def _ring_width(self) -> int:
        return self.head_dim

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        entries = tokens // self.compress_rate * self.head_dim
        ring = 2 * self.compress_rate * self._ring_width()
        return batch * elem_bytes * (self._window_bytes(tokens) + entries + ring)

    def _compressed_seen(self, seq_len: int) -> int:
        return _floor_sum(seq_len, self.compress_rate)

    def label(self) -> str:
        return f"HCA/{self.compress_rate}"

    def _entry_pattern(self, q, k):  # every complete entry: its last token stands for it
        return (k + 1) % self.compress_rate == 0


@register_spec("csa", aliases=("compressed_sparse_attention",))
@dataclass(kw_only=True)
class CSASpec(HCASpec):
    """Compressed sparse attention: overlapping windows of ``compress_rate`` tokens, a lightning indexer
    picking ``index_topk`` entries per query."""

    compress_rate: int = 4
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 64

    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = V4SlidingSpec.WIDTH_FIELDS + ("index_head_dim",)
    EXAMPLES: ClassVar[dict[str, dict]] = {"topk3_overlap": {
        "layers": [{"type": "csa", **_V4, "compress_rate": 2, "index_n_heads": 2, "index_head_dim": 8,
                    "index_topk": 3}], "_seq": 20}}

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim,
                   index_topk=self.index_topk)

    def _ring_width(self) -> int:
        return 2 * self.head_dim + 2 * self.index_head_dim

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        entries = tokens // self.compress_rate * (self.head_dim + self.index_head_dim)
        ring = 2 * self.compress_rate * self._ring_width()
        overlap = 2 * self.compress_rate * (self.head_dim + self.index_head_dim)
        return batch * elem_bytes * (self._window_bytes(tokens) + entries + ring + overlap)

    def _selected(self, n: int) -> int:
        """sum over queries 0..n-1 of min(top-k, visible entries)."""
        cap = self.index_topk * self.compress_rate
        if n < cap:
            return _floor_sum(n, self.compress_rate)
        return _floor_sum(cap - 1, self.compress_rate) + (n - cap + 1) * self.index_topk

    def _compressed_seen(self, seq_len: int) -> int:
        return self._selected(seq_len)

    def _indexer_flops(self, seq_len: int) -> int:  # q.k of every visible entry, every indexer head
        return 2 * self.index_n_heads * self.index_head_dim * _floor_sum(seq_len, self.compress_rate)

    def decode_flops(self, context: int) -> int:
        return super().decode_flops(context) + self._indexer_flops(context) - self._indexer_flops(context - 1)

    def prefill_flops(self, seq_len: int) -> int:
        return super().prefill_flops(seq_len) + self._indexer_flops(seq_len)

    def label(self) -> str:
        return f"CSA/{self.compress_rate}k{self.index_topk}"

    def attention_pattern(self, seq: int):
        pattern, _ = super().attention_pattern(seq)  # candidates: the indexer picks top-k of these per query
        return pattern, f"{self.label()} (top-{self.index_topk} of the drawn entries, chosen per query)"


# ---- modules: V4 sliding -> HCA (+ compressor) -> CSA (+ indexer), as the specs ---------------------
@register_module("v4_sliding")
class V4SlidingAttention(nn.Module):
    """V4 attention block over the window; parameter names follow transformers' ``DeepseekV4Attention``.
    Subclasses add attention to compressed entries through ``entry_source`` and ``entry_terms``."""

    gather_max_queries = 256  # CSA: query blocks up to this many queries gather their top-k entries; 0: dense

    def __init__(self, spec: V4SlidingSpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        d_model, heads, dim = cfg.d_model, spec.n_heads, spec.head_dim
        self.n_heads, self.head_dim, self.window = heads, dim, spec.window
        self.prefill_block = band_block(spec.window)  # queries per block of a long chunk
        self.q_a_proj = nn.Linear(d_model, spec.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(spec.q_lora_rank, cfg.norm_eps)
        self.q_b_proj = nn.Linear(spec.q_lora_rank, heads * dim, bias=False)
        self.q_b_norm = RMSNorm(dim, cfg.norm_eps, scale=False)
        self.kv_proj = nn.Linear(d_model, dim, bias=False)
        self.kv_norm = RMSNorm(dim, cfg.norm_eps)
        self.o_groups = spec.o_groups
        self.o_a_proj = nn.Linear(heads * dim // spec.o_groups, spec.o_groups * spec.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(spec.o_groups * spec.o_lora_rank, d_model, bias=False)
        self.sinks = nn.Parameter(torch.zeros(heads))
        self.rotary = Rotary(spec.rope, dim)
        self.scale = spec.softmax_scale or dim ** -0.5

    def compressors(self) -> dict[str, Compressor]:
        """The compressors whose entries the cache layer holds, by buffer name."""
        return {}

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        return V4CacheLayer(batch, self.head_dim, self.window, dtype, device, self.compressors())

    def entry_source(self, x, q_res, cos, sin, ctx: ForwardContext, cache: V4CacheLayer | None) -> _v4.EntrySource | None:
        """Compress this chunk (appending to ``cache``); None: no entries to attend to."""
        return None

    def entry_terms(self, src: _v4.EntrySource | None, q: torch.Tensor, rows: slice, ctx: ForwardContext,
                    gather_max: int):
        """For the queries ``rows`` (``q [B, H, n, d]``): logits ``[B, H, n, E_i]`` and values of the entries
        they attend to, as lists (shared values ``[B, E_i, d]``), plus gathered per-query values
        ``[B, n, k, d]`` or None."""
        return [], [], None

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: V4CacheLayer | None) -> torch.Tensor:
        return self._forward(x, ctx, cache, self.prefill_block, self.gather_max_queries)

    def _forward(self, x: torch.Tensor, ctx: ForwardContext, cache: V4CacheLayer | None, block: int | None,
                 gather_max: int) -> torch.Tensor:
        """The forward with queries in blocks of ``block`` (None: one block, dense masks over all keys)."""
        batch, seq, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_norm(self.q_b_proj(q_res).view(batch, seq, heads, dim).transpose(1, 2))  # [B, H, S, d]
        cos, sin = ctx.cos_sin(self.rotary, q.dtype)  # [B, 1, S, rot]
        q = rope_tail(self.rotary, q, cos, sin)
        kv = rope_tail(self.rotary, self.kv_norm(self.kv_proj(x)), cos[:, 0], sin[:, 0])  # [B, S, d]
        keys = cache.window_append(kv) if cache is not None else kv  # [B, T_w, d]: held keys, then the chunk's
        held = keys.shape[1] - seq
        key_steps = torch.arange(ctx.start - held, ctx.start + seq, device=x.device)  # [T_w]
        src = self.entry_source(x, q_res, cos, sin, ctx, cache)
        if block is None or seq <= block:  # one block: every key under one (memoized) mask [B|1, 1, S, T_w]
            win_mask = ctx.mask(key_steps, window=self.window, memo_key=("v4win", self.window, keys.shape[1]))
            ctx.record(self.layer_idx, "window_keys", keys.shape[1])
            out = self._attend(q, keys, win_mask, *self.entry_terms(src, q, slice(0, seq), ctx, gather_max))
        else:
            outs = []
            for a in range(0, seq, block):
                rows = slice(a, min(a + block, seq))
                lo, hi = max(0, held + a - self.window + 1), held + rows.stop  # keys the block's windows reach
                win_mask = window_mask(ctx, key_steps[lo:hi], self.window, 0, ctx.start, rows)  # [B|1, 1, n, hi-lo]
                q_blk = q[:, :, rows]
                terms = self.entry_terms(src, q_blk, rows, ctx, gather_max)
                outs.append(self._attend(q_blk, keys[:, lo:hi], win_mask, *terms))
            out = torch.cat(outs, dim=2)  # [B, H, S, d]
        out = rope_tail(self.rotary, out, cos, -sin)  # undo V's rotation at the query position
        grouped = out.transpose(1, 2).reshape(batch, seq, self.o_groups, -1)  # heads grouped contiguously
        weight = self.o_a_proj.weight.view(self.o_groups, -1, grouped.shape[-1])  # [g, r, H*d/g]
        low = torch.einsum("bsgi,gri->bsgr", grouped, weight).flatten(2)
        return self.o_b_proj(low)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, win_mask: torch.Tensor, entry_logits: list,
                entry_values: list, gathered: torch.Tensor | None) -> torch.Tensor:
        """One softmax over [window keys ; entries ; sink] for ``q [B, H, n, d]``, window ``keys [B, T, d]``
        (K = V) under ``win_mask [B|1, 1, n, T]``; returns ``[B, H, n, d]`` (V still rotated)."""
        batch, heads, seq, _ = q.shape
        logits = [(q @ keys.unsqueeze(1).transpose(-1, -2)).float().mul(self.scale)
                  .masked_fill(~win_mask, float("-inf")), *entry_logits]  # [B, H, n, T], ...
        values = [keys, *entry_values]
        sink = self.sinks.float().view(1, heads, 1, 1).expand(batch, heads, seq, 1)
        all_logits = torch.cat([*logits, sink], dim=-1)
        probs = (all_logits - all_logits.amax(-1, keepdim=True)).softmax(-1)[..., :-1].to(q.dtype)
        out, at = 0, 0
        for v in values:  # [B, T, d] shared by every head
            out = out + probs[..., at: at + v.shape[1]] @ v.unsqueeze(1)
            at += v.shape[1]
        if gathered is not None:
            out = out + torch.einsum("bhsk,bskd->bhsd", probs[..., at:], gathered)
        return out


def dense_reference_forward(module: V4SlidingAttention, x: torch.Tensor, ctx: ForwardContext,
                            cache: V4CacheLayer | None) -> torch.Tensor:
    """The naive forward of a V4 layer (what ``forward`` computes, the way it did before blocked prefill):
    one query block, one dense mask over every window key and every entry, CSA's choice as a mask."""
    return module._forward(x, ctx, cache, None, 0)


@register_module("hca")
class HCAttention(V4SlidingAttention):
    """V4 sliding + a compressor; every query attends to every complete entry it can see."""

    OVERLAP = False  # CSA's compressor pools overlapping windows

    def __init__(self, spec: HCASpec, cfg, layer_idx: int):
        super().__init__(spec, cfg, layer_idx)
        self.compressor = Compressor(cfg.d_model, spec.head_dim, spec.compress_rate, self.OVERLAP, cfg.norm_eps)

    def compressors(self) -> dict[str, Compressor]:
        return {"entries": self.compressor}

    def entry_source(self, x, q_res, cos, sin, ctx, cache):
        w = _v4.ChunkWindows(ctx, x.shape[0], x.shape[1], self.compressor.rate, x.device)
        return _v4.EntrySource(self.compressor.chunk_entries("entries", x, cache, w, self.rotary), w)

    def entry_terms(self, src, q, rows, ctx, gather_max):
        """HCA: every entry visible to each query (a prefix of ``src.entries``)."""
        n = src.seen(rows)
        return self._masked_terms(src, q, rows, ctx, n, None) if n else ([], [], None)

    def _masked_terms(self, src: _v4.EntrySource, q, rows: slice, ctx, n: int, chosen: torch.Tensor | None):
        """Logits over the first ``n`` entries, masked to each query's visible ones (or to ``chosen``
        ``[B, n_q, n]``)."""
        entries = src.entries[:, :n]  # [B, n, d]
        if chosen is None:
            chosen = torch.arange(n, device=q.device) < src.visible[:, rows, None]  # [B, n_q, n]
        logits = (q @ entries.unsqueeze(1).transpose(-1, -2)).float().mul(self.scale)  # [B, H, n_q, n]
        ctx.record(self.layer_idx, "entries_attended", n)
        return [logits.masked_fill(~chosen.unsqueeze(1), float("-inf"))], [entries], None


@register_module("csa")
class CSAttention(HCAttention):
    """HCA with overlapping windows and a lightning indexer choosing ``index_topk`` entries per query."""

    OVERLAP = True
    GATHER_BUDGET = 2 ** 21  # elements a prefill block gathers per row (8 MiB fp32): larger buffers page-fault

    def __init__(self, spec: CSASpec, cfg, layer_idx: int):
        super().__init__(spec, cfg, layer_idx)
        self.prefill_block = min(self.prefill_block, max(16, self.GATHER_BUDGET // (spec.index_topk * spec.head_dim)))
        if self.rotary.rot_dim > spec.index_head_dim:
            raise ConfigError(f"layers[{layer_idx}].index_head_dim: smaller than the rotated slice "
                              f"({self.rotary.rot_dim} channels)")
        self.compressor.indexer = Indexer(spec, cfg.d_model, cfg.norm_eps)

    def compressors(self) -> dict[str, Compressor]:
        return {"entries": self.compressor, "index_keys": self.compressor.indexer}

    def entry_source(self, x, q_res, cos, sin, ctx, cache):
        src = super().entry_source(x, q_res, cos, sin, ctx, cache)
        indexer = self.compressor.indexer
        if not src.entries.shape[1]:
            if cache is not None:  # keep the indexer's compressor state current
                indexer.chunk_entries("index_keys", x, cache, src.windows, self.rotary)
            return src
        src.index_keys = indexer.chunk_entries("index_keys", x, cache, src.windows, self.rotary)
        src.index_q, src.index_w = indexer.queries(x, q_res, self.rotary, cos, sin)
        return src

    def entry_terms(self, src, q, rows, ctx, gather_max):
        """The indexer's top-k of the entries each query sees: gathered (``[B, n_q, k, d]``) for blocks of
        at most ``gather_max`` queries, else a mask over the visible prefix."""
        n = src.seen(rows)
        indexer = self.compressor.indexer
        if n <= indexer.topk:  # every visible entry is among the top-k: HCA's terms, no scoring needed
            return super().entry_terms(src, q, rows, ctx, gather_max)
        visible = src.visible[:, rows]  # [B, n_q]
        scores = indexer.scores(src.index_q[:, :, rows], src.index_w[:, rows], src.index_keys[:, :n], visible)
        idx, valid = indexer.select(scores, visible)  # [B, n_q, k]
        ctx.record(self.layer_idx, "entries_scored", n)
        if q.shape[2] > gather_max:
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, valid)  # [B, n_q, n]
            return self._masked_terms(src, q, rows, ctx, n, chosen)
        picked = src.pick(idx)  # [B, n_q, k, d]: only k entries per query
        logits = torch.einsum("bhsd,bskd->bhsk", q, picked).float() * self.scale
        ctx.record(self.layer_idx, "entries_attended", idx.shape[-1])
        return [logits.masked_fill(~valid.unsqueeze(1), float("-inf"))], [], picked
