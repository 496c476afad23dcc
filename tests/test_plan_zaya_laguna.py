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
