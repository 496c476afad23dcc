"""KIVI-style int8/int4 KV quantization: reconstruction error bounds, planner == measured bytes at every
length (MHA, GQA, MLA latent), flush policy independent of chunking, exactness while everything is in
the full-precision residual, bounded logit drift. (Quantized decoding is not the full forward, so these
replace the standard matrix.)"""

import pytest
import torch
from helpers import build, decode_stepwise, portable_build
from helpers import model_dict as _model

import kvlab
from kvlab.cache.quantized import dequantize, quantize, quantized_tokens, stream_bytes


@pytest.fixture(params=["kernel", "torch ops"])
def read_path(request, monkeypatch):
    """Both implementations of ``QuantizedKVCacheLayer.attend``'s codes read: the compiled kernel
    (``kernels.QUANTIZED``; skipped where it cannot be built) and the torch ops over float blocks."""
    from kvlab.kernels import QUANTIZED

    monkeypatch.setenv("KVLAB_QUANT_KERNEL", "1" if request.param == "kernel" else "0")
    if request.param == "kernel" and QUANTIZED.module() is None:
        pytest.skip("the quantized-KV decode kernel did not build on this machine")
    return request.param


def _full(kind, **extra):
    return {"type": "full", "n_heads": 4, "n_kv_heads": 2, "kv_quant": kind, "kv_quant_group": 8,
            "kv_quant_residual": 4, **extra}


def _mla(kind=None, **extra):
    return {"type": "mla", "n_heads": 4, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
            "v_head_dim": 16, "kv_quant": kind, "kv_quant_group": 8, "kv_quant_residual": 4, **extra}


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["channel", "token"])
def test_reconstruction_error_is_within_half_a_step(kind, mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 24, generator=gen)
    x[..., 5] *= 20  # an outlier channel (keys have them; per-channel groups confine the damage)
    codes, scale, zero = quantize(x, mode, kind, 8, torch.float32)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (24 if kind == "int8" else 12)
    back = dequantize(codes, scale, zero, mode, kind, 8, 24, torch.float32)
    step = scale.unsqueeze(3).expand(2, 3, 2, 8, 24).reshape(x.shape) if mode == "channel" \
        else scale.repeat_interleave(8, dim=-1)
    assert ((back - x).abs() <= step / 2 + 1e-5).all()
    rel = ((back - x).norm() / x.norm()).item()
    assert rel < (0.01 if kind == "int8" else 0.15)


def test_constant_groups_are_exact():
    x = torch.full((1, 1, 8, 4), 0.75)
    for kind in ("int8", "int4"):
        codes, scale, zero = quantize(x, "channel", kind, 8, torch.float32)
        assert torch.equal(dequantize(codes, scale, zero, "channel", kind, 8, 4, torch.float32), x)


def test_flush_policy():
    # oldest whole groups beyond the last R tokens are quantized; R..R+G-1 stay in full precision
    assert [quantized_tokens(t, 8, 4) for t in (0, 4, 11, 12, 19, 20, 100)] == [0, 0, 0, 8, 8, 16, 96]
    assert [quantized_tokens(t, 4, 0) for t in (3, 4, 7)] == [0, 4, 4]
    # int8: 1 byte/code; scale + zero per (group of 8 tokens, channel); fp32 residual of 5 tokens
    assert stream_bytes("channel", 1, 16, 13, "int8", 8, 4, 4) == 8 * 16 + 2 * 16 * 4 + 5 * 16 * 4
    assert stream_bytes("token", 1, 16, 13, "int4", 8, 4, 4) == 8 * 8 + 2 * 8 * 2 * 4 + 5 * 16 * 4


QUANT_CASES = {
    "mha_int8": _model([_full("int8", n_kv_heads=4), _full("int8", n_kv_heads=4)]),
    "gqa_int4_residual0": _model([_full("int4", kv_quant_residual=0), _full("int4", kv_quant_group=4)]),
    "gqa_int4_group_wider_than_head": _model([_full("int4", head_dim=24, kv_quant_group=32,
                                                    kv_quant_residual=3)]),
    "mla_int4": _model([_mla("int4"), _mla("int4", q_lora_rank=16)]),
    "mla_int8_with_plain_layers": _model([_mla("int8"), {"type": "full", "n_heads": 4}, _mla()]),
}


@pytest.mark.parametrize("name", list(QUANT_CASES))
@torch.no_grad()
def test_planner_equals_measured_bytes_at_every_length(name):
    model = build(QUANT_CASES[name])
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2)
    model(ids[:, :13], cache=cache)
    for t in range(13, 70):
        planned = kvlab.plan(model.config, context=t, batch=2)
        assert [layer.cache_bytes for layer in planned.layers] == cache.layer_nbytes(), f"at {t} tokens"
        model(ids[:, t:t + 1], cache=cache)
    for dtype in ("bfloat16", "float32"):  # bf16 caches: bf16 residual and scales
        config = kvlab.ModelConfig.from_dict({**QUANT_CASES[name], "dtype": dtype})
        bf16 = build(config)
        cache = bf16.new_cache(1)
        bf16(ids[:1, :41], cache=cache)
        assert kvlab.plan(config, context=41).total_bytes == cache.nbytes


@torch.no_grad()
def test_quantized_storage_is_smaller():
    ids = torch.randint(0, 97, (1, 200))
    sizes = {}
    for kind in (None, "int8", "int4"):
        model = build(_model([_full(kind, head_dim=32, kv_quant_group=32, kv_quant_residual=32)]))
        _, cache = decode_stepwise(model, ids, [150])
        sizes[kind] = cache.nbytes
    # 160 of 200 tokens quantized: int8 codes + fp32 scales/zeros per 32 tokens, 40 fp32 tokens
    assert sizes[None] == 2 * 2 * 32 * 200 * 4
    assert sizes["int8"] == 2 * 2 * (160 * 32 + 2 * 5 * 32 * 4 + 40 * 32 * 4)  # K and V x 2 KV heads
    assert sizes["int4"] < sizes["int8"] < sizes[None] / 2


def _single_layer_codes(kind, chunks):
    model = build(_model([_mla(kind)]))
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = decode_stepwise(model, ids, chunks)
    return {name: buf.view().clone() for name, buf in cache.layers[0].buffers.items()}


def test_stored_codes_do_not_depend_on_chunking():
    # one layer: its latent depends on the tokens only, so the flush policy alone decides the codes
    for kind in ("int8", "int4"):
        stepwise, chunked = _single_layer_codes(kind, [1]), _single_layer_codes(kind, [30, 7])
        assert stepwise.keys() == chunked.keys()
        for name in stepwise:
            torch.testing.assert_close(stepwise[name], chunked[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer", [_full("int4", kv_quant_residual=64), _mla("int8", kv_quant_residual=64)])
@torch.no_grad()
def test_exact_while_every_token_is_in_the_residual(layer):
    model = build(_model([layer, layer]))
    ids = torch.randint(0, 97, (2, 60))
    cached, cache = decode_stepwise(model, ids, [20])
    torch.testing.assert_close(cached, model(ids), atol=2e-4, rtol=1e-4)
    assert all(buf.view().shape[2] == 0 for name, buf in cache.layers[0].buffers.items() if "codes" in name)


@pytest.mark.parametrize("kind,bound", [("int8", 0.02), ("int4", 0.3)])  # logits reach ~2
@pytest.mark.parametrize("layer", ["full", "mla"])
@torch.no_grad()
def test_logit_drift_is_bounded(kind, bound, layer):
    spec = _full(kind, kv_quant_residual=8) if layer == "full" else _mla(kind, kv_quant_residual=8)
    model = build(_model([spec, spec]))
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(5))
    cached, _ = decode_stepwise(model, ids, [16])
    drift = (cached - model(ids)).abs().max().item()
    assert 0 < drift < bound, drift


@torch.no_grad()
def test_select_and_reset_cover_quantized_buffers():
    model = build(QUANT_CASES["mla_int4"])
    ids = torch.randint(0, 97, (2, 40))
    cache = model.new_cache(2)
    model(ids, cache=cache)
    before = {k: v.view().clone() for k, v in cache.layers[0].buffers.items()}
    cache.select([1, 0])
    for k, buf in cache.layers[0].buffers.items():
        assert torch.equal(buf.view(), before[k].flip(0))
    cache.reset()
    assert cache.nbytes == 0


@pytest.mark.parametrize("layer,message", [
    (_full("int4", head_dim=15), "kv_quant: int4 packs two codes per byte; head_dim"),
    (_full("int3"), "kv_quant: must be null, 'int8' or 'int4'"),
    (_mla("int4", kv_lora_rank=31), "kv_quant: int4 packs two codes per byte; kv_lora_rank"),
])
def test_invalid_quantization_settings_name_the_field(layer, message):
    with pytest.raises(kvlab.ConfigError, match=rf"layers\[0\]\.{message}"):
        kvlab.ModelConfig.from_dict(_model([layer]))


@torch.no_grad()
def test_rows_are_isolated():
    model = build(QUANT_CASES["gqa_int4_residual0"])
    ids = torch.randint(0, 97, (2, 40))
    other = ids.clone()
    other[1] = (other[1] + 5) % 97
    a, _ = decode_stepwise(model, ids, [10])
    b, _ = decode_stepwise(model, other, [10])
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_int4_group_wider_than_head", "mla_int4"])
def test_config_and_checkpoint_round_trip(name, tmp_path):
    model = build(QUANT_CASES[name])
    model.save(tmp_path / "ckpt")
    loaded = kvlab.load(tmp_path / "ckpt").eval()
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.config.layers[0].kv_quant == QUANT_CASES[name]["layers"][0]["kv_quant"]
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(decode_stepwise(loaded, ids, [9])[0], decode_stepwise(model, ids, [9])[0],
                                   atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.no_grad()
def test_decode_reading_codes_block_by_block_equals_the_dequantized_copy(kind, monkeypatch, read_path):
    # decode steps attend through QuantizedKVCacheLayer.attend (blocks of 8 tokens here, left padding
    # included); the reference is append's full-size dequantized copy, forced by marking a consumer
    import kvlab.cache.quantized as quantized

    monkeypatch.setattr(quantized, "BLOCK", 8)
    calls = []
    attend = quantized.QuantizedKVCacheLayer.attend
    monkeypatch.setattr(quantized.QuantizedKVCacheLayer, "attend", lambda *a: calls.append(1) or attend(*a))
    model = build(_model([_full(kind), _full(kind, n_kv_heads=1, kv_quant_group=4)]))
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    chunked, _ = decode_stepwise(model, ids, [10, 1], attention_mask=mask)
    assert len(calls) == 2 * 30  # every one-token step of both layers read the codes
    for block in model.layers:
        block.self_attn.has_consumers = True  # -> the reference path
    reference, _ = decode_stepwise(model, ids, [10, 1], attention_mask=mask)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize(("batch", "kv_heads", "queries", "dim", "group", "residual", "block"), [
    (1, 3, 3, 64, 32, 32, 64),   # SmolLM2's shape (GQA-3), blocks of two groups
    (2, 2, 4, 24, 8, 4, 24),     # head dim not a power of two, int4 words of 4 bytes
    (2, 1, 1, 10, 4, 0, 1),      # MQA, no residual, block smaller than a group (rounded up), 1-byte words
    (1, 2, 6, 16, 32, 5, 8192),  # group wider than the head dim (value groups of gcd(32, 16) channels)
    (2, 2, 2, 128, 8, 3, 64),    # head dim 128, value groups of 8 channels (the kernel's scalar value loop)
    (1, 1, 9, 128, 32, 7, 64),   # 9 query rows x 128 channels: the kernel's value blocks of 4 rows x 64
    (1, 2, 5, 48, 16, 2, 64),    # 48 channels: 3-vector blocks, 5 rows (4 + 1)
])
@torch.no_grad()
def test_attend_on_codes_equals_dequantize_then_attend(kind, batch, kv_heads, queries, dim, group, residual, block,
                                                      monkeypatch, read_path):
    # the fast decode read (codes converted block by block, scales folded into q and p) against
    # attend_reference (full-size dequantized copy, then softmax attention), step by step: lengths not
    # multiples of the group or the block, residual window partly filled, left padding, GQA groups in M
    import kvlab.cache.quantized as quantized

    monkeypatch.setattr(quantized, "BLOCK", block)
    gen = torch.Generator().manual_seed(dim * 7 + group)
    fast, ref = (quantized.QuantizedKVCacheLayer(batch, kv_heads, dim, torch.float32, quant=kind, group=group,
                                                 residual=residual) for _ in range(2))
    prefill = 3 * group + 5
    k, v = torch.randn(batch, kv_heads, prefill, dim, generator=gen), torch.randn(batch, kv_heads, prefill, dim,
                                                                                  generator=gen)
    k[..., 1] *= 10  # an outlier key channel
    fast.append(k, v)
    ref.append(k, v)
    pad = torch.zeros(batch, dtype=torch.long)
    pad[-1] = min(3, prefill)  # the last row is left-padded
    for _ in range(group + 3):  # crosses at least one flush
        t = fast.length + 1
        q = torch.randn(batch, kv_heads, queries, dim, generator=gen)
        k1, v1 = torch.randn(batch, kv_heads, 1, dim, generator=gen), torch.randn(batch, kv_heads, 1, dim, generator=gen)
        mask = (torch.arange(t) >= pad[:, None]).view(batch, 1, 1, t).expand(-1, -1, queries, -1)
        out = fast.attend(q, k1, v1, mask, 0.3)
        torch.testing.assert_close(out, ref.attend_reference(q, k1, v1, mask, 0.3), atol=2e-5, rtol=2e-5)
    assert fast.k.quantized_length > 0 and fast.nbytes == ref.nbytes
    for name in fast.buffers:
        assert torch.equal(fast.buffers[name].view(), ref.buffers[name].view())


def test_block_tokens_keep_the_workspace_bounded():
    from kvlab.cache.quantized import BLOCK, WORKSPACE_BYTES, block_tokens

    assert block_tokens(3, 64) == BLOCK  # batch 1, SmolLM2's 3 KV heads: whole blocks
    for rows in (1, 3, 12, 48, 200, 10_000):
        n = block_tokens(rows, 64)
        assert n & (n - 1) == 0 and (n == 1 or rows * n * 64 * 4 <= WORKSPACE_BYTES) and n <= BLOCK
    assert block_tokens(48, 64) == 512  # batch 16: 6 MiB of workspace, not 24
    assert block_tokens(48, 64, 32) % 32 == 0 and block_tokens(10_000, 64, 32) == 32  # whole groups, one at least


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_attend_on_codes_with_blocks_shrunk_by_the_workspace_bound(kind, monkeypatch):
    # batch 4 x 3 KV heads with a 64 KiB workspace bound: 16-token value blocks, 32-token (one group) key
    # blocks (the torch-ops read; the kernel has no workspace)
    import kvlab.cache.quantized as quantized

    monkeypatch.setattr(quantized, "WORKSPACE_BYTES", 64 << 10)
    monkeypatch.setenv("KVLAB_QUANT_KERNEL", "0")
    assert quantized.block_tokens(12, 64) == 16
    test_attend_on_codes_equals_dequantize_then_attend(kind, 4, 3, 3, 64, 32, 32, 2048, monkeypatch, "torch ops")


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.no_grad()
def test_kernel_equals_torch_ops_on_a_bf16_cache_with_long_strided_rows(kind, monkeypatch):
    # a bf16 cache (scales stored in bf16), 3 x 2048-token chunks (the kernel's work items), a preallocated
    # buffer (rows strided by its capacity): the kernel and the torch-ops read agree
    from kvlab.cache.quantized import QuantizedKVCacheLayer
    from kvlab.kernels import QUANTIZED

    if QUANTIZED.module() is None:
        pytest.skip("the quantized-KV decode kernel did not build on this machine")
    gen = torch.Generator().manual_seed(3)
    layer = QuantizedKVCacheLayer(2, 3, 64, torch.bfloat16, quant=kind, group=32, residual=32)
    layer.reserve(6000)
    layer.append(*(torch.randn(2, 3, 5000, 64, generator=gen).bfloat16() for _ in range(2)))
    q = torch.randn(2, 3, 3, 64, generator=gen).bfloat16()
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("KVLAB_QUANT_KERNEL", flag)
        scores = torch.empty(2, 3, 3, layer.k.quantized_length)
        layer._quantized_scores(q.float(), scores)
        outs[flag] = scores, layer._quantized_values(scores.softmax(-1))
    for kernel, ops in zip(outs["1"], outs["0"]):
        torch.testing.assert_close(kernel, ops, atol=1e-4, rtol=1e-4)


def test_a_kernel_that_cannot_build_warns_once_and_decode_uses_the_torch_ops(tmp_path, monkeypatch):
    # no compiler / broken toolchain stands in as a source that does not compile: one warning, no
    # exception, the same answers through the torch ops; KVLAB_QUANT_KERNEL=0 turns a built kernel off
    from kvlab.cache.quantized import QuantizedKVCacheLayer
    from kvlab.kernels import QUANTIZED

    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(QUANTIZED, "source", broken)
    monkeypatch.setattr(QUANTIZED, "built", {})
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("KVLAB_QUANT_KERNEL", "1")
    with pytest.warns(UserWarning, match="quantized-KV decode kernel not built"):
        assert QUANTIZED.module() is None
    assert QUANTIZED.module() is None and not QUANTIZED.usable(torch.zeros(1))  # no second build
    gen = torch.Generator().manual_seed(0)
    fast, ref = (QuantizedKVCacheLayer(1, 2, 16, torch.float32, quant="int8", group=4, residual=2) for _ in range(2))
    k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
    fast.append(k, v)
    ref.append(k, v)
    q, k1 = torch.randn(1, 2, 2, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fast.attend(q, k1, k1, None, 0.25), ref.attend_reference(q, k1, k1, None, 0.25))
    monkeypatch.setattr(QUANTIZED, "built", {"module": object()})  # "built"
    monkeypatch.setenv("KVLAB_QUANT_KERNEL", "0")
    assert QUANTIZED.module() is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_kernel_built_without_avx512_equals_the_reference(kind, monkeypatch):
    # the build a CPU without AVX-512 gets (x86-64-v3: AVX2 + FMA) runs the plain loops for every shape;
    # the native build here takes the AVX-512 paths for head dims that are multiples of 16
    from kvlab.kernels import QUANTIZED

    portable_build(QUANTIZED, monkeypatch)
    for shape in [(1, 3, 3, 64, 32, 32, 64), (2, 2, 2, 128, 8, 3, 64), (2, 2, 4, 24, 8, 4, 24)]:
        test_attend_on_codes_equals_dequantize_then_attend(kind, *shape, monkeypatch, "kernel")
