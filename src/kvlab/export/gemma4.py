"""Gemma 4 (text) export: the one stock family with cross-layer KV sharing. Its ``num_kv_shared_layers``
makes each of the last ``n`` layers reuse the K/V of the last earlier layer of its type (sliding / full),
kvlab's ``kv_sharing: {"last": n}`` (``kvlab.sharing.share_last``).

There is no second copy of the mapping here: ``gemma4_hf_config`` writes the ``config.json`` fields, and
kvlab's own Gemma 4 import (``kvlab.hf.gemma``, verified against transformers' Gemma 4 in
``tests/test_gemma.py``) is the judge. The model is Gemma 4 exactly when importing that config gives back
its kvlab config (every resolved layer spec and model option) and importing the renamed tensors gives back
its state dict; otherwise the first difference is reported. A Llama-family model with KV sharing is
therefore refused: Gemma 4 also has sandwich norms, q/k/v norms, a scaled embedding, GeGLU, per-layer
scalars, a softmax scale of 1, and always ends with a full-attention layer.
"""

from __future__ import annotations

import re

import torch

from kvlab.config import ModelConfig, RopeConfig

MODEL_TYPE = "gemma4_text"
IGNORED = ("name", "dtype", "rope", "layers")  # name, dtype: not architecture; rope and layers: compared resolved
_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "gelu": "gelu"}


def _rope(rope: RopeConfig) -> dict:
    scaling = dict(rope.scaling or {})
    out = {"rope_type": scaling.pop("rope_type", scaling.pop("type", "default")), "rope_theta": float(rope.theta),
           **scaling}
    if rope.partial != 1.0:
        out["partial_rotary_factor"] = rope.partial
    return out


def gemma4_hf_config(config: ModelConfig) -> dict:
    """The Gemma 4 text ``config.json`` fields of ``config`` (exact only if ``gemma4_mismatch`` is None)."""
    specs = [config.layer(i) for i in range(config.n_layers)]
    types = ["sliding_attention" if s.type == "sliding" else "full_attention" for s in specs]
    sliding = [s for s in specs if s.type == "sliding"]
    full = [s for s in specs if s.type != "sliding"]
    local, glob = (sliding or specs)[0], (full or specs)[0]
    shared = next((i for i in range(config.n_layers) if all(s.kv_from is not None for s in specs[i:])), config.n_layers)
    consumers = specs[shared:]
    ple = config.per_layer_embeddings or {}
    k_eq_v = any(getattr(s, "k_eq_v", False) for s in full)
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers, "num_attention_heads": specs[0].n_heads,
        "num_key_value_heads": local.n_kv_heads, "head_dim": local.head_dim, "global_head_dim": glob.head_dim,
        "num_global_key_value_heads": glob.n_kv_heads if k_eq_v else None, "attention_k_eq_v": k_eq_v,
        "layer_types": types, "sliding_window": getattr(local, "window", None) or 512,
        "rope_parameters": {t: _rope(s.rope) for t, s in (("sliding_attention", local), ("full_attention", glob))},
        "num_kv_shared_layers": len(consumers),
        "use_double_wide_mlp": bool(consumers) and all(s.mlp_hidden == 2 * config.mlp_hidden for s in consumers),
        "hidden_size_per_layer_input": ple.get("dim", 0), "vocab_size_per_layer_input": ple.get("vocab", config.vocab_size),
        "final_logit_softcapping": config.logit_softcap, "attention_bias": specs[0].qkv_bias,
        "hidden_activation": _ACTIVATIONS.get(config.mlp_act, config.mlp_act), "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": config.max_seq_len,
        "enable_moe_block": False,
    }


def gemma4_mismatch(config: ModelConfig) -> str | None:
    """None when kvlab's Gemma 4 import of ``gemma4_hf_config(config)`` is ``config``; else the first
    difference, in words."""
    from kvlab.errors import KvlabError
    from kvlab.hf.gemma import gemma4_config

    if any(s.type not in ("full", "sliding") for s in config.layers):
        return "it has layers other than full/sliding attention"
    try:
        back = gemma4_config({"model_type": MODEL_TYPE, **gemma4_hf_config(config)})
    except (KvlabError, KeyError, TypeError, ValueError) as exc:
        return f"its Gemma 4 config does not import ({exc})"
    ours, theirs = config.to_dict(), back.to_dict()
    for key in ours:
        if key not in IGNORED and ours[key] != theirs[key]:
            return f"its {key} is {ours[key]!r} where Gemma 4's is {theirs[key]!r}"
    for i in range(config.n_layers):
        if config.layer(i) != back.layer(i):
            mine, gemma = config.layer(i).to_dict(), back.layer(i).to_dict()
            field = next((k for k in mine if mine[k] != gemma.get(k)), "type")
            return f"layer {i}'s {field} is {mine.get(field)!r} where Gemma 4's is {gemma.get(field)!r}"
    return None


def gemma4_state(model) -> dict[str, torch.Tensor]:
    """kvlab's tensors under Gemma 4's HF names (the inverse of ``kvlab.hf.gemma.convert_gemma``, checked
    against it: importing the result gives back exactly kvlab's names)."""
    from kvlab.hf.gemma import convert_gemma

    config, out = model.config, {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not config.tie_embeddings:
                out[name] = tensor
            continue
        name = name.removeprefix("per_layer_embeddings.")
        out["model." + re.sub(r"^(layers\.\d+\.)per_layer\.", r"\1", name)] = tensor
    back = set(convert_gemma(out, config))
    want = {k for k in model.state_dict() if not (k == "lm_head.weight" and config.tie_embeddings)}
    if back != want:
        raise AssertionError(f"internal: Gemma 4 tensor names do not invert ({sorted(back ^ want)[:3]})")
    return out
