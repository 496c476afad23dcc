"""``kvlab plan --preset`` for ZAYA1-8B and Laguna XS.2: totals checked against bytes computed by hand
from the public configs (bf16, batch 1)."""

import json

import kvlab
from kvlab.cli import main


def _plan_json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_zaya1_8b_preset(capsys):
    # per layer: K and V, 2 KV heads x 128, bf16 -> 1024 B/token; fixed state: conv history of
    # (8 + 2) heads x 128 channels x 2 tokens + the delayed value (2 x 128 / 2) -> 2688 elements = 5376 B
    results = _plan_json(capsys, "--preset", "zaya1-8b", "--context", "1K,128K")
    for result, tokens in zip(results, (1024, 131072)):
        assert result["total_bytes"] == 40 * (1024 * tokens + 5376)
    assert results[0]["total_bytes"] == 42_158_080
    assert {layer.type for layer in kvlab.plan("zaya1-8b").layers} == {"cca"}


def test_laguna_xs2_preset(capsys):
    # every layer: K and V, 8 KV heads x 128, bf16 -> 4096 B/token; 10 full layers grow forever, the 30
    # sliding layers (window 512) stop growing once the window is full
    small, long, longer = _plan_json(capsys, "--preset", "laguna-xs.2", "--context", "256,4K,8K")
    assert small["total_bytes"] == 40 * 4096 * 256
    assert longer["total_bytes"] - long["total_bytes"] == 10 * 4096 * 4096
    layers = kvlab.plan("laguna-xs.2", context=8192, dtype="bf16").layers
    assert [layer.type for layer in layers[:4]] == ["full", "sliding", "sliding", "sliding"]
    assert sum(layer.type == "full" for layer in layers) == 10
    assert all(layer.cache_bytes == 4096 * 8192 for layer in layers if layer.type == "full")
