"""MHA / GQA / MQA through the standard matrix, plus a check of attention against a naive version."""

import math

import torch
from helpers import build, tiny_config
from helpers import model_dict as _model
from matrix import *  # noqa: F401,F403

from kvlab.attention._common import ForwardContext

CASES = {
    "mha": _model([{"type": "full", "n_heads": 4}] * 2),
    "gqa": _model([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2),
    "mqa": _model([{"type": "full", "n_heads": 4, "n_kv_heads": 1}] * 2),
    "mixed_qknorm_bias_headdim": _model([
        {"type": "full", "n_heads": 4, "n_kv_heads": 2, "head_dim": 24, "qk_norm": True, "qkv_bias": True},
        {"type": "mqa", "n_heads": 6, "n_kv_heads": 1, "head_dim": 8, "o_bias": True},
    ], tie_embeddings=True),
}


def naive_attention(q, k, v, scale):
    """q [B,H,S,D], k/v [B,Hkv,S,D]: explicit repeat, scores, causal mask, softmax."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores.softmax(-1) @ v


@torch.no_grad()
def test_attention_layer_matches_naive_implementation():
    config = tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}])
    model = build(config)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 11, 64)
    ctx = ForwardContext(2, 11, 0, None, x.device)
    got = attn(x, ctx, None)
    q = attn.q_proj(x).view(2, 11, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 11, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(2, 11, 2, 16).transpose(1, 2)
    # rotate-half RoPE written out: pairs (i, i + 8) rotate by position * theta^(-2i/16)
    pos = torch.arange(11, dtype=torch.float32)[:, None]
    freqs = pos * 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    cos, sin = freqs.cos(), freqs.sin()

    def rope(t):
        a, b = t[..., :8], t[..., 8:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    out = naive_attention(rope(q), rope(k), v, 1 / math.sqrt(16))
    expected = attn.o_proj(out.transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mha_gqa_mqa_cache_sizes_scale_with_kv_heads():
    sizes = {}
    for kv in (4, 2, 1):
        model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": kv}]))
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        sizes[kv] = cache.nbytes
    assert sizes == {4: 2 * 4 * 16 * 10 * 4, 2: 2 * 2 * 16 * 10 * 4, 1: 2 * 1 * 16 * 10 * 4}
