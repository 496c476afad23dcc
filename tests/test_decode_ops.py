"""The decode step's elementwise kernels (``kernels.DECODE_OPS``, ``csrc/decode_ops.cpp``) against the torch
ops they replace (their references): RMSNorm with and without a weight, RoPE on strided head views with
per-row positions, SiLU-times-up on the halves of a fused output; where ``decode_ops`` lets them run and
where it must not; and a model's decode through them giving the torch path's logits and greedy tokens."""

import pytest
import torch
import torch.nn.functional as F
from helpers import build, portable_build, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.config import RopeConfig
from kvlab.kernels import DECODE_OPS, DECODE_OPS_MAX_ROWS, NOTHING, decode_ops
from kvlab.mlp import GatedMLP
from kvlab.norms import RMSNorm
from kvlab.rope import Rotary


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    monkeypatch.setenv(DECODE_OPS.env, "1")
    if DECODE_OPS.module() is None:
        pytest.skip("the decode elementwise kernels did not build on this machine")


def strided_rows(rows: int, dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """``[rows, dim]``, every row a slice of a wider buffer (as a fused linear's outputs are)."""
    return (torch.randn(rows, dim + 7, generator=torch.Generator().manual_seed(seed)) * scale)[:, 3:3 + dim]


def torch_path(monkeypatch, fn):
    """``fn()`` with the kernels turned off (the references)."""
    monkeypatch.setenv(DECODE_OPS.env, "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv(DECODE_OPS.env, "1")


def check_norm(rows, dim, scaled, seed):
    x = strided_rows(rows, dim, seed, scale=3.0)
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1)) if scaled else None
    got = DECODE_OPS.module().rms_norm(x, NOTHING if weight is None else weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(x, (dim,), weight, 1e-5), atol=1e-6, rtol=1e-5)


def check_rope(batch, heads, seq, dim, seed, per_row_positions):
    gen = torch.Generator().manual_seed(seed)
    rotary = Rotary(RopeConfig(theta=10000.0), dim)
    x = torch.randn(batch, seq, heads, dim, generator=gen).transpose(1, 2)  # [B, H, S, D], strided
    if per_row_positions:
        positions = torch.randint(0, 9000, (batch, 1), generator=gen) + torch.arange(seq)
    else:
        positions = torch.arange(5, 5 + seq).expand(batch, seq)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    want = x * cos + rotary.rotate(x) * sin
    torch.testing.assert_close(DECODE_OPS.module().rope(x, cos, sin), want, atol=1e-6, rtol=1e-5)


def check_silu_mul(rows, cols, seed):
    fused = strided_rows(rows, 2 * cols, seed, scale=6.0)  # large |x|: both branches of the sigmoid
    gate, up = fused[:, :cols], fused[:, cols:]
    torch.testing.assert_close(DECODE_OPS.module().silu_mul(gate, up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows, dim", [(1, 576), (3, 64), (64, 960), (2, 7)])
@pytest.mark.parametrize("scaled", [True, False])
def test_rms_norm_equals_f_rms_norm(rows, dim, scaled):
    check_norm(rows, dim, scaled, seed=rows + dim)


@pytest.mark.parametrize("batch, heads, seq, dim", [(1, 9, 1, 64), (4, 3, 1, 128), (2, 2, 3, 8), (1, 1, 1, 2)])
@pytest.mark.parametrize("per_row_positions", [True, False])
def test_rope_equals_the_torch_rotation(batch, heads, seq, dim, per_row_positions):
    check_rope(batch, heads, seq, dim, seed=batch * heads + dim, per_row_positions=per_row_positions)


@pytest.mark.parametrize("rows, cols", [(1, 1536), (5, 17), (64, 64)])
def test_silu_mul_equals_silu_times_up(rows, cols):
    check_silu_mul(rows, cols, seed=rows + cols)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), dim=st.integers(1, 40).map(lambda n: 2 * n), heads=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_the_kernels_equal_torch_on_random_shapes(rows, dim, heads, seed):
    check_norm(rows, dim, scaled=seed % 2 == 0, seed=seed)
    check_rope(rows, heads, 1 + seed % 3, dim, seed=seed, per_row_positions=seed % 2 == 1)
    check_silu_mul(rows, dim + 1, seed=seed)


def test_modules_take_the_kernels_only_on_decode_sized_inference(monkeypatch):
    """Decode-sized float32 CPU inputs outside autograd take them; prefill rows, bf16, tensors that need
    gradients, and KVLAB_DECODE_OPS_KERNEL=0 keep the torch ops, with the same results either way."""
    x = torch.randn(2, 1, 576)
    assert decode_ops(2, x) is not None
    assert decode_ops(DECODE_OPS_MAX_ROWS + 1, x) is None
    assert decode_ops(2, x.bfloat16()) is None
    assert decode_ops(2, x.requires_grad_(True)) is None
    with torch.no_grad():
        assert decode_ops(2, x) is not None
    monkeypatch.setenv(DECODE_OPS.env, "0")
    assert decode_ops(2, x.detach()) is None
    monkeypatch.setenv(DECODE_OPS.env, "1")

    norm, mlp = RMSNorm(576), GatedMLP(576, 96)
    with torch.no_grad():
        norm.weight.normal_()
        for inputs in (torch.randn(3, 1, 576), torch.randn(1, 100, 576)):  # a decode step and a prefill
            for module in (norm, mlp):
                reference = torch_path(monkeypatch, lambda m=module, x=inputs: m(x))
                torch.testing.assert_close(module(inputs), reference, atol=1e-5, rtol=1e-5)
    out = norm(x)  # autograd: the torch ops, gradients flow
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


@torch.no_grad()
def test_decode_through_the_kernels_gives_the_torch_logits_and_tokens(monkeypatch):
    """A model with q/k norms, a gated MLP and left-padded rows: decode logits through the kernels equal the
    torch ops' (within float32 rounding), and greedy generation gives the same tokens."""
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2, "qk_norm": True},
                               {"type": "full", "n_heads": 4, "n_kv_heads": 1}])).eval()
    ids = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: per-row RoPE positions
    plain = torch_path(monkeypatch, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=12).tokens)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=12).tokens == plain

    def step():
        cache = model.new_cache(3)
        model(ids, cache=cache, attention_mask=mask)
        return model(torch.tensor([[5], [6], [7]]), cache=cache)

    torch.testing.assert_close(step(), torch_path(monkeypatch, step), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_kernels_built_without_avx512_equal_torch(monkeypatch):
    # the build a CPU without AVX-512 gets (x86-64-v3: AVX2 + FMA)
    portable_build(DECODE_OPS, monkeypatch)
    check_norm(3, 576, scaled=True, seed=1)
    check_rope(2, 3, 1, 64, seed=2, per_row_positions=True)
    check_silu_mul(2, 1536, seed=3)
