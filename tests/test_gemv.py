"""kvlab's GEMV kernel (``kernels.GEMV``, ``kernels/csrc/gemv.cpp``) against ``F.linear`` (its reference):
rows on both paths (the GEMV up to 4 and the register tiles of 8 x 48 past it), widths on and off their
steps, bias, fp32 and bf16 weights, strided weights (a
slice of a fused group); when ``FusedGroup.linear`` takes it; the model's decode through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import build, portable_build, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab import linear_layout
from kvlab.kernels import GEMV
from kvlab.linear_layout import gemv, gemv_applies


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    monkeypatch.setenv("KVLAB_GEMV_KERNEL", "1")
    if GEMV.module() is None:
        pytest.skip("the GEMV kernel did not build on this machine")


def column_major(out_features: int, in_features: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return weight.t().contiguous().t()  # [out, in] stored in-major, as linear_layout.fuse_ lays it out


@settings(max_examples=60, deadline=None)
@given(rows=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 40]), in_features=st.integers(1, 700), out_features=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(), lead=st.sampled_from([(), (1,)]),
       seed=st.integers(0, 2**16))
@torch.no_grad()
def test_gemv_equals_f_linear(rows, in_features, out_features, dtype, bias, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = column_major(out_features, in_features, dtype, seed)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    x = torch.randn(rows, *lead, in_features, generator=gen).to(dtype)
    out = gemv(x, weight, b)
    ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 2e-5 * in_features ** 0.5 if dtype == torch.float32 else 2e-2 * in_features ** 0.5
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@torch.no_grad()
def test_gemv_on_a_row_block_of_a_fused_weight():
    # q/k/v of a fused group are row blocks of one column-major tensor: wt = weight.T has strided rows
    fused = column_major(960, 576)
    x = torch.randn(1, 576)
    for rows in (slice(0, 576), slice(576, 768), slice(768, 960)):
        torch.testing.assert_close(gemv(x, fused[rows]), F.linear(x, fused[rows]), atol=1e-4, rtol=1e-5)


def test_gemv_applies_only_where_it_can_run(monkeypatch):
    weight, x = column_major(512, 256), torch.randn(1, 256)
    assert gemv_applies(x, weight)
    assert gemv_applies(torch.randn(64, 256), weight) and not gemv_applies(torch.randn(65, 256), weight)
    assert not gemv_applies(x, weight.contiguous())  # row-major: F.linear
    assert not gemv_applies(x, column_major(8, 256))  # a toy weight: nothing to gain
    assert not gemv_applies(x.half(), weight.half()) and not gemv_applies(x.bfloat16(), weight)
    monkeypatch.setenv("KVLAB_GEMV_KERNEL", "0")
    assert not gemv_applies(x, weight)


def test_gemv_pays_is_measured_once_per_key(monkeypatch, tmp_path):
    asked, timings = [], linear_layout._timings
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))  # no decisions stored yet
    monkeypatch.setattr(linear_layout, "_GEMV_PAYS", {})
    monkeypatch.setattr(linear_layout, "_timings", lambda w, rows, names: asked.append((w.shape, rows, names))
                        or {"gemv": 1.0, "mkl": 2.0, "onednn": 0.5})
    weight = column_major(512, 256)
    assert linear_layout.gemv_pays(weight, 1, False) and linear_layout.gemv_pays(weight, 1, False)
    assert not linear_layout.gemv_pays(weight, 1, True)  # oneDNN measured faster here
    assert linear_layout.gemv_pays(weight, 3, False)  # 2-4 rows: measured at 4
    for rows in (5, 16, 32, 33, 64):  # 5-32 at 16, 33-64 at 64
        assert linear_layout.gemv_pays(weight, rows, False)
    assert asked == [(weight.shape, 1, ("gemv", "mkl")), (weight.shape, 1, ("gemv", "onednn")),
                     (weight.shape, 4, ("gemv", "mkl")), (weight.shape, 16, ("gemv", "mkl")),
                     (weight.shape, 64, ("gemv", "mkl"))]
    times = timings(weight, 1, ("gemv", "mkl"))  # the real measurement runs and times both
    assert set(times) == {"gemv", "mkl"} and all(t > 0 for t in times.values())


def test_gemv_decisions_are_kept_per_machine(monkeypatch, tmp_path):
    """A later process reads the decision instead of measuring again; a corrupt, foreign or unwritable
    decisions file only means measuring."""
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(linear_layout, "_timings", lambda w, rows, names: measured.append(rows)
                        or {"gemv": 1.0, "mkl": 2.0})
    weight = column_major(512, 256)
    for _ in range(2):  # two "processes"
        monkeypatch.setattr(linear_layout, "_GEMV_PAYS", {})
        assert linear_layout.gemv_pays(weight, 1, False)
    assert measured == [1] and (tmp_path / linear_layout.DECISIONS).exists()
    for text in ("{not json", "[1, 2]", '{"x": "yes"}'):
        (tmp_path / linear_layout.DECISIONS).write_text(text)
        monkeypatch.setattr(linear_layout, "_GEMV_PAYS", {})
        assert linear_layout.gemv_pays(weight, 1, False)
    assert measured == [1, 1, 1, 1]
    monkeypatch.setenv("KVLAB_KERNEL_DIR", str(tmp_path / linear_layout.DECISIONS / "x"))  # under a file
    monkeypatch.setattr(linear_layout, "_GEMV_PAYS", {})
    assert linear_layout.gemv_pays(weight, 1, False) and len(measured) == 5


@torch.no_grad()
def test_decode_through_the_kernel_gives_the_members_logits_and_tokens(monkeypatch):
    """Every fused group of a model taken through the kernel (size floor off, measured as paying): the decode
    logits equal the autograd (members') path, and the greedy tokens those of ``F.linear``."""
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True},
                               {"type": "full", "n_heads": 4, "n_kv_heads": 1}])).eval()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    plain = model.generate(ids, max_new_tokens=10).tokens
    calls = []
    monkeypatch.setattr(linear_layout, "GEMV_MIN_BYTES", 0)
    monkeypatch.setattr(linear_layout, "gemv_pays", lambda *a: calls.append(a) or True)
    assert model.generate(ids, max_new_tokens=10).tokens == plain
    assert len(calls) >= 10 * 5  # q/k/v, o, gate/up, down per layer and the head, every step
    cache = model.new_cache(1)
    model(ids, cache=cache)
    token = torch.tensor([[5]])
    fused = model(token, cache=cache)
    with torch.enable_grad():
        cache2 = model.new_cache(1)
        model(ids, cache=cache2)
        members = model(token, cache=cache2).detach()
    torch.testing.assert_close(fused, members, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batched_decode_through_the_kernel_gives_f_linear_tokens(monkeypatch):
    """A batch of 12 decoding together: every linear through the register-tiled path gives F.linear's
    greedy tokens, row by row."""
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2},
                               {"type": "full", "n_heads": 4, "n_kv_heads": 1}])).eval()
    ids = torch.randint(0, 97, (12, 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("KVLAB_GEMV_KERNEL", "0")
    plain = model.generate(ids, max_new_tokens=6).tokens
    monkeypatch.setenv("KVLAB_GEMV_KERNEL", "1")
    rows = []
    monkeypatch.setattr(linear_layout, "GEMV_MIN_BYTES", 0)
    monkeypatch.setattr(linear_layout, "gemv_pays", lambda w, n, packed: rows.append(n) or True)
    assert model.generate(ids, max_new_tokens=6).tokens == plain
    assert 12 in rows


@pytest.mark.slow
def test_the_kernel_built_without_avx512_equals_f_linear(monkeypatch):
    # the build a CPU without AVX-512 gets (x86-64-v3: AVX2 + FMA) runs the plain loops
    portable_build(GEMV, monkeypatch)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for rows, n_in, n_out in ((1, 576, 960), (3, 37, 100), (4, 1536, 17), (16, 576, 100), (9, 70, 49)):
                weight, x = column_major(n_out, n_in, dtype), torch.randn(rows, n_in).to(dtype)
                tol = 1e-4 if dtype == torch.float32 else 5e-1
                torch.testing.assert_close(gemv(x, weight).float(), F.linear(x.float(), weight.float()),
                                           atol=tol, rtol=1e-2)
