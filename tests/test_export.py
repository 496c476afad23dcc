"""``kvlab export``: each exportable kind of tiny random model reloads in stock transformers
(``AutoModelForCausalLM``, no remote code) with kvlab's logits (1e-4) and greedy tokens (MLA with any
biases as DeepSeek V3, Gemma 4 with last-n KV sharing as Gemma 4); refusals are one line and write nothing;
the output folder rules. Engine round trips (vLLM, llama.cpp) and SmolLM2 are in
``test_export_engines.py``."""

import json

import pytest
import torch
from helpers import build, tiny_config

from kvlab.cli import main
from kvlab.errors import UnsupportedError
from kvlab.export import export

transformers = pytest.importorskip("transformers")

GQA = {"type": "full", "n_heads": 4, "n_kv_heads": 2}
MLA = {"type": "mla", "n_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 12}
SWA = {"type": "sliding", "window": 5, "n_heads": 4, "n_kv_heads": 2}
G4_SLIDING = {"type": "sliding", "window": 5, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "qk_norm": True,
              "v_norm": True, "softmax_scale": 1.0, "rope": {"theta": 1e4}}
G4_FULL = {"type": "full", "n_heads": 4, "n_kv_heads": 1, "head_dim": 32, "qk_norm": True, "v_norm": True,
           "k_eq_v": True, "softmax_scale": 1.0, "rope": {"theta": 1e6, "partial": 0.25,
                                                          "scaling": {"rope_type": "proportional"}}}
GEMMA4 = {"mlp_act": "gelu_tanh", "sandwich_norms": True, "embed_scale": 8.0, "logit_softcap": 30.0,
          "layer_scalar": True, "per_layer_embeddings": {"dim": 8, "vocab": 97}, "tie_embeddings": True}
CASES = {  # name -> (layers, model extras, expected stock family)
    "mha": ([{"type": "full", "n_heads": 4}] * 2, {}, "llama"),
    "gqa": ([GQA] * 2, {}, "llama"),
    "mqa-tied-llama3": ([{**GQA, "n_kv_heads": 1}] * 2,
                        {"tie_embeddings": True, "rope": {"theta": 5e5, "scaling": {
                            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}}}, "llama"),
    "gqa-all-biases": ([{**GQA, "qkv_bias": True, "o_bias": True}] * 2, {}, "llama"),
    "gqa-qkv-bias": ([{**GQA, "qkv_bias": True}] * 2, {}, "qwen2"),
    "sliding": ([SWA] * 3, {}, "mistral"),
    "mixed-full-sliding": ([SWA, GQA, SWA], {}, "qwen2"),
    "mla": ([MLA] * 2, {"rope": {"interleaved": True}}, "deepseek_v3"),
    "mla-q-lora-rotate-half": ([{**MLA, "q_lora_rank": 12}] * 2, {}, "deepseek_v3"),
    "mla-kv-bias": ([{**MLA, "qkv_bias": True}] * 2, {"rope": {"interleaved": True}}, "deepseek_v3"),
    "mla-o-bias-q-lora-linear-rope": ([{**MLA, "q_lora_rank": 12, "o_bias": True}] * 2,
                                      {"rope": {"scaling": {"type": "linear", "factor": 3.0}}}, "deepseek_v3"),
    "gemma4-last-2-shared": ([G4_SLIDING, G4_SLIDING, G4_FULL, {**G4_SLIDING, "mlp_hidden": 192},
                              {**G4_FULL, "mlp_hidden": 192}], {**GEMMA4, "kv_sharing": {"last": 2}}, "gemma4_text"),
    "gemma4-unshared": ([G4_SLIDING, G4_FULL], GEMMA4, "gemma4_text"),
}


def biased_(model):
    """Nonzero biases (init leaves them at zero), so a dropped bias would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_hf_export_reloads_in_stock_transformers(tmp_path, name):
    layers, extra, family = CASES[name]
    model = biased_(build(tiny_config(layers, **extra)))
    report = export(model, "hf", tmp_path / "out", n_new=24, log=lambda *a: None)
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert report["family"] == hf_config["model_type"] == family
    assert "auto_map" not in hf_config  # nothing custom: stock classes only
    saved = json.loads((tmp_path / "out" / "export_check.json").read_text())
    assert saved["checks"][0]["greedy_ok"] and saved["checks"][0]["max_abs_logit_diff"] < 1e-4
    # the test's own comparison, independent of check.py: a longer sequence than any window
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(reference).__module__.startswith("transformers.models.")
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids), atol=1e-4, rtol=1e-4)
        ours = model.generate(ids[:1], max_new_tokens=16)
        theirs = reference.generate(ids[:1], max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours.tokens[0] == theirs[0, -16:].tolist()


REFUSED = {  # name -> (layers, words the one-line refusal must contain)
    "sinks": ([{**SWA, "sinks": 2}] * 2, "sink"),
    "kv-quant": ([{**GQA, "kv_quant": "int8"}] * 2, "int8"),
    "cross-layer-sharing": ([GQA, {**GQA, "kv_from": 0}], "sharing"),
    "block-sparse": ([{"type": "block_sparse", "n_heads": 4, "block": 4}] * 2, "block_sparse"),
    "two-windows": ([SWA, {**SWA, "window": 7}], "window sizes"),
    "mixed-mla-full": ([MLA, GQA], "'mla'"),
}


def test_sharing_that_is_not_gemma_4_is_refused_naming_the_difference(tmp_path):
    """Gemma 4's rule only: a Gemma 4 model sharing every 2nd layer (CLA) and a Llama model sharing the
    last layer are refused in one line that says why they are not Gemma 4."""
    gemma_cla = tiny_config([G4_SLIDING, G4_SLIDING, G4_FULL, G4_FULL], **GEMMA4, kv_sharing={"every": 2})
    llama_last = tiny_config([GQA, GQA, GQA], kv_sharing={"last": 1})
    for config, why in ((gemma_cla, "layer 1's kv_from is 0 where Gemma 4's is None"),
                        (llama_last, "sandwich_norms is False where Gemma 4's is True")):
        with pytest.raises(UnsupportedError) as info:
            export(build(config), "hf", tmp_path / "out", check=False)
        assert "\n" not in str(info.value) and "not Gemma 4" in str(info.value) and why in str(info.value)


@pytest.mark.parametrize("name", list(REFUSED))
def test_no_stock_representation_is_refused_in_one_line(tmp_path, name, capsys):
    layers, words = REFUSED[name]
    config = tiny_config(layers)
    with pytest.raises(UnsupportedError) as info:
        export(build(config), "hf", tmp_path / "out", check=False)
    message = str(info.value)
    assert "\n" not in message and words in message and "stock" in message and "kvlab checkpoint" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written
    build(config).save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "g").exists()


def test_gguf_writer_refuses_what_llama_arch_lacks(tmp_path):
    with pytest.raises(UnsupportedError, match="sliding-window attention.*use --format hf"):
        export(build(tiny_config([SWA] * 2)), "gguf", tmp_path / "out", check=False)


def test_output_folder_rules(tmp_path, capsys):
    build(tiny_config([GQA] * 2)).save(tmp_path / "ckpt")
    out = tmp_path / "out"
    args = ["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(out), "--tokens", "4"]
    assert main(args) == 0
    assert "greedy equal" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # never over an existing folder
    assert main(args + ["--force", "--no-check"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force removed only what the export wrote
    assert sorted(p.name for p in out.iterdir()) == [".kvlab-manifest.json", "config.json", "export_check.json",
                                                      "model.safetensors", "notes.txt"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("{}")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(user), "--force"]) == 2
    assert "not a kvlab export folder" in capsys.readouterr().err and (user / "config.json").read_text() == "{}"


def test_stock_gemma_4_with_kv_sharing_round_trips(tmp_path):
    """A stock Gemma 4 (2 KV-shared layers, PLE, double-wide MLP, K=V full layers) -> kvlab -> export:
    the export's config reads back as the same Gemma 4 layout and gives the stock model's logits."""
    import kvlab

    cfg = transformers.Gemma4TextConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=6, num_kv_shared_layers=2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=61, use_double_wide_mlp=True,
        attention_k_eq_v=True, num_global_key_value_heads=1, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    source = transformers.Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    source.save_pretrained(tmp_path / "hf")
    report = export(kvlab.load(str(tmp_path / "hf")), "hf", tmp_path / "out", log=lambda *a: None)
    assert report["family"] == "gemma4_text" and report["checks"][0]["greedy"] == "equal"
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["num_kv_shared_layers"] == 2 and exported["use_double_wide_mlp"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, source(ids).logits, atol=1e-4, rtol=1e-4)


def test_gemma_style_model_that_is_not_gemma_4_is_refused(tmp_path):
    """Gemma 4 with an int8 KV cache has no stock form: refused with the difference named."""
    config = tiny_config([G4_SLIDING, {**G4_FULL, "kv_quant": "int8"}], **GEMMA4)
    with pytest.raises(UnsupportedError, match=r"Gemma-style decoder .* not Gemma 4 \(layer 1's kv_quant is 'int8'"):
        export(build(config), "hf", tmp_path / "out", check=False)
