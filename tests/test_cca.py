"""ZAYA1 compressed convolutional attention ("cca") through the standard matrix, its cache contents, and
module parity with transformers' ``zaya`` attention."""

import pytest
import torch
from helpers import build
from helpers import model_dict as _model
from hf_parity import additive_causal_mask, check_module_parity, noisy_
from matrix import *  # noqa: F401,F403
from safetensors.torch import load_file

import kvlab
from kvlab.hf import config_from_hf
from kvlab.hf.zaya import attention_state
from kvlab.model import build_attention

transformers = pytest.importorskip("transformers")


def _cca(n_heads=4, n_kv=2, head_dim=16, **extra):
    return {"type": "cca", "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
            "rope": {"theta": 5e6, "partial": 0.5}, **extra}


CASES = {
    "zaya_like": _model([_cca(), _cca(rope={"theta": 1e4, "partial": 0.5})]),
    "mqa_bias_gate_kernels_3_1": _model([_cca(2, 1, 16, qkv_bias=True, o_bias=True, conv_depthwise=3,
                                              conv_grouped=1, output_gate="head"),
                                         {"type": "full", "n_heads": 4, "n_kv_heads": 2}], _seq=20),
    "mha_kernels_1_4": _model([_cca(4, 4, 8, conv_depthwise=1, conv_grouped=4)], _seq=20),
    "sliding_window_6": _model([_cca(window=6), _cca(rope={"theta": 1e4, "partial": 0.5})], _seq=20),
}


def test_cache_holds_kv_conv_and_delayed_value_states():
    model = build(CASES["zaya_like"])
    cache = model.new_cache(3)
    with torch.no_grad():
        model(torch.zeros(3, 10, dtype=torch.long), cache=cache)
    layer = cache[0]
    assert tuple(layer.buffers["k"].view().shape) == (3, 2, 10, 16)
    assert tuple(layer.state["conv"].shape) == (3, (4 + 2) * 16, 2)
    assert tuple(layer.state["v_delayed"].shape) == (3, 2 * 16 // 2)
    per_row = 2 * 2 * 16 * 10 + 6 * 16 * 2 + 16
    assert layer.nbytes == 3 * per_row * 4
    windowed = build({k: v for k, v in CASES["sliding_window_6"].items() if k != "_seq"})
    cache = windowed.new_cache(1)
    with torch.no_grad():
        windowed(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    assert cache[0].nbytes == (2 * 2 * 16 * 6 + 6 * 16 * 2 + 16) * 4  # a ring of window = 6 tokens


def test_spec_errors_name_the_field():
    with pytest.raises(kvlab.ConfigError, match=r"layers\[1\]\.kv_from"):
        kvlab.ModelConfig.from_dict(_model([_cca(), _cca(kv_from=0)]))
    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.conv_grouped"):
        kvlab.ModelConfig.from_dict(_model([_cca(conv_grouped=0)]))
    with pytest.raises(kvlab.ConfigError, match=r"layers\[0\]\.head_dim: n_kv_heads \* head_dim \(3\)"):
        kvlab.ModelConfig.from_dict(_model([_cca(3, 1, 3)]))


def hf_config(layer_types=("hybrid", "hybrid"), **extra):
    return transformers.ZayaConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=len(layer_types), num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=list(layer_types), num_experts=2,
        moe_intermediate_size=32, router_hidden_size=16, max_position_embeddings=2048,
        attn_implementation="eager", **extra)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_module_parity_with_transformers(tmp_path, bias):
    torch.manual_seed(0)
    reference = transformers.ZayaForCausalLM(hf_config(("hybrid", "hybrid_sliding"), attention_bias=bias,
                                                       sliding_window=8)).eval()
    noisy_(reference)
    with torch.no_grad():  # temp is initialised to 0 (keys vanish): give it a real value
        for layer in reference.model.layers:
            layer.self_attn.qk_norm.temp.add_(1.0)
    reference.save_pretrained(tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    config = config_from_hf(reference.config.to_dict())
    x = torch.randn(2, 39, 64, generator=torch.Generator().manual_seed(4))
    for i, layer_type in enumerate(reference.config.layer_types):
        attn = reference.model.layers[i].self_attn
        module = build_attention(config, i).eval()
        module.load_state_dict(attention_state(state, i))

        window = 8 if layer_type == "hybrid_sliding" else None
        assert module.spec.window == window

        def hf_step(chunk, start, cache, attn=attn, layer_type=layer_type, window=window):
            positions = torch.arange(start, start + chunk.shape[1])[None]
            cos_sin = reference.model.rotary_emb(chunk, positions, layer_type)
            assert chunk.shape[1] == 1 or start == 0
            mask = additive_causal_mask(chunk.shape[1], window) if chunk.shape[1] > 1 else None
            return attn(chunk, {"causal": mask, "conv": None}, cache, cos_sin)[0]

        check_module_parity(hf_step, lambda: transformers.DynamicCache(config=reference.config), module, x)


def test_reader_and_unsupported_full_checkpoint(tmp_path):
    config = config_from_hf(hf_config(cca_time0=3, cca_time1=2).to_dict())
    spec = config.layer(0)
    assert (spec.type, spec.conv_depthwise, spec.conv_grouped, spec.rope.partial, spec.rope.theta) == \
        ("cca", 3, 2, 0.5, 5e6)
    assert config.tie_embeddings
    torch.manual_seed(0)
    transformers.ZayaForCausalLM(hf_config()).save_pretrained(tmp_path / "hf")
    with pytest.raises(kvlab.UnsupportedError):
        kvlab.load(tmp_path / "hf")


@torch.no_grad()
def test_windowed_cca_banded_prefill_equals_dense(monkeypatch):
    """ZAYA's windowed CCA through the sliding technique's block-banded path equals its dense mask."""
    import kvlab.attention.sliding as sliding

    model = build({k: v for k, v in CASES["sliding_window_6"].items() if k != "_seq"})
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(sliding, "BAND_MIN", 10**9)
    dense = model(ids)
    monkeypatch.setattr(sliding, "BAND_MIN", 1)
    torch.testing.assert_close(model(ids), dense, atol=1e-5, rtol=1e-5)
