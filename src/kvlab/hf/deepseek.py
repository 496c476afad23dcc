"""DeepSeek V3 (``deepseek_v3``): multi-head latent attention on every layer, dense or MoE MLPs.

kvlab runs checkpoints whose layers are all dense (``first_k_dense_replace >= num_hidden_layers``); any
config can be planned (the cache does not depend on the MLP). The HF config's ``head_dim`` (=
``qk_rope_head_dim``) and ``num_key_value_heads`` (= the query heads) do not describe what MLA caches and
are ignored: the ``mla`` spec's rule is ``(kv_lora_rank + qk_rope_head_dim)`` values per token and layer.
Tensor names equal kvlab's once ``model.`` is dropped (the attention module uses HF's names).
"""

from __future__ import annotations

import torch

from kvlab.config import ModelConfig
from kvlab.errors import UnsupportedError
from kvlab.hf import hf_flag, hf_get, hf_rope, register_family
from kvlab.hf.llama import decoder_config, strip_model_prefix


def deepseek_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> kvlab names; refuses MoE checkpoints (``extras["unsupported"]``); drops multi-token-prediction layers
    (stored as extra ``model.layers.{n_layers + i}``)."""
    if config.extras.get("unsupported"):
        raise UnsupportedError(f"deepseek_v3: {config.extras['unsupported']}")
    out = {}
    for name, tensor in strip_model_prefix(state, config).items():
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) >= config.n_layers:
            continue
        out[name] = tensor
    return out


@register_family("deepseek_v3", convert_state=deepseek_state)
def deepseek_v3_config(hf: dict) -> ModelConfig:
    n_layers = hf["num_hidden_layers"]
    bias = hf_flag(hf, "attention_bias", False)
    rope = hf_rope(hf)
    rope.interleaved = hf_flag(hf, "rope_interleave", True)
    spec = {
        "type": "mla",
        "n_heads": hf["num_attention_heads"],
        "kv_lora_rank": hf["kv_lora_rank"],
        "q_lora_rank": hf.get("q_lora_rank"),
        "qk_rope_head_dim": hf["qk_rope_head_dim"],
        "qk_nope_head_dim": hf["qk_nope_head_dim"],
        "v_head_dim": hf_get(hf, "v_head_dim", default=hf["qk_nope_head_dim"]),
        "qkv_bias": bias,
        "o_bias": bias,
    }
    extras = {}
    dense = hf_get(hf, "first_k_dense_replace", default=3)
    if dense < n_layers:
        extras["unsupported"] = (f"layers {dense}..{n_layers - 1} are mixture-of-experts (first_k_dense_replace="
                                 f"{dense} < num_hidden_layers={n_layers}); kvlab runs only all-dense checkpoints "
                                 "(the KV cache can still be planned)")
    return decoder_config(hf, "deepseek_v3", [dict(spec) for _ in range(n_layers)], rope=rope, extras=extras)
