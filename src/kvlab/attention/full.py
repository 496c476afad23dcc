"""Full causal attention with any number of KV heads: MHA, GQA, MQA.

Cache: K and V ``[B, n_kv_heads, T, head_dim]`` (keys stored after RoPE), grown by chunks, or with
``kv_quant`` KIVI-quantized (``kvlab.cache.quantized``: the storage and its exact byte rule).
Planner: 2 * B * n_kv_heads * head_dim * T * bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvlab.attention._common import ForwardContext, attend_in_blocks, grouped_sdpa
from kvlab.attention._gate import apply_output_gate, output_gate_proj
from kvlab.cache.base import CacheLayer, GrowingBuffer
from kvlab.cache.quantized import QuantizedKVCacheLayer, quantized_kv_bytes
from kvlab.config import LayerSpec
from kvlab.config_options import BASE_OPTIONS
from kvlab.kernels import FLOAT
from kvlab.linear_layout import group_forward
from kvlab.norms import RMSNorm
from kvlab.registry import register_module, register_spec
from kvlab.rope import Rotary
from kvlab.sharing import shared_cache_layer


@register_spec("full", aliases=("mha", "gqa", "mqa", "attention", "full_attention"))
@dataclass(kw_only=True)
class FullSpec(LayerSpec):
    """Standard softmax attention over every past token."""

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset(BASE_OPTIONS)
    EXAMPLES: ClassVar[dict[str, dict]] = {  # quantized caches are lossy: test_kv_quant.py bounds them
        "gqa_qk_norm_bias": {"layers": [
            {"type": "full", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True, "qkv_bias": True},
            {"type": "full", "n_heads": 4, "n_kv_heads": 1}]},
        "gate_k_eq_v_kv_shared": {"layers": [
            {"type": "full", "n_heads": 4, "n_kv_heads": 2, "output_gate": "head"},
            {"type": "full", "n_heads": 4, "n_kv_heads": 2, "v_norm": True, "k_eq_v": True},
            {"type": "full", "n_heads": 2, "n_kv_heads": 2, "head_dim": 8, "kv_from": 1}]},
    }

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        if self.kv_quant:  # codes + scales + zero points + full-precision residual
            return quantized_kv_bytes(self, tokens, batch, elem_bytes)
        return 2 * batch * self.n_kv_heads * self.head_dim * tokens * elem_bytes

    def label(self) -> str:
        kv = self.n_kv_heads or self.n_heads
        return "MHA" if kv == self.n_heads else ("MQA" if kv == 1 else f"GQA-{self.n_heads // kv}")

    def grouped_label(self, base: str) -> str:
        """``base`` followed by the GQA/MQA label when the layer has fewer KV heads than query heads."""
        kv = self.n_kv_heads or self.n_heads
        return base if kv == self.n_heads else f"{base} {FullSpec.label(self)}"

    def accepts_kv_from(self, producer: LayerSpec) -> bool:
        """Full and sliding layers may read each other's K/V (a consumer sees the producer's keys and mask)."""
        return isinstance(producer, FullSpec)


class KVCacheLayer(CacheLayer):
    """Keys and values of every past token, ``[B, n_kv_heads, T, head_dim]`` each."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.buffers["k"] = GrowingBuffer((batch, kv_heads, 0, head_dim), 2, dtype, device)
        self.buffers["v"] = GrowingBuffer((batch, kv_heads, 0, head_dim), 2, dtype, device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``k, v [B, Hkv, S, D]``; return views of all keys and values held."""
        self.length += k.shape[2]
        return self.buffers["k"].append(k), self.buffers["v"].append(v)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffers["k"].view(), self.buffers["v"].view()

    @property
    def dtype(self) -> torch.dtype:
        return self.buffers["k"].dtype

    def claim_slot(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for one more token, counted as held: the K and V buffers ``[B, Hkv, capacity, D]`` and the
        slot the caller must write (``FullAttention.decode_step`` does, in its kernel)."""
        self.length += 1
        (k, slot), (v, _) = self.buffers["k"].claim(1), self.buffers["v"].claim(1)
        return k, v, slot


def causal_mask(ctx: ForwardContext, kv_len: int, device) -> torch.Tensor | None:
    """Mask of the new queries over keys at steps ``0 .. kv_len - 1`` (None: plain causal SDPA is exact)."""
    if not ctx.needs_mask(kv_len):
        return None
    return ctx.mask(torch.arange(kv_len, device=device), memo_key=("full", kv_len))


def causal_keys_values(k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: KVCacheLayer | None):
    """Every key so far: new ``k, v [B, Hkv, S, D]`` appended to ``cache`` (if any); returns all keys and
    values ``[B, Hkv, T, D]`` and their mask."""
    if cache is not None:
        k, v = cache.append(k, v)  # views of all T keys/values
    return k, v, causal_mask(ctx, k.shape[2], k.device)


@register_module("full")
class FullAttention(nn.Module):
    """q/k/v projections (optional bias, optional per-head q/k RMSNorm), RoPE, grouped SDPA, o_proj.
    A layer with ``kv_from`` has no k/v projections: it reads the producer's keys and values."""

    QKV = ("q_proj", "k_proj", "v_proj")
    DECODE_GROUPS = (QKV, ("o_proj",))  # decode weight layout: q/k/v as one matmul (linear_layout.py)

    def __init__(self, spec: FullSpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.owns_kv = spec.kv_from is None
        d, h, hd = cfg.d_model, spec.n_heads, spec.head_dim
        self.q_proj = nn.Linear(d, h * hd, bias=spec.qkv_bias)
        if self.owns_kv:
            self.k_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
            if not spec.k_eq_v:  # k_eq_v: values are the raw key projection
                self.v_proj = nn.Linear(d, spec.n_kv_heads * hd, bias=spec.qkv_bias)
            if spec.v_norm:
                self.v_norm = RMSNorm(hd, cfg.norm_eps, scale=False)
        self.o_proj = nn.Linear(h * hd, d, bias=spec.o_bias)
        self.g_proj = output_gate_proj(spec, d)
        if spec.qk_norm:
            unit = cfg.norm_unit_offset
            self.q_norm = RMSNorm(hd, cfg.norm_eps, unit_offset=unit)
            if self.owns_kv:
                self.k_norm = RMSNorm(hd, cfg.norm_eps, unit_offset=unit)
        self.rotary = Rotary(spec.rope, hd)
        self.scale = spec.softmax_scale
        # a kv_from consumer reads this layer's keys and values as tensors: then decode cannot read codes
        self.has_consumers = any(cfg.layer(j).kv_from == layer_idx for j in range(cfg.n_layers))
        # decode_step applies: nothing between the projections and attention differs from the plain path
        plain = all(getattr(type(self), name) is getattr(FullAttention, name)
                    for name in ("project", "keys_values", "attend"))
        self.fused_decode = (plain and self.owns_kv and not spec.k_eq_v and not spec.qk_norm and not spec.v_norm
                             and self.rotary.rot_dim == hd and not self.rotary.interleaved)

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        shared = shared_cache_layer(self.spec, built)
        if shared is not None:
            return shared
        if self.spec.kv_quant:
            return QuantizedKVCacheLayer(batch, self.n_kv_heads, self.head_dim, dtype, device,
                                         quant=self.spec.kv_quant, group=self.spec.kv_quant_group,
                                         residual=self.spec.kv_quant_residual)
        return KVCacheLayer(batch, self.n_kv_heads, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        out = self.decode_step(x, ctx, cache) if seq == 1 and self.fused_decode else None
        if out is not None:
            return group_forward(self, ("o_proj",), apply_output_gate(self.g_proj, x, out, self.n_heads))[0]
        q, k, v = self.project(x, ctx)
        if seq == 1 and isinstance(cache, QuantizedKVCacheLayer) and not self.has_consumers:
            out = self.attend_codes(q, k, v, ctx, cache)
        else:
            if self.owns_kv:
                k, v, mask = self.keys_values(k, v, ctx, cache)
                ctx.shared[self.layer_idx] = (k, v, mask)  # consumers attend to the same keys, same mask
            else:
                k, v, mask = ctx.shared[self.spec.kv_from]
            # [B, H, S, Dv]; a windowed producer's mask may be a Band: then block by block
            out = attend_in_blocks(lambda *qkvm: self.attend(*qkvm, ctx), q, k, v, mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return group_forward(self, ("o_proj",), apply_output_gate(self.g_proj, x, out, self.n_heads))[0]

    def decode_step(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None) -> torch.Tensor | None:
        """One token per row, ``x [B, 1, d]``, through ``FLOAT``'s ``decode_step`` (``float_attention.cpp``):
        RoPE, the cache write and attention in one call, ``[B, 1, H*D]``. None where it does not apply (then
        the general path below, its reference, runs): a plain float32 CPU cache, no mask needed (no padding),
        nothing to differentiate, no ``torch.compile`` trace."""
        if (type(cache) is not KVCacheLayer or cache.dtype != torch.float32 or x.dtype != torch.float32
                or torch.is_grad_enabled() or torch.compiler.is_compiling() or ctx.needs_mask(cache.length + 1)
                or not FLOAT.usable(x)):
            return None
        batch = x.shape[0]
        q, k, v = group_forward(self, self.QKV, x)  # [B, 1, H*D], [B, 1, Hkv*D] x 2: views of one output
        cos, sin = ctx.cos_sin(self.rotary, x.dtype)  # [B|1, 1, 1, D]
        k_buf, v_buf, slot = cache.claim_slot()  # [B, Hkv, capacity, D] each
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        out = FLOAT.module().decode_step(q.view(batch, -1), k.view(batch, -1), v.view(batch, -1),
                                         cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1),
                                         k_buf, v_buf, slot, scale)  # [B*Hkv, G, D]
        if self.has_consumers:  # kv_from layers attend to the same keys (no mask: none is needed)
            ctx.shared[self.layer_idx] = (*cache.read(), None)
        return out.view(batch, 1, self.n_heads * self.head_dim)

    def project(self, x: torch.Tensor, ctx: ForwardContext):
        """Rotated ``q [B, H, S, D]`` and, for a producer, rotated ``k`` and ``v [B, Hkv, S, D]``."""
        batch, seq, _ = x.shape
        heads = lambda t: t.view(batch, seq, -1, self.head_dim).transpose(1, 2)  # noqa: E731  [B, S, h*D] -> [B, h, S, D]
        if self.owns_kv and not self.spec.k_eq_v:  # one GEMV for the three at decode (linear_layout.py)
            q, k, v = map(heads, group_forward(self, self.QKV, x))
        else:
            q = heads(self.q_proj(x))
            k = v = heads(self.k_proj(x)) if self.owns_kv else None  # k_eq_v: values are the raw keys
        if self.spec.qk_norm:
            q = self.q_norm(q)
        cos, sin = ctx.cos_sin(self.rotary, q.dtype)
        q = self.rotary.apply(q, cos, sin)
        if not self.owns_kv:
            return q, None, None
        if self.spec.v_norm:
            v = self.v_norm(v)
        if self.spec.qk_norm:
            k = self.k_norm(k)
        return q, self.rotary.apply(k, cos, sin), v

    def attend_codes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                     cache: QuantizedKVCacheLayer) -> torch.Tensor:
        """One decode query per row over a quantized cache, read block by block from the codes (the G query
        heads of a group folded into one axis, as ``grouped_sdpa`` does). ``q [B, H, 1, D]`` -> same."""
        batch, heads, _, dim = q.shape
        group = heads // self.n_kv_heads
        mask = causal_mask(ctx, cache.length + 1, q.device)  # [B|1, 1, 1, T] or None
        if mask is not None:
            mask = mask.expand(-1, -1, group, -1)
        scale = self.scale if self.scale is not None else dim ** -0.5
        out = cache.attend(q.reshape(batch, self.n_kv_heads, group, dim), k, v, mask, scale)
        return out.reshape(batch, heads, 1, -1)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None):
        """Keys/values the new queries attend to (cache extended in place) and their mask (None: causal)."""
        return causal_keys_values(k, v, ctx, cache)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               ctx: ForwardContext) -> torch.Tensor:
        return grouped_sdpa(q, k, v, mask, causal=True, scale=self.scale)
