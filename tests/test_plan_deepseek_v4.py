"""``kvlab plan`` for DeepSeek V4 Flash (and its ratio to DeepSeek V3), and the deepseek_v4 config reader:
planned bytes equal hand-computed ones and the measured cache of a small model built from an HF config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build

import kvlab
from kvlab.cli import main
from kvlab.hf.deepseek_v4 import deepseek_v4_config
from kvlab.planner import preset_names

M = 1024 * 1024


def test_deepseek_v4_flash_preset_bytes_by_hand():
    result = kvlab.plan("deepseek-v4-flash", context=M, dtype="bfloat16")
    d, d_i, window = 512, 128, 127
    csa = window * d + M // 4 * (d + d_i) + 2 * 4 * (2 * d + 2 * d_i) + 2 * 4 * (d + d_i)
    hca = window * d + M // 128 * d + 2 * 128 * d
    assert [layer.type for layer in result.layers] == ["v4_sliding"] * 2 + ["csa", "hca"] * 20 + ["csa"]
    assert result.total_bytes == 2 * (2 * window * d + 21 * csa + 20 * hca)
    assert 6.7 < result.total_bytes / 2**30 < 6.8  # ~10% of V3's 68.6 GiB (MLA) at 1M tokens


def test_plan_compares_presets_and_prints_the_ratio(capsys):
    other = "deepseek-v3" if "deepseek-v3" in preset_names() else "llama-3.1-8b"
    assert main(["plan", "--preset", "deepseek-v4-flash", "--preset", other, "--context", "1M"]) == 0
    out = capsys.readouterr().out
    assert "KV-cache bytes relative to deepseek-v4-flash:" in out and f"{other} " in out
    assert main(["plan", "--preset", "deepseek-v4-flash", "--preset", other, "--context", "1M", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    v4, theirs = (plans[0]["total_bytes"] for plans in data["plans"])
    assert data["ratios"][0]["ratio"] == pytest.approx(theirs / v4)


def test_plan_deepseek_v4_flash_vs_v3():
    if "deepseek-v3" not in preset_names():
        pytest.skip("the deepseek-v3 preset is not there yet")
    v4 = kvlab.plan("deepseek-v4-flash", context=M, dtype="bfloat16").total_bytes
    v3 = kvlab.plan("deepseek-v3", context=M, dtype="bfloat16").total_bytes
    assert 0.05 < v4 / v3 < 0.15  # DeepSeek reports ~10% of V3.2's KV cache at 1M


TINY_HF = {"model_type": "deepseek_v4", "vocab_size": 61, "hidden_size": 32, "num_hidden_layers": 4,
           "num_attention_heads": 2, "head_dim": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
           "sliding_window": 5, "compress_ratios": [0, 4, 8, 4], "compress_rate_hca": 8, "o_groups": 2,
           "o_lora_rank": 8, "index_n_heads": 2, "index_head_dim": 12, "index_topk": 2, "hc_mult": 2,
           "moe_intermediate_size": 24,
           "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64}}


def test_hf_config_reader_fields():
    config = deepseek_v4_config(TINY_HF)
    assert [s.type for s in config.layers] == ["v4_sliding", "csa", "hca", "csa"]
    csa, hca = config.layer(1), config.layer(2)
    assert (csa.compress_rate, hca.compress_rate, csa.index_topk, csa.window) == (4, 8, 2, 5)
    assert csa.rope.theta == 160000.0 and csa.rope.interleaved and csa.rope.partial == 0.5
    assert csa.rope.scaling["attention_factor"] == 1.0 and config.layer(0).rope.scaling is None
    assert config.hyper_connections == {"streams": 2, "sinkhorn_iters": 20, "eps": 1e-6}
    with pytest.raises(kvlab.KvlabError, match="compress_ratios"):
        deepseek_v4_config({**TINY_HF, "compress_ratios": [0, 4, 16, 4]})


@torch.no_grad()
def test_planner_equals_measured_cache_for_model_from_hf_config():
    model = build(deepseek_v4_config(TINY_HF))
    cache = model.new_cache(2)
    ids = torch.randint(0, 61, (2, 40))
    model(ids[:, :13], cache=cache)
    for t in range(13, 40):
        model(ids[:, t:t + 1], cache=cache)
        assert cache.layer_nbytes() == [layer.cache_bytes for layer in kvlab.plan(model.config, t + 1, batch=2).layers]


def test_hf_checkpoint_is_plannable_not_loadable(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    assert kvlab.plan(tmp_path, context=64).total_bytes > 0
    with pytest.raises(kvlab.errors.UnsupportedError, match="planned but not loaded"):
        kvlab.load(tmp_path)
