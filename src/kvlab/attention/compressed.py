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
equals that row alone. Decoding gathers the selected entries (cost ~ window + top-k); long chunks use a
dense masked path over all entries (same result).

Cache (per row): the window's last ``window - 1`` keys (one copy: K = V), the compressed entries (and
the indexer's keys for CSA), the not-yet-compressed remainder as a fixed ``m``-slot ring of projected
kv/gate, and for CSA the last complete window's "Ca" half (kv, gate) carried into the next entry.
Planner (no padding, T tokens, elem bytes b):
    min(T, W-1) d b + floor(T/m) (d [+ d_I]) b + ring 2 m width b [+ overlap 2 m (d + d_I) b].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.attention._common import ForwardContext, get_rotary
from kvlab.cache.base import CacheLayer, GrowingBuffer
from kvlab.config import LayerSpec
from kvlab.errors import ConfigError
from kvlab.norms import RMSNorm
from kvlab.registry import register_module, register_spec
from kvlab.rope import Rotary

NEG = -1.0e30  # "empty slot" gate logit: exp underflows to exactly 0 without producing NaN


# ---- specs ------------------------------------------------------------------------------------
@register_spec("v4_sliding", aliases=("dsv4_sliding",))
@dataclass(kw_only=True)
class V4SlidingSpec(LayerSpec):
    """V4's attention block over a sliding window only (K = V single head, sinks, grouped output)."""

    window: int = 128  # a query sees the last `window` steps, itself included
    q_lora_rank: int = 64
    o_groups: int = 1
    o_lora_rank: int = 64

    def validate(self, where: str) -> None:
        super().validate(where)
        _check = {"window": self.window, "q_lora_rank": self.q_lora_rank, "o_groups": self.o_groups,
                  "o_lora_rank": self.o_lora_rank}
        for name, value in _check.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}{name}: must be a positive integer, got {value!r}")
        if self.n_kv_heads not in (None, 1):
            raise ConfigError(f"{where}n_kv_heads: {self.type} has one shared K=V head, got {self.n_kv_heads}")
        if self.n_heads % self.o_groups:
            raise ConfigError(f"{where}o_groups: n_heads ({self.n_heads}) is not divisible by o_groups "
                              f"({self.o_groups})")
        for name in ("kv_from", "kv_quant", "output_gate"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{where}{name}: not supported by '{self.type}' layers")
        for name in ("qk_norm", "qkv_bias", "o_bias"):
            if getattr(self, name):
                raise ConfigError(f"{where}{name}: not supported by '{self.type}' layers (V4 norms q and kv itself)")

    def resolved(self, cfg) -> V4SlidingSpec:
        return replace(super().resolved(cfg), n_kv_heads=1)

    # planner
    def _window_bytes(self, tokens: int) -> int:
        return min(tokens, self.window - 1) * self.head_dim

    def cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        return batch * elem_bytes * self._window_bytes(tokens)

    def _compressed_seen(self, seq_len: int) -> int:
        return 0

    def attended_pairs(self, seq_len: int) -> int:
        w = self.window
        window = seq_len * (seq_len + 1) // 2 if seq_len <= w else w * (w + 1) // 2 + (seq_len - w) * w
        return window + self._compressed_seen(seq_len)

    def label(self) -> str:
        return f"V4-SWA{self.window}"


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

    def validate(self, where: str) -> None:
        super().validate(where)
        if isinstance(self.compress_rate, bool) or not isinstance(self.compress_rate, int) or self.compress_rate < 1:
            raise ConfigError(f"{where}compress_rate: must be a positive integer, got {self.compress_rate!r}")

    def _ring_width(self) -> int:
        return self.head_dim

    def cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        entries = tokens // self.compress_rate * self.head_dim
        ring = 2 * self.compress_rate * self._ring_width()
        return batch * elem_bytes * (self._window_bytes(tokens) + entries + ring)

    def _compressed_seen(self, seq_len: int) -> int:
        return _floor_sum(seq_len, self.compress_rate)

    def label(self) -> str:
        return f"HCA/{self.compress_rate}"


@register_spec("csa", aliases=("compressed_sparse_attention",))
@dataclass(kw_only=True)
class CSASpec(HCASpec):
    """Compressed sparse attention: overlapping windows of ``compress_rate`` tokens, a lightning indexer
    picking ``index_topk`` entries per query."""

    compress_rate: int = 4
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 64

    def validate(self, where: str) -> None:
        super().validate(where)
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}{name}: must be a positive integer, got {value!r}")

    def _ring_width(self) -> int:
        return 2 * self.head_dim + 2 * self.index_head_dim

    def cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
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


# ---- helpers ----------------------------------------------------------------------------------
def rope_tail(rotary: Rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``rotary.rot_dim`` channels of ``x [..., S, D]`` (V4's ``[nope | rope]``
    layout); cos/sin broadcast against ``x[..., -rot_dim:]``."""
    rot = rotary.rot_dim
    if rot == 0:
        return x
    head, tail = x[..., :-rot], x[..., -rot:]
    return torch.cat([head, tail * cos + rotary._rotate(tail) * sin], dim=-1)


class Compressor(nn.Module):
    """Pools every ``rate`` real tokens of a row into one ``dim``-wide entry (parameter names as
    transformers' ``DeepseekV4{HCA,CSA}Compressor``). ``overlap``: CSA's two series (width 2 dim)."""

    def __init__(self, d_model: int, dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        self.width = 2 * dim if overlap else dim
        self.kv_proj = nn.Linear(d_model, self.width, bias=False)
        self.gate_proj = nn.Linear(d_model, self.width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(rate, self.width))
        self.kv_norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor], before: torch.Tensor,
                after: torch.Tensor, chunk_offset: torch.Tensor, rotary: Rotary
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Entries completed by this chunk ``x [B, S, d_model]``.

        ``before``/``after`` [B]: real tokens of each row before/after the chunk; ``chunk_offset`` [B]:
        chunk index of real position 0 (pad_offset - start). ``state``: ``ring_kv``/``ring_gate``
        [B, m, width] (raw projections of the incomplete window's tokens, slot = position mod m) and for
        CSA ``ov_kv``/``ov_gate`` [B, m, dim] (the last complete window's Ca half); updated in place.
        Returns entries [B, n, dim] (row b's first ``new[b]`` are real, entry index ``first[b] + i``),
        ``new`` [B] and ``first`` [B].
        """
        batch, seq, _ = x.shape
        m, dim, width = self.rate, self.dim, self.width
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # [B, S, width]
        first = torch.div(before, m, rounding_mode="floor")  # entries already emitted
        new = torch.div(after, m, rounding_mode="floor") - first  # entries this chunk completes
        n_win = int(new.max()) + 1  # + the window still open afterwards
        offs = (torch.arange(n_win, device=x.device)[:, None] * m
                + torch.arange(m, device=x.device)[None, :])  # [n, m]
        pos = first[:, None, None] * m + offs  # [B, n, m] real position of each slot
        from_chunk = (pos + chunk_offset[:, None, None]).clamp(0, seq - 1) + m
        empty_idx = m + seq
        src = torch.where(pos < before[:, None, None], pos % m,
                          torch.where(pos < after[:, None, None], from_chunk, torch.full_like(pos, empty_idx)))
        zero = kv.new_zeros(batch, 1, width)
        src_flat = src.view(batch, -1, 1).expand(-1, -1, width)
        g_kv = torch.cat([state["ring_kv"].to(kv.dtype), kv, zero], 1).gather(1, src_flat).view(batch, n_win, m, width)
        g_gate = torch.cat([state["ring_gate"].to(gate.dtype), gate, zero], 1).gather(1, src_flat)
        g_gate = g_gate.view(batch, n_win, m, width)
        empty = (pos >= after[:, None, None]).unsqueeze(-1)  # [B, n, m, 1]
        logits = (g_gate.float() + self.position_bias.float()).masked_fill(empty, NEG)
        if self.overlap:  # entry w pools Ca of window w-1 (slots 0..m-1) and Cb of window w
            ov_logits = (state["ov_gate"].float() + self.position_bias[:, :dim].float())
            ov_logits = ov_logits.masked_fill((first == 0)[:, None, None], NEG)
            prev_kv = torch.cat([state["ov_kv"].to(kv.dtype)[:, None], g_kv[:, :-1, :, :dim]], 1)
            prev_logits = torch.cat([ov_logits[:, None], logits[:, :-1, :, :dim]], 1)
            pool_kv = torch.cat([prev_kv, g_kv[..., dim:]], 2)  # [B, n, 2m, dim]
            pool_logits = torch.cat([prev_logits, logits[..., dim:]], 2)
        else:
            pool_kv, pool_logits = g_kv, logits
        entries = (pool_kv * pool_logits.softmax(dim=2).to(pool_kv.dtype)).sum(2)  # [B, n, dim]
        entries = self.kv_norm(entries)
        positions = (first[:, None] + torch.arange(n_win, device=x.device)) * m  # [B, n]
        cos, sin = rotary.cos_sin(positions, entries.dtype)
        entries = rope_tail(rotary, entries, cos[:, 0], sin[:, 0])
        # carry the open window's slots and (CSA) the last complete window's Ca half
        rows = torch.arange(batch, device=x.device)
        state["ring_kv"] = g_kv[rows, new].to(state["ring_kv"].dtype)
        state["ring_gate"] = g_gate[rows, new].to(state["ring_gate"].dtype)
        if self.overlap:
            last = (new - 1).clamp_min(0)
            done = (new > 0)[:, None, None]
            state["ov_kv"] = torch.where(done, g_kv[rows, last, :, :dim].to(state["ov_kv"].dtype), state["ov_kv"])
            state["ov_gate"] = torch.where(done, g_gate[rows, last, :, :dim].to(state["ov_gate"].dtype),
                                           state["ov_gate"])
        return entries, new, first

    def empty_state(self, batch: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        state = {"ring_kv": torch.zeros(batch, self.rate, self.width, dtype=dtype, device=device),
                 "ring_gate": torch.zeros(batch, self.rate, self.width, dtype=dtype, device=device)}
        if self.overlap:
            state["ov_kv"] = torch.zeros(batch, self.rate, self.dim, dtype=dtype, device=device)
            state["ov_gate"] = torch.zeros(batch, self.rate, self.dim, dtype=dtype, device=device)
        return state


class IndexerScorer(nn.Module):
    """``weights_proj`` of the lightning indexer (transformers' ``DeepseekV4IndexerScorer``)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.weights_proj = nn.Linear(d_model, n_heads, bias=False)


class Indexer(Compressor):
    """CSA's lightning indexer: an overlapping compressor of its own at ``index_head_dim`` (its keys)
    plus low-rank queries; scores ``sum_h w_h * relu(q_h . k_s)``."""

    def __init__(self, spec: CSASpec, d_model: int, eps: float):
        super().__init__(d_model, spec.index_head_dim, spec.compress_rate, True, eps)
        self.n_heads, self.head_dim, self.topk = spec.index_n_heads, spec.index_head_dim, spec.index_topk
        self.q_b_proj = nn.Linear(spec.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = IndexerScorer(d_model, self.n_heads)

    def scores(self, x: torch.Tensor, q_res: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
               rotary: Rotary, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores ``[B, S, E]`` (fp32) of keys ``[B, E, d_I]``; invisible entries are -inf."""
        batch, seq, _ = x.shape
        q = self.q_b_proj(q_res).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        q = rope_tail(rotary, q, cos, sin)  # [B, H_I, S, d_I]
        dots = F.relu(q.float() @ keys.float().transpose(-1, -2).unsqueeze(1)) * self.head_dim ** -0.5
        weights = self.scorer.weights_proj(x).float() * self.n_heads ** -0.5  # [B, S, H_I]
        total = torch.einsum("bhse,bsh->bse", dots, weights)
        entry = torch.arange(keys.shape[1], device=x.device)
        return total.masked_fill(entry >= visible.unsqueeze(-1), float("-inf"))

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k entry indices ``[B, S, k]`` in position order, and their validity. Deterministic under
        ties: entries scoring above the k-th score are taken, then the earliest entries equal to it."""
        k = min(self.topk, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]  # [B, S, 1]
        above = scores > kth
        tie = scores == kth
        chosen = above | (tie & (tie.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per query
        idx = chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)
        return idx, idx < visible.unsqueeze(-1)


class V4CacheLayer(CacheLayer):
    """Window keys (K = V, last ``window - 1``), compressed entries (+ indexer keys), compressor rings
    and overlaps (fixed size)."""

    def __init__(self, batch: int, head_dim: int, window: int, dtype: torch.dtype, device,
                 compressors: dict[str, Compressor]):
        super().__init__()
        self.window, self.head_dim = window, head_dim
        self._dtype, self._device, self._batch = dtype, device, batch
        self.state["window"] = torch.zeros(batch, 0, head_dim, dtype=dtype, device=device)
        self.compressors = compressors
        for name, comp in compressors.items():
            self.buffers[name] = GrowingBuffer((batch, 0, comp.dim), 1, dtype, device)
            for key, t in comp.empty_state(batch, dtype, device).items():
                self.state[f"{name}.{key}"] = t

    def comp_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = f"{name}."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    def set_comp_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.state[f"{name}.{k}"] = v

    def window_append(self, kv: torch.Tensor) -> torch.Tensor:
        """Append ``kv [B, S, d]``; return the held window + new keys ``[B, T_w, d]``."""
        full = torch.cat([self.state["window"], kv.to(self.state["window"].dtype)], 1)
        keep = min(full.shape[1], self.window - 1)
        self.state["window"] = full[:, full.shape[1] - keep:].clone()
        return full

    def append_entries(self, name: str, entries: torch.Tensor, new: torch.Tensor, first: torch.Tensor,
                       uniform: bool) -> torch.Tensor:
        """Write each row's new entries at its own entry index; return all entries ``[B, E, dim]``."""
        buf = self.buffers[name]
        if uniform:
            n = int(new[0])
            return buf.append(entries[:, :n]) if n else buf.view()
        total = int((first + new).max())
        grow = total - buf.length
        if grow > 0:
            buf.append(entries.new_zeros(entries.shape[0], grow, entries.shape[2]))
        i = torch.arange(entries.shape[1], device=entries.device)
        rows, cols = (i[None, :] < new[:, None]).nonzero(as_tuple=True)
        if rows.numel():
            buf.data[rows, first[rows] + cols] = entries[rows, cols].to(buf.data.dtype)
        return buf.view()

    def reserve(self, total: int) -> None:
        for name, comp in self.compressors.items():
            self.buffers[name].reserve(total // comp.rate + 1)

    def reset(self) -> None:
        super().reset()
        self.state["window"] = self.state["window"][:, :0]


@register_module("v4_sliding")
@register_module("hca")
@register_module("csa")
class CompressedAttention(nn.Module):
    """V4 attention block; parameter names follow transformers' ``DeepseekV4Attention``."""

    gather_max_queries = 16  # chunks up to this many queries gather their top-k entries; longer: dense

    def __init__(self, spec: V4SlidingSpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        d_model, heads, dim = cfg.d_model, spec.n_heads, spec.head_dim
        self.n_heads, self.head_dim, self.window = heads, dim, spec.window
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
        self.rotary = get_rotary(spec.rope, dim)
        self.scale = spec.softmax_scale or dim ** -0.5
        self.kind = spec.type
        self.compressor = None
        if self.kind in ("hca", "csa"):
            self.compressor = Compressor(d_model, dim, spec.compress_rate, self.kind == "csa", cfg.norm_eps)
            if self.kind == "csa":
                if self.rotary.rot_dim > spec.index_head_dim:
                    raise ConfigError(f"layers[{layer_idx}].index_head_dim: smaller than the rotated slice "
                                      f"({self.rotary.rot_dim} channels)")
                self.compressor.indexer = Indexer(spec, d_model, cfg.norm_eps)
        self.stats: dict[str, int] = {}  # what the last forward touched (window keys, entries attended)

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        comps = {}
        if self.compressor is not None:
            comps["entries"] = self.compressor
            if self.kind == "csa":
                comps["index_keys"] = self.compressor.indexer
        return V4CacheLayer(batch, self.head_dim, self.window, dtype, device, comps)

    def _compress(self, name: str, comp: Compressor, x, cache, before, after, offset, uniform):
        if cache is None:
            state = comp.empty_state(x.shape[0], x.dtype, x.device)
            entries, new, _ = comp(x, state, before, after, offset, self.rotary)
            return entries[:, : int(new.max())]
        state = cache.comp_state(name)
        entries, new, first = comp(x, state, before, after, offset, self.rotary)
        cache.set_comp_state(name, state)
        return cache.append_entries(name, entries, new, first, uniform)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: V4CacheLayer | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        q_res = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_norm(self.q_b_proj(q_res).view(batch, seq, heads, dim).transpose(1, 2))  # [B, H, S, d]
        cos, sin = ctx.cos_sin(self.rotary, q.dtype)  # [B, 1, S, rot]
        q = rope_tail(self.rotary, q, cos, sin)
        kv = rope_tail(self.rotary, self.kv_norm(self.kv_proj(x)), cos[:, 0], sin[:, 0])  # [B, S, d]
        keys = cache.window_append(kv) if cache is not None else kv  # [B, T_w, d]
        key_steps = torch.arange(ctx.start + seq - keys.shape[1], ctx.start + seq, device=x.device)
        win_mask = ctx.mask(key_steps, window=self.window, memo_key=("v4win", self.window, keys.shape[1]))
        logits = [(q @ keys.unsqueeze(1).transpose(-1, -2)).float().mul(self.scale)
                  .masked_fill(~win_mask, float("-inf"))]  # [B, H, S, T_w]
        values = [keys]
        gathered = None
        self.stats = {"window_keys": keys.shape[1], "entries_scored": 0, "entries_attended": 0}
        if self.compressor is not None:
            pad = ctx.pad_offset if ctx.pad_offset is not None else torch.zeros(batch, dtype=torch.long,
                                                                                  device=x.device)
            before = (ctx.start - pad).clamp_min(0)
            after = (ctx.start + seq - pad).clamp_min(0)
            offset = pad - ctx.start
            uniform = ctx.pad_offset is None
            real = ctx.query_steps[None, :] - pad[:, None]  # [B, S] real position (negative: padding)
            visible = torch.div(real + 1, self.compressor.rate, rounding_mode="floor").clamp_min(0)  # [B, S]
            entries = self._compress("entries", self.compressor, x, cache, before, after, offset, uniform)
            n_entries = entries.shape[1]
            entry_ids = torch.arange(n_entries, device=x.device)
            if self.kind == "csa" and n_entries:
                indexer = self.compressor.indexer
                index_keys = self._compress("index_keys", indexer, x, cache, before, after, offset,
                                            uniform)
                scores = indexer.scores(x, q_res, index_keys, visible, self.rotary, cos, sin)
                idx, valid = indexer.select(scores, visible)  # [B, S, k]
                self.stats["entries_scored"] = n_entries
                if seq <= self.gather_max_queries and idx.shape[-1] < n_entries:
                    picked = entries.unsqueeze(1).expand(-1, seq, -1, -1).gather(
                        2, idx.unsqueeze(-1).expand(-1, -1, -1, dim))  # [B, S, k, d]: only k entries per query
                    comp_logits = torch.einsum("bhsd,bskd->bhsk", q, picked).float() * self.scale
                    logits.append(comp_logits.masked_fill(~valid.unsqueeze(1), float("-inf")))
                    gathered = picked
                    self.stats["entries_attended"] = idx.shape[-1]
                else:
                    chosen = torch.zeros(batch, seq, n_entries, dtype=torch.bool, device=x.device)
                    chosen.scatter_(-1, idx, valid)
                    logits.append((q @ entries.unsqueeze(1).transpose(-1, -2)).float().mul(self.scale)
                                  .masked_fill(~chosen.unsqueeze(1), float("-inf")))
                    values.append(entries)
                    self.stats["entries_attended"] = n_entries
            elif self.kind == "csa" and cache is not None:  # keep the indexer's compressor state current
                self._compress("index_keys", self.compressor.indexer, x, cache, before, after,
                               offset, uniform)
            elif n_entries:
                seen = entry_ids[None, None, :] < visible.unsqueeze(-1)  # [B, S, E]
                logits.append((q @ entries.unsqueeze(1).transpose(-1, -2)).float().mul(self.scale)
                              .masked_fill(~seen.unsqueeze(1), float("-inf")))
                values.append(entries)
                self.stats["entries_attended"] = n_entries
        sink = self.sinks.float().view(1, heads, 1, 1).expand(batch, heads, seq, 1)
        all_logits = torch.cat([*logits, sink], dim=-1)
        probs = (all_logits - all_logits.amax(-1, keepdim=True)).softmax(-1)[..., :-1].to(q.dtype)
        out, at = 0, 0
        for v in values:  # [B, T, d] shared by every head
            out = out + probs[..., at: at + v.shape[1]] @ v.unsqueeze(1)
            at += v.shape[1]
        if gathered is not None:
            out = out + torch.einsum("bhsk,bskd->bhsd", probs[..., at:], gathered)
        out = rope_tail(self.rotary, out, cos, -sin)  # undo V's rotation at the query position
        grouped = out.transpose(1, 2).reshape(batch, seq, self.o_groups, -1)  # heads grouped contiguously
        weight = self.o_a_proj.weight.view(self.o_groups, -1, grouped.shape[-1])  # [g, r, H*d/g]
        low = torch.einsum("bsgi,gri->bsgr", grouped, weight).flatten(2)
        return self.o_b_proj(low)
