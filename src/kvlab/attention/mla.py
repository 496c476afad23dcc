"""Multi-head latent attention (MLA, DeepSeek V2/V3) with absorbed decoding.

Keys and values come from a shared latent ``c = RMSNorm(W_DKV x)`` of rank ``r`` (``kv_lora_rank``) plus a
decoupled RoPE key ``k_R`` of ``d_R`` dims (``qk_rope_head_dim``) shared by all heads. Per head ``h``:
``k_h = [W_UK_h c ; k_R]``, ``v_h = W_UV_h c`` (``kv_b_proj`` holds ``[W_UK_h ; W_UV_h]`` per head).
Queries: ``W_Q x`` or, with ``q_lora_rank``, ``W_UQ RMSNorm(W_DQ x)``; per head ``[q_nope ; q_rope]``.

Cache: ``[c ; k_R]`` per token, ``[B, 1, T, r + d_R]``: (r + d_R) * T * dtype bytes per row, nothing else.
A layer with ``kv_from`` reads an earlier MLA layer's latent (same rank and RoPE dims) with its own query
and up-projections, and caches nothing.

Two execution paths that agree (to fp32 rounding):
- expanded (long prefill, training): ``kv_b_proj`` expands the latent into per-head K/V, then SDPA;
- absorbed (decode, short chunks): ``q_h . k_h = (W_UK_h^T q_nope_h) . c + q_rope_h . k_R``, so scores
  are one product of ``[W_UK^T q_nope ; q_rope]`` with the cached ``[c ; k_R]``, and the output is
  ``W_UV_h (sum_t p_t c_t)``. The cache is read once, as is; per-head K/V are never formed.
The path is chosen by cost: absorbed iff ``S * (2r - d_nope - d_v) < r * (d_nope + d_v)`` (expanding
costs ``r (d_nope + d_v)`` per key and head, absorbing ``2r + d_R`` instead of ``d_nope + d_R + d_v`` per
query, key and head).

Softmax scale: ``(d_nope + d_R)^-0.5``, times ``mscale(factor, mscale_all_dim)^2`` under YaRN RoPE scaling
with ``mscale_all_dim`` set (DeepSeek's correction; the RoPE attention factor scales cos/sin separately).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvlab.attention._common import ForwardContext, decode_attention, decode_kernel_applies, grouped_sdpa
from kvlab.attention.full import causal_mask
from kvlab.cache.base import CacheLayer, GrowingBuffer
from kvlab.cache.quantized import QuantizedStream, stream_bytes
from kvlab.config import LayerSpec, _check_positive
from kvlab.errors import ConfigError
from kvlab.norms import RMSNorm
from kvlab.registry import register_module, register_spec
from kvlab.rope import Rotary, _yarn_mscale, scaling_type
from kvlab.sharing import shared_cache_layer

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


@register_spec("mla", aliases=("latent",))
@dataclass(kw_only=True)
class MLASpec(LayerSpec):
    """Latent KV of rank ``kv_lora_rank`` + a shared RoPE key; ``head_dim`` is the q/k head size
    ``qk_nope_head_dim + qk_rope_head_dim`` (filled in), ``n_kv_heads`` is 1 (one shared latent)."""

    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    q_lora_rank: int | None = None  # None: full-rank query projection
    path: str = "auto"  # "auto" (by cost), "absorbed" or "expanded": the execution path (same result)

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset({"kv_from", "kv_quant", "qkv_bias", "o_bias"})
    WIDTH_FIELDS: ClassVar[tuple[str, ...]] = ("head_dim", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                                               "qk_nope_head_dim", "v_head_dim")
    EXAMPLES: ClassVar[dict[str, dict]] = {
        "q_lora_paths_shared_latent": {"layers": [
            {"type": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
             "v_head_dim": 8, "q_lora_rank": 12},
            {"type": "mla", "n_heads": 2, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
             "v_head_dim": 12, "path": "expanded"},
            {"type": "mla", "n_heads": 2, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
             "v_head_dim": 8, "kv_from": 1, "path": "absorbed"}]},
    }

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.qk_nope_head_dim, int) and isinstance(self.qk_rope_head_dim, int):
            self.head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.n_kv_heads is None:
            self.n_kv_heads = 1

    @property
    def latent_width(self) -> int:
        """Values cached per token: latent + RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def validate(self, where: str) -> None:
        super().validate(where)
        _check_positive(where, kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim,
                        qk_nope_head_dim=self.qk_nope_head_dim, v_head_dim=self.v_head_dim,
                        q_lora_rank=self.q_lora_rank)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{where}qk_rope_head_dim: must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ConfigError(f"{where}head_dim: MLA's q/k head size is qk_nope_head_dim + qk_rope_head_dim "
                              f"({self.qk_nope_head_dim + self.qk_rope_head_dim}); got {self.head_dim}")
        if self.n_kv_heads != 1:
            raise ConfigError(f"{where}n_kv_heads: MLA caches one latent shared by all heads; omit it or use 1")
        if self.kv_from is not None and self.kv_quant:
            raise ConfigError(f"{where}kv_quant: this layer reads layer {self.kv_from}'s latent; set kv_quant there")
        if self.path not in ("auto", "absorbed", "expanded"):
            raise ConfigError(f"{where}path: must be 'auto', 'absorbed' or 'expanded', got {self.path!r}")
        if self.kv_quant == "int4" and self.latent_width % 2:
            raise ConfigError(f"{where}kv_quant: int4 packs two codes per byte; kv_lora_rank + "
                              f"qk_rope_head_dim ({self.latent_width}) must be even")

    # ---- planner --------------------------------------------------------------------------
    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        if self.kv_quant:
            return stream_bytes("channel", batch, self.latent_width, tokens, self.kv_quant, self.kv_quant_group,
                                self.kv_quant_residual, elem_bytes)
        return batch * self.latent_width * tokens * elem_bytes

    def mha_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        """MHA with this layer's heads and head size (``qk_nope_head_dim`` keys, ``v_head_dim`` values,
        DeepSeek's comparison: 128 x (128 + 128) = 32,768 values per token for V3)."""
        return batch * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim) * tokens * elem_bytes

    def decode_flops(self, context: int) -> int:
        """Absorbed decode: scores over ``r + d_R`` dims and a weighted sum over ``r`` dims, per head."""
        new_pairs = self.attended_pairs(context) - self.attended_pairs(context - 1)
        return 2 * self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim) * new_pairs

    def prefill_flops(self, seq_len: int) -> int:
        """Expanded prefill: per-head ``d_nope + d_R`` key dims and ``d_v`` value dims."""
        per_pair = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        return 2 * self.n_heads * per_pair * self.attended_pairs(seq_len)

    def label(self) -> str:
        return f"MLA-{self.kv_lora_rank}+{self.qk_rope_head_dim}" + (f"-{self.kv_quant}" if self.kv_quant else "")


def mla_softmax_scale(spec: MLASpec) -> float:
    """``(d_nope + d_R)^-0.5``, with DeepSeek's YaRN correction ``mscale(factor, mscale_all_dim)^2``."""
    if spec.softmax_scale is not None:
        return spec.softmax_scale
    scale = float(spec.head_dim) ** -0.5
    scaling = (spec.rope.scaling if spec.rope is not None else None) or {}
    if scaling_type(spec.rope) != "default" and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor")
        if factor is None:  # as YaRN: max_position / original stands in for a missing factor
            factor = spec.rope.max_position / scaling["original_max_position_embeddings"]
        mscale = _yarn_mscale(float(factor), float(scaling["mscale_all_dim"]))
        scale *= mscale * mscale
    return scale


class LatentCacheLayer(CacheLayer):
    """``[c ; k_R]`` of every past token, ``[B, 1, T, r + d_R]``; optionally quantized per channel."""

    def __init__(self, batch: int, width: int, dtype: torch.dtype, device=None, spec: MLASpec | None = None):
        super().__init__()
        self.stream = None
        if spec is not None and spec.kv_quant:
            self.stream = QuantizedStream(self, "latent", batch, 1, width, "channel", spec.kv_quant,
                                          spec.kv_quant_group, spec.kv_quant_residual, dtype, device)
        else:
            self.buffers["latent"] = GrowingBuffer((batch, 1, 0, width), 2, dtype, device)

    def append(self, ckv: torch.Tensor) -> torch.Tensor:
        """Store ``ckv [B, 1, S, r + d_R]``; return everything held, ``[B, 1, T, r + d_R]``."""
        self.length += ckv.shape[2]
        return self.stream.append(ckv) if self.stream is not None else self.buffers["latent"].append(ckv)

    def reserve(self, total: int) -> None:
        if self.stream is not None:
            self.stream.reserve(total)
        else:
            super().reserve(total)


@register_module("mla")
class MultiHeadLatentAttention(nn.Module):
    """MLA; parameter names follow Hugging Face's DeepseekV3Attention so checkpoints map one to one.
    The execution path is the spec's ``path`` ("auto": by cost; tests and benchmarks force one)."""

    def __init__(self, spec: MLASpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        d, h = cfg.d_model, spec.n_heads
        self.n_heads, self.rank, self.d_rope = h, spec.kv_lora_rank, spec.qk_rope_head_dim
        self.d_nope, self.d_v = spec.qk_nope_head_dim, spec.v_head_dim
        qk = self.d_nope + self.d_rope
        if spec.q_lora_rank:
            self.q_a_proj = nn.Linear(d, spec.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        self.owns_kv = spec.kv_from is None
        if self.owns_kv:
            self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.d_rope, bias=spec.qkv_bias)
            self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        else:  # reads the producer's latent: its rank and RoPE key must match
            producer = cfg.layer(spec.kv_from)
            if (producer.kv_lora_rank, producer.qk_rope_head_dim) != (self.rank, self.d_rope):
                raise ConfigError(f"layers[{layer_idx}].kv_from: layer {spec.kv_from} caches a latent of "
                                  f"{producer.kv_lora_rank} + {producer.qk_rope_head_dim}, this layer expects "
                                  f"{self.rank} + {self.d_rope}")
        self.kv_b_proj = nn.Linear(self.rank, h * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(h * self.d_v, d, bias=spec.o_bias)
        self.rotary = Rotary(spec.rope, self.d_rope)
        self.scale = mla_softmax_scale(spec)

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        return shared_cache_layer(self.spec, built) or LatentCacheLayer(batch, self.spec.latent_width, dtype, device, self.spec)

    def use_absorbed(self, seq: int) -> bool:
        if self.spec.path != "auto":
            return self.spec.path == "absorbed"
        return seq * (2 * self.rank - self.d_nope - self.d_v) < self.rank * (self.d_nope + self.d_v)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        if self.spec.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(batch, seq, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)  # [B, H, S, qk]
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        cos, sin = ctx.cos_sin(self.rotary, x.dtype)
        q_rope = self.rotary.apply(q_rope, cos, sin)
        if self.owns_kv:
            latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.d_rope], dim=-1)  # [B,S,r], [B,S,dR]
            k_rope = self.rotary.apply(k_rope.unsqueeze(1), cos, sin)  # [B, 1, S, dR]
            ckv = torch.cat([self.kv_a_layernorm(latent).unsqueeze(1), k_rope], dim=-1)  # [B, 1, S, r + dR]
            if cache is not None:
                ckv = cache.append(ckv)  # [B, 1, T, r + dR]: everything cached, as stored
            ctx.shared[self.layer_idx] = ckv
        else:
            ckv = ctx.shared[self.spec.kv_from]  # the producer's latent (cross-layer sharing)
        mask = causal_mask(ctx, ckv.shape[2], x.device)
        if self.use_absorbed(seq):
            out = self.absorbed_attention(q_nope, q_rope, ckv, mask)
        else:
            out = self.expanded_attention(q_nope, q_rope, ckv, mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.d_v))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_UK [H, d_nope, r]`` and ``W_UV [H, d_v, r]``: views of ``kv_b_proj.weight``."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.rank)
        return w[:, : self.d_nope], w[:, self.d_nope:]

    def absorbed_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ckv: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the cached ``ckv [B, 1, T, r + dR]`` as is; returns ``[B, H, S, d_v]``."""
        w_uk, w_uv = self._up_weights()
        batch, heads, seq, _ = q_nope.shape
        # per-head products as one bmm over heads (weights read in place, not broadcast over the batch)
        q_latent = torch.bmm(q_nope.transpose(0, 1).reshape(heads, batch * seq, -1), w_uk)  # [H, B*S, r]
        q_latent = q_latent.view(heads, batch, seq, -1).transpose(0, 1)  # [B, H, S, r]
        query = torch.cat([q_latent, q_rope], dim=-1)  # [B, H, S, r + dR]
        values = ckv[..., : self.rank]  # [B, 1, T, r]: the latent, read in place
        if seq > 1:  # a prefill chunk: SDPA's fused kernel over one KV head (values: the latent), no [S, T] scores
            out = grouped_sdpa(query, ckv, values, mask, causal=True, scale=self.scale)  # [B,H,S,r]
        elif decode_kernel_applies(query, ckv, values, mask):  # the one-pass kernel: H query rows, one KV row
            out = decode_attention(query, ckv, values, mask, self.scale)  # [B, H, 1, r]
        else:
            # decode: one "KV head" shared by all H query heads, the cache read in place (SDPA's math fallback
            # for unequal q/v dims would copy the scaled cache every step); heads folded into the query axis
            scores = torch.matmul((query * self.scale).view(batch, 1, heads, -1), ckv.transpose(-1, -2))  # [B,1,H,T]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))  # mask [B|1, 1, 1, T] broadcasts over heads
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(ckv.dtype)
            out = torch.matmul(probs, values).view(batch, heads, 1, self.rank)  # [B, H, 1, r]
        out = torch.bmm(out.transpose(0, 1).reshape(heads, batch * seq, -1), w_uv.transpose(1, 2))  # [H,B*S,dv]
        return out.view(heads, batch, seq, -1).transpose(0, 1)  # [B, H, S, d_v]

    def expanded_attention(self, q_nope: torch.Tensor, q_rope: torch.Tensor, ckv: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
        """Expand the latent into per-head K/V (``kv_b_proj``), then SDPA; returns ``[B, H, S, d_v]``."""
        batch, _, kv_len, _ = ckv.shape
        latent, k_rope = ckv[:, 0].split([self.rank, self.d_rope], dim=-1)  # [B, T, r], [B, T, dR]
        kv = self.kv_b_proj(latent).view(batch, kv_len, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # [B, H, T, d_nope], [B, H, T, d_v]
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
        query = torch.cat([q_nope, q_rope], dim=-1)  # [B, H, S, d_nope + dR]
        return grouped_sdpa(query, k, v, mask, causal=True, scale=self.scale)
