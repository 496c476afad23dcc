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
A decode step (``QuantizedKVCacheLayer.attend``) reads the codes, never a dequantized copy, in one of two
implementations of the same arithmetic: the compiled kernel (``kernels.QUANTIZED``, C++: each token's codes
dequantized in registers; used on CPU where it builds) or torch ops reading a block of tokens at a time
(``block_tokens``: each block only converted to float in a reused workspace, int4 unpacked by whole-word
bit ops first; the key scales folded into the query and the value scales into the probabilities, so no
per-element scale work touches the big tensors). ``benchmarks/kv_quant_decode.py``: at 8K the whole-model
int8 / int4 step takes 0.89x / 0.95x fp32's with the kernel, 1.23x / 1.57x with the torch ops (2-core
EPYC, 1 thread). ``append`` (prefill, ``kv_from`` consumers) and ``attend_reference`` (the reference in tests)
build a full-size dequantized copy.
"""

from __future__ import annotations

import math
import threading

import torch

from kvlab.cache.base import CacheLayer, GrowingBuffer
from kvlab.kernels import QUANTIZED

BITS = {"int8": 8, "int4": 4}
# Tokens read at a time by ``QuantizedKVCacheLayer.attend``: at most ``BLOCK``, fewer when a block's float
# workspace (rows x tokens x width x 4 bytes, rows = batch x KV heads) would outgrow ``WORKSPACE_BYTES``.
# Measured on the 2-core EPYC (32 MiB L3), SmolLM2's GQA-3 shape: at batch 1, 2048 tokens beat 512 / 1024
# (fewer small matmul calls); at batch 16 (48 rows) a 2048-token block's 25 MB workspace left the cache:
# ``benchmarks/kv_quant_decode.py --batch 16`` at 4K (before the kernel, which needs no workspace), whole-model
# int8 step 1.39x fp32's with 512-token blocks against 2.00x with 2048.
BLOCK = 2048
WORKSPACE_BYTES = 8 << 20


def block_tokens(rows: int, width: int, multiple: int = 1) -> int:
    """Tokens per block for ``rows`` rows of ``width`` channels: the largest power of two keeping the float
    workspace within ``WORKSPACE_BYTES`` (at most ``BLOCK``), rounded down to whole ``multiple``s (at least one)."""
    fit = max(1, min(BLOCK, WORKSPACE_BYTES // max(rows * width * 4, 1)))
    tokens = BLOCK if fit == BLOCK else 1 << (fit.bit_length() - 1)
    return max(tokens // multiple, 1) * multiple


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


_WORKSPACE = threading.local()  # reused scratch tensors per thread (not cache state), by slot name


def workspace(slot: str, shape: tuple[int, ...], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous scratch tensor of ``shape``, reused across blocks, layers and steps (one per slot)."""
    numel = math.prod(shape)
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (slot, dtype, torch.is_inference_mode_enabled())  # an inference tensor is written only in inference mode
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel or buffer.device != torch.device(device):
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(packed_width: int) -> tuple[int, torch.dtype]:
    """The widest integer word (bytes, dtype) that tiles a packed int4 row of ``packed_width`` bytes."""
    return next((b, d) for b, d in _WORDS if packed_width % b == 0)


def unpack_int4(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Unpack int4 ``codes [..., W/2]`` into uint8 ``out [..., W]`` in *word order*: each packed word of
    ``b`` bytes (channels ``2bi .. 2bi+2b-1``) becomes its ``b`` low nibbles (even channels) then its ``b``
    high nibbles (odd channels). Three whole-word ops (and, shift, and) instead of per-byte ones; the
    channel order is undone on the query side (``to_word_order``) or on the result (``from_word_order``)."""
    nbytes, dtype = _word(codes.shape[-1])
    mask = int.from_bytes(b"\x0f" * nbytes, "little")
    words = codes.view(dtype)  # [..., W/2b]
    halves = out.view(dtype).unflatten(-1, (-1, 2))  # [..., W/2b, 2]: low word, high word
    torch.bitwise_and(words, mask, out=halves[..., 0])
    torch.bitwise_right_shift(words, 4, out=halves[..., 1])
    out.view(dtype).bitwise_and_(mask)
    return out


def to_word_order(x: torch.Tensor) -> torch.Tensor:
    """View of ``x [..., W]`` with its channels in ``unpack_int4``'s word order: ``[..., W/2b, 2, b]``."""
    nbytes = _word(x.shape[-1] // 2)[0]
    return x.unflatten(-1, (-1, nbytes, 2)).transpose(-1, -2)


def from_word_order(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_word_order``: ``x [..., W]`` in word order -> channel order (a copy)."""
    nbytes = _word(x.shape[-1] // 2)[0]
    return x.unflatten(-1, (-1, 2, nbytes)).transpose(-1, -2).flatten(-3)


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
        reads the codes block by block instead)."""
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
        into ``M``) to every key held, reading the codes: through the compiled kernel where it is usable,
        else ``block_tokens`` at a time, each block only converted to float (int4: unpacked first) in a
        reused workspace; no dequantized copy exists. The scales and zero points never touch the big
        tensors (the kernel does the same algebra per token):

        - keys (per channel, groups of ``G`` tokens): ``q . (s * c + z) = (q * s) . c + q . z``: one scaled
          query per group, ``qs [T/G, B, Hkv, M, D]``, one batched matmul per block over the groups;
        - values (per token, ``J`` groups of ``g`` channels): ``sum_t p_t (s_tj c_t + z_tj) = sum_t (p_t s_tj)
          c_t + sum_t p_t z_tj``: the ``J`` scaled copies of the probabilities, stacked, times the codes;
          group ``j``'s channels are kept from copy ``j`` (``M`` is tiny, so the stack costs what reading
          the codes costs).

        Two passes in float32: the scores ``[B, Hkv, M, T]``, one softmax, then the values. ``mask
        [B|1, 1, M, T]`` bool or None. Equals ``attend_reference`` (dequantize, then attend) up to float
        rounding. Under autograd (a training forward through the cache) it is ``attend_reference``: the
        workspaces are overwritten in place, which autograd cannot differentiate through."""
        if torch.is_grad_enabled():
            return self.attend_reference(q, k, v, mask, scale)
        self.length += k.shape[2]
        self.k.push(k)
        self.v.push(v)
        b, h, m, d = q.shape
        done, dev = self.k.quantized_length, q.device  # quantized tokens (both streams hold the same)
        qf = q.float()
        scores = workspace("scores", (b, h, m, done + self.k.recent.length), dev)  # [B, Hkv, M, T]
        if done:
            self._quantized_scores(qf, scores[..., :done])
        torch.matmul(qf, self.k.recent.view().float().transpose(-1, -2), out=scores[..., done:])
        scores.mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(-1)
        out = torch.matmul(probs[..., done:], self.v.recent.view().float())  # [B, Hkv, M, Dv]: the residual
        if done:
            out += self._quantized_values(probs[..., :done])
        self.k.flush()
        self.v.flush()
        return out.to(q.dtype)

    def _float_codes(self, stream: QuantizedStream, start: int, n: int) -> torch.Tensor:
        """Tokens ``start .. start+n`` of ``stream``'s codes as uint8 ``[B, Hkv, n, D]`` (int4: unpacked,
        channels in word order)."""
        codes = stream.codes.view()[:, :, start:start + n]
        if stream.quant == "int4":
            b, h, _, half = codes.shape
            codes = unpack_int4(codes, workspace("unpacked", (b, h, n, 2 * half), codes.device, torch.uint8))
        return codes

    def _quantized_scores(self, qf: torch.Tensor, out: torch.Tensor) -> None:
        """``q . k`` over the quantized keys into ``out [B, Hkv, M, Q]`` (unscaled)."""
        ks = self.k
        b, h, m, d = qf.shape
        g, groups = ks.group, ks.quantized_length // ks.group
        scale, zero = ks.scale.view().float(), ks.zero.view().float()  # [B, Hkv, Q/G, D]
        if QUANTIZED.usable(qf):  # the compiled loop: codes dequantized in registers
            QUANTIZED.module().scores(_rows(qf), _rows(ks.codes.view()), _rows(scale), _rows(zero), g,
                                      BITS[ks.quant], _rows(out))
            return
        qs = workspace("qs", (groups, b, h, m, d), qf.device)  # the query scaled per group: [Q/G, B, Hkv, M, D]
        s = scale.permute(2, 0, 1, 3).unsqueeze(3)  # [Q/G, B, Hkv, 1, D]
        if ks.quant == "int4":  # channels in the codes' word order
            torch.mul(to_word_order(qf), to_word_order(s), out=qs.view(to_word_order(qs).shape))
        else:
            torch.mul(qf, s, out=qs)
        sq = workspace("sq", (groups, b, h, m, g), qf.device)  # (q * s) . c: [Q/G, B, Hkv, M, G]
        size = block_tokens(b * h, d, g)
        for start in range(0, ks.quantized_length, size):
            n = min(size, ks.quantized_length - start)
            g0, g1 = start // g, (start + n) // g
            codes = self._float_codes(ks, start, n).view(b, h, g1 - g0, g, d)
            block = workspace("block", (g1 - g0, b, h, g, d), qf.device).copy_(codes.permute(2, 0, 1, 3, 4))
            torch.matmul(qs[g0:g1].view(-1, m, d), block.view(-1, g, d).transpose(-1, -2),
                         out=sq[g0:g1].view(-1, m, g))
        bias = torch.matmul(qf, zero.transpose(-1, -2))  # q . z: [B, Hkv, M, Q/G]
        torch.add(sq.permute(1, 2, 3, 0, 4), bias.unsqueeze(-1), out=out.view(b, h, m, groups, g))

    def _quantized_values(self, p: torch.Tensor) -> torch.Tensor:
        """``p @ dequantized values`` for ``p [B, Hkv, M, Q]`` over the quantized tokens: ``[B, Hkv, M, D]``."""
        vs = self.v
        b, h, m, n_all = p.shape
        d = vs.width
        if QUANTIZED.usable(p):
            out = QUANTIZED.module().values(_rows(p), _rows(vs.codes.view()), _rows(vs.scale.view().float()),
                                            _rows(vs.zero.view().float()), BITS[vs.quant])
            return out.view(b, h, m, d)
        scale_t = vs.scale.view().transpose(-1, -2).float().contiguous()  # [B, Hkv, J, Q]
        zero_t = vs.zero.view().transpose(-1, -2).float().contiguous()
        j = scale_t.shape[2]
        ps = workspace("ps", (b, h, j, m, n_all), p.device)
        torch.mul(p.unsqueeze(2), scale_t.unsqueeze(3), out=ps)  # p_t s_tj: [B, Hkv, J, M, Q]
        acc = workspace("acc", (b * h, j * m, d), p.device).zero_()  # [B*Hkv, J*M, D]
        size = block_tokens(b * h, d)
        for start in range(0, n_all, size):
            n = min(size, n_all - start)
            block = workspace("block", (b, h, n, d), p.device).copy_(self._float_codes(vs, start, n))
            acc.baddbmm_(ps[..., start:start + n].reshape(b * h, j * m, n), block.view(b * h, n, d))
        if vs.quant == "int4":
            acc = from_word_order(acc)
        diag = acc.view(b, h, j, m, j, d // j).diagonal(dim1=2, dim2=4)  # group j's channels from copy j: [B, Hkv, M, g, J]
        zp = torch.matmul(p, zero_t.transpose(-1, -2))  # sum_t p_t z_tj: [B, Hkv, M, J]
        return (diag + zp.unsqueeze(-2)).transpose(-1, -2).reshape(b, h, m, d)

    def attend_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
        """``attend`` the naive way (the reference in tests): ``append``'s full-size dequantized copy, then
        float32 softmax attention."""
        keys, values = self.append(k, v)
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale  # [B, Hkv, M, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), values.float()).to(q.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, w] -> [B*H, n, w]`` for the kernel, as a view: ``view`` raises where a copy would be
    needed, and a copy of an output would silently drop what the kernel writes into it."""
    return t.view(t.shape[0] * t.shape[1], t.shape[2], t.shape[3])


def quantized_kv_bytes(spec, tokens: int, batch: int, elem_bytes: int) -> int:
    """Planner rule of ``QuantizedKVCacheLayer`` for a resolved spec with ``kv_quant`` set."""
    rows = batch * spec.n_kv_heads
    return sum(stream_bytes(mode, rows, spec.head_dim, tokens, spec.kv_quant, spec.kv_quant_group,
                            spec.kv_quant_residual, elem_bytes) for mode in ("channel", "token"))
