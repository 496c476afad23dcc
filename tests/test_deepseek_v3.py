"""DeepSeek V3 (all-dense) against transformers' DeepseekV3ForCausalLM; the planner on the public config;
kvlab's YaRN frequencies against transformers' ``_compute_yarn_parameters``."""

import json

import pytest
import torch
from hf_parity import noisy_

import kvlab
from kvlab.cli import main
from kvlab.hf import config_from_hf
from kvlab.planner import load_preset

transformers = pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}


def hf_config(n_layers=2, q_lora_rank=24, rope_interleave=True, **extra):
    return transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, first_k_dense_replace=extra.pop("dense", n_layers),
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=256,
        rope_parameters=dict(YARN), rope_interleave=rope_interleave, attn_implementation="eager", **extra)


@pytest.mark.parametrize("q_lora_rank,interleave", [(24, True), (None, False)])
def test_full_model_parity_with_transformers(tmp_path, q_lora_rank, interleave):
    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(hf_config(q_lora_rank=q_lora_rank,
                                                             rope_interleave=interleave)).eval()
    noisy_(reference, std=0.1)
    reference.save_pretrained(tmp_path / "hf")
    model = kvlab.load(tmp_path / "hf").eval()
    assert model.config.layers[0].type == "mla"
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=1e-4)
        # 32 cached greedy steps, each side with its own cache (HF re-expands its latent; kvlab absorbs)
        hf_cache, cache = transformers.DynamicCache(config=reference.config), model.new_cache(2)
        ref_next = reference(ids, past_key_values=hf_cache, use_cache=True).logits[:, -1]
        ours_next = model(ids, cache=cache)[:, -1]
        for _ in range(32):
            torch.testing.assert_close(ours_next, ref_next, atol=1e-4, rtol=1e-4)
            token = ref_next.argmax(-1, keepdim=True)
            assert torch.equal(token, ours_next.argmax(-1, keepdim=True))
            ref_next = reference(token, past_key_values=hf_cache, use_cache=True).logits[:, -1]
            ours_next = model(token, cache=cache)[:, -1]
    assert cache.nbytes == 2 * 2 * (32 + 8) * 44 * 4  # layers x rows x (latent + rope) x tokens x fp32


def test_mixture_of_experts_checkpoint_is_unsupported(tmp_path):
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(hf_config(dense=1)).save_pretrained(tmp_path / "moe")
    with pytest.raises(kvlab.UnsupportedError, match=r"mixture-of-experts.*first_k_dense_replace=1") as info:
        kvlab.load(tmp_path / "moe")
    assert "\n" not in str(info.value)


def test_config_head_dim_and_kv_heads_do_not_fool_the_planner():
    data = load_preset("deepseek-v3")
    config = config_from_hf(data)
    spec = config.layer(0)
    assert (spec.kv_lora_rank, spec.qk_rope_head_dim, spec.n_kv_heads) == (512, 64, 1)
    assert config.rope.interleaved and config.rope.scaling["factor"] == 40
    plan = kvlab.plan(config, context=1000, dtype="bf16")
    assert plan.total_bytes == 61 * 576 * 2 * 1000
    generic = 61 * 2 * data["num_key_value_heads"] * (data["qk_nope_head_dim"] + data["qk_rope_head_dim"]) * 2
    assert generic / (plan.total_bytes / 1000) > 28  # what the generic 2 * n_kv * head_dim rule would claim


def test_plan_preset_deepseek_v3_cli(capsys):
    assert main(["plan", "--preset", "deepseek-v3", "--context", "1,4K,128K", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    for result, tokens in zip(results, (1, 4096, 131072)):
        assert result["dtype"] == "bfloat16"
        assert result["total_bytes"] == 70_272 * tokens
        assert result["bytes_per_token"] == 70_272


def test_softmax_scale_has_yarn_mscale_correction():
    from kvlab.attention.mla import mla_softmax_scale
    from kvlab.rope import _yarn_mscale

    spec = config_from_hf(load_preset("deepseek-v3")).layer(0)
    assert mla_softmax_scale(spec) == pytest.approx(192 ** -0.5 * _yarn_mscale(40, 1.0) ** 2)


@pytest.mark.parametrize("params", [
    dict(YARN),
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0, "original_max_position_embeddings": 8192,
     "truncate": False},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 2048,
     "attention_factor": 0.8, "beta_fast": 16, "beta_slow": 2},
])
def test_yarn_frequencies_match_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kvlab.config import RopeConfig
    from kvlab.rope import rope_frequencies

    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=1, head_dim=64,
                                  max_position_embeddings=8 * params["original_max_position_embeddings"],
                                  rope_parameters=dict(params))
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    rope = RopeConfig(theta=params["rope_theta"], scaling=scaling, max_position=hf.max_position_embeddings)
    inv_freq, factor = rope_frequencies(rope, 64)
    torch.testing.assert_close(inv_freq, expected.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(expected_factor, rel=1e-7)


def test_moe_config_is_planned_but_not_built():
    config = config_from_hf(load_preset("deepseek-v3"))
    with pytest.raises(kvlab.UnsupportedError, match="mixture-of-experts"):
        kvlab.Model(config)
    assert kvlab.plan(config, context=10, with_weights=True).weights_bytes is None  # not a dense-model guess
    with pytest.raises(kvlab.KvlabError, match="a mixture of 256 experts, whose weights kvlab does not count"):
        kvlab.plan(config, context=10, budget_bytes=2**40)
