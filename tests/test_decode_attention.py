"""The one-pass float decode-attention kernel (``kernels.FLOAT``, ``csrc/float_attention.cpp``) against
SDPA (its reference): shapes, GQA groups, head dims on and off the vector paths, token counts across its
1,024-token blocks and 16-token steps, masks (per row, shared, whole blocks hidden), strided cache buffers,
fp32 and bf16; and when ``grouped_sdpa`` takes it and when it must not."""

import pytest
import torch
import torch.nn.functional as F
from helpers import portable_build
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.attention._common import decode_attention, decode_kernel_applies, grouped_sdpa
from kvlab.kernels import FLOAT


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    monkeypatch.setenv("KVLAB_FLOAT_KERNEL", "1")
    if FLOAT.module() is None:
        pytest.skip("the float decode-attention kernel did not build on this machine")


def reference(q, k, v, mask, scale):
    """SDPA in float32 with K/V heads repeated per group: [B, H, 1, Dv]."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale)


def case(batch, kv_heads, group, tokens, dim, dv, dtype, mask_kind, seed, capacity=0):
    """q, k, v (k/v slices of buffers ``capacity`` tokens longer, as a growing cache holds them) and a mask."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, 1, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, tokens + capacity, dim, generator=gen).to(dtype)[:, :, :tokens]
    v = torch.randn(batch, kv_heads, tokens + capacity, dv, generator=gen).to(dtype)[:, :, :tokens]
    mask = None
    if mask_kind != "none":
        rows = batch if mask_kind == "per row" else 1
        mask = torch.rand(rows, 1, 1, tokens, generator=gen) > 0.3
        if mask_kind == "first block hidden":
            mask[..., :1024] = False
        mask[..., -1] = True  # the query sees itself
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, kv_heads, group, tokens, dim, dv", [
    (1, 3, 3, 512, 64, 64),  # SmolLM2's layer
    (2, 3, 3, 1025, 64, 64),  # one token into a second block
    (3, 1, 9, 17, 64, 64),  # MQA; one 16-token step and a tail
    (2, 2, 1, 2100, 128, 128),  # MHA, three blocks
    (1, 2, 4, 33, 24, 24),  # a head dim off the vector paths
    (2, 1, 5, 40, 256, 256),  # a head dim past the register paths
    (1, 1, 2, 1, 8, 8),  # a single token
    (2, 2, 2, 300, 64, 32),  # value head dim != key head dim (MLA's absorbed shape)
])
@pytest.mark.parametrize("mask_kind", ["none", "per row", "shared"])
@torch.no_grad()
def test_kernel_equals_sdpa(batch, kv_heads, group, tokens, dim, dv, dtype, mask_kind):
    q, k, v, mask = case(batch, kv_heads, group, tokens, dim, dv, dtype, mask_kind, seed=tokens, capacity=7)
    scale = dim ** -0.5
    out = decode_attention(q, k, v, mask, scale)
    assert out.shape == (batch, kv_heads * group, 1, dv) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), reference(q, k, v, mask, scale), atol=tol, rtol=tol)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 8]),
       tokens=st.integers(1, 2200), dim=st.sampled_from([16, 32, 48, 64, 80, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       mask_kind=st.sampled_from(["none", "per row", "shared", "first block hidden"]),
       capacity=st.integers(0, 40), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_kernel_equals_sdpa_on_random_shapes(batch, kv_heads, group, tokens, dim, dtype, mask_kind, capacity, seed):
    if mask_kind == "first block hidden" and tokens <= 1024:
        mask_kind = "per row"
    q, k, v, mask = case(batch, kv_heads, group, tokens, dim, dim, dtype, mask_kind, seed, capacity)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(decode_attention(q, k, v, mask, None).float(), reference(q, k, v, mask, None),
                               atol=tol, rtol=tol)


@torch.no_grad()
def test_grouped_sdpa_takes_the_kernel_only_where_it_applies(monkeypatch):
    q, k, v, mask = case(2, 3, 3, 100, 64, 64, torch.float32, "per row", seed=1)
    assert decode_kernel_applies(q, k, v, mask)
    calls = []
    monkeypatch.setattr("kvlab.attention._common.decode_attention", lambda *a: calls.append(a) or reference(*a))
    grouped_sdpa(q, k, v, mask, causal=True, scale=None)
    assert len(calls) == 1
    assert not decode_kernel_applies(q.half(), k.half(), v.half(), mask)  # fp16: SDPA
    assert not decode_kernel_applies(q, k, v, mask.float())  # an additive mask: SDPA
    assert not decode_kernel_applies(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask)  # channels strided
    monkeypatch.setenv("KVLAB_FLOAT_KERNEL", "0")
    assert not decode_kernel_applies(q, k, v, mask)


def test_decode_with_autograd_uses_sdpa_and_keeps_gradients():
    q, k, v, _ = case(1, 2, 2, 50, 16, 16, torch.float32, "none", seed=2)
    q.requires_grad_(True)
    assert not decode_kernel_applies(q, k, v, None)
    grouped_sdpa(q, k, v, None, causal=True, scale=None).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert decode_kernel_applies(q, k, v, None)


@pytest.mark.slow
def test_the_kernel_built_without_avx512_equals_sdpa(monkeypatch):
    # the build a CPU without AVX-512 gets (x86-64-v3: AVX2 + FMA) runs the plain loops for every shape
    portable_build(FLOAT, monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(2, 3, 3, 1030, 64, 64), (1, 2, 4, 33, 24, 24), (2, 1, 2, 40, 128, 64)]:
            with torch.no_grad():
                q, k, v, mask = case(*shape, dtype, "per row", seed=5, capacity=3)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(decode_attention(q, k, v, mask, None).float(),
                                           reference(q, k, v, mask, None), atol=tol, rtol=tol)


@pytest.mark.parametrize("layers", [
    [{"type": "full", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True}, {"type": "full", "n_heads": 4, "n_kv_heads": 1}],
    [{"type": "full", "n_heads": 4, "n_kv_heads": 4, "output_gate": "head"},  # MHA, gated output, a consumer
     {"type": "full", "n_heads": 4, "n_kv_heads": 2}, {"type": "full", "n_heads": 4, "n_kv_heads": 2, "kv_from": 1}],
])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_fused_decode_step_equals_the_general_path(layers, batch):
    """``FullAttention.decode_step`` (RoPE, the cache write and attention in one kernel call) gives the general
    path's logits step after step, across the cache's growth past its first 256-token chunk, and leaves the
    same cache; a left-padded batch needs a mask and keeps the general path."""
    from helpers import build, tiny_config

    model = build(tiny_config(layers)).eval()
    fused = [layer.self_attn for layer in model.layers if layer.self_attn.fused_decode]
    assert fused, "no layer takes the fused step"
    ids = torch.randint(1, 97, (batch, 250), generator=torch.Generator().manual_seed(batch))
    caches, logits = {}, {}
    for flag in (True, False):
        for attn in fused:
            attn.fused_decode = flag
        cache = model.new_cache(batch)
        model(ids, cache=cache)
        steps = [model(torch.full((batch, 1), 3 + i), cache=cache) for i in range(10)]  # crosses 256 slots
        caches[flag], logits[flag] = cache, torch.cat(steps, dim=1)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
    for fused_layer, plain_layer in zip(caches[True].layers, caches[False].layers):
        for a, b in zip(fused_layer.live_tensors(), plain_layer.live_tensors()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for attn in fused:
        attn.fused_decode = True
    real, calls = FLOAT.module(), []
    spy = type("Spy", (), {"attend": staticmethod(real.attend),
                           "decode_step": staticmethod(lambda *a: calls.append(1) or real.decode_step(*a))})()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for attention_mask, expected in ((None, len(fused)), (mask, 0)):  # padding needs a mask: the general path
        cache = model.new_cache(batch)
        model(ids, cache=cache, attention_mask=attention_mask)
        calls.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(FLOAT.built, "module", spy)
            model(torch.full((batch, 1), 3), cache=cache)
        assert len(calls) == expected
