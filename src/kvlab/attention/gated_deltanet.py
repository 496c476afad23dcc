"""Gated DeltaNet: a linear-attention mixer with a fixed-size recurrent state (Qwen3-Next's linear layers).

Per value head the state ``S [dk, dv]`` follows the gated delta rule
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, read out as ``o_t = S_t^T q_t``
(``q, k`` L2-normalised, ``q`` scaled by ``dk^-1/2``; ``g = -exp(A_log) softplus(a + dt_bias)``,
``beta = sigmoid(b)``). q, k, v first pass a causal depthwise conv (kernel ``conv_kernel``, SiLU); the
output is a gated RMSNorm (``norm(o) * silu(z)``) and ``out_proj``.

Two forms that agree: the **chunked** form (training, prefill: within a chunk of ``C`` tokens the
state corrections ``U`` solve a unit lower-triangular system, ``(I + A) U = beta (V - exp(G) K S_0)``,
``A_tj = beta_t exp(G_t - G_j) k_t.k_j`` for ``j < t``), and the **recurrent** form (decode: one state
update per token).

Head layout: ``n_value_heads`` value heads (the config key ``n_heads``), ``n_key_heads`` query/key heads
(the config key ``n_kv_heads``, a divisor), ``head_dim`` = key head dim, ``value_head_dim``; parameter
names follow transformers' ``Qwen3NextGatedDeltaNet`` so its weights load unchanged. Left padding: padded inputs are zeroed, so they leave the (zero) state untouched.

Cache: conv state ``[B, conv_dim, conv_kernel - 1]`` (cache dtype) + recurrent state
``[B, n_heads, head_dim, value_head_dim]`` (always fp32): constant bytes from the first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.attention._common import ForwardContext
from kvlab.cache.base import CacheLayer
from kvlab.config import LayerSpec
from kvlab.config_options import check_ints
from kvlab.registry import register_module, register_spec

STATE_DTYPE = torch.float32


@register_spec("gated_deltanet", aliases=("gdn", "linear_attention", "gated_delta_net"))
@dataclass(kw_only=True)
class GatedDeltaNetSpec(LayerSpec):
    value_head_dim: int | None = None  # None -> head_dim
    conv_kernel: int = 4
    chunk: int = 64  # chunk length of the parallel form

    SUPPORTED_OPTIONS: ClassVar[frozenset[str]] = frozenset()  # no K/V cache to share or quantize
    EXAMPLES: ClassVar[dict[str, dict]] = {
        "grouped_heads_short_chunks": {"layers": [{"type": "gated_deltanet", "n_heads": 4, "n_kv_heads": 2,
                                                   "head_dim": 8, "value_head_dim": 6, "conv_kernel": 3,
                                                   "chunk": 5}], "_seq": 20},
    }

    def validate(self, where: str) -> None:
        super().validate(where)
        check_ints(where, conv_kernel=self.conv_kernel, chunk=self.chunk)

    @property
    def n_value_heads(self) -> int:
        """Value heads (each with its own recurrent state): the config's ``n_heads``."""
        return self.n_heads

    @property
    def n_key_heads(self) -> int:
        """Query/key heads, each shared by ``n_value_heads / n_key_heads`` value heads: ``n_kv_heads``."""
        return self.n_kv_heads

    @property
    def v_dim(self) -> int:
        return self.value_head_dim or self.head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.n_key_heads * self.head_dim + self.n_value_heads * self.v_dim

    def own_cache_bytes(self, tokens: int, batch: int, elem_bytes: int) -> int:
        if tokens == 0:
            return 0
        conv = batch * self.conv_dim * (self.conv_kernel - 1) * elem_bytes
        state = batch * self.n_value_heads * self.head_dim * self.v_dim * STATE_DTYPE.itemsize
        return conv + state

    def attended_pairs(self, seq_len: int) -> int:
        return 0  # no softmax attention; FLOPs below

    def decode_flops(self, context: int) -> int:
        """Matmul FLOPs of one recurrent step per head: k^T S, the rank-1 update k delta^T and S^T q, 2 dk dv
        each (the state decay's dk dv multiplies are not counted, as softmax is not for attention)."""
        return 6 * self.n_value_heads * self.head_dim * self.v_dim

    def prefill_flops(self, seq_len: int) -> int:
        return seq_len * self.decode_flops(seq_len)  # linear in length (recurrent-form count)

    def label(self) -> str:
        return f"GatedDeltaNet-{self.n_value_heads}x{self.head_dim}"

    def attention_pattern(self, seq: int):
        pattern, _ = super().attention_pattern(seq)
        return pattern, f"{self.label()}: every past token, through a fixed-size state"


class LinearStateCacheLayer(CacheLayer):
    """Conv state (last ``conv_kernel - 1`` conv inputs) and the recurrent state; fixed size."""

    def __init__(self, batch: int, conv_dim: int, kernel: int, heads: int, dk: int, dv: int,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.state["conv"] = torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device)
        self.state["ssm"] = torch.zeros(batch, heads, dk, dv, dtype=STATE_DTYPE, device=device)

    def live_tensors(self) -> list[torch.Tensor]:
        return list(self.state.values()) if self.length else []


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(q, k, v, g, beta, state):
    """Token-by-token gated delta rule. q, k ``[B, H, S, dk]``, v ``[B, H, S, dv]``, g/beta ``[B, H, S]``,
    state ``[B, H, dk, dv]`` (updated copy returned). Returns ``(out [B, H, S, dv], state)``."""
    outs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        recalled = torch.einsum("bhk,bhkv->bhv", k[:, :, t], state)
        delta = (v[:, :, t] - recalled) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] @ delta[:, :, None, :]  # rank-1 update k delta^T
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outs, dim=2), state


def delta_rule_chunked(q, k, v, g, beta, state, chunk: int):
    """Chunk-parallel gated delta rule, same arguments and result as ``delta_rule_recurrent``."""
    batch, heads, seq, dk = q.shape
    pad = (-seq) % chunk
    if pad:  # padded steps: k = v = 0, g = 0 leave the state and the real outputs unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = q.shape[2] // chunk
    q, k, v = (x.reshape(batch, heads, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(batch, heads, n, chunk) for x in (g, beta))
    cum = g.cumsum(-1)  # G_t: log decay from the chunk start to t (inclusive)
    decay = cum[..., :, None] - cum[..., None, :]  # [.., C, C]: G_t - G_j
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gamma = decay.masked_fill(~lower, float("-inf")).exp()  # exp(G_t - G_j) for j <= t, else 0
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    a = (k @ k.transpose(-1, -2)) * gamma * beta[..., :, None]
    system = eye + a.tril(-1)  # unit lower triangular
    rhs_v = v * beta[..., None]
    rhs_k = k * (beta * cum.exp())[..., None]
    solved = torch.linalg.solve_triangular(system, torch.cat([rhs_v, rhs_k], -1), upper=False, unitriangular=True)
    u_v, w = solved[..., : v.shape[-1]], solved[..., v.shape[-1]:]  # U = u_v - w @ S_0
    scores = (q @ k.transpose(-1, -2)) * gamma  # [.., C, C]
    outs = []
    for c in range(n):
        u = u_v[:, :, c] - w[:, :, c] @ state
        outs.append((q[:, :, c] * cum[:, :, c, :, None].exp()) @ state + scores[:, :, c] @ u)
        last = cum[:, :, c, -1]
        tail = (last[..., None] - cum[:, :, c]).exp()  # exp(G_C - G_j)
        state = state * last.exp()[..., None, None] + (k[:, :, c] * tail[..., None]).transpose(-1, -2) @ u
    out = torch.cat(outs, dim=2)[:, :, :seq]
    return out, state


@register_module("gated_deltanet")
class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer (parameter names as transformers' Qwen3NextGatedDeltaNet)."""

    def __init__(self, spec: GatedDeltaNetSpec, cfg, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        self.hk, self.hv, self.dk, self.dv = spec.n_key_heads, spec.n_value_heads, spec.head_dim, spec.v_dim
        group = self.hv // self.hk
        d = cfg.d_model
        self.in_proj_qkvz = nn.Linear(d, self.hk * (2 * self.dk + 2 * group * self.dv), bias=False)
        self.in_proj_ba = nn.Linear(d, 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(spec.conv_dim, spec.conv_dim, spec.conv_kernel, groups=spec.conv_dim,
                                bias=False, padding=spec.conv_kernel - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.empty(self.hv).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(self.dv, cfg.norm_eps)
        self.out_proj = nn.Linear(self.hv * self.dv, d, bias=False)

    def new_cache_layer(self, batch: int, dtype: torch.dtype, device, built) -> CacheLayer:
        s = self.spec
        return LinearStateCacheLayer(batch, s.conv_dim, s.conv_kernel, self.hv, self.dk, self.dv, dtype, device)

    def split(self, x: torch.Tensor):
        """``x [B, S, d]`` -> conv input ``[B, conv_dim, S]`` (q | k | v channels), z ``[B, S, Hv, dv]``,
        b and a ``[B, S, Hv]``. The fused projections are grouped per key head (transformers' layout)."""
        batch, seq, _ = x.shape
        group = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).view(batch, seq, self.hk, -1)
        q, k, v, z = qkvz.split([self.dk, self.dk, group * self.dv, group * self.dv], dim=-1)
        ba = self.in_proj_ba(x).view(batch, seq, self.hk, 2 * group)
        b, a = ba[..., :group].reshape(batch, seq, self.hv), ba[..., group:].reshape(batch, seq, self.hv)
        mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1).transpose(1, 2)
        return mixed, z.reshape(batch, seq, self.hv, self.dv), b, a

    def conv(self, mixed: torch.Tensor, cache: LinearStateCacheLayer | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over ``[B, C, S]``; with a cache, prefixed by its conv state."""
        seq, kernel = mixed.shape[-1], self.spec.conv_kernel
        if cache is None:
            out = F.conv1d(mixed, self.conv1d.weight, padding=kernel - 1, groups=mixed.shape[1])[..., :seq]
        else:
            full = torch.cat([cache.state["conv"], mixed], dim=-1)  # [B, C, K-1+S]
            out = F.conv1d(full, self.conv1d.weight, groups=mixed.shape[1])
            cache.state["conv"].copy_(full[..., full.shape[-1] - (kernel - 1):])
        return F.silu(out)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache: CacheLayer | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        if ctx.pad_offset is not None:  # zeroed padding leaves the zero state untouched
            real = ctx.query_steps[None, :] >= ctx.pad_offset[:, None]  # [B, S]
            x = x * real[..., None].to(x.dtype)
        mixed, z, b, a = self.split(x)
        mixed = self.conv(mixed, cache).transpose(1, 2)  # [B, S, conv_dim]
        kd = self.hk * self.dk
        q, k, v = mixed.split([kd, kd, self.hv * self.dv], dim=-1)
        group = self.hv // self.hk
        q, k = (t.reshape(batch, seq, self.hk, self.dk).repeat_interleave(group, 2) for t in (q, k))
        q = l2_normalize(q.float()).transpose(1, 2) * self.dk ** -0.5  # [B, Hv, S, dk]
        k = l2_normalize(k.float()).transpose(1, 2)
        v = v.reshape(batch, seq, self.hv, self.dv).float().transpose(1, 2)
        beta = b.float().sigmoid().transpose(1, 2)  # [B, Hv, S]
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)).transpose(1, 2)
        state = cache.state["ssm"] if cache is not None else q.new_zeros(batch, self.hv, self.dk, self.dv)
        if seq == 1:
            out, state = delta_rule_recurrent(q, k, v, g, beta, state)
        else:
            out, state = delta_rule_chunked(q, k, v, g, beta, state, self.spec.chunk)
        if cache is not None:
            cache.state["ssm"].copy_(state)
            cache.length += seq
        out = self.norm(out.transpose(1, 2).to(x.dtype), z)  # [B, S, Hv, dv]
        return self.out_proj(out.reshape(batch, seq, self.hv * self.dv))


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim (fp32), times ``silu(gate)``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
        return ((self.weight * h.to(x.dtype)) * F.silu(gate.float())).to(x.dtype)
