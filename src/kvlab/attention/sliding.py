"""Sliding-window attention with optional sink tokens and learned sink logits.

A query at step ``t`` sees the last ``window`` steps ``(t - window, t]`` (itself included, Hugging Face's
convention) plus, with ``sinks = S``, the first ``S`` real tokens of its row forever (StreamingLLM's
attention sinks). ``sink_logits`` adds a learned per-head logit to the softmax denominator (GPT-OSS):
attention may put weight on "nothing".

Cache: a ring buffer of ``window`` slots per K and V (step ``s`` lives in slot ``s % window``; keys are
stored after RoPE, so wrap-around needs no re-rotation) plus ``sinks`` slots for the sink tokens.
Bytes stop growing once the context passes ``window``:
``2 * B * n_kv_heads * head_dim * (min(T, window) + sinks) * bytes`` (sinks only once T > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvlab.attention._common import EMPTY_STEP, Band, ForwardContext
from kvlab.attention.full import FullAttention, FullSpec
from kvlab.cache.base import CacheLayer
from kvlab.config_options import check_ints
from kvlab.registry import register_module, register_spec
from kvlab.sharing import shared_cache_layer


@register_spec("sliding", aliases=("sliding_attention", "swa", "window"))
@dataclass(kw_only=True)
class SlidingSpec(FullSpec):
    window: int
    sinks: int = 0  # first real tokens kept visible forever
    sink_logits: bool = False  # learned per-head softmax sink

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = FullSpec.SUPPORTED_OPTIONS - {"kv_quant"}  # already bounded
    EXAMPLES: ClassVar[dict[str, dict]] = {
        "window_sinks_logits": {"layers": [{"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "window": 5,
                                            "sinks": 2, "sink_logits": True},
                                           {"type": "sliding", "n_heads": 2, "n_kv_heads": 2, "head_dim": 8,
                                            "window": 5, "kv_from": 0}], "_seq": 20},
    }

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, window=self.window)
        check_ints(where, low=0, sinks=self.sinks)

    def kv_window(self) -> int | None:
        return self.window

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        if tokens == 0:
            return 0
        slots = min(tokens, self.window) + self.sinks
        return 2 * batch * self.n_kv_heads * self.head_dim * slots * elem_bytes

    def attended_pairs(self, seq_len: int) -> int:
        """sum over queries p of min(p + 1, W) window keys, plus the sinks that lie outside the window."""
        w, n = self.window, seq_len
        in_window = n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w
        m, k = max(n - w, 0), self.sinks  # m queries no longer see the first tokens; sum_i min(k, i)
        extra_sinks = m * (m + 1) // 2 if m <= k else k * (k + 1) // 2 + (m - k) * k
        return in_window + extra_sinks

    def label(self) -> str:
        base = f"SWA-{self.window}"
        if self.sinks:
            base += f"+{self.sinks}sink"
        return self.grouped_label(base)

    def attention_pattern(self, seq: int):
        mask = ForwardContext(1, seq, 0, None, torch.device("cpu")).mask(torch.arange(seq), self.window, self.sinks)
        return mask[0, 0], self.label() + (" (+ learned sink logit)" if self.sink_logits else "")


class WindowKVCacheLayer(CacheLayer):
    """Ring buffer of the last ``window`` steps' K/V plus ``sinks`` sink slots per row.

    ``key_steps()`` tells which step each ring slot holds (slot ``i`` holds the latest step ``s`` with
    ``s % window == i``; never-written slots get a step far in the past, which every mask rejects).
    The sink slots and the ring are two views of one ``[B, Hkv, sinks + window, D]`` tensor per K and V,
    so a decode step that sees every sink and every ring slot attends to it as is, with no copy.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, window: int, sinks: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.window, self.sinks = window, sinks
        shape = (batch, kv_heads, sinks + window, head_dim)
        self.slots_k = torch.zeros(shape, dtype=dtype, device=device)  # [B, Hkv, sinks + W, D]: sinks, then ring
        self.slots_v = torch.zeros(shape, dtype=dtype, device=device)

    # views of slots_k/v, made on access (a write under autograd replaces the tensor's history, not the views')
    @property
    def ring_k(self) -> torch.Tensor:
        return self.slots_k[:, :, self.sinks:]  # [B, Hkv, W, D]

    @property
    def ring_v(self) -> torch.Tensor:
        return self.slots_v[:, :, self.sinks:]

    @property
    def sink_k(self) -> torch.Tensor:
        return self.slots_k[:, :, :self.sinks]  # [B, Hkv, sinks, D]

    @property
    def sink_v(self) -> torch.Tensor:
        return self.slots_v[:, :, :self.sinks]

    def live_tensors(self) -> list[torch.Tensor]:
        if self.length == 0:
            return list(self.state.values())  # a subclass's fixed state
        filled = min(self.length, self.window)
        sinks = [self.sink_k, self.sink_v] if self.sinks else []
        return [self.ring_k[:, :, :filled], self.ring_v[:, :, :filled], *sinks, *self.state.values()]

    @property
    def reserved_nbytes(self) -> int:
        return self.slots_k.nbytes + self.slots_v.nbytes + sum(t.nbytes for t in self.state.values())

    def reserve(self, total: int) -> None:
        pass  # fixed size

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)  # a subclass's state
        self.slots_k = self.slots_k.index_select(0, rows.to(self.slots_k.device))
        self.slots_v = self.slots_v.index_select(0, rows.to(self.slots_v.device))

    def key_steps(self) -> torch.Tensor:
        """Step held by each ring slot ``[window]`` (``EMPTY_STEP`` for empty slots)."""
        slots = torch.arange(self.window, device=self.ring_k.device)
        last = self.length - 1
        steps = slots + self.window * torch.div(last - slots, self.window, rounding_mode="floor")
        return torch.where(steps >= 0, steps, torch.full_like(steps, EMPTY_STEP))

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int, pad_offset: torch.Tensor | None) -> None:
        """Store the new steps ``start .. start+S-1`` (ring: only the last ``window``; sinks: the tokens
        whose index among their row's real tokens is below ``sinks``)."""
        seq = k.shape[2]
        if self.sinks and start < self.sinks + (0 if pad_offset is None else int(pad_offset.max())):
            self._write_sinks(k, v, start, pad_offset)
        keep = min(seq, self.window)
        steps = torch.arange(start + seq - keep, start + seq, device=k.device)
        slots = steps % self.window
        self.slots_k[:, :, self.sinks + slots] = k[:, :, seq - keep:]
        self.slots_v[:, :, self.sinks + slots] = v[:, :, seq - keep:]
        self.length = start + seq

    def _write_sinks(self, k, v, start, pad_offset):
        seq = k.shape[2]
        for row in range(k.shape[0]):
            pad = 0 if pad_offset is None else int(pad_offset[row])
            first, last = max(start, pad), min(start + seq, pad + self.sinks)  # steps that are sinks
            if first < last:
                self.slots_k[row, :, first - pad:last - pad] = k[row, :, first - start:last - start]
                self.slots_v[row, :, first - pad:last - pad] = v[row, :, first - start:last - start]


BAND_MIN = 256  # smallest query block of the banded prefill (``band_block``)


def band_block(window: int) -> int:
    """Query block of the banded prefill: a quarter of the window, at least ``BAND_MIN``. A block reads at
    most ``window + block`` keys; smaller blocks waste less but pay more per-call overhead (the script
    benchmarks/sliding_prefill.py sweeps the block size)."""
    return max(window // 4, BAND_MIN)


def window_mask(ctx: ForwardContext, key_steps: torch.Tensor, window: int, sinks: int,
                cached_before: int, rows: slice = slice(None)) -> torch.Tensor:
    """Mask ``[B|1, 1, S, T]`` for window (+ sink) keys at ``key_steps [T]`` (queries ``rows`` of the forward).
    Keys that are sinks and were cached before this forward (``step < cached_before``) live in the sink
    slots, so they are excluded here to avoid counting them twice."""
    q = ctx.query_steps[rows][None, :, None]  # [1, S, 1]
    k = key_steps[None, None, :]  # [1, 1, T]
    pad = 0 if ctx.pad_offset is None else ctx.pad_offset[:, None, None]  # [B, 1, 1]
    allowed = (k <= q) & (k > q - window)
    if sinks:
        is_sink = (k - pad >= 0) & (k - pad < sinks)
        allowed = ((k <= q) & ((k > q - window) | is_sink)) & ~(is_sink & (k < cached_before))
    if ctx.pad_offset is not None:
        allowed = (allowed & (k >= pad)) | (k == q)  # a padded query sees itself only
    return allowed.unsqueeze(1)


def sink_slot_mask(ctx: ForwardContext, sinks: int, cached_before: int, rows: slice = slice(None)) -> torch.Tensor:
    """Mask ``[B|1, 1, S, sinks]`` for the sink slots: slot ``j`` of row ``b`` holds step ``pad_b + j``,
    valid once cached (``step < cached_before``); padded queries see no sink."""
    j = torch.arange(sinks, device=ctx.query_steps.device)
    pad = torch.zeros(1, dtype=torch.long, device=j.device) if ctx.pad_offset is None else ctx.pad_offset
    steps = pad[:, None] + j[None, :]  # [B, sinks]
    valid = (steps < cached_before)[:, None, :]  # [B, 1, sinks]
    real_query = ctx.query_steps[rows][None, :, None] >= pad[:, None, None]  # [B, S, 1]
    return (valid & real_query).unsqueeze(1)


def cat_masks(masks: list[torch.Tensor]) -> torch.Tensor:
    """Masks ``[B|1, 1, S, T_i]`` joined along the keys (batch dims broadcast to the largest)."""
    batch = max(m.shape[0] for m in masks)
    return torch.cat([m.expand(batch, -1, -1, -1) for m in masks], dim=-1)


class WindowBand(Band):
    """A windowed forward's keys for block-banded attention (``Band``): the sink slots and ring cached
    before this forward (``prefix``, copied: the ring is overwritten right after) and the new keys, at
    consecutive steps ``start ..``. Query block ``[a, b)`` reads the sink slots, the ring only while its
    window reaches before ``start``, new keys ``[a - W + 1, b)`` and, with sinks, the first new keys that
    may be sinks (steps below ``max(pad) + sinks``). Every key left out is one its mask rejects."""

    def __init__(self, ctx: ForwardContext, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                 cache: WindowKVCacheLayer | None):
        self.ctx, self.k, self.v, self.window, self.sinks = ctx, k, v, window, sinks
        self.block = band_block(window)
        self.ring = self.sink_slots = None
        if cache is not None and cache.length:
            steps = cache.key_steps()
            self.ring = (cache.ring_k.clone(), cache.ring_v.clone(), steps)  # [B, Hkv, W, D] x 2, [W]
        if cache is not None and sinks:
            self.sink_slots = (cache.sink_k.clone(), cache.sink_v.clone())

    def blocks(self):
        ctx, w, start, seq = self.ctx, self.window, self.ctx.start, self.k.shape[2]
        pad = 0 if ctx.pad_offset is None else int(ctx.pad_offset.max())
        sink_reach = max(pad + self.sinks - start, 0) if self.sinks else 0  # new keys that may be sinks
        for a in range(0, seq, self.block):
            rows = slice(a, min(a + self.block, seq))
            lo = max(0, a - w + 1)
            head = min(lo, sink_reach)
            keys, values, masks = [], [], []
            steps = [ctx.query_steps[:head], ctx.query_steps[lo:rows.stop]]
            if self.sink_slots is not None:
                keys.append(self.sink_slots[0])
                values.append(self.sink_slots[1])
                masks.append(sink_slot_mask(ctx, self.sinks, start, rows))
            if self.ring is not None and a < w - 1:
                keys.append(self.ring[0])
                values.append(self.ring[1])
                steps.insert(0, self.ring[2])
            keys += [self.k[:, :, :head], self.k[:, :, lo:rows.stop]]
            values += [self.v[:, :, :head], self.v[:, :, lo:rows.stop]]
            masks.append(window_mask(ctx, torch.cat(steps), w, self.sinks, start, rows))
            yield rows, torch.cat(keys, dim=2), torch.cat(values, dim=2), cat_masks(masks)


def window_keys_values(k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: WindowKVCacheLayer | None,
                       window: int, sinks: int):
    """Keys the new queries see: the ring's last ``window`` steps (+ ``sinks`` sink slots) and the new
    ``k, v [B, Hkv, S, D]``, which are then written to the ring; returns keys, values and their mask (a
    ``WindowBand`` for a forward longer than a band block: attend with ``attend_in_blocks``)."""
    start = ctx.start
    held = start + 1  # steps held after a decode step's write
    if cache is not None and ctx.seq_len == 1 and (not sinks or ctx.pad_offset is None and not window < held < window + sinks):
        # decode: write, then attend over what is held, unmasked wherever every held key is visible
        cache.write(k, v, start, ctx.pad_offset)
        filled = min(held, window)  # before wrap-around only slots 0..held-1 are written
        if sinks and held > window:  # every sink has left the window: sink slots + the whole ring, one view
            return cache.slots_k, cache.slots_v, None
        k_all, v_all = cache.ring_k[:, :, :filled], cache.ring_v[:, :, :filled]  # the sinks, if any, are in it
        if ctx.pad_offset is None:
            return k_all, v_all, None  # every written slot is in the window
        return k_all, v_all, window_mask(ctx, cache.key_steps()[:filled], window, 0, start)
    if ctx.seq_len > band_block(window):
        band = WindowBand(ctx, k, v, window, sinks, cache)
        if cache is not None:
            cache.write(k, v, start, ctx.pad_offset)
        return k, v, band
    return dense_window_keys_values(k, v, ctx, cache, window, sinks)


def dense_window_keys_values(k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                             cache: WindowKVCacheLayer | None, window: int, sinks: int):
    """The reference of ``window_keys_values``: every key (ring, sinks, new) under one dense mask ``[.., S, T]``."""
    if cache is None:  # full sequence: keys are the new tokens themselves
        return k, v, window_mask(ctx, ctx.query_steps, window, sinks, cached_before=ctx.start)
    start = ctx.start
    ring_steps = cache.key_steps() if cache.length else cache.key_steps()[:0]
    keys = [cache.ring_k[:, :, : len(ring_steps)], k]
    values = [cache.ring_v[:, :, : len(ring_steps)], v]
    masks = [window_mask(ctx, torch.cat([ring_steps, ctx.query_steps]), window, sinks, start)]
    if sinks:
        keys.insert(0, cache.sink_k)
        values.insert(0, cache.sink_v)
        masks.insert(0, sink_slot_mask(ctx, sinks, start))
    k_all, v_all = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    cache.write(k, v, start, ctx.pad_offset)
    return k_all, v_all, cat_masks(masks)


@register_module("sliding")
class SlidingAttention(FullAttention):
    """Full attention's projections, keys limited to a window (+ sinks), ring-buffer cache."""

    def __init__(self, spec: SlidingSpec, cfg, layer_idx: int):
        super().__init__(spec, cfg, layer_idx)
        self.window, self.sinks = spec.window, spec.sinks
        if spec.sink_logits:
            self.sink_logit = nn.Parameter(torch.zeros(spec.n_heads))

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        return shared_cache_layer(self.spec, built) or WindowKVCacheLayer(batch, self.n_kv_heads, self.head_dim, self.window, self.sinks, dtype, device)

    def keys_values(self, k, v, ctx: ForwardContext, cache):
        return window_keys_values(k, v, ctx, cache, self.window, self.sinks)

    def attend(self, q, k, v, mask, ctx: ForwardContext):
        if not self.spec.sink_logits:
            return super().attend(q, k, v, mask, ctx)
        # softmax over [scores, sink]: the sink takes probability mass but contributes no value
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, H, S, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sink = self.sink_logit.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
        return (probs.to(v.dtype) @ v)
