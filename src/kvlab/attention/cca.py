"""ZAYA1's compressed convolutional attention (CCA), as transformers' ``zaya`` implements it.

Per token: q = W_q x (H heads), k = W_k x (n_kv heads), values from two half-width projections, the
current token's (``v_proj_current``) and the previous token's (``v_proj_delayed``), concatenated, so with
n_kv = 2 the first value head is "current" and the second "delayed". q|k channels (C = (H + n_kv) * d) are
mixed over time by a causal depthwise conv (kernel ``conv_depthwise``) then a grouped conv (kernel
``conv_grouped``, one group per head: full channel mixing within a head), both with bias. Residual paths:
q_res = (q + k of its group) / 2, k_res = mean of q_res over the group. q and k are L2-normalised to norm
sqrt(d), k is scaled by a learned per-KV-head temperature, RoPE (usually partial) follows, then GQA.

Cache: K and V ``[B, n_kv, T, d]`` (post conv/norm/RoPE), the raw q|k projections of the last
``(conv_depthwise - 1) + (conv_grouped - 1)`` tokens ``[B, C, K]`` and the previous token's delayed value
projection ``[B, n_kv * d / 2]``.
With ``window`` W (ZAYA's "hybrid_sliding" layers) K/V live in the sliding technique's ring of W slots.
Planner: 2*B*n_kv*d*T'*b + B*C*K*b + B*(n_kv*d/2)*b with T' = T or min(T, W - 1) (the fixed states are
allocated with the cache).
Left padding: padded steps' projections are zeroed, which is exactly the zero history of an unpadded row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kvlab.attention._common import ForwardContext, attend_in_blocks, grouped_sdpa
from kvlab.attention._gate import apply_output_gate, output_gate_proj
from kvlab.attention.full import KVCacheLayer, causal_keys_values
from kvlab.attention.sliding import WindowKVCacheLayer, window_keys_values
from kvlab.cache.base import CacheLayer
from kvlab.config import ConfigError, LayerSpec, _check_positive
from kvlab.registry import register_module, register_spec
from kvlab.rope import Rotary


@register_spec("cca", aliases=("compressed_convolutional",))
@dataclass(kw_only=True)
class CCASpec(LayerSpec):
    """ZAYA1 CCA: causal conv over q|k, current/delayed value halves, L2 q/k norm with key temperature."""

    conv_depthwise: int = 2  # kernel of the depthwise conv over time (ZAYA's cca_time0)
    conv_grouped: int = 2  # kernel of the per-head grouped conv over time (cca_time1)
    window: int | None = None  # ZAYA's "hybrid_sliding": a query sees the last `window` steps (itself included)

    # kv_from: its conv state is per layer; kv_quant: not implemented; qk_norm: always L2 (+ temperature)
    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset({"output_gate", "qkv_bias", "o_bias"})
    EXAMPLES: ClassVar[dict[str, dict]] = {
        "gqa_gate_conv3": {"layers": [{"type": "cca", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                                       "conv_depthwise": 3, "conv_grouped": 2, "output_gate": "head",
                                       "qkv_bias": True},
                                      {"type": "cca", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                                       "window": 5, "rope": {"theta": 1e4, "partial": 0.5}}], "_seq": 20},
    }

    @property
    def conv_context(self) -> int:
        """Past tokens the two convolutions read: the length of the cached conv state."""
        return (self.conv_depthwise - 1) + (self.conv_grouped - 1)

    def validate(self, where: str) -> None:
        super().validate(where)
        _check_positive(where, conv_depthwise=self.conv_depthwise, conv_grouped=self.conv_grouped,
                        window=self.window)
        kv, hd = self.n_kv_heads or self.n_heads, self.head_dim
        if hd is not None and (kv * hd) % 2:
            raise ConfigError(f"{where}head_dim: n_kv_heads * head_dim ({kv * hd}) must be even "
                              "(values are half current, half delayed)")

    def state_elements(self) -> int:
        """Elements of the fixed per-row state: conv history plus the delayed value projection."""
        channels = (self.n_heads + self.n_kv_heads) * self.head_dim
        return channels * self.conv_context + self.n_kv_heads * self.head_dim // 2

    def cached_tokens(self, tokens: int) -> int:
        """K/V tokens held after ``tokens`` steps: all, or the last ``window`` (the sliding ring)."""
        return tokens if self.window is None else min(tokens, self.window)

    def attended_pairs(self, seq_len: int) -> int:
        if self.window is None or seq_len <= self.window:
            return super().attended_pairs(seq_len)
        return super().attended_pairs(self.window) + (seq_len - self.window) * self.window

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        kv = 2 * self.n_kv_heads * self.head_dim * self.cached_tokens(tokens)
        return batch * (kv + self.state_elements()) * elem_bytes

    def attention_pattern(self, seq: int):
        pattern, caption = super().attention_pattern(seq)
        if self.window is not None:
            steps = torch.arange(seq)
            pattern = pattern & (steps[None, :] > steps[:, None] - self.window)
        return pattern, caption

    def label(self) -> str:
        window = "" if self.window is None else f"-W{self.window}"
        return f"CCA-{self.n_heads}/{self.n_kv_heads}{window}"


def _add_states(layer: CacheLayer, batch: int, spec: CCASpec, dtype: torch.dtype, device) -> None:
    channels = (spec.n_heads + spec.n_kv_heads) * spec.head_dim
    layer.state["conv"] = torch.zeros(batch, channels, spec.conv_context, dtype=dtype, device=device)
    layer.state["v_delayed"] = torch.zeros(batch, spec.n_kv_heads * spec.head_dim // 2, dtype=dtype,
                                           device=device)


class CCACacheLayer(KVCacheLayer):
    """K/V of every past token plus the fixed conv and delayed-value states."""

    def __init__(self, batch: int, spec: CCASpec, dtype: torch.dtype, device=None):
        super().__init__(batch, spec.n_kv_heads, spec.head_dim, dtype, device)
        _add_states(self, batch, spec, dtype, device)


class WindowCCACacheLayer(WindowKVCacheLayer):
    """The sliding technique's ring of the last ``window`` K/V plus the fixed conv and delayed-value
    states (held, and counted, from the start like ``CCACacheLayer``'s)."""

    def __init__(self, batch: int, spec: CCASpec, dtype: torch.dtype, device=None):
        super().__init__(batch, spec.n_kv_heads, spec.head_dim, spec.window, 0, dtype, device)
        _add_states(self, batch, spec, dtype, device)

    def live_tensors(self) -> list[torch.Tensor]:
        return super().live_tensors() if self.length else list(self.state.values())


@register_module("cca")
class CCAttention(nn.Module):
    """Parameter names follow transformers' ``ZayaAttention`` (flattened: ``qkv_proj.`` and ``qk_norm.``
    dropped), so checkpoints map by prefix."""

    def __init__(self, spec: CCASpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        h, kv, hd, d = spec.n_heads, spec.n_kv_heads, spec.head_dim, cfg.d_model
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
        self.q_proj = nn.Linear(d, h * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=spec.qkv_bias)
        self.v_proj_current = nn.Linear(d, kv * hd // 2, bias=spec.qkv_bias)
        self.v_proj_delayed = nn.Linear(d, kv * hd // 2, bias=spec.qkv_bias)
        channels = (h + kv) * hd
        self.conv_qk_depthwise = nn.Conv1d(channels, channels, spec.conv_depthwise, groups=channels)
        self.conv_qk_grouped = nn.Conv1d(channels, channels, spec.conv_grouped, groups=h + kv)
        # transformers initialises temp to 0 (all keys vanish in a fresh model); 1 keeps attention alive
        self.temp = nn.Parameter(torch.ones(kv))
        self.o_proj = nn.Linear(h * hd, d, bias=spec.o_bias)
        self.g_proj = output_gate_proj(spec, d)
        self.rotary = Rotary(spec.rope, hd)
        self.scale = spec.softmax_scale

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built: list[CacheLayer]) -> CacheLayer:
        if self.spec.window is not None:
            return WindowCCACacheLayer(batch, self.spec, dtype, device)
        return CCACacheLayer(batch, self.spec, dtype, device)

    def _project(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None):
        """q ``[B, S, H, D]``, k ``[B, S, Hkv, D]`` (pre-norm) and v ``[B, S, Hkv, D]``; updates the states."""
        batch, seq, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        fresh = cache is None or cache.length == 0
        if ctx.pad_offset is not None:  # zero padded steps: a padded row then sees a zero history
            real = (ctx.query_steps[None, :] >= ctx.pad_offset[:, None]).unsqueeze(-1).to(x.dtype)  # [B,S,1]
            x = x * real
        q, k = self.q_proj(x), self.k_proj(x)  # [B, S, H*D], [B, S, Hkv*D]
        qk = torch.cat([q, k], dim=-1)
        if ctx.pad_offset is not None:
            qk = qk * real
        q_res = (q.view(batch, seq, kv, h // kv, hd) + k.view(batch, seq, kv, 1, hd)) * 0.5  # [B,S,Hkv,G,D]
        k_res = q_res.mean(dim=3)  # [B, S, Hkv, D]
        q_res = q_res.reshape(batch, seq, h, hd)
        context = self.spec.conv_context
        history = qk.new_zeros(batch, qk.shape[-1], context) if fresh else cache.state["conv"]
        qk = torch.cat([history, qk.transpose(1, 2)], dim=-1)  # [B, C, K + S]
        if cache is not None:
            cache.state["conv"].copy_(qk[..., qk.shape[-1] - context:])
        mixed = self.conv_qk_grouped(self.conv_qk_depthwise(qk)).transpose(1, 2)  # [B, S, C]
        q = mixed[..., : h * hd].reshape(batch, seq, h, hd) + q_res
        k = mixed[..., h * hd:].reshape(batch, seq, kv, hd) + k_res
        delayed = self.v_proj_delayed(x)  # [B, S, Hkv*D/2]
        if fresh:  # the token before the first one is a zero vector
            previous = self.v_proj_delayed(x.new_zeros(batch, 1, x.shape[-1]))
        else:
            previous = cache.state["v_delayed"].unsqueeze(1)
        last = delayed[:, -1]
        delayed = torch.cat([previous, delayed[:, :-1]], dim=1)  # read the state before overwriting it
        if cache is not None:
            cache.state["v_delayed"].copy_(last)
        v = torch.cat([self.v_proj_current(x), delayed], dim=-1).view(batch, seq, kv, hd)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self._project(x, ctx, cache)
        eps = torch.finfo(q.dtype).eps
        root = math.sqrt(self.head_dim)
        q = q * (root / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (root / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * self.temp[:, None]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        cos, sin = ctx.cos_sin(self.rotary, q.dtype)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        if self.spec.window is not None:  # the sliding technique's ring buffer and window mask
            k, v, mask = window_keys_values(k, v, ctx, cache, self.spec.window, 0)
        else:
            k, v, mask = causal_keys_values(k, v, ctx, cache)
        out = attend_in_blocks(lambda *qkvm: grouped_sdpa(*qkvm, causal=True, scale=self.scale), q, k, v, mask)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(apply_output_gate(self.g_proj, x, out, self.n_heads))
