"""``deltanet``: a gated DeltaNet layer (``kvlab.attention.gated_deltanet``) initialised from the layer's
projections: key head ``g`` takes the source key head ``g`` and the mean of its query heads, value head
``h`` the value of query head ``h``'s KV head, ``out_proj`` the source ``o_proj``; the conv starts as
the identity and the decay slow. Its output gate ``silu(z)`` starts closed (``z = 0``), so before
healing the layer adds nothing: softmax attention has no training-free linear-state equivalent, and a
closed gate is the init whose cost is known (that of dropping the layer's attention). The state is
constant-size: the cache no longer grows with context."""

from __future__ import annotations

import math

import torch

from kvlab.attention.gated_deltanet import GatedDeltaNetSpec
from kvlab.convert.heads import check_plain_attention
from kvlab.convert.registry import ConvertEnv, LayerWork, register_target
from kvlab.errors import UnsupportedError


@register_target("deltanet", options={"conv_kernel": 4, "decay": 0.01})
def deltanet(work: LayerWork, opts: dict, env: ConvertEnv) -> LayerWork:
    """Gated DeltaNet from q/k/v/o (expected to need healing)."""
    check_plain_attention(work, "deltanet")
    spec = work.spec.resolved(env.config)
    if spec.qkv_bias or spec.o_bias:
        raise UnsupportedError(f"layers[{work.index}]: deltanet: projections with biases are not supported")
    h, hk, dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
    group, w = h // hk, work.weights
    d = w["q_proj.weight"].shape[1]
    q = w["q_proj.weight"].view(hk, group, dim, d).mean(1)  # [Hk, D, d]
    k = w["k_proj.weight"].view(hk, dim, d)
    v = w["v_proj.weight"].view(hk, 1, dim, d).expand(hk, group, dim, d).reshape(hk, group * dim, d)
    z = torch.zeros_like(v)
    new = GatedDeltaNetSpec(n_heads=h, n_kv_heads=hk, head_dim=dim, value_head_dim=dim,
                            conv_kernel=opts["conv_kernel"], mlp_hidden=work.spec.mlp_hidden)
    conv = torch.zeros(new.conv_dim, 1, opts["conv_kernel"], dtype=q.dtype)
    conv[..., -1] = 1.0  # identity (then SiLU)
    decay = float(opts["decay"])  # per-token log-decay: g = -exp(A_log) * softplus(dt_bias) = -decay
    weights = {
        "in_proj_qkvz.weight": torch.cat([q, k, v, z], dim=1).reshape(-1, d).contiguous(),
        "in_proj_ba.weight": torch.zeros(2 * h, d, dtype=q.dtype),
        "conv1d.weight": conv,
        "dt_bias": torch.full((h,), math.log(math.expm1(decay)), dtype=q.dtype),
        "A_log": torch.zeros(h, dtype=q.dtype),
        "norm.weight": torch.ones(dim, dtype=q.dtype),
        "out_proj.weight": w["o_proj.weight"].clone(),
    }
    return LayerWork(work.index, new, weights)
