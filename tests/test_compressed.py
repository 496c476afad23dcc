"""DeepSeek V4 layers (CSA, HCA, V4 sliding) and mHC through the standard matrix, plus parity with
transformers' deepseek_v4 modules, decode sparsity and planner checks."""

from __future__ import annotations

import pytest
import torch
from helpers import build, decode_stepwise
from matrix import *  # noqa: F401,F403

import kvlab


def _model(layers, **extra):
    return {"vocab_size": 97, "d_model": 32, "n_layers": len(layers), "mlp_hidden": 48, "layers": layers, **extra}


_V4 = {"n_heads": 4, "head_dim": 16, "q_lora_rank": 24, "o_groups": 2, "o_lora_rank": 12, "window": 6,
       "rope": {"theta": 10000.0, "partial": 0.5, "interleaved": True}}
CSA = {"type": "csa", **_V4, "compress_rate": 4, "index_n_heads": 3, "index_head_dim": 12, "index_topk": 3}
HCA = {"type": "hca", **_V4, "compress_rate": 8}
SWA = {"type": "v4_sliding", **_V4}

CASES = {
    "csa_hca": {**_model([CSA, HCA]), "_seq": 30},
    "v4_mixed": {**_model([SWA, HCA, CSA, {"type": "full", "n_heads": 2}]), "_seq": 27},
}


# ---- parity with transformers' deepseek_v4 --------------------------------------------------------
HF_TYPES = {"csa": "compressed_sparse_attention", "hca": "heavily_compressed_attention",
            "v4_sliding": "sliding_attention"}


def _hf_config(layer_type: str, **extra):
    from transformers import DeepseekV4Config

    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=16, q_lora_rank=24, partial_rotary_factor=0.5, sliding_window=6, o_groups=2,
                  o_lora_rank=12, index_n_heads=8, index_head_dim=12, index_topk=5, rope_theta=10000.0,
                  compress_rope_theta=160000.0, layer_types=[HF_TYPES[layer_type]], mlp_layer_types=["moe"],
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, hc_mult=2,
                  hc_sinkhorn_iters=20, attn_implementation="eager")
    fields.update(extra)
    return DeepseekV4Config(**fields)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)


def _sliding_mask(start: int, seq: int, kv_len: int, window: int) -> torch.Tensor:
    q = torch.arange(start, start + seq)[:, None]
    k = torch.arange(start + seq - kv_len, start + seq)[None, :]
    allowed = (k <= q) & (k > q - window)
    return torch.zeros(1, 1, seq, kv_len).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("kind", ["csa", "hca", "v4_sliding"])
@torch.no_grad()
def test_attention_module_matches_transformers(kind):
    pytest.importorskip("transformers")
    from transformers.cache_utils import DynamicCache
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

    from kvlab.attention._common import ForwardContext
    from kvlab.hf.deepseek_v4 import deepseek_v4_config

    hf_cfg = _hf_config(kind)
    ref = DeepseekV4Attention(hf_cfg, 0).eval()
    _randomize(ref)
    rotary = DeepseekV4RotaryEmbedding(hf_cfg)
    config = deepseek_v4_config(hf_cfg.to_dict())
    module = kvlab.registry.get_technique(kind).module_cls(config.layer(0), config, 0).eval()
    module.load_state_dict(ref.state_dict(), strict=True)

    def hf_step(x, start, cache):
        pos = torch.arange(start, start + x.shape[1])[None]
        emb = {t: rotary(x, pos, layer_type=t) for t in ("main", "compress")}
        kv_len = x.shape[1] + (min(start, hf_cfg.sliding_window - 1) if cache is not None else 0)
        mask = _sliding_mask(start, x.shape[1], kv_len, hf_cfg.sliding_window)
        return ref(x, emb, pos, mask, past_key_values=cache)[0]

    total, prefill = 21 + 32, 21
    x = torch.randn(1, total, 32, generator=torch.Generator().manual_seed(3))
    expected = hf_step(x, 0, None)
    got = module(x, ForwardContext(1, total, 0, None, x.device), None)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    hf_cache = DynamicCache(config=hf_cfg)
    cache = module.new_cache_layer(1, torch.float32, x.device, [])
    ref_steps, steps, start = [], [], 0
    for size in [prefill] + [1] * (total - prefill):
        chunk = x[:, start:start + size]
        ref_steps.append(hf_step(chunk, start, hf_cache))
        steps.append(module(chunk, ForwardContext(1, size, start, None, x.device), cache))
        start += size
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(ref_steps, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=1e-4)
