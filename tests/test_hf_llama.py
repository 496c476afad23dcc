"""Parity with transformers for the Llama family (llama, mistral without window, qwen2, qwen3): tiny random
HF models saved with ``save_pretrained``, loaded with ``kvlab.load``; logits must match within 1e-4 (fp32)
for the full forward and for 32 cached greedy steps, left-padded batches of different lengths included."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.generate import left_pad

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
STEPS = 32
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None,
              eos_token_id=None, pad_token_id=0)  # no EOS: HF must not stop or suppress a token

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3-rope-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=4)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}


def make_hf(name: str, tmp_path):
    """A random HF model with weights large enough that mismatches show, saved to ``tmp_path/name``."""
    config_cls, model_cls, extra = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)  # non-trivial norm weights
            elif p.dim() == 1:  # biases
                p.normal_(0.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.15, generator=gen)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf, path = make_hf(request.param, tmp_path_factory.mktemp("hf"))
    return request.param, hf, kvlab.load(path).eval()


def test_loaded_config_matches_family(pair):
    name, hf, model = pair
    spec = model.config.layer(0)
    assert spec.type == "full"
    assert spec.n_kv_heads == hf.config.num_key_value_heads
    assert spec.qkv_bias == (name == "qwen2")
    assert spec.qk_norm == (name == "qwen3")
    assert model.config.tie_embeddings == (name == "llama3-rope-tied")
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight


@torch.no_grad()
def test_full_forward_logits_match(pair):
    _, hf, model = pair
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_left_padded_batch_matches_hf(pair):
    """Rows of lengths 40, 25 and 9, left-padded: real positions match HF's masked forward."""
    _, hf, model = pair
    gen = torch.Generator().manual_seed(3)
    lengths = [40, 25, 9]
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 40 - n:] = torch.randint(3, 160, (n,), generator=gen)
        mask[row, 40 - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    got = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_32_cached_greedy_steps_match_hf_generate(pair):
    """Batched, left-padded greedy generation: the same tokens as HF's cached ``generate`` and, step by step,
    the same logits (kvlab's cache is fed HF's tokens so one near-tie cannot derail the comparison)."""
    _, hf, model = pair
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 160, (n,), generator=gen).tolist() for n in (12, 5)]
    ids, mask = left_pad(prompts, pad_id=0)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    ref_tokens = out.sequences[:, ids.shape[1]:]
    assert ref_tokens.shape == (2, STEPS)
    ref_logits = torch.stack(out.logits, dim=1)  # [B, STEPS, V]

    result = model.generate(prompts, max_new_tokens=STEPS)
    assert result.tokens == ref_tokens.tolist()

    cache = model.new_cache(2, max_length=ids.shape[1] + STEPS)
    logits = [model(ids, cache=cache, attention_mask=mask)[:, -1]]
    for step in range(STEPS - 1):
        logits.append(model(ref_tokens[:, step:step + 1], cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(logits, dim=1), ref_logits, atol=ATOL, rtol=1e-4)


def test_unsupported_family_names_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(kvlab.UnsupportedError, match="'gpt2'"):
        kvlab.load(tmp_path)


def test_truncated_hf_safetensors_fail_in_one_line(tmp_path, capsys):
    from kvlab.cli import main

    _, path = make_hf("llama", tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(kvlab.KvlabError, match="cannot read safetensors"):
        kvlab.load(path)
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert main(["generate", str(path), "--ids", "3,4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot read safetensors" in err


def test_bf16_hf_checkpoint_loads_in_fp32_or_bf16(tmp_path):
    hf, path = make_hf("qwen3", tmp_path)
    hf.to(torch.bfloat16).save_pretrained(path)
    model = kvlab.load(path)
    assert model.dtype == torch.float32
    torch.testing.assert_close(model.layers[1].self_attn.k_norm.weight,
                               hf.model.layers[1].self_attn.k_norm.weight.float(), atol=0, rtol=0)
    ids = torch.randint(3, 160, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=ATOL, rtol=1e-4)
    assert kvlab.load(path, dtype="bfloat16").dtype == torch.bfloat16
