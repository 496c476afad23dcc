"""Llama, Mistral, Qwen2 and Qwen3: the same decoder up to biases, q/k norms and sliding windows.
Their tensor names equal kvlab's once the ``model.`` prefix is dropped."""

from __future__ import annotations

import torch

from kvlab.config import ModelConfig
from kvlab.errors import ConfigError
from kvlab.hf import hf_dtype, hf_flag, hf_get, hf_rope, register_family

ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def strip_model_prefix(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("model."):
            name = name[len("model."):]
        if "rotary_emb" in name:
            continue
        out[name] = tensor
    return out


def layer_windows(hf: dict) -> list[int | None]:
    """Per-layer sliding window (None = full attention) as each family defines it."""
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    model_type = hf["model_type"]
    if hf.get("layer_types"):
        types = hf["layer_types"]
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError(f"config.json: layer_types: expected a list of {n} entries, got {types!r}"[:200])
        unknown = [t for t in types if t not in ("full_attention", "sliding_attention")]
        if unknown:  # refuse rather than guess full attention for a kind kvlab does not know
            raise ConfigError(f"config.json: layer_types: {unknown[0]!r} is not 'full_attention' or "
                              "'sliding_attention'")
        return [window if t == "sliding_attention" else None for t in types]
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window") or window is None:
            return [None] * n
        first_full = hf.get("max_window_layers", n)
        return [window if i >= first_full else None for i in range(n)]
    return [window] * n


@register_family("llama", "mistral", "qwen2", "qwen3", convert_state=strip_model_prefix)
def llama_config(hf: dict) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    model_type = hf["model_type"]
    bias = hf_flag(hf, "attention_bias", model_type == "qwen2")
    base = {
        "n_heads": n_heads,
        "n_kv_heads": hf_get(hf, "num_key_value_heads", default=n_heads),
        "head_dim": hf_get(hf, "head_dim", default=hf["hidden_size"] // n_heads),
        "qkv_bias": bias,
        "o_bias": bias and model_type != "qwen2",
        "qk_norm": model_type == "qwen3",
    }
    layers = [{"type": "full", **base} if w is None else {"type": "sliding", "window": w, **base}
              for w in layer_windows(hf)]
    return decoder_config(hf, model_type, layers)


def decoder_config(hf: dict, name: str, layers: list[dict], rope=None, **overrides) -> ModelConfig:
    """A ModelConfig from the fields every Llama-like HF config has (sizes, MLP, norm, RoPE, tying)."""
    fields = dict(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        mlp_hidden=hf["intermediate_size"],
        mlp_act=ACTS.get(hf.get("hidden_act", "silu"), hf.get("hidden_act")),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope or hf_rope(hf),
        tie_embeddings=hf_flag(hf, "tie_word_embeddings", False),
        dtype=hf_dtype(hf),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        layers=layers,
    )
    return ModelConfig(**{**fields, **overrides})
