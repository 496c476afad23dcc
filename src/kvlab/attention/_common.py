"""What every attention module shares: the forward context (positions, masks, rotary tables) and
grouped-query SDPA.

Time is counted in *steps*: step ``t`` is the ``t``-th token a row has consumed, left padding included.
A key at step ``s`` is visible to a query at step ``t`` iff ``s <= t`` (causal), ``s >= pad_offset[b]``
(not padding) and, for windowed layers, ``s > t - window``. The RoPE position of step ``t`` is
``t - pad_offset[b]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from kvlab.kernels import FLOAT
from kvlab.rope import Rotary

EMPTY_STEP = -(2**40)  # the step of a never-written cache slot: before every query's window, so every mask rejects it


class ForwardContext:
    """Per-forward information shared by all layers; memoizes masks and cos/sin.

    Modules never write their own attributes in ``forward``; what they publish for others goes here:
    ``shared[layer]`` (a producer's keys for its ``kv_from`` consumers) and, when the caller passes a
    ``trace`` dict, observations keyed ``(layer_idx, name)`` (the kernel a layer ran, entries it read).
    """

    def __init__(self, batch: int, seq_len: int, start: int, pad_offset: torch.Tensor | None,
                 device: torch.device, trace: dict | None = None):
        self.batch, self.seq_len, self.start, self.device = batch, seq_len, start, device
        self.trace = trace  # None: nothing recorded
        self.pad_offset = pad_offset  # [B] long or None
        steps = torch.arange(start, start + seq_len, device=device)
        self.query_steps = steps  # [S]
        if pad_offset is None:
            self.positions = steps.unsqueeze(0).expand(batch, seq_len)  # [B, S]
        else:
            self.positions = (steps.unsqueeze(0) - pad_offset.unsqueeze(1)).clamp_min(0)
        self.shared: dict[int, object] = {}  # producer layer index -> what its consumers read
        self.per_layer_inputs: torch.Tensor | None = None  # [B, S, L, P]: PLE, set by Model.forward
        self._memo: dict = {}

    def record(self, layer_idx: int, name: str, value: object) -> None:
        """Note what layer ``layer_idx`` did (``trace[(layer_idx, name)] = value``) if tracing."""
        if self.trace is not None:
            self.trace[(layer_idx, name)] = value

    def cos_sin(self, rotary: Rotary, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", rotary.key, dtype)
        if key not in self._memo:
            self._memo[key] = rotary.cos_sin(self.positions, dtype)
        return self._memo[key]

    def mask(self, key_steps: torch.Tensor, window: int | None = None, sinks: int = 0,
             memo_key: object = None) -> torch.Tensor:
        """Boolean mask ``[B or 1, 1, S, T]`` (True = attend) for keys at ``key_steps [T]``.

        ``window``: a query sees the last ``window`` steps (itself included); ``sinks``: the first
        ``sinks`` real tokens of each row stay visible. A padded query sees itself, so no row is empty.
        """
        key = ("mask", memo_key, window, sinks) if memo_key is not None else None
        if key is not None and key in self._memo:
            return self._memo[key]
        q = self.query_steps[:, None]  # [S, 1]
        k = key_steps[None, :]  # [1, T]
        allowed = k <= q
        if window is not None:
            in_window = k > q - window
            if sinks:
                first_real = 0 if self.pad_offset is None else self.pad_offset[:, None, None]
                in_window = in_window | (k < first_real + sinks)
            allowed = allowed & in_window
        if self.pad_offset is not None:
            real = k.unsqueeze(0) >= self.pad_offset[:, None, None]  # [B, 1, T]
            allowed = allowed & (real | (k == q))  # [B, S, T]
        if allowed.dim() == 2:
            allowed = allowed.unsqueeze(0)
        allowed = allowed.unsqueeze(1)  # [B or 1, 1, S, T]
        if key is not None:
            self._memo[key] = allowed
        return allowed

    def needs_mask(self, kv_len: int) -> bool:
        """False when plain causal SDPA (or no mask at all for one query) is exact: no padding, the keys
        are exactly steps ``0 .. start + S - 1``, and either no past (causal kernel) or one query."""
        simple = self.start == 0 or self.seq_len == 1
        return self.pad_offset is not None or kv_len != self.start + self.seq_len or not simple


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 causal: bool, scale: float | None) -> torch.Tensor:
    """SDPA for any number of KV heads dividing the query heads, without expanding K/V.

    q ``[B, H, S, D]``, k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]``, mask ``[B|1, 1, S, T]`` bool or None.
    Returns ``[B, H, S, Dv]``. With a mask (or one query) the G = H / Hkv query heads of a group are
    folded into the query axis, ``[B, Hkv, G*S, D]``, so each K/V head is read once (2-3x faster on CPU
    than ``enable_gqa``); causal full-sequence attention uses the fused causal kernel. One query per row
    (decode) on CPU goes through kvlab's one-pass kernel where it applies (``decode_attention``).
    """
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if seq == 1 and decode_kernel_applies(q, k, v, mask):
        return decode_attention(q, k, v, mask, scale)
    if seq > 1 and v.shape[-1] != dim:
        return _equal_head_dims(q, k, v, mask, causal, scale)
    if kv_heads == heads:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              is_causal=causal and mask is None and seq > 1)
    group = heads // kv_heads
    if causal and mask is None and seq > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    qg = q.reshape(batch, kv_heads, group * seq, dim)  # head h = kv_head * G + g
    if mask is not None:
        mask = mask.unsqueeze(2).expand(-1, -1, group, -1, -1).reshape(mask.shape[0], 1, group * seq, -1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.view(batch, heads, seq, v.shape[-1])


def decode_kernel_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """``FLOAT`` can take this decode call: a float32 / bfloat16 cache whose ``[B, Hkv]`` rows fold into one
    axis without a copy, a boolean mask (or none), nothing to differentiate, no trace being recorded."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                      or v.requires_grad)):
        return False
    if k.dtype != v.dtype or k.dtype not in (torch.float32, torch.bfloat16) or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.shape[1] != 1 or mask.shape[2] != 1):
        return False
    folds = all(t.stride(-1) == 1 and t.stride(0) == t.shape[1] * t.stride(1) for t in (k, v))
    return folds and FLOAT.usable(q, k, v)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None) -> torch.Tensor:
    """``grouped_sdpa`` for one query per row through ``FLOAT`` (``kernels/csrc/float_attention.cpp``): scores,
    softmax and values in one pass over the cache, in float32. q ``[B, H, 1, D]``, k ``[B, Hkv, T, D]``,
    v ``[B, Hkv, T, Dv]`` (float32 or bfloat16, rows possibly strided by a buffer's capacity), mask
    ``[B|1, 1, 1, T]`` bool or None. Returns ``[B, H, 1, Dv]`` in q's dtype."""
    batch, heads, _, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    rows = q.reshape(batch * kv_heads, heads // kv_heads, dim)  # [B*Hkv, G, D]: head h = kv_head * G + g
    rows = rows if rows.dtype == torch.float32 else rows.float()
    keys = k.view(batch * kv_heads, tokens, dim)  # [B*Hkv, T, D]
    values = v.view(batch * kv_heads, tokens, v.shape[-1])
    visible = mask[:, 0, 0, :] if mask is not None else NO_MASK  # [B|1, T]
    out = FLOAT.module().attend(rows, keys, values, visible, dim ** -0.5 if scale is None else scale)
    out = out.view(batch, heads, 1, -1)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


NO_MASK = torch.empty(0, 0, dtype=torch.bool)  # decode_attention's "every key visible" (never written)


def _equal_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     causal: bool, scale: float | None) -> torch.Tensor:
    """``grouped_sdpa`` with the narrower of q/k and v zero-padded to the other's head dim: SDPA's fused CPU
    kernel needs equal dims and otherwise falls back to the math path, which builds the ``[S, T]`` score
    matrix (MLA's expanded prefill: 21x slower at 4K, quadratic memory). Zero channels add nothing to the
    scores or the output; the scale stays the one of the real q dim."""
    dim, dv = q.shape[-1], v.shape[-1]
    scale = scale if scale is not None else dim ** -0.5
    if dv < dim:
        return grouped_sdpa(q, k, F.pad(v, (0, dim - dv)), mask, causal, scale)[..., :dv]
    return grouped_sdpa(F.pad(q, (0, dv - dim)), F.pad(k, (0, dv - dim)), v, mask, causal, scale)



class Band:
    """Keys a windowed forward's queries see, handed out block by block instead of as one dense mask:
    ``blocks()`` yields ``(rows, k, v, mask)`` for consecutive query slices ``rows``, each with only the keys
    its queries can see and a small mask ``[B|1, 1, len(rows), T_block]``. Sliding-window prefill then
    costs O(S * (W + block)) instead of O(S * T). Stored in ``ctx.shared`` like a mask, so ``kv_from``
    consumers attend to the same bands."""

    def blocks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def attend_in_blocks(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | Band | None) -> torch.Tensor:
    """``attend(q, k, v, mask)`` for a tensor mask; for a ``Band``, once per query block (``q [B, H, S, D]``,
    outputs concatenated along S). Exact: a query's softmax only involves its own row."""
    if not isinstance(mask, Band):
        return attend(q, k, v, mask)
    return torch.cat([attend(q[:, :, rows], kb, vb, mb) for rows, kb, vb, mb in mask.blocks()], dim=2)
