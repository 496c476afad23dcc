"""Gemma 3 and Gemma 4 text decoders (dense) as kvlab configs built from generic options.

Both: sliding/full layer types with a RoPE per type, q/k RMSNorm, sandwich norms, embeddings times
sqrt(d_model), GELU-tanh MLP, optional final-logit softcap, tied embeddings.
Gemma 3: RMSNorm weights stored as w - 1, softmax scale ``query_pre_attn_scalar ** -0.5``.
Gemma 4: plain RMSNorm weights, value norm without weight, softmax scale 1, full layers with their own
head_dim (``global_head_dim``) and proportional RoPE, K=V full layers (``attention_k_eq_v``), per-layer
embeddings, a per-layer output scalar, and KV sharing: the last ``num_kv_shared_layers`` layers reuse the
last earlier layer of their type (``kvlab.sharing.share_last``), with a double-wide MLP if configured.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from kvlab.config import ModelConfig
from kvlab.errors import ConfigError, UnsupportedError
from kvlab.hf import hf_flag, hf_rope, register_family
from kvlab.hf.llama import decoder_config, strip_model_prefix
from kvlab.sharing import share_last


def text_config(hf: dict) -> dict:
    """The text part of a (possibly multimodal) Gemma config."""
    if isinstance(hf.get("text_config"), dict):
        return {**hf["text_config"], "model_type": hf["text_config"].get("model_type", hf["model_type"])}
    return hf


def rope_of(params: dict | None, default_theta: float) -> dict:
    """One HF ``rope_parameters`` entry -> kvlab's rope dict (parsed by ``hf_rope``)."""
    params = {"rope_theta": default_theta, **(params or {})}
    if params.get("rope_type", params.get("type", "default")) == "default":
        params.pop("partial_rotary_factor", None)  # Gemma's default RoPE ignores partial_rotary_factor
    return dataclasses.asdict(hf_rope({"rope_parameters": params}))


def layer_types(hf: dict, pattern: int) -> list[str]:
    n = hf["num_hidden_layers"]
    types = list(hf.get("layer_types") or
                 ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)])
    unknown = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if unknown or len(types) != n:  # refuse rather than guess full attention
        raise ConfigError(f"config.json: layer_types: expected {n} of 'full_attention' / 'sliding_attention', "
                          f"got {(unknown or [len(types)])[0]!r}")
    if hf["model_type"].startswith("gemma4"):
        types[-1] = "full_attention"  # as transformers forces it
    return types


def _per_layer(hf: dict, i: int) -> dict:
    overrides = hf.get("per_layer_config") or {}
    return overrides.get(str(i)) or overrides.get(i) or {}


_PLE_NAMES = ("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm")


def convert_gemma(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Gemma 3/4 tensors -> kvlab names: drop the multimodal wrapper prefixes and the vision/audio towers,
    move PLE tensors into their modules, drop the K/V tensors of KV-shared layers."""
    out = {}
    for name, tensor in state.items():
        name = re.sub(r"^(model\.)?(language_model\.)?(model\.)?", "", name)
        if name.startswith(("vision_tower", "audio_tower", "multi_modal_projector", "embed_vision", "embed_audio")):
            continue
        if name.startswith(("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")):
            name = "per_layer_embeddings." + name
        match = re.match(r"layers\.(\d+)\.(.*)", name)
        if match:
            i, rest = int(match.group(1)), match.group(2)
            if rest.startswith(_PLE_NAMES):
                name = f"layers.{i}.per_layer.{rest}"
            if config.layers[i].kv_from is not None and rest.startswith(
                    tuple(f"self_attn.{p}" for p in ("k_proj", "v_proj", "k_norm", "v_norm"))):
                continue
        out[name] = tensor
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return strip_model_prefix(out, config)


def _common(hf: dict, layers: list[dict], name: str, **options) -> ModelConfig:
    return decoder_config(
        {**hf, "hidden_act": hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh")),
         "tie_word_embeddings": hf.get("tie_word_embeddings", True)},
        name, layers, rope={"theta": 10000.0}, sandwich_norms=True,
        embed_scale=math.sqrt(hf["hidden_size"]), logit_softcap=hf.get("final_logit_softcapping"), **options)


@register_family("gemma3_text", "gemma3", convert_state=convert_gemma)
def gemma3_config(hf: dict) -> ModelConfig:
    hf = text_config(hf)
    if hf.get("attn_logit_softcapping"):
        raise UnsupportedError("gemma3: attn_logit_softcapping is not supported")
    rope = hf.get("rope_parameters") or {}
    local = rope_of(rope.get("sliding_attention"), hf.get("rope_local_base_freq", 10000.0))
    glob = rope_of(rope.get("full_attention") or
                   ({"rope_type": "default", **hf["rope_scaling"]} if hf.get("rope_scaling") else None),
                   hf.get("rope_theta", 1_000_000.0))
    base = {"n_heads": hf["num_attention_heads"], "n_kv_heads": hf.get("num_key_value_heads"),
            "head_dim": hf.get("head_dim", 256), "qk_norm": True, "qkv_bias": hf_flag(hf, "attention_bias"),
            "o_bias": hf_flag(hf, "attention_bias"),
            "softmax_scale": hf.get("query_pre_attn_scalar", 256) ** -0.5}
    layers = [{"type": "sliding", "window": hf.get("sliding_window", 4096), "rope": local, **base}
              if t == "sliding_attention" else {"type": "full", "rope": glob, **base}
              for t in layer_types(hf, hf.get("sliding_window_pattern", 6))]
    return _common(hf, layers, "gemma3", norm_unit_offset=True)


@register_family("gemma4_text", "gemma4", convert_state=convert_gemma)
def gemma4_config(hf: dict) -> ModelConfig:
    hf = text_config(hf)
    if hf.get("enable_moe_block"):
        raise UnsupportedError("gemma4: the mixture-of-experts block (enable_moe_block) is not supported")
    rope = hf.get("rope_parameters") or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
    k_eq_v = hf_flag(hf, "attention_k_eq_v", False)
    layers = []
    for i, layer_type in enumerate(layer_types(hf, 6)):
        full = layer_type == "full_attention"
        n_kv, head_dim = hf.get("num_key_value_heads", 4), hf.get("head_dim", 256)
        if full:
            head_dim = hf.get("global_head_dim", 512)
            if k_eq_v and hf.get("num_global_key_value_heads"):
                n_kv = hf["num_global_key_value_heads"]
        override = _per_layer(hf, i)
        n_kv, head_dim = override.get("num_key_value_heads", n_kv), override.get("head_dim", head_dim)
        layer = {"type": "full" if full else "sliding", "n_heads": hf["num_attention_heads"], "n_kv_heads": n_kv,
                 "head_dim": head_dim, "qk_norm": True, "v_norm": True, "softmax_scale": 1.0,
                 "qkv_bias": hf_flag(hf, "attention_bias"), "o_bias": hf_flag(hf, "attention_bias"),
                 "rope": rope_of(rope.get(layer_type), 1e6 if full else 1e4)}
        if full and k_eq_v:
            layer["k_eq_v"] = True
        if not full:
            layer["window"] = hf.get("sliding_window", 512)
        layers.append(layer)
    shared = hf.get("num_kv_shared_layers") or 0
    if shared:
        layers = share_last(layers, shared, where="num_kv_shared_layers")
        if hf.get("use_double_wide_mlp"):
            for layer in layers[-shared:]:
                layer["mlp_hidden"] = 2 * hf["intermediate_size"]
    ple = None
    if hf.get("hidden_size_per_layer_input"):
        ple = {"dim": hf["hidden_size_per_layer_input"],
               "vocab": hf.get("vocab_size_per_layer_input", hf["vocab_size"])}
    return _common(hf, layers, "gemma4", layer_scalar=True, per_layer_embeddings=ple)
