"""Gated DeltaNet: standard matrix (incl. 3 linear : 1 full hybrid), chunked == recurrent form, constant
state bytes, and parity with transformers' Qwen3NextGatedDeltaNet on the same weights."""

from functools import partial

import pytest
import torch
from helpers import build, model_dict, tiny_config
from matrix import *  # noqa: F401,F403

import kvlab
from kvlab.attention.gated_deltanet import delta_rule_chunked, delta_rule_recurrent, l2_normalize

_model = partial(model_dict, _seq=40)


GDN = {"type": "gated_deltanet", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "value_head_dim": 12,
       "chunk": 16}
FULL = {"type": "full", "n_heads": 4, "n_kv_heads": 2}
CASES = {
    "gdn": _model([GDN, {**GDN, "n_kv_heads": 4, "conv_kernel": 2, "chunk": 5}]),
    "hybrid_3_linear_1_full": _model([GDN, GDN, GDN, FULL]),
    "hybrid_linear_sliding_sparse": _model([GDN, {**FULL, "type": "sliding", "window": 6},
                                            {**FULL, "type": "block_sparse", "block": 4, "local_blocks": 2}]),
}


def test_chunked_form_equals_recurrent_form():
    torch.manual_seed(0)
    b, h, s, dk, dv = 2, 3, 45, 8, 6
    q, k = l2_normalize(torch.randn(b, h, s, dk)), l2_normalize(torch.randn(b, h, s, dk))
    v, g, beta, s0 = torch.randn(b, h, s, dv), -torch.rand(b, h, s) * 2, torch.rand(b, h, s), torch.randn(b, h, dk, dv)
    want, want_state = delta_rule_recurrent(q, k, v, g, beta, s0)
    for chunk in (1, 7, 16, 64):
        out, state = delta_rule_chunked(q, k, v, g, beta, s0, chunk)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, want_state, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_state_bytes_constant_from_first_token():
    model = build(tiny_config([GDN]))
    cache = model.new_cache(2)
    ids = torch.randint(0, 97, (2, 30))
    sizes = [cache.nbytes]
    model(ids[:, :5], cache=cache)
    sizes.append(cache.nbytes)
    for t in range(5, 30):
        model(ids[:, t:t + 1], cache=cache)
        sizes.append(cache.nbytes)
    conv_dim = 2 * 2 * 8 + 4 * 12
    assert sizes[0] == 0 and set(sizes[1:]) == {2 * conv_dim * 3 * 4 + 2 * 4 * 8 * 12 * 4}
    assert kvlab.plan(model.config, context=10**6, batch=2).total_bytes == sizes[-1]


def test_planner_flops_are_linear_in_context():
    spec = tiny_config([GDN]).layer(0)
    assert spec.decode_flops(100) == spec.decode_flops(100_000) == 6 * 4 * 8 * 12
    assert spec.prefill_flops(2000) == 2 * spec.prefill_flops(1000)


@pytest.fixture
def hf_pair():
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    torch.manual_seed(0)
    cfg = Qwen3NextConfig(hidden_size=64, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                          linear_value_head_dim=12, linear_conv_kernel_dim=4, num_hidden_layers=1,
                          layer_types=["linear_attention"], rms_norm_eps=1e-6, num_attention_heads=4,
                          num_key_value_heads=2)
    hf = Qwen3NextGatedDeltaNet(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
        hf.A_log.copy_(torch.rand(4).log())
    model = build(tiny_config([{**GDN, "chunk": 8}], norm_eps=1e-6))
    mine = model.layers[0].self_attn
    mine.load_state_dict(hf.state_dict())
    return hf, mine, model


@torch.no_grad()
def test_parity_with_transformers_chunked_and_recurrent(hf_pair):
    hf, mine, model = hf_pair
    x = torch.randn(2, 29, 64)
    want = hf(x)
    ctx = kvlab.model.ForwardContext(2, 29, 0, None, x.device)
    torch.testing.assert_close(mine(x, ctx, None), want, atol=1e-4, rtol=1e-4)  # chunked form
    cache = mine.new_cache_layer(2, torch.float32, x.device, [])
    outs = [mine(x[:, :10], kvlab.model.ForwardContext(2, 10, 0, None, x.device), cache)]
    for t in range(10, 29):  # recurrent form, one token at a time
        outs.append(mine(x[:, t:t + 1], kvlab.model.ForwardContext(2, 1, t, None, x.device), cache))
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-4, rtol=1e-4)


def test_recurrent_rule_matches_transformers_kernel():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    torch.manual_seed(1)
    b, s, h, dk, dv = 2, 13, 3, 8, 5
    q, k, v = torch.randn(b, s, h, dk), torch.randn(b, s, h, dk), torch.randn(b, s, h, dv)
    g, beta = -torch.rand(b, s, h), torch.rand(b, s, h)
    want, want_state = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None,
                                                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    qn = l2_normalize(q).transpose(1, 2) * dk ** -0.5
    args = (qn, l2_normalize(k).transpose(1, 2), v.transpose(1, 2), g.transpose(1, 2), beta.transpose(1, 2),
            torch.zeros(b, h, dk, dv))
    for out, state in (delta_rule_recurrent(*args), delta_rule_chunked(*args, chunk=4)):
        torch.testing.assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state, want_state, atol=1e-5, rtol=1e-5)
