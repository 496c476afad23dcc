"""Cross-layer KV sharing: the CLA-k and Gemma 4 patterns (kvlab.sharing), 0-byte consumers, and the
standard matrix on shared layouts (GQA/MQA, q/k norm, windows)."""

import pytest
import torch
from helpers import build, decode_stepwise, model_dict, tiny_config
from matrix import *  # noqa: F401,F403

import kvlab
from kvlab.errors import ConfigError
from kvlab.sharing import share_every, share_last

F = {"type": "full", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
S = {"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "window": 6}


def _model(layers, sharing=None, **extra):
    out = model_dict(layers, d_model=32, mlp_hidden=48, _seq=20, **extra)
    if sharing:
        out["kv_sharing"] = sharing
    return out


CASES = {
    "cla2_gqa": _model([F] * 4, {"every": 2}),
    "cla3_mqa_qk_norm": _model([{**F, "n_kv_heads": 1, "qk_norm": True}] * 3, {"every": 3}),
    "gemma4_rule_windows": _model([S, S, F, S, S, F], {"last": 2}),
    "shared_window_consumer_more_heads": _model([S, {**S, "n_heads": 8, "kv_from": 0}, F]),
}


def test_share_every_rule():
    out = share_every([dict(F) for _ in range(7)], 3)
    assert [layer.get("kv_from") for layer in out] == [None, 0, 0, None, 3, 3, None]
    assert share_every([dict(F)] * 3, 1) == [dict(F)] * 3  # k = 1 shares nothing


def test_share_last_gemma4_rule():
    # the hf-reference probe: S,S,F,S,S,F with 2 shared -> layer 4 reuses 3, layer 5 reuses 2
    out = share_last([S, S, F, S, S, F], 2)
    assert [layer.get("kv_from") for layer in out] == [None, None, None, None, 3, 2]
    with pytest.raises(ConfigError, match="no earlier 'full'"):
        share_last([S, S, F], 1)  # no full layer before the shared tail
    with pytest.raises(ConfigError, match="kv_sharing.last"):
        share_last([F, F], 2)


def test_patterns_do_not_mutate_input_and_validate_counts():
    layers = [dict(F), dict(F)]
    share_every(layers, 2)
    assert "kv_from" not in layers[1]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="positive integer"):
            share_every(layers, bad)
    with pytest.raises(ConfigError, match="kv_sharing"):
        kvlab.ModelConfig.from_dict(_model([F, F], {"every": 2, "last": 1}))


def test_consumer_shape_mismatch_is_rejected():
    with pytest.raises(ConfigError, match=r"layers\[1\].kv_from"):
        tiny_config([F, {**F, "head_dim": 8, "kv_from": 0}])
    with pytest.raises(ConfigError, match="window"):
        tiny_config([S, {**S, "window": 3, "kv_from": 0}])


@torch.no_grad()
def test_consumers_hold_zero_bytes_and_planner_agrees():
    cfg = kvlab.ModelConfig.from_dict({k: v for k, v in CASES["gemma4_rule_windows"].items() if k != "_seq"})
    model = build(cfg)
    ids = torch.randint(0, 97, (2, 20))
    _, cache = decode_stepwise(model, ids, [7])
    per_layer = cache.layer_nbytes()
    assert per_layer[4] == 0 and per_layer[5] == 0
    assert all(b > 0 for b in per_layer[:4])
    for i in range(cfg.n_layers):
        assert cfg.layer(i).cache_bytes(20, 2, 4) == per_layer[i], i
    # consumers own no K/V projections
    names = {n for n, _ in model.layers[5].self_attn.named_parameters()}
    assert not any(n.startswith(("k_proj", "v_proj", "k_norm")) for n in names), names


@torch.no_grad()
def test_consumer_of_windowed_producer_sees_only_the_window():
    """A full-attention consumer of a sliding producer reads the producer's window: changing a token that
    left the window leaves the consumer's attention output unchanged at the last position."""
    cfg = tiny_config([S, {**F, "kv_from": 0}], d_model=32, mlp_hidden=48)
    model = build(cfg)
    ids = torch.randint(0, 97, (1, 16))
    x = model.layers[0].input_layernorm(model.embed(ids))
    ctx = kvlab.model.ForwardContext(1, 16, 0, None, ids.device)
    model.layers[0].self_attn(x, ctx, None)  # producer publishes its K/V
    base = model.layers[1].self_attn(x, ctx, None)[:, -1]
    x2 = x.clone()
    x2[:, 2] += 5.0  # step 2 is outside the last query's window (16 - 6 = 10)
    ctx2 = kvlab.model.ForwardContext(1, 16, 0, None, ids.device)
    model.layers[0].self_attn(x2, ctx2, None)
    torch.testing.assert_close(model.layers[1].self_attn(x2, ctx2, None)[:, -1], base)

