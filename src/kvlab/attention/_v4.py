"""The parts DeepSeek V4's compressed layers share (``compressed.py`` has the specs and modules): the
trailing-slice RoPE, the compressor that pools ``rate`` real tokens into one entry, CSA's lightning
indexer, the V4 cache layer (window keys, entries, compressor rings) and what a blocked prefill reads per
query block (``ChunkWindows``, ``EntrySource``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from kvlab.attention._common import ForwardContext
from kvlab.cache.base import CacheLayer, GrowingBuffer
from kvlab.kernels import TOPK
from kvlab.norms import RMSNorm
from kvlab.rope import Rotary

EMPTY_LOGIT = -1.0e30  # gate logit of an empty pooling slot: exp underflows to exactly 0 without NaN


def rope_tail(rotary: Rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing ``rotary.rot_dim`` channels of ``x [..., S, D]`` (V4's ``[nope | rope]``
    layout); cos/sin broadcast against ``x[..., -rot_dim:]``."""
    rot = rotary.rot_dim
    if rot == 0:
        return x
    head, tail = x[..., :-rot], x[..., -rot:]
    return torch.cat([head, tail * cos + rotary.rotate(tail) * sin], dim=-1)


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

    def chunk_entries(self, name: str, x: torch.Tensor, cache: V4CacheLayer | None, w: ChunkWindows,
                      rotary: Rotary) -> torch.Tensor:
        """Pool the chunk ``x [B, S, d_model]``: every entry so far ``[B, E, dim]`` (appended to ``cache``'s
        buffer ``name``, its ring state carried), or without a cache the chunk's own complete entries."""
        if cache is None:
            state = self.empty_state(x.shape[0], x.dtype, x.device)
            entries, new, _ = self(x, state, w.before, w.after, w.offset, rotary)
            return entries[:, : int(new.max())]
        state = cache.comp_state(name)
        entries, new, first = self(x, state, w.before, w.after, w.offset, rotary)
        cache.set_comp_state(name, state)
        return cache.append_entries(name, entries, new, first, w.uniform)

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
        logits = (g_gate.float() + self.position_bias.float()).masked_fill(empty, EMPTY_LOGIT)
        if self.overlap:  # entry w pools Ca of window w-1 (slots 0..m-1) and Cb of window w
            ov_logits = (state["ov_gate"].float() + self.position_bias[:, :dim].float())
            ov_logits = ov_logits.masked_fill((first == 0)[:, None, None], EMPTY_LOGIT)
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

    def __init__(self, spec, d_model: int, eps: float):
        super().__init__(d_model, spec.index_head_dim, spec.compress_rate, True, eps)
        self.n_heads, self.head_dim, self.topk = spec.index_n_heads, spec.index_head_dim, spec.index_topk
        self.q_b_proj = nn.Linear(spec.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.scorer = IndexerScorer(d_model, self.n_heads)

    def queries(self, x: torch.Tensor, q_res: torch.Tensor, rotary: Rotary, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer's queries ``[B, H_I, S, d_I]`` (rotated) and head weights ``[B, S, H_I]`` (fp32)."""
        batch, seq, _ = x.shape
        q = self.q_b_proj(q_res).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        weights = self.scorer.weights_proj(x).float() * self.n_heads ** -0.5
        return rope_tail(rotary, q, cos, sin), weights

    def scores(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """Index scores ``[B, S, E]`` (fp32) of keys ``[B, E, d_I]`` for the ``queries`` ``q, weights``;
        entries at or past ``visible [B, S]`` are -inf."""
        dots = torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)).relu_()  # [B, H_I, S, E]
        # sum_h w_h relu(q_h . k) / sqrt(d_I) as one batched [1, H_I] @ [H_I, E] per query, the scale folded
        # into the weights (was an einsum over [B, H_I, S, E]; v4_prefill.py: CSA at 16K 2.89 s -> 2.70 s)
        scaled = (weights * self.head_dim ** -0.5).unsqueeze(-2)  # [B, S, 1, H_I]
        total = torch.matmul(scaled, dots.transpose(1, 2)).squeeze(-2)  # [B, S, E]
        entry = torch.arange(keys.shape[1], device=keys.device)
        return total.masked_fill_(entry >= visible.unsqueeze(-1), float("-inf"))

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k entry indices ``[B, S, k]`` in position order, and their validity. Deterministic under
        ties: entries scoring above the k-th score are taken, then the earliest entries equal to it.
        Through ``kernels.TOPK`` (per row, a bisection on the scores' values) where it applies, else
        ``select_reference``."""
        k = min(self.topk, scores.shape[-1])
        if scores.dtype == torch.float32 and scores.is_contiguous() and TOPK.usable(scores):
            idx = TOPK.module().select(scores.view(-1, scores.shape[-1]), k).view(*scores.shape[:-1], k)
            return idx, idx < visible.unsqueeze(-1)
        return self.select_reference(scores, visible)

    def select_reference(self, scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``select`` as torch ops over the whole score matrix (the kernel's reference)."""
        k = min(self.topk, scores.shape[-1])
        kth = scores.kthvalue(scores.shape[-1] - k + 1, dim=-1, keepdim=True).values  # [B, S, 1]: quickselect
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


class ChunkWindows:
    """Where a chunk sits in each row's real positions (left padding is never compressed)."""

    def __init__(self, ctx: ForwardContext, batch: int, seq: int, rate: int, device):
        pad = ctx.pad_offset if ctx.pad_offset is not None else torch.zeros(batch, dtype=torch.long, device=device)
        self.before = (ctx.start - pad).clamp_min(0)  # [B] real tokens before the chunk
        self.after = (ctx.start + seq - pad).clamp_min(0)  # [B] ... after it
        self.offset = pad - ctx.start  # [B] chunk index of real position 0
        self.uniform = ctx.pad_offset is None
        real = ctx.query_steps[None, :] - pad[:, None]  # [B, S] real position (negative: padding)
        self.visible = torch.div(real + 1, rate, rounding_mode="floor").clamp_min(0)  # [B, S] entries seen


@dataclass
class EntrySource:
    """A forward's compressed entries, computed once and read per query block. Every query sees a prefix
    of its row's entries, ``visible [B, S]`` long (non-decreasing along S)."""

    entries: torch.Tensor  # [B, E, d]
    windows: ChunkWindows  # where the chunk sits in each row
    index_keys: torch.Tensor | None = None  # CSA: the indexer's keys [B, E, d_I]
    index_q: torch.Tensor | None = None  # ... its queries [B, H_I, S, d_I]
    index_w: torch.Tensor | None = None  # ... and head weights [B, S, H_I]

    @property
    def visible(self) -> torch.Tensor:  # [B, S]
        return self.windows.visible

    def seen(self, rows: slice) -> int:
        """Entries the queries ``rows`` see at most (the block's last query sees the longest prefix)."""
        return int(self.visible[:, rows.stop - 1].max()) if self.entries.shape[1] else 0

    @cached_property
    def _flat(self) -> torch.Tensor:  # [B * E, d], copied once per forward at most
        return self.entries.reshape(-1, self.entries.shape[-1])

    def pick(self, idx: torch.Tensor) -> torch.Tensor:
        """Each query's entries at ``idx [B, n_q, k]`` (indices into its row) as ``[B, n_q, k, d]``
        (``index_select``: several times faster on CPU than advanced indexing or ``gather``)."""
        batch, n_entries = self.entries.shape[:2]
        rows = idx + torch.arange(batch, device=idx.device)[:, None, None] * n_entries
        return self._flat.index_select(0, rows.flatten()).view(*idx.shape, -1)
