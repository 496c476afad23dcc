"""Fused decode groups (kvlab.linear_layout): one GEMV for q/k/v and gate/up gives the members' own outputs,
never goes stale (training updates, ``.to()``, replaced parameters, hooks) and changes nothing a state dict
or a checkpoint sees."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build, tiny_config
from torch import nn

import kvlab
from kvlab.linear_layout import _GROUPS, fuse_, group_forward

NAMES = ("a", "b", "c")


def members(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Module()
    for name, out in zip(NAMES, (8, 4, 4)):
        setattr(module, name, nn.Linear(6, out, bias=bias))
    return module


def separate(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [getattr(module, name)(x) for name in NAMES]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_group_equals_members_and_keeps_names(bias):
    module = members(bias)
    x = torch.randn(2, 3, 6)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    expected = separate(module, x)
    fuse_(module, NAMES, pack=True)
    group = module.__dict__[_GROUPS][NAMES]
    assert (group.packed is not None) == torch.backends.mkldnn.is_available()  # CPU fp32: a oneDNN copy
    state = module.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    with torch.inference_mode():
        fused = group_forward(module, NAMES, x)
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)


def test_training_updates_reach_the_fused_weight_and_gradients_reach_members():
    module = members(bias=True)
    fuse_(module, NAMES, pack=True)
    x = torch.randn(4, 6)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    sum(out.square().sum() for out in group_forward(module, NAMES, x)).backward()  # grad mode: members
    assert all(getattr(module, name).weight.grad is not None for name in NAMES)
    optimizer.step()  # in place: the fused tensor holds the new values, the packed copy is stale
    with torch.no_grad():
        for got, want in zip(group_forward(module, NAMES, x), separate(module, x)):
            torch.testing.assert_close(got, want)
    stale = module.__dict__[_GROUPS][NAMES]
    fuse_(module, NAMES, pack=True)  # re-packs (generate() does this before decoding)
    fresh = module.__dict__[_GROUPS][NAMES]
    assert fresh.weight is stale.weight and (fresh.packed is None or fresh.packed is not stale.packed)
    with torch.no_grad():
        for got, want in zip(group_forward(module, NAMES, x), separate(module, x)):
            torch.testing.assert_close(got, want)


def test_replaced_parameters_and_hooks_fall_back_to_the_members():
    module = members(bias=False)
    fuse_(module, NAMES)
    x = torch.randn(3, 6)
    module.b.weight.data = torch.randn(4, 6)  # no longer a view of the fused tensor
    with torch.no_grad():
        for got, want in zip(group_forward(module, NAMES, x), separate(module, x)):
            torch.testing.assert_close(got, want)
    fuse_(module, NAMES)  # re-done: fused again, with the new values
    seen = []
    module.c.register_forward_hook(lambda *_: seen.append(1))
    with torch.no_grad():
        group_forward(module, NAMES, x)
    assert seen == [1]


def test_unfusable_groups_are_left_column_major():
    module = members(bias=False)
    module.c = nn.Linear(6, 4, bias=True)  # mixed bias-ness: no fusion
    fuse_(module, NAMES)
    assert NAMES not in module.__dict__[_GROUPS]
    assert all(getattr(module, name).weight.stride(0) == 1 for name in NAMES)
    with torch.no_grad():
        x = torch.randn(2, 6)
        for got, want in zip(group_forward(module, NAMES, x), separate(module, x)):
            torch.testing.assert_close(got, want)


LAYERS = [{"type": "full", "n_heads": 4, "n_kv_heads": 2, "qkv_bias": True},
          {"type": "full", "n_heads": 4, "n_kv_heads": 1, "qk_norm": True},
          {"type": "full", "n_heads": 4, "n_kv_heads": 2, "k_eq_v": True},
          {"type": "full", "n_heads": 4, "n_kv_heads": 2, "kv_from": 0}]


@torch.no_grad()
def test_model_decode_equals_training_path_after_to_and_reload(tmp_path):
    """The fused inference path gives the logits of the members' path (autograd on); ``.to(float64)`` and
    a save/load round trip re-fuse (greedy tokens unchanged)."""
    model = build(tiny_config(LAYERS)).eval()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    fused = model(ids)
    with torch.enable_grad():
        members_path = model(ids).detach()
    torch.testing.assert_close(fused, members_path, atol=1e-5, rtol=1e-5)
    greedy = model.generate(ids, max_new_tokens=12).tokens
    model.save(tmp_path / "m")
    loaded = kvlab.load(tmp_path / "m").eval()
    assert loaded.layers[0].self_attn.__dict__[_GROUPS]
    assert loaded.__dict__[_GROUPS][("lm_head",)].packed is None  # a lone linear's group (the GEMV kernel's); packing is opt-in
    loaded.pack_linears_()
    assert loaded.__dict__[_GROUPS][("lm_head",)].packed is not None or not torch.backends.mkldnn.is_available()
    torch.testing.assert_close(loaded(ids), fused, atol=1e-4, rtol=1e-4)
    assert loaded.generate(ids, max_new_tokens=12).tokens == greedy
    assert loaded.generate(ids, max_new_tokens=12).tokens == greedy
    copied = copy.deepcopy(model).eval()  # the copy gets a layout of its own
    assert copied.layers[0].self_attn.q_proj.weight.data_ptr() != model.layers[0].self_attn.q_proj.weight.data_ptr()
    torch.testing.assert_close(copied(ids), fused, atol=0, rtol=0)
    wide = model.to(torch.float64)
    attn = wide.layers[0].self_attn
    group = attn.__dict__[_GROUPS][attn.QKV]
    assert group.weight.dtype == torch.float64 and attn.q_proj.weight.data_ptr() == group.weight.data_ptr()
    assert group.packed is None  # no oneDNN copy of a float64 weight: F.linear on the fused tensor
    torch.testing.assert_close(wide(ids).float(), fused, atol=1e-4, rtol=1e-4)


def test_layout_redone_under_inference_mode_still_trains():
    """generate() re-does the layout inside inference mode: the fused storage must stay a normal tensor."""
    module = members(bias=True)
    with torch.inference_mode():
        fuse_(module, NAMES)
    loss = sum(out.sum() for out in group_forward(module, NAMES, torch.randn(2, 6)))
    loss.backward()
    assert module.a.weight.grad is not None


def test_model_built_under_inference_mode():
    """Parameters made under inference mode are inference tensors (no version counter): still laid out."""
    ids = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        model = build(tiny_config(LAYERS))
        logits = model(ids)
        assert model.layers[0].self_attn.__dict__[_GROUPS]
    torch.testing.assert_close(logits, build(tiny_config(LAYERS))(ids).detach(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_linears_is_scoped_and_frees_the_copies():
    """``with model.packed_linears()`` packs for the block only (the copies are freed after it), keeps a model
    that was packed before packed, and changes no logit beyond fp32 rounding."""
    model = build(tiny_config(LAYERS)).eval()
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    attn = model.layers[0].self_attn

    def packed() -> bool:
        return attn.__dict__[_GROUPS][attn.QKV].packed is not None

    plain = model(ids)
    with model.packed_linears() as same:
        assert same is model and model.pack_linears
        assert packed() == torch.backends.mkldnn.is_available()
        torch.testing.assert_close(model(ids), plain, atol=1e-4, rtol=1e-4)
    assert not model.pack_linears and not packed()
    assert all(group.packed is None for group in model.__dict__[_GROUPS].values())  # the LM head's copy too
    model.pack_linears_()
    with model.packed_linears():
        pass
    assert model.pack_linears and packed() == torch.backends.mkldnn.is_available()
    with pytest.raises(RuntimeError), model.pack_linears_(False).packed_linears():
        raise RuntimeError("freed on the way out too")
    assert not packed()


@torch.no_grad()
def test_bf16_packed_where_onednn_has_native_bf16(monkeypatch):
    """A bf16 model is packed only where oneDNN has a bf16 kernel (``packable_dtypes``), and the packed path
    gives the unpacked bf16 logits within bf16 rounding; its own ``packed_pays`` decision (the key holds the
    dtype) is what routes it."""
    from kvlab import linear_layout

    model = build(tiny_config(LAYERS)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = model(ids).float()
    monkeypatch.setattr(linear_layout, "packed_pays", lambda weight, rows: True)  # take the packed path
    with model.packed_linears():
        attn = model.layers[0].self_attn
        packed = attn.__dict__[_GROUPS][attn.QKV].packed
        assert (packed is not None) == (torch.bfloat16 in linear_layout.packable_dtypes())
        torch.testing.assert_close(model(ids).float(), plain, atol=0.05, rtol=0.05)
    assert attn.__dict__[_GROUPS][attn.QKV].packed is None


def test_packed_pays_is_measured_per_dtype_and_shape(monkeypatch):
    """One measurement per (threads, rows bucket, dtype, weight shape): an LM head asked first (a prefill's
    last token) does not decide for the layers' linears, nor q/k/v for the MLP."""
    from kvlab import linear_layout

    asked = []
    monkeypatch.setattr(linear_layout, "_PACKED_PAYS", {})
    monkeypatch.setattr(linear_layout, "_measure_packed", lambda w, rows: asked.append((w.shape, rows)) or 2.0)
    head, layer, mlp = torch.empty(512, 32), torch.empty(64, 32), torch.empty(32, 96)
    for weight, rows in ((head, 1), (layer, 1), (layer, 1), (layer.bfloat16(), 1), (layer, 16), (mlp, 16),
                         (head, 1), (mlp, 20)):
        assert linear_layout.packed_pays(weight, rows)
    assert asked == [(head.shape, 1), (layer.shape, 1), (layer.shape, 1), (layer.shape, 16), (mlp.shape, 16)]


@pytest.mark.parametrize("rows_out", [48, 2**17])  # a layer's linear; a head larger than the timing budget (a slice)
def test_packed_measurement_times_distinct_copies_in_the_models_layout(monkeypatch, rows_out):
    """The timed copies are real copies (not aliases of one hot tensor: ``.t().contiguous()`` of a column-major
    weight is a no-op, which once made MKL look 3x faster) and keep the column-major layout, a slice too."""
    from kvlab import linear_layout

    seen = []
    monkeypatch.setattr(linear_layout, "packed_weight", lambda w: seen.append(w) or None)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, *a: x, raising=False)
    weight = torch.zeros(rows_out, 64).t().contiguous().t()  # column-major, as the model stores it
    linear_layout._measure_packed(weight, 16)
    assert len(seen) >= 2 and len({w.data_ptr() for w in seen}) == len(seen)
    assert all(w.stride(0) == 1 and w.data_ptr() != weight.data_ptr() for w in seen)


def test_a_decode_step_traces_without_graph_breaks():
    """``torch.compile`` of a one-token step through the cache sees one graph: tracing bypasses the fused
    groups (their storage check is a graph break); the traced step advances the cache as the eager one does
    (``benchmarks/compiled_decode.py`` measures whether compiling pays)."""
    model = build(tiny_config([{"type": "full", "n_heads": 4, "n_kv_heads": 2}] * 2))
    assert model.layers[0].self_attn.__dict__.get(_GROUPS)  # laid out for decode: fused groups exist

    def step(token, cache):
        return model(token, cache=cache)[:, -1]

    with torch.inference_mode():
        traced, eager = model.new_cache(1), model.new_cache(1)
        for cache in (traced, eager):
            model(torch.tensor([[1, 2, 3]]), cache=cache)
        explained = torch._dynamo.explain(step)(torch.tensor([[4]]), traced)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        step(torch.tensor([[4]]), eager)
        torch.testing.assert_close(step(torch.tensor([[5]]), traced), step(torch.tensor([[5]]), eager))
