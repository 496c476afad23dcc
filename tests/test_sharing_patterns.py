"""Extra cross-layer KV sharing checks (helper's version; complements tests/test_sharing.py): CLA-3 GQA,
CLA-2 on MLA, kv_sharing over the pattern shorthand, round trip, explicit windowed-producer reference,
and a hypothesis property over full/shared_full/sliding layers."""

import pytest
import torch
from helpers import build, decode_stepwise
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matrix import *  # noqa: F401,F403
from strategies import model_config
from test_sharing import _model  # the same case builder as the basic sharing tests

import kvlab
from kvlab import ModelConfig
from kvlab.errors import ConfigError
from kvlab.sharing import apply_kv_sharing, share_every, share_last

GQA = {"type": "full", "n_heads": 4, "n_kv_heads": 2}
MQA_NORM = {"type": "full", "n_heads": 4, "n_kv_heads": 1, "qk_norm": True}
MLA = {"type": "mla", "n_heads": 2, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
       "v_head_dim": 8}
SW = {"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "window": 6}

CASES = {
    "cla3_gqa": _model([GQA] * 4, {"every": 3}),
    "cla2_mla": _model([MLA] * 3, {"every": 2}),
    "last2_full_mix": _model([MQA_NORM, GQA, GQA, GQA], {"last": 2}),  # both consumers read layer 1
    "cla2_pattern_sliding": _model({"pattern": [SW, SW, GQA, GQA]}, {"every": 2}, n_layers=4),
}


def test_share_every_follows_an_existing_consumer_to_its_producer():
    layers = [dict(GQA), dict(GQA), dict(GQA, kv_from=0), dict(GQA)]
    assert [x.get("kv_from") for x in share_every(layers, 2)] == [None, 0, 0, 0]


def test_share_last_matches_gemma4_rule_on_a_gemma_layout():
    s, f = {"type": "sliding_attention", "n_heads": 2, "window": 4}, {"type": "full_attention", "n_heads": 2}
    out = share_last([s, s, s, s, f, s, s, s, s, f], 4)  # aliases count as the same type
    assert [x.get("kv_from") for x in out] == [None] * 6 + [5, 5, 5, 4]


def test_share_last_skips_consumers_when_choosing_the_producer():
    layers = [dict(GQA), dict(GQA), dict(GQA, kv_from=0), dict(GQA)]
    assert [x.get("kv_from") for x in share_last(layers, 1)] == [None, None, 0, 1]


@pytest.mark.parametrize("sharing, message", [
    ({"every": 0}, "kv_sharing.every: must be a positive integer"),
    ({"last": 4}, "kv_sharing.last: 4 consumer layers leave no producer"),
    ({"first": 1}, "kv_sharing: expected"),
    ("every", "kv_sharing: expected"),
])
def test_kv_sharing_errors_name_the_field(sharing, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({k: v for k, v in _model([GQA] * 4, sharing).items() if k != "_seq"})


def test_share_last_needs_a_producer_of_the_same_type():
    with pytest.raises(ConfigError, match=r"kv_sharing.last: layer 2 \('mla'\) has no earlier 'mla' layer"):
        apply_kv_sharing({"last": 1}, [dict(GQA), dict(GQA), dict(MLA)])


def test_kv_sharing_expands_to_explicit_kv_from_and_round_trips():
    config = ModelConfig.from_dict({k: v for k, v in CASES["cla3_gqa"].items() if k != "_seq"})
    assert [s.kv_from for s in config.layers] == [None, 0, 0, None]
    assert "kv_sharing" not in config.to_dict()
    assert [s.kv_from for s in ModelConfig.from_dict(config.to_dict()).layers] == [None, 0, 0, None]


def test_cla2_halves_the_planned_cache():
    plain = ModelConfig.from_dict({k: v for k, v in _model([GQA] * 4).items() if k != "_seq"})
    shared = ModelConfig.from_dict({k: v for k, v in _model([GQA] * 4, {"every": 2}).items() if k != "_seq"})
    assert 2 * kvlab.plan(shared, context=100).total_bytes == kvlab.plan(plain, context=100).total_bytes


@torch.no_grad()
def test_consumer_of_windowed_producer_matches_explicit_window_reference():
    window, seq = 4, 14
    model = build({"vocab_size": 61, "d_model": 32, "n_layers": 2, "mlp_hidden": 48,
                   "layers": [dict(SW, window=window), dict(GQA, kv_from=0)]})
    attn = model.layers[1].self_attn
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["ctx"], seen["out"] = args[0], args[1], output

    handle = attn.register_forward_hook(hook)
    model(torch.randint(0, 61, (2, seq), generator=torch.Generator().manual_seed(3)))
    handle.remove()
    x, ctx = seen["x"], seen["ctx"]
    k, v = ctx.shared[0][:2]  # the producer's rotated keys and values, [B, Hkv, S, D]
    q = attn.project(x, ctx)[0]  # [B, H, S, D]
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]

    def reference(mask):
        out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return attn.o_proj(out.transpose(1, 2).reshape(2, seq, -1))

    torch.testing.assert_close(seen["out"], reference((j <= i) & (j > i - window)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["out"], reference(j <= i), atol=1e-3)  # the window does matter


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=model_config(techniques=["full", "shared", "sliding"]),
       prefill=st.integers(1, 16), decode=st.integers(1, 6))
@torch.no_grad()
def test_random_shared_configs_decode_like_full_forward_with_planned_bytes(config, prefill, decode):
    model = build(config)
    ids = torch.randint(0, config["vocab_size"], (2, prefill + decode), generator=torch.Generator().manual_seed(0))
    inc, cache = decode_stepwise(model, ids, [prefill])
    torch.testing.assert_close(inc, model(ids), atol=2e-4, rtol=1e-4)
    planned = kvlab.plan(model.config, context=prefill + decode, batch=2)
    assert [layer.cache_bytes for layer in planned.layers] == cache.layer_nbytes()
