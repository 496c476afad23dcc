"""ZAYA1 (Zyphra ZAYA1-8B): every layer is compressed convolutional attention (``cca``) plus a
mixture-of-experts MLP. ``layer_types``: "hybrid" (full context) or "hybrid_sliding" (a window), each with
its own RoPE (``rope_parameters`` keyed by type). kvlab runs the attention layers (see
``attention_state``) and plans the model; the MoE MLP, its router and ZAYA's residual scaling are not
part of kvlab, so full checkpoints are planned, not loaded.
"""

from __future__ import annotations

import dataclasses

import torch

from kvlab.config import ModelConfig
from kvlab.errors import ConfigError
from kvlab.hf import register_family
from kvlab.hf.laguna import per_layer_model_config, per_type_rope

DEFAULT_ROPE = {
    "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
    "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
}


@register_family("zaya")
def zaya_config(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    layer_types = list(hf.get("layer_types") or ["hybrid"] * n)
    if len(layer_types) != n:
        raise ConfigError(f"config.json: layer_types has {len(layer_types)} entries but num_hidden_layers is {n}")
    params = {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_type"}
    hf = {**hf, "rope_parameters": params or None}  # the hub config carries a stray top-level rope_type
    ropes = {t: per_type_rope(hf, t, DEFAULT_ROPE) for t in set(layer_types)}
    bias = bool(hf.get("attention_bias", False))
    layers = []
    for i, layer_type in enumerate(layer_types):
        if layer_type not in DEFAULT_ROPE:
            raise ConfigError(f"config.json: layer_types[{i}] must be 'hybrid' or 'hybrid_sliding', got {layer_type!r}")
        spec = {"type": "cca", "n_heads": hf["num_attention_heads"], "n_kv_heads": hf["num_key_value_heads"],
                "head_dim": hf.get("head_dim", 128), "qkv_bias": bias, "o_bias": bias,
                "conv_depthwise": hf.get("cca_time0", 2), "conv_grouped": hf.get("cca_time1", 2),
                "rope": dataclasses.asdict(ropes[layer_type])}
        if layer_type == "hybrid_sliding":
            if hf.get("sliding_window") is None:
                raise ConfigError("config.json: sliding_window must be set when layer_types has 'hybrid_sliding'")
            spec["window"] = hf["sliding_window"]
        layers.append(spec)
    # mlp_hidden: the per-expert width (ZAYA's MLPs are mixtures of experts, which kvlab does not run)
    return per_layer_model_config(hf, "zaya", layers, ropes[layer_types[0]],
                                  mlp_hidden=hf.get("moe_intermediate_size", 2048), norm_eps=1e-5, tie=True)


def attention_state(state: dict[str, torch.Tensor], layer_idx: int) -> dict[str, torch.Tensor]:
    """The weights of HF layer ``layer_idx``'s ``self_attn``, named as kvlab's ``cca`` module names them."""
    prefix = f"model.layers.{layer_idx}.self_attn."
    out = {}
    for name, tensor in state.items():
        if name.startswith(prefix):
            short = name[len(prefix):].removeprefix("qkv_proj.").removeprefix("qk_norm.")
            out[short] = tensor
    return out
