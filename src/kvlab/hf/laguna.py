"""Laguna (poolside Laguna XS.2): GQA with a per-layer attention budget.

Each layer has its own query-head count (``num_attention_heads_per_layer``), type (full or sliding, one
global ``sliding_window``) and RoPE (``rope_parameters`` keyed by layer type: partial rotary, YaRN), plus
per-head q/k RMSNorm and a softplus output gate (``gating``: per head or per element). KV heads and
head_dim are global, so every layer's cache has the same shape. Dense-MLP layers load; mixture-of-experts
layers can be planned but not run.
"""

from __future__ import annotations

import dataclasses

import torch

from kvlab.config import ModelConfig, RopeConfig
from kvlab.errors import ConfigError, UnsupportedError
from kvlab.hf import hf_flag, hf_get, hf_rope, register_family
from kvlab.hf.llama import decoder_config, strip_model_prefix

# transformers' defaults when ``rope_parameters`` is absent
DEFAULT_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
}
GATES = {True: "head", "per-head": "head", "per-element": "element", False: None, None: None}


def per_type_rope(hf: dict, layer_type: str, defaults: dict = DEFAULT_ROPE) -> RopeConfig:
    """The RoPE of one layer type from ``rope_parameters`` (keyed by type, or one dict for all);
    ``defaults``: the family's per-type parameters when the config has none."""
    params = hf.get("rope_parameters") or defaults
    if layer_type in params or any(isinstance(v, dict) for v in params.values()):
        params = params.get(layer_type) or defaults[layer_type]
    return hf_rope({"rope_parameters": dict(params), "max_position_embeddings": hf.get("max_position_embeddings")})


def _listed(hf: dict, name: str, n: int, default: list) -> list:
    values = hf.get(name)
    if values is None:
        return default
    if len(values) != n:
        raise ConfigError(f"config.json: {name} has {len(values)} entries but num_hidden_layers is {n}")
    return list(values)


@register_family("laguna", convert_state=lambda state, config: laguna_state(state, config))
def laguna_config(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    layer_types = _listed(hf, "layer_types", n, ["full_attention"] * n)
    heads = _listed(hf, "num_attention_heads_per_layer", n, [hf["num_attention_heads"]] * n)
    gating = hf.get("gating", True)
    if gating not in GATES:
        raise ConfigError(f"config.json: gating must be true, false, 'per-head' or 'per-element', got {gating!r}")
    bias = hf_flag(hf, "attention_bias", False)
    ropes = {t: per_type_rope(hf, t) for t in set(layer_types)}
    layers = []
    for i, (layer_type, n_heads) in enumerate(zip(layer_types, heads)):
        spec = {"type": "full", "n_heads": n_heads, "n_kv_heads": hf_get(hf, "num_key_value_heads", default=n_heads),
                "head_dim": hf.get("head_dim", 128), "qk_norm": True, "qkv_bias": bias, "o_bias": bias,
                "output_gate": GATES[gating], "rope": dataclasses.asdict(ropes[layer_type])}
        if layer_type == "sliding_attention":
            spec.update(type="sliding", window=hf["sliding_window"])
        elif layer_type != "full_attention":
            raise ConfigError(f"config.json: layer_types[{i}] must be 'full_attention' or 'sliding_attention', "
                              f"got {layer_type!r}")
        layers.append(spec)
    return per_layer_model_config(hf, "laguna", layers, ropes[layer_types[0]], mlp_hidden=hf["intermediate_size"],
                                  norm_eps=1e-6, tie=False)


def per_layer_model_config(hf: dict, name: str, layers: list[dict], rope: RopeConfig, mlp_hidden: int,
                           norm_eps: float, tie: bool) -> ModelConfig:
    """The global fields of a per-layer-typed family (Laguna, ZAYA); ``norm_eps`` / ``tie``: the family's
    defaults for ``rms_norm_eps`` / ``tie_word_embeddings``."""
    defaults = {"rms_norm_eps": norm_eps, "tie_word_embeddings": tie, "max_position_embeddings": 131072}
    return decoder_config({**defaults, **hf, "intermediate_size": mlp_hidden}, name, layers, rope=rope)


def laguna_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Laguna's tensor names equal kvlab's (``g_proj`` included) once ``model.`` is dropped; MoE layers
    (``mlp.experts``, router, shared experts) have no kvlab counterpart."""
    moe = sorted({name.split(".mlp.")[0] for name in state if ".mlp.experts" in name or ".mlp.gate." in name})
    if moe:
        raise UnsupportedError(f"laguna: mixture-of-experts MLP layers ({moe[0]}, ...) are not supported; "
                               "only checkpoints whose mlp_layer_types are all 'dense' load")
    return strip_model_prefix(state, config)
