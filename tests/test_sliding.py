"""Sliding window (+ sinks, + learned sink logits): standard matrix, constant cache bytes, parity with
transformers' Mistral, and an independent masked reference."""

from functools import partial

import pytest
import torch
from helpers import build, decode_stepwise, model_dict, tiny_config
from matrix import *  # noqa: F401,F403

import kvlab
import kvlab.attention.sliding as sliding

_model = partial(model_dict, _seq=40)


W = {"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "window": 8}
CASES = {
    "window": _model([W, W]),
    "window_mqa_sinks": _model([{**W, "n_kv_heads": 1, "sinks": 3}, {**W, "window": 5, "sinks": 1}]),
    "window_sink_logits": _model([{**W, "sink_logits": True}, {**W, "sinks": 2, "sink_logits": True}]),
    "hybrid_3_window_1_full": _model([W, W, W, {"type": "full", "n_heads": 4, "n_kv_heads": 2}]),
    "shared_window": _model([W, {**W, "kv_from": 0}, {"type": "full", "n_heads": 4, "n_kv_heads": 2, "kv_from": 0}]),
    "window_of_one": _model([{**W, "window": 1}, {**W, "window": 2, "sinks": 1}]),
}


def naive_window_forward(model, ids, window, sinks):
    """Reference: run the model with full attention under an explicit window+sink mask built here."""
    layer = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed(ids))
    seq = ids.shape[1]
    q, k, v = layer.project(x, kvlab.model.ForwardContext(ids.shape[0], seq, 0, None, ids.device))
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    mask = (j <= i) & ((j > i - window) | (j < sinks))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) / layer.head_dim ** 0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return layer.o_proj(out.transpose(1, 2).reshape(ids.shape[0], seq, -1))


@torch.no_grad()
def test_window_attention_matches_explicit_mask():
    model = build(tiny_config([{**W, "sinks": 2}]))
    ids = torch.randint(0, 97, (2, 30))
    layer = model.layers[0]
    x = layer.input_layernorm(model.embed(ids))
    got = layer.self_attn(x, kvlab.model.ForwardContext(2, 30, 0, None, ids.device), None)
    torch.testing.assert_close(got, naive_window_forward(model, ids, 8, 2), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cache_bytes_constant_past_window_and_decoding_far_past_it():
    model = build(tiny_config([{**W, "sinks": 2}, W]))
    ids = torch.randint(0, 97, (1, 8 * 5))  # 5x the window
    full = model(ids)
    inc, cache = decode_stepwise(model, ids, [3])
    torch.testing.assert_close(inc, full, atol=2e-4, rtol=1e-4)
    sizes = []
    cache = model.new_cache(1)
    for t in range(ids.shape[1]):
        model(ids[:, t:t + 1], cache=cache)
        sizes.append(cache.nbytes)
    per_slot = 2 * 2 * 16 * 4
    assert sizes[-1] == per_slot * ((8 + 2) + 8)
    assert len(set(sizes[8:])) == 1  # constant once past W


@torch.no_grad()
def test_prefill_chunk_longer_than_window():
    model = build(tiny_config([W, {**W, "sinks": 2}]))
    ids = torch.randint(0, 97, (2, 50))
    full = model(ids)
    inc, _ = decode_stepwise(model, ids, [21, 17])
    torch.testing.assert_close(inc, full, atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_mistral_sliding_window_parity_with_transformers(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf_config = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                              max_position_embeddings=256, eos_token_id=None, bos_token_id=None)
    hf = MistralForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = kvlab.load(tmp_path).eval()
    assert model.config.layers[0].type == "sliding"
    ids = torch.randint(0, 101, (1, 30))
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    # cached decoding past the window: feed HF's greedy tokens step by step through both caches
    out = hf.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    cache = model.new_cache(1)
    mine = [model(ids, cache=cache)[:, -1]]
    for t in range(30, out.shape[1] - 1):
        mine.append(model(out[:, t:t + 1], cache=cache)[:, -1])
    reference = hf(out[:, :-1]).logits[:, 29:]
    torch.testing.assert_close(torch.stack(mine, 1), reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.stack(mine, 1).argmax(-1), out[:, 30:])


def test_window_validation_names_the_field():
    import pytest

    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.window"):
        tiny_config([{**W, "window": 0}])
    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.sinks"):
        tiny_config([{**W, "sinks": -1}])


def test_plan_mistral_preset_is_windowed():
    result = kvlab.plan("mistral-7b", context=32768, dtype="bfloat16")
    assert result.total_bytes == 32 * 2 * 8 * 128 * 4096 * 2  # 4096-token ring per layer
    assert result.mha_bytes == 32 * 2 * 32 * 128 * 32768 * 2


def test_planner_pairs_count_the_explicit_mask():
    for window, sinks, seq in [(8, 0, 5), (8, 0, 30), (8, 3, 30), (5, 7, 9), (4, 2, 6), (1, 1, 12)]:
        spec = tiny_config([{**W, "window": window, "sinks": sinks}]).layer(0)
        i = torch.arange(seq)[:, None]
        j = torch.arange(seq)[None, :]
        mask = (j <= i) & ((j > i - window) | (j < sinks))
        assert spec.attended_pairs(seq) == int(mask.sum()), (window, sinks, seq)


@torch.no_grad()
@pytest.mark.parametrize("name", ["window_mqa_sinks", "window_sink_logits", "shared_window", "window_of_one"])
def test_banded_prefill_equals_dense_reference(name, monkeypatch):
    """Block-banded windowed attention (a Band per query block) against the dense-mask reference, for a
    full forward with left padding and for chunked prefill through the ring longer than a block."""
    model = build({k: v for k, v in CASES[name].items() if k != "_seq"})
    ids = torch.randint(0, 97, (2, 40))
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[1, :5] = 0
    monkeypatch.setattr(sliding, "BAND_MIN", 10**9)  # every forward dense
    dense = model(ids, attention_mask=attention_mask)
    dense_chunked, _ = decode_stepwise(model, ids, [19, 15])
    trace = {}
    monkeypatch.setattr(sliding, "BAND_MIN", 1)  # block = window: every forward longer than it banded
    banded = model(ids, attention_mask=attention_mask, trace=trace)
    torch.testing.assert_close(banded, dense, atol=1e-5, rtol=1e-5)
    chunked, _ = decode_stepwise(model, ids, [19, 15])
    torch.testing.assert_close(chunked, dense_chunked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, model(ids), atol=2e-4, rtol=1e-4)  # incremental = full forward
