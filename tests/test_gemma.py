"""Gemma 4 (dense text) and Gemma 3 text: tiny random transformers models saved with save_pretrained load
in kvlab and match logits within 1e-4 (fp32) for the full forward and 32 cached greedy steps past the
sliding window; the Gemma-style options run the standard matrix; the gemma-4-e2b preset's plan."""

import json

import pytest
import torch
from matrix import *  # noqa: F401,F403

import kvlab

transformers = pytest.importorskip("transformers")

S = {"type": "sliding", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "window": 6, "qk_norm": True,
     "v_norm": True, "softmax_scale": 1.0}
F = {"type": "full", "n_heads": 4, "n_kv_heads": 1, "head_dim": 32, "qk_norm": True, "v_norm": True,
     "k_eq_v": True, "softmax_scale": 1.0, "rope": {"theta": 1e6, "partial": 0.25,
                                                     "scaling": {"rope_type": "proportional"}}}
CASES = {
    "gemma4_style": {"vocab_size": 61, "d_model": 32, "n_layers": 5, "mlp_hidden": 48, "mlp_act": "gelu_tanh",
                     "layers": [S, S, F, S, {**F, "mlp_hidden": 96}], "kv_sharing": {"last": 2},
                     "sandwich_norms": True, "embed_scale": 32 ** 0.5, "logit_softcap": 30.0, "layer_scalar": True,
                     "per_layer_embeddings": {"dim": 8, "vocab": 61}, "_seq": 20},
    "gemma3_style": {"vocab_size": 61, "d_model": 32, "n_layers": 2, "mlp_hidden": 48, "mlp_act": "gelu_tanh",
                     "layers": [{**S, "v_norm": False, "softmax_scale": 0.25}, {"type": "full", "n_heads": 2,
                                                                               "qk_norm": True}],
                     "sandwich_norms": True, "norm_unit_offset": True, "embed_scale": 2.0, "_seq": 20},
}

TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
         "full_attention"]


def _perturb(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() >= 2 else 0.1))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.fill_(0.8)


@torch.no_grad()
def _parity(hf_model, tmp_path, vocab, seq=24, steps=32):
    hf_model.eval()
    _perturb(hf_model)
    hf_model.save_pretrained(tmp_path)
    model = kvlab.load(str(tmp_path), dtype="float32")
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(3))
    want = hf_model(ids).logits
    got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # 32 cached greedy steps (kvlab cache) vs transformers' full forward over the grown sequence
    cache = model.new_cache(1)
    seq_ids = ids[:1, :5]
    logits = model(seq_ids, cache=cache)[:, -1]
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        seq_ids = torch.cat([seq_ids, nxt], dim=1)
        logits = model(nxt, cache=cache)[:, -1]
    torch.testing.assert_close(logits, hf_model(seq_ids).logits[:, -1], atol=1e-4, rtol=1e-4)
    return model


def test_gemma4_parity(tmp_path):
    cfg = transformers.Gemma4TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=6, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=61, layer_types=TYPES,
        use_double_wide_mlp=True, final_logit_softcapping=30.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = _parity(transformers.Gemma4ForCausalLM(cfg), tmp_path, 61)
    assert [s.kv_from for s in model.config.layers] == [None, None, None, None, 3, 2]
    cache = model.new_cache(1)
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    assert cache.layer_nbytes()[4:] == [0, 0]


def test_gemma4_k_eq_v_parity(tmp_path):
    cfg = transformers.Gemma4TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=6, attention_k_eq_v=True,
        num_global_key_value_heads=1, hidden_size_per_layer_input=8, vocab_size_per_layer_input=61,
        layer_types=["sliding_attention", "full_attention", "full_attention"], attn_implementation="eager")
    torch.manual_seed(0)
    model = _parity(transformers.Gemma4ForCausalLM(cfg), tmp_path, 61, steps=8)
    assert model.config.layers[1].k_eq_v and model.config.layers[1].n_kv_heads == 1


def test_gemma3_parity(tmp_path):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=20.0, attn_implementation="eager",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    torch.manual_seed(0)
    _parity(transformers.Gemma3ForCausalLM(cfg), tmp_path, 61)


def test_plan_gemma_4_e2b_preset_matches_hand_computation(capsys):
    """Producers are layers 0-14 (12 sliding, 3 full); layers 15-34 reuse 13 (sliding) or 14 (full), 0 bytes.
    bf16, 1 KV head: sliding 2 * 256 * 2 = 1024 B per token up to the 512-token window; full 2 * 512 * 2."""
    from kvlab.cli import main
    from kvlab.hf import config_from_hf
    from kvlab.planner import load_preset

    config = config_from_hf(load_preset("gemma-4-e2b"))
    assert [s.kv_from for s in config.layers[15:20]] == [13, 13, 13, 13, 14]
    assert config.layers[34].kv_from == 14 and config.layer(34).mlp_hidden == 2 * 6144
    assert main(["plan", "--preset", "gemma-4-e2b", "--context", "1,512,128K", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    sliding, full = 12 * 2 * 256 * 2, 3 * 2 * 512 * 2
    for tokens, result in zip((1, 512, 131072), results):
        assert result["total_bytes"] == sliding * min(tokens, 512) + full * tokens
    assert results[1]["bytes_per_token"] == 18_432  # 811,597,824 B (774 MiB) at 128K
    plan = kvlab.plan(config, context=4096, dtype="bf16")
    assert [layer.cache_bytes for layer in plan.layers][15:] == [0] * 20


def test_value_options_are_validated():
    from kvlab.errors import ConfigError

    base = {"vocab_size": 61, "d_model": 32, "n_layers": 1, "mlp_hidden": 48}
    with pytest.raises(ConfigError, match=r"layers\[0\].v_norm: must be true or false"):
        kvlab.ModelConfig.from_dict({**base, "layers": [{"type": "full", "n_heads": 2, "v_norm": 1}]})
    with pytest.raises(ConfigError, match=r"layers\[0\].k_eq_v: not supported by 'mla'"):
        kvlab.ModelConfig.from_dict({**base, "layers": [{"type": "mla", "n_heads": 2, "kv_lora_rank": 8,
                                                        "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
                                                        "v_head_dim": 4, "k_eq_v": True}]})
    for field, bad in (("embed_scale", 0), ("logit_softcap", "x"), ("sandwich_norms", 1),
                       ("per_layer_embeddings", {"dim": 0}), ("per_layer_embeddings", {"size": 4})):
        with pytest.raises(ConfigError, match=field):
            kvlab.ModelConfig.from_dict({**base, "layers": [{"type": "full", "n_heads": 2}], field: bad})
