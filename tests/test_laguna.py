"""Laguna XS.2 per-layer budgeting: per-layer query heads, layer types and RoPE, softplus output gate.
kvlab models through the standard matrix; parity with transformers' ``laguna`` (module and full model)."""

import pytest
import torch
from helpers import model_dict as _model
from hf_parity import additive_causal_mask, check_module_parity, noisy_
from matrix import *  # noqa: F401,F403

import kvlab
from kvlab.hf import config_from_hf

transformers = pytest.importorskip("transformers")

YARN = {"theta": 500000.0, "partial": 0.5, "max_position": 2048,
        "scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                    "beta_fast": 64, "beta_slow": 1, "attention_factor": 1.0}}


def _layer(n_heads, gate="head", **extra):
    return {"type": "full", "n_heads": n_heads, "n_kv_heads": 2, "head_dim": 16, "qk_norm": True,
            "output_gate": gate, **extra}


CASES = {
    "budgeted_heads_gate_per_head": _model([_layer(4, rope=YARN), _layer(8), _layer(2, rope=YARN)]),
    "gate_per_element_partial_rope": _model([_layer(6, "element", rope={"theta": 1e4, "partial": 0.5}),
                                             _layer(2, "element")]),
    "sliding_layers_gated": _model([_layer(4, rope=YARN), _layer(8, type="sliding", window=6),
                                    _layer(2, "element", type="sliding", window=6)], _seq=20),
}

LAYER_TYPES = ["full_attention", "full_attention", "full_attention"]
MIXED_TYPES = ["full_attention", "sliding_attention", "sliding_attention"]


def hf_config(layer_types=LAYER_TYPES, heads=(4, 8, 2), gating="per-element", **extra):
    rope = {"full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "partial_rotary_factor": 0.5,
                               "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 64,
                               "beta_slow": 1, "attention_factor": 1.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}}
    return transformers.LagunaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_attention_heads_per_layer=list(heads),
        layer_types=list(layer_types), mlp_layer_types=["dense"] * len(layer_types), gating=gating,
        sliding_window=8, max_position_embeddings=2048, rope_parameters=rope, attn_implementation="eager",
        **extra)


def hf_pair(tmp_path, **kwargs):
    """A tiny random transformers Laguna (dense MLPs) and the kvlab model loaded from its checkpoint."""
    torch.manual_seed(0)
    reference = transformers.LagunaForCausalLM(hf_config(**kwargs)).eval()
    noisy_(reference)
    reference.save_pretrained(tmp_path / "hf")
    return reference, kvlab.load(tmp_path / "hf").eval()


@pytest.mark.parametrize("layer_types", [LAYER_TYPES, MIXED_TYPES],
                         ids=["full", "sliding"])
@pytest.mark.parametrize("gating", ["per-element", "per-head"])
def test_full_model_parity_with_transformers(tmp_path, gating, layer_types):
    reference, model = hf_pair(tmp_path, gating=gating, layer_types=layer_types)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)
        cache, outs = model.new_cache(2), []
        for start, size in [(0, 8)] + [(t, 1) for t in range(8, 40)]:
            outs.append(model(ids[:, start:start + size], cache=cache))
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_types", [LAYER_TYPES, MIXED_TYPES],
                         ids=["full", "sliding"])
def test_attention_module_parity_with_transformers(tmp_path, layer_types):
    reference, model = hf_pair(tmp_path, layer_types=layer_types)
    x = torch.randn(2, 39, 64, generator=torch.Generator().manual_seed(4))
    for i, layer_type in enumerate(reference.config.layer_types):
        attn = reference.model.layers[i].self_attn
        window = reference.config.sliding_window if layer_type == "sliding_attention" else None

        def hf_step(chunk, start, cache, attn=attn, layer_type=layer_type, window=window):
            positions = torch.arange(start, start + chunk.shape[1])[None]
            cos_sin = reference.model.rotary_emb(chunk, positions, layer_type)
            assert chunk.shape[1] == 1 or start == 0
            mask = additive_causal_mask(chunk.shape[1], window) if chunk.shape[1] > 1 else None
            return attn(chunk, cos_sin, mask, past_key_values=cache)[0]

        check_module_parity(hf_step, lambda: transformers.DynamicCache(config=reference.config),
                            model.layers[i].self_attn, x)


def _hf_dict(**overrides):
    data = hf_config().to_dict()
    data.update(overrides)
    return data


def test_reader_maps_budget_gate_and_rope():
    config = config_from_hf(_hf_dict(gating="per-head"))
    assert [spec.n_heads for spec in config.layers] == [4, 8, 2]
    assert {spec.output_gate for spec in config.layers} == {"head"}
    rope = config.layers[0].rope
    assert (rope.partial, rope.scaling["rope_type"], rope.max_position) == (0.5, "yarn", 2048)


def test_head_count_not_divisible_by_kv_heads_is_a_config_error():
    with pytest.raises(kvlab.ConfigError, match=r"layers\[1\]\.n_kv_heads: n_heads \(6\) is not divisible"):
        config_from_hf(_hf_dict(num_attention_heads_per_layer=[4, 6, 2], num_key_value_heads=4))
    with pytest.raises(kvlab.ConfigError, match="num_attention_heads_per_layer has 2 entries"):
        config_from_hf(_hf_dict(num_attention_heads_per_layer=[4, 4]))


def test_invalid_gate_values_are_config_errors():
    with pytest.raises(kvlab.ConfigError, match="gating"):
        config_from_hf(_hf_dict(gating="per-token"))
    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.output_gate"):
        kvlab.ModelConfig.from_dict(_model([_layer(4, gate="channel")]))


def test_mixture_of_experts_checkpoint_is_unsupported(tmp_path):
    torch.manual_seed(0)
    config = hf_config(layer_types=["full_attention"] * 2, heads=(4, 2), num_experts=2, num_experts_per_tok=1,
                       moe_intermediate_size=16, shared_expert_intermediate_size=16)
    config.mlp_layer_types = ["dense", "sparse"]
    transformers.LagunaForCausalLM(config).save_pretrained(tmp_path / "moe")
    with pytest.raises(kvlab.UnsupportedError, match="mixture-of-experts"):
        kvlab.load(tmp_path / "moe")


def test_reader_maps_sliding_layers_to_the_sliding_technique():
    config = config_from_hf(_hf_dict(layer_types=MIXED_TYPES))
    assert [spec.type for spec in config.layers] == ["full", "sliding", "sliding"]
    assert config.layers[1].window == 8 and config.layers[1].output_gate == "element"
    assert (config.layers[1].rope.theta, config.layers[1].rope.partial) == (1e4, 1.0)
