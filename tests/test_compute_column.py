"""The planner's compute column against FLOPs counted by torch (FlopCounterMode) on a decode step, and the
``kvlab show-mask`` picture."""

import pytest
import torch
from helpers import build, tiny_config
from torch.utils.flop_counter import FlopCounterMode

import kvlab

MATMUL_PROJECTIONS = {"mm", "addmm", "convolution"}  # q/k/v/o projections, MLP, conv: not attention core


def math_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **_):
    """SDPA written as matmuls, so FlopCounterMode sees it (it does not count CPU's fused kernel)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def counted_core_flops(model, ids, monkeypatch) -> int:
    """Counted FLOPs of the last token's forward, minus the projection matmuls."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", math_sdpa)
    monkeypatch.setenv("KVLAB_FLOAT_KERNEL", "0")  # decode through SDPA: the C++ kernel is invisible to the counter
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        with FlopCounterMode(display=False) as counter:
            model(ids[:, -1:], cache=cache)
    per_op = counter.get_flop_counts()["Global"]
    return sum(n for op, n in per_op.items() if op.__name__.split(".")[0] not in MATMUL_PROJECTIONS)


@pytest.mark.parametrize("layer", [
    {"type": "full", "n_heads": 4, "n_kv_heads": 2},
    {"type": "full", "n_heads": 4, "n_kv_heads": 1},
    {"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "window": 8},
    {"type": "gated_deltanet", "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "value_head_dim": 12},
], ids=["gqa", "mqa", "sliding", "gated_deltanet"])
@pytest.mark.parametrize("context", [12, 30])  # sliding: past the window (W = 8)
def test_decode_flops_column_equals_counted_flops(layer, context, monkeypatch):
    model = build(tiny_config([layer]))
    ids = torch.randint(0, 97, (1, context))
    planned = kvlab.plan(model.config, context=context).decode_flops
    assert planned == counted_core_flops(model, ids, monkeypatch) > 0


def test_compute_column_orders_quadratic_window_linear():
    layers = {"full": {"type": "full", "n_heads": 8}, "sliding": {"type": "sliding", "n_heads": 8, "window": 512},
              "linear": {"type": "gated_deltanet", "n_heads": 8}}
    prefill = {name: [kvlab.plan(tiny_config([spec], d_model=512), context=n).prefill_flops for n in (4096, 8192)]
               for name, spec in layers.items()}
    assert prefill["full"][1] / prefill["full"][0] == pytest.approx(4, rel=1e-3)  # O(N^2)
    assert prefill["sliding"][1] / prefill["sliding"][0] == pytest.approx(2, rel=0.1)  # O(N W)
    assert prefill["linear"][1] / prefill["linear"][0] == 2  # O(N)


def test_show_mask_writes_png(tmp_path):
    import json

    from kvlab.cli import main

    config = {"vocab_size": 97, "d_model": 64, "n_layers": 2, "mlp_hidden": 96, "layers": [
        {"type": "sliding", "n_heads": 4, "window": 8, "sinks": 2},
        {"type": "block_sparse", "n_heads": 4, "block": 4, "local_blocks": 2, "random_blocks": 1}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    for layer in (0, 1):
        out = tmp_path / f"m{layer}.png"
        assert main(["show-mask", str(path), "--layer", str(layer), "--seq", "40", "--out", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show-mask", str(path), "--layer", "7"]) == 2
    out.write_bytes(b"mine")  # an existing file is not overwritten without --force
    assert main(["show-mask", str(path), "--layer", "1", "--seq", "40", "--out", str(out)]) == 2
    assert out.read_bytes() == b"mine"
    assert main(["show-mask", str(path), "--layer", "1", "--seq", "40", "--out", str(out), "--force"]) == 0
