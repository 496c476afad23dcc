"""DeepSeek V4 layers (CSA, HCA, V4 sliding) and mHC through the standard matrix, plus parity with
transformers' deepseek_v4 modules, decode sparsity and planner checks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from helpers import build, decode_stepwise, model_dict
from matrix import *  # noqa: F401,F403

import kvlab
from kvlab.attention._common import ForwardContext

_model = partial(model_dict, d_model=32, mlp_hidden=48)


_V4 = {"n_heads": 4, "head_dim": 16, "q_lora_rank": 24, "o_groups": 2, "o_lora_rank": 12, "window": 6,
       "rope": {"theta": 10000.0, "partial": 0.5, "interleaved": True}}
CSA = {"type": "csa", **_V4, "compress_rate": 4, "index_n_heads": 3, "index_head_dim": 12, "index_topk": 3}
HCA = {"type": "hca", **_V4, "compress_rate": 8}
SWA = {"type": "v4_sliding", **_V4}

CASES = {
    "csa_hca": {**_model([CSA, HCA]), "_seq": 30},
    "v4_mixed": {**_model([SWA, HCA, CSA, {"type": "full", "n_heads": 2}]), "_seq": 27},
    "mhc_csa_full": {**_model([CSA, {"type": "full", "n_heads": 4, "n_kv_heads": 2}],
                              hyper_connections={"streams": 3, "sinkhorn_iters": 5}), "_seq": 26},
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
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4Attention,
        DeepseekV4RotaryEmbedding,
    )

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


@torch.no_grad()
def test_csa_decode_gathers_only_window_and_topk_entries():
    model = build(_model([CSA]))
    touched = {}
    for context in (101, 403):
        ids = torch.randint(0, 97, (1, context))
        cache = model.new_cache(1)
        model(ids[:, :-1], cache=cache)
        trace = {}
        model(ids[:, -1:], cache=cache, trace=trace)  # what the decode step touched, per layer
        touched[context] = {name: value for (layer, name), value in trace.items() if layer == 0}
    for context, stats in touched.items():
        assert stats["entries_scored"] == context // 4  # the indexer scores every entry (cheap, d_I wide)
        assert stats["entries_attended"] == CSA["index_topk"]  # attention gathers only the top-k
        assert stats["window_keys"] == CSA["window"]


@torch.no_grad()
def test_gathered_and_dense_paths_agree():
    model = build(_model([CSA, CSA]))
    ids = torch.randint(0, 97, (2, 41))
    sparse, _ = decode_stepwise(model, ids, [30, 3])
    for block in model.layers:
        block.self_attn.gather_max_queries = 0
    dense, _ = decode_stepwise(model, ids, [30, 3])
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


# ---- blocked prefill == the dense reference (one block, dense masks) ----------------------------------
BLOCKED = {"csa": {"type": "csa", **_V4, "compress_rate": 3, "index_n_heads": 2, "index_head_dim": 12,
                   "index_topk": 4},
           "hca": {"type": "hca", **_V4, "compress_rate": 3},
           "v4_sliding": SWA}


def _v4_layer(kind: str, block: int, gather_max: int | None = None):
    config = kvlab.ModelConfig.from_dict(_model([BLOCKED[kind]]))
    torch.manual_seed(0)
    module = kvlab.registry.get_technique(kind).module_cls(config.layer(0), config, 0)
    with torch.no_grad():  # larger-than-init weights: sharper softmaxes, more distinct top-k scores
        for p in module.parameters():
            p.mul_(3.0 if p.dim() >= 2 else 1.0).add_(0.2 * torch.randn(p.shape) if p.dim() == 1 else 0)
    module.prefill_block = block
    if gather_max is not None:
        module.gather_max_queries = gather_max
    return module


def _chunked(forward, module, x, pad, chunks):
    """Outputs of ``forward`` fed ``x`` in ``chunks`` through one cache (None: no cache, one chunk) and the
    cache's tensors."""
    if chunks is None:
        return forward(x, ForwardContext(x.shape[0], x.shape[1], 0, pad, x.device), None), {}
    cache = module.new_cache_layer(x.shape[0], torch.float32, x.device, [])
    outs, start = [], 0
    for size in chunks:
        outs.append(forward(x[:, start:start + size], ForwardContext(x.shape[0], size, start, pad, x.device), cache))
        start += size
    return torch.cat(outs, 1), {**cache.state, **{k: b.view() for k, b in cache.buffers.items()}}


@pytest.mark.parametrize("kind,block,gather_max", [("csa", 5, None), ("csa", 7, 0), ("hca", 5, None),
                                                   ("hca", 8, None), ("v4_sliding", 4, None)])
@pytest.mark.parametrize("chunks", [None, [47], [20, 11, 1, 1, 13, 1], [1, 9, 37]])
@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_blocked_prefill_matches_dense_reference(kind, block, gather_max, chunks, padded):
    from kvlab.attention.compressed import dense_reference_forward

    module = _v4_layer(kind, block, gather_max)
    x = torch.randn(3, 47, 32, generator=torch.Generator().manual_seed(7))
    pad = torch.tensor([0, 5, 13]) if padded else None  # not multiples of the rate (3) or the blocks
    got, got_cache = _chunked(module, module, x, pad, chunks)
    want, want_cache = _chunked(partial(dense_reference_forward, module), module, x, pad, chunks)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_cache:
        torch.testing.assert_close(got_cache[name], want_cache[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_blocked_prefill_gradients_match_dense_reference(kind):
    from kvlab.attention.compressed import dense_reference_forward

    module = _v4_layer(kind, 6)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(8))
    weight = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(9))
    pad = torch.tensor([0, 7])
    grads = []
    for forward in (module, partial(dense_reference_forward, module)):
        xi = x.clone().requires_grad_()
        module.zero_grad()
        (forward(xi, ForwardContext(2, 40, 0, pad, x.device), None) * weight).sum().backward()
        grads.append({"x": xi.grad, **{n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


@torch.no_grad()
def test_indexer_breaks_ties_by_position():
    from kvlab.attention.compressed import Indexer

    scores = torch.tensor([[[1.0, 2.0, 2.0, 0.0, 2.0, float("-inf")]]])
    indexer = Indexer.__new__(Indexer)
    for k, expected in ((3, [1, 2, 4]), (2, [1, 2]), (4, [0, 1, 2, 4]), (6, [0, 1, 2, 3, 4, 5])):
        indexer.topk = k
        idx, valid = Indexer.select(indexer, scores, torch.tensor([[5]]))
        assert idx.tolist() == [[expected]]
        assert valid.tolist() == [[[i < 5 for i in expected]]]


def test_planner_bytes_follow_the_formula():
    from kvlab.config import ModelConfig

    config = ModelConfig.from_dict(_model([CSA, HCA]))
    csa, hca = config.layer(0), config.layer(1)
    for tokens in (1, 7, 64, 1000):
        window = min(tokens, 5) * 16
        assert csa.cache_bytes(tokens, 1, 2) == 2 * (window + tokens // 4 * (16 + 12) + 2 * 4 * (32 + 24)
                                                     + 2 * 4 * (16 + 12))
        assert hca.cache_bytes(tokens, 1, 2) == 2 * (window + tokens // 8 * 16 + 2 * 8 * 16)
    for n in (1, 5, 9, 40):  # closed forms equal the per-query sums
        seen_h = sum(min(t + 1, 6) + (t + 1) // 8 for t in range(n))
        seen_c = sum(min(t + 1, 6) + min((t + 1) // 4, 3) for t in range(n))
        assert hca.attended_pairs(n) == seen_h and csa.attended_pairs(n) == seen_c


@torch.no_grad()
def test_hyper_connections_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
        DeepseekV4HyperConnection,
        DeepseekV4HyperHead,
    )

    from kvlab.hyper_connections import HyperConnection, HyperHead

    hf_cfg = _hf_config("hca", hc_mult=3, hc_sinkhorn_iters=7)
    hc = {"streams": 3, "sinkhorn_iters": 7, "eps": hf_cfg.hc_eps}
    for ref, mine in ((DeepseekV4HyperConnection(hf_cfg), HyperConnection(32, hc, hf_cfg.rms_norm_eps)),
                      (DeepseekV4HyperHead(hf_cfg), HyperHead(32, hc, hf_cfg.rms_norm_eps))):
        _randomize(ref, seed=5)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(3.0)  # far from the near-uniform init: Sinkhorn's order matters
        mine.load_state_dict(ref.state_dict(), strict=True)
        streams = torch.randn(2, 7, 3, 32)
        if isinstance(ref, DeepseekV4HyperHead):
            torch.testing.assert_close(mine(streams), ref(streams), atol=1e-5, rtol=1e-5)
            continue
        branch = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh())
        post, comb, collapsed = ref(streams)
        expected = post.unsqueeze(-1) * branch(collapsed).unsqueeze(-2) + comb.transpose(-1, -2) @ streams
        torch.testing.assert_close(mine(streams, branch), expected, atol=1e-5, rtol=1e-5)


def test_hyper_connections_config_is_validated():
    from kvlab.errors import ConfigError

    for bad, field in (({"streams": 0}, "streams"), ({"stream": 2}, "stream"), ({"eps": "x"}, "eps")):
        with pytest.raises(ConfigError, match=f"hyper_connections.{field}"):
            kvlab.ModelConfig.from_dict(_model([CSA], hyper_connections=bad))


@torch.no_grad()
def test_any_prefill_decode_split_leaves_the_same_cache_state():
    model = build(_model([CSA, HCA]))
    ids = torch.randint(0, 97, (2, 35))
    states = []
    for chunks in ([35], [1], [13, 9, 2], [4, 4, 8]):
        _, cache = decode_stepwise(model, ids, chunks)
        states.append([{**{k: v for k, v in layer.state.items()},
                        **{k: b.view() for k, b in layer.buffers.items()}} for layer in cache.layers])
    for other in states[1:]:
        for mine, theirs in zip(states[0], other):
            assert mine.keys() == theirs.keys()
            for name in mine:
                torch.testing.assert_close(theirs[name], mine[name], atol=1e-6, rtol=1e-5, msg=name)


def test_csa_v4_layers_train():
    model = build(_model([CSA, HCA], hyper_connections={"streams": 2})).train()
    ids = torch.randint(0, 97, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if ".indexer." in name:  # top-k passes no gradient to the indexer (as in the reference)
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
