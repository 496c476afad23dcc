"""KIVI-style quantized KV storage: int8 / int4 codes with per-group scale and zero point.

A *stream* is one time-growing tensor ``[B, H, T, W]`` stored quantized. Two grouping modes (KIVI):
- ``"channel"`` (keys, the MLA latent): each channel of each group of ``G`` consecutive tokens shares a
  scale and zero point, so outlier channels do not spoil the others. Scales ``[B, H, T/G, W]``.
- ``"token"`` (values): each token's channels are split into groups of ``gcd(G, W)`` channels.
  Scales ``[B, H, T, W/g]``.

Flush policy (what makes the planner exact at every length): of ``T`` tokens held, the oldest
``Q(T) = G * floor(max(T - R, 0) / G)`` are quantized and the rest (``R .. R+G-1`` tokens once
``T >= R``) stay in full precision. It depends on ``T`` only, so chunked and token-by-token filling
hold the same codes. int4 packs two codes per byte along the channel axis (``W`` must be even).
Bytes: codes ``Q*W*bits/8`` + scales and zero points (cache dtype) + residual ``(T-Q)*W`` elements.

A forward attends to the dequantized old tokens plus the full-precision residual, which includes the
tokens of this forward (they are quantized, if at all, after it), as in Hugging Face's QuantizedCache.
A decode step (``QuantizedKVCacheLayer.attend``) reads the codes ``BLOCK`` tokens at a time: key blocks
are dequantized into a reused workspace (one fused ``addcmul``), value blocks are only converted to float
and their per-token scales applied to the probabilities (``token_group_values``); ``append`` (prefill,
``kv_from`` consumers, the reference in tests) returns a full-size dequantized copy.
"""

from __future__ import annotations

import math
import threading

import torch

from kvlab.cache.base import CacheLayer, GrowingBuffer

BITS = {"int8": 8, "int4": 4}
BLOCK = 1024  # tokens read at a time by ``QuantizedKVCacheLayer.attend`` (a multiple of the group)


def quantized_tokens(tokens: int, group: int, residual: int) -> int:
    """How many of ``tokens`` are held quantized: whole groups older than the last ``residual``."""
    return max(tokens - residual, 0) // group * group


def token_group(group: int, width: int) -> int:
    """Channels per scale in ``"token"`` mode."""
    return math.gcd(group, width)


def stream_bytes(mode: str, rows: int, width: int, tokens: int, quant: str, group: int, residual: int,
                 elem_bytes: int) -> int:
    """Exact bytes of one quantized stream of ``rows`` (= batch * heads) rows of width ``width``."""
    q = quantized_tokens(tokens, group, residual)
    codes = rows * q * width * BITS[quant] // 8
    scale_count = (q // group) * width if mode == "channel" else q * (width // token_group(group, width))
    return codes + 2 * rows * scale_count * elem_bytes + rows * (tokens - q) * width * elem_bytes


def quantize(x: torch.Tensor, mode: str, quant: str, group: int, scale_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of ``x [B, H, N, W]`` (``N`` a multiple of ``group`` in channel
    mode). Returns codes ``[B, H, N, W]`` (uint8, int4 packed to ``W/2``), scale and zero point."""
    levels = 2 ** BITS[quant] - 1
    b, h, n, w = x.shape
    xf = x.float()
    if mode == "channel":
        grouped = xf.view(b, h, n // group, group, w)  # groups of tokens, per channel
        lo, hi = grouped.amin(3), grouped.amax(3)  # [B, H, N/G, W]
    else:
        g = token_group(group, w)
        grouped = xf.view(b, h, n, w // g, g)  # groups of channels, per token
        lo, hi = grouped.amin(4), grouped.amax(4)  # [B, H, N, W/g]
    scale, zero = ((hi - lo) / levels).to(scale_dtype), lo.to(scale_dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    expand = (lambda t: t.unsqueeze(3)) if mode == "channel" else (lambda t: t.unsqueeze(4))
    codes = ((grouped - expand(zero.float())) / expand(s)).round_().clamp_(0, levels)
    codes = codes.view(b, h, n, w).to(torch.uint8)
    if quant == "int4":
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [B, H, N, W/2]
    return codes, scale, zero


def _grouped_shape(mode: str, group: int, shape: torch.Size) -> tuple[tuple[int, ...], int]:
    """The view of codes ``[B, H, N, W]`` in which the scale and zero point broadcast, and their new axis."""
    b, h, n, w = shape
    if mode == "channel":
        return (b, h, n // group, group, w), 3
    g = token_group(group, w)
    return (b, h, n, w // g, g), 4


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mode: str, quant: str,
               group: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize``: ``[B, H, N, W]`` in ``dtype`` (``zero + code * scale`` in fp32, one fused op)."""
    if quant == "int4":
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)  # unpack: [B, H, N, W]
    shape, axis = _grouped_shape(mode, group, codes.shape)
    x = torch.addcmul(zero.float().unsqueeze(axis), codes.view(shape), scale.float().unsqueeze(axis))
    return x.view(codes.shape).to(dtype)


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, mode: str,
                    group: int) -> torch.Tensor:
    """``dequantize`` of unpacked ``codes [B, H, n, W]`` written into the float32 ``out`` of that shape."""
    shape, axis = _grouped_shape(mode, group, codes.shape)
    torch.addcmul(zero.float().unsqueeze(axis), codes.view(shape), scale.float().unsqueeze(axis), out=out.view(shape))
    return out


_WORKSPACE = threading.local()  # one reused block of float codes per thread (scratch, not cache state)


def workspace(shape: tuple[int, ...], device) -> torch.Tensor:
    """A contiguous float32 scratch tensor of ``shape``, reused across blocks, layers and steps."""
    numel = math.prod(shape)
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < numel or buffer.device != torch.device(device):
        buffer = _WORKSPACE.buffer = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel].view(shape)


class QuantizedStream:
    """One quantized time-growing tensor ``[B, H, T, W]``; its buffers live in ``owner.buffers`` (so
    ``nbytes``, ``select`` and ``reset`` of the owner cover them) under ``name.*``."""

    def __init__(self, owner: CacheLayer, name: str, batch: int, heads: int, width: int, mode: str,
                 quant: str, group: int, residual: int, dtype: torch.dtype, device=None):
        if quant == "int4" and width % 2:
            raise ValueError(f"int4 packing needs an even width, got {width}")
        self.mode, self.quant, self.group, self.residual = mode, quant, group, residual
        self.width, self.dtype = width, dtype
        scale_width = width if mode == "channel" else width // token_group(group, width)
        code_width = width * BITS[quant] // 8
        self.codes = GrowingBuffer((batch, heads, 0, code_width), 2, torch.uint8, device)
        self.scale = GrowingBuffer((batch, heads, 0, scale_width), 2, dtype, device)
        self.zero = GrowingBuffer((batch, heads, 0, scale_width), 2, dtype, device)
        self.recent = GrowingBuffer((batch, heads, 0, width), 2, dtype, device)  # full precision
        for part in ("codes", "scale", "zero", "recent"):
            owner.buffers[f"{name}.{part}"] = getattr(self, part)

    @property
    def quantized_length(self) -> int:
        return self.codes.length

    def dequantized(self) -> torch.Tensor:
        """The quantized tokens, dequantized: ``[B, H, Q, W]``."""
        return dequantize(self.codes.view(), self.scale.view(), self.zero.view(), self.mode, self.quant,
                          self.group, self.width, self.dtype)

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Store ``x [B, H, S, W]``; return every token held, ``[B, H, T, W]`` (old ones dequantized,
        recent ones and ``x`` exact). Then quantize the groups that left the residual window. This is
        the reference read: it builds a full-size dequantized copy (``QuantizedKVCacheLayer.attend``
        reads the codes chunk by chunk instead)."""
        recent = self.push(x)
        if self.quantized_length == 0 and not self.pending_flush():
            return recent  # nothing quantized yet and the buffer is not rewritten below
        out = torch.cat([self.dequantized(), recent], dim=2)
        self.flush()
        return out

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Write ``x [B, H, S, W]`` into the full-precision residual (no flush); return the residual."""
        return self.recent.append(x)

    def pending_flush(self) -> int:
        """Tokens of the residual that ``flush`` would quantize now."""
        return quantized_tokens(self.quantized_length + self.recent.length, self.group, self.residual) \
            - self.quantized_length

    def flush(self) -> None:
        """Quantize the whole groups that left the residual window."""
        flush = self.pending_flush()
        if flush:
            recent = self.recent.view()
            codes, scale, zero = quantize(recent[:, :, :flush], self.mode, self.quant, self.group, self.dtype)
            self.codes.append(codes)
            self.scale.append(scale)
            self.zero.append(zero)
            keep = recent[:, :, flush:].clone()
            self.recent.reset()
            self.recent.append(keep)

    def code_blocks(self, size: int):
        """``(start, codes, scale, zero)`` over the quantized tokens, oldest first, ``size`` tokens at a time
        (rounded to whole groups): ``codes [B, H, n, W]`` uint8 (int4 unpacked), the block's scale and zero
        point rows."""
        codes, scale, zero = self.codes.view(), self.scale.view(), self.zero.view()
        size = max(size // self.group, 1) * self.group
        per_scale = self.group if self.mode == "channel" else 1  # tokens per scale row
        for start in range(0, self.quantized_length, size):
            n = min(size, self.quantized_length - start)
            block = codes[:, :, start:start + n]
            if self.quant == "int4":
                block = torch.stack([block & 15, block >> 4], dim=-1).flatten(-2)  # [B, H, n, W]
            rows = slice(start // per_scale, (start + n) // per_scale)
            yield start, block, scale[:, :, rows], zero[:, :, rows]

    def reserve(self, total: int) -> None:
        self.recent.reserve(min(total, self.residual + self.group))
        for buf in (self.codes, self.scale, self.zero):
            buf.reserve(total if buf is self.codes or self.mode == "token" else -(-total // self.group))


class QuantizedKVCacheLayer(CacheLayer):
    """K and V of every past token, quantized KIVI-style: keys per channel, values per token."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device=None, *,
                 quant: str, group: int, residual: int):
        super().__init__()
        self.k = QuantizedStream(self, "k", batch, kv_heads, head_dim, "channel", quant, group, residual,
                                 dtype, device)
        self.v = QuantizedStream(self, "v", batch, kv_heads, head_dim, "token", quant, group,
                                 residual, dtype, device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``k, v [B, Hkv, S, D]``; return all keys and values held (dequantized)."""
        self.length += k.shape[2]
        return self.k.append(k), self.v.append(v)

    def reserve(self, total: int) -> None:
        self.k.reserve(total)
        self.v.reserve(total)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Store new ``k, v [B, Hkv, S, D]`` and attend ``q [B, Hkv, M, D]`` (query heads of a group folded
        into ``M``) to every key held, dequantizing ``BLOCK`` tokens at a time into a workspace that stays
        in cache: no full-size dequantized copy exists. Two passes in float32: the scores ``[B, Hkv, M, T]``,
        one softmax, then the values. ``mask [B|1, 1, M, T]`` bool or None. Equals ``append`` followed by
        softmax attention."""
        self.length += k.shape[2]
        self.k.push(k)
        self.v.push(v)
        done = self.k.quantized_length
        qf = q.float()
        scores = qf.new_empty(q.shape[:-1] + (done + self.k.recent.length,))  # [B, Hkv, M, T]
        for start, codes, scale_, zero in self.k.code_blocks(BLOCK):  # keys: dequantized per channel group
            block = dequantize_into(workspace(codes.shape, codes.device), codes, scale_, zero, "channel", self.k.group)
            scores[..., start:start + codes.shape[2]] = torch.matmul(qf, block.transpose(-1, -2))
        scores[..., done:] = torch.matmul(qf, self.k.recent.view().float().transpose(-1, -2))
        scores.mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(-1)
        out = torch.matmul(probs[..., done:], self.v.recent.view().float())  # [B, Hkv, M, Dv]: the residual
        for start, codes, scale_, zero in self.v.code_blocks(BLOCK):
            out += token_group_values(probs[..., start:start + codes.shape[2]], codes, scale_, zero)
        self.k.flush()
        self.v.flush()
        return out.to(q.dtype)


def token_group_values(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``p @ dequantize(codes)`` for per-token ("token" mode) values, without dequantizing: ``p [B, H, M, n]``,
    ``codes [B, H, n, W]`` uint8, ``scale, zero [B, H, n, J]`` (J groups of ``g = W/J`` channels). The
    scales go to ``p`` instead: ``sum_t p_t (s_tj c_tc + z_tj) = sum_t (p_t s_tj) c_tc + sum_t p_t z_tj``; the
    J scaled copies of ``p`` are stacked into one matmul over the float codes (M is tiny, so the matmul costs
    what reading the codes costs) whose diagonal blocks are kept. Returns ``[B, H, M, W]`` float32."""
    b, h, m, n = p.shape
    j = scale.shape[-1]
    g = codes.shape[-1] // j
    ps = p.unsqueeze(2) * scale.float().transpose(-1, -2).contiguous().unsqueeze(3)  # [B, H, J, M, n]
    full = torch.matmul(ps.reshape(b, h, j * m, n), workspace(codes.shape, codes.device).copy_(codes))
    diag = full.view(b, h, j, m, j, g).diagonal(dim1=2, dim2=4)  # [B, H, M, g, J]: group j's channels
    out = diag.permute(0, 1, 2, 4, 3) + torch.matmul(p, zero.float()).unsqueeze(-1)  # [B, H, M, J, g]
    return out.reshape(b, h, m, j * g)


def quantized_kv_bytes(spec, tokens: int, batch: int, elem_bytes: int) -> int:
    """Planner rule of ``QuantizedKVCacheLayer`` for a resolved spec with ``kv_quant`` set."""
    rows = batch * spec.n_kv_heads
    return sum(stream_bytes(mode, rows, spec.head_dim, tokens, spec.kv_quant, spec.kv_quant_group,
                            spec.kv_quant_residual, elem_bytes) for mode in ("channel", "token"))
