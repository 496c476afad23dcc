"""Hugging Face export: ``config.json`` of a stock transformers family + ``model.safetensors`` (no
``trust_remote_code``). The inverse of ``kvlab.hf`` (which loads the same families): tensor names gain the
``model.`` prefix; a family whose projections are always biased gets zero biases where kvlab has none
(``zero_biases``: Qwen2's q/k/v, DeepSeek V3's o_proj or q/kv projections under one ``attention_bias``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvlab.config import ModelConfig, RopeConfig
from kvlab.export.gemma4 import gemma4_hf_config, gemma4_state
from kvlab.export.layout import Layout
from kvlab.export.outdir import OutputFolder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "gemma4_text": "Gemma4ForCausalLM"}


def rope_parameters(rope: RopeConfig) -> dict:
    """kvlab's RoPE as transformers 5's ``rope_parameters``."""
    scaling = dict(rope.scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": kind, "rope_theta": float(rope.theta), **scaling}


def hf_config(config: ModelConfig, layout: Layout) -> dict:
    """The ``config.json`` of the stock family ``layout.family``."""
    spec = layout.spec
    if layout.family == "gemma4_text":
        return {"architectures": [ARCHITECTURES[layout.family]], "model_type": layout.family,
                **gemma4_hf_config(config), "dtype": config.dtype, "use_cache": True}
    out = {
        "architectures": [ARCHITECTURES[layout.family]],
        "model_type": layout.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": spec.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.rope.max_position or config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope_parameters(spec.rope),
        "dtype": config.dtype,
        "use_cache": True,
    }
    if layout.family == "deepseek_v3":
        out.update(_deepseek_fields(config, spec))
        return out
    out.update(num_key_value_heads=spec.n_kv_heads, head_dim=spec.head_dim)
    window = next((w for w in layout.windows if w is not None), None)
    if layout.family == "llama":
        out.update(attention_bias=spec.qkv_bias, mlp_bias=False)
    elif layout.family == "mistral":
        out.update(sliding_window=window)
    else:  # qwen2: the schedule is explicit
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=config.n_layers,
                   layer_types=["full_attention" if w is None else "sliding_attention" for w in layout.windows])
    return out


def _deepseek_fields(config: ModelConfig, spec) -> dict:
    """DeepSeek V3 with every layer dense: ``first_k_dense_replace`` = layers; one (unused) routed expert,
    an int because vLLM's loader adds to it; ``head_dim`` is the RoPE key's (HF's convention)."""
    return {
        "num_key_value_heads": spec.n_heads,
        "kv_lora_rank": spec.kv_lora_rank,
        "q_lora_rank": spec.q_lora_rank,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "head_dim": spec.qk_rope_head_dim,
        "rope_interleave": bool(spec.rope.interleaved),
        "attention_bias": spec.qkv_bias or spec.o_bias,
        "first_k_dense_replace": config.n_layers,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": config.mlp_hidden,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
    }


def hf_state(model, layout: Layout) -> dict[str, torch.Tensor]:
    """kvlab's tensors under HF names, contiguous, in the model's dtype."""
    config = model.config
    if layout.family == "gemma4_text":
        return {k: v.detach().contiguous() for k, v in gemma4_state(model).items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if config.tie_embeddings:
                continue
            state[name] = tensor
        else:
            state[f"model.{name}"] = tensor
    for i in range(config.n_layers):
        for proj, size in zero_biases(config, layout).items():
            state.setdefault(f"model.layers.{i}.self_attn.{proj}.bias", torch.zeros(size, dtype=model.dtype))
    return {k: v.detach().contiguous() for k, v in state.items()}


def zero_biases(config: ModelConfig, layout: Layout) -> dict[str, int]:
    """Biases the stock family always has where kvlab may have none (projection -> size): Qwen2's q/k/v;
    DeepSeek V3's one ``attention_bias`` covers ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (its
    ``q_proj``/``q_b_proj``/``kv_b_proj`` have none, as kvlab's), so kvlab's q/kv biases without an o bias
    (``kvlab convert``'s MLA) or the reverse export exactly with zeros for the missing ones."""
    spec = layout.spec
    if layout.family == "qwen2" and not spec.qkv_bias:
        return {"q_proj": spec.n_heads * spec.head_dim, "k_proj": spec.n_kv_heads * spec.head_dim,
                "v_proj": spec.n_kv_heads * spec.head_dim}
    if layout.family != "deepseek_v3" or not (spec.qkv_bias or spec.o_bias):
        return {}
    sizes = {"kv_a_proj_with_mqa": spec.kv_lora_rank + spec.qk_rope_head_dim, "o_proj": config.d_model}
    if spec.q_lora_rank:
        sizes["q_a_proj"] = spec.q_lora_rank
    return sizes


def write_hf(model, layout: Layout, out: OutputFolder, source: Path | None) -> list[str]:
    """Write the export; returns the file names written."""
    save_file(hf_state(model, layout), str(out.file("model.safetensors")), metadata={"format": "pt"})
    out.file("config.json").write_text(json.dumps(hf_config(model.config, layout), indent=2) + "\n")
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out.file(name))
    return list(out.files)
