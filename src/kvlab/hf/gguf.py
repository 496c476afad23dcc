"""GGUF (llama.cpp's file format) as a pure mapping, no I/O: the metadata of a file becomes the
Hugging Face config dict its converter started from (then a ``ModelConfig`` through the HF family),
and GGUF tensor names become kvlab names, with the converter's Q/K row permutation undone.

llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of each Llama head's ``q_proj`` / ``k_proj``
from rotate-half order (first half, second half) to interleaved pairs, because ggml's Llama RoPE rotates
adjacent pairs. kvlab (like HF) rotates halves, so the rows go back. Qwen2/Qwen3 files are written
without that permutation (ggml uses NeoX rotation for them). Reading the file is ``kvlab.loading``'s job.
"""

from __future__ import annotations

import re

import torch

from kvlab.config import ModelConfig
from kvlab.errors import ConfigError, UnsupportedError

# GGUF architecture -> (HF model_type, Q/K rows permuted by the converter). Mistral 7B-style models are
# written as "llama" by llama.cpp's converter.
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_MISSING = object()


def architecture(meta: dict, where: str) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{where}: GGUF architecture {arch!r} is not supported "
                               f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return arch


def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]], where: str = "gguf") -> dict:
    """The HF ``config.json`` dict of a GGUF file's metadata; ``shapes`` (GGUF tensor name -> torch-order
    shape) gives the vocabulary size and whether the embeddings are tied (no ``output.weight``)."""
    arch = architecture(meta, where)

    def get(key: str, default=_MISSING):
        value = meta.get(f"{arch}.{key}", default)
        if value is _MISSING:
            raise ConfigError(f"{where}: GGUF metadata has no '{arch}.{key}'")
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv): kvlab needs one
            if len(set(value)) != 1:
                raise UnsupportedError(f"{where}: per-layer '{arch}.{key}' = {value[:4]}... is not supported")
            value = value[0]
        return value

    if "rope_freqs.weight" in shapes:
        raise UnsupportedError(f"{where}: rope_freqs (Llama 3 RoPE scaling factors) is not supported")
    if "token_embd.weight" not in shapes:
        raise ConfigError(f"{where}: GGUF file has no token_embd.weight")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    hf = {
        "model_type": ARCHITECTURES[arch][0],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": d_model,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "partial_rotary_factor": rope_dim / head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedError(f"{where}: GGUF RoPE scaling {scaling!r} is not supported (linear only)")
    window = get("attention.sliding_window", None)
    if window:
        hf["sliding_window"] = int(window)
        hf["use_sliding_window"] = True
    return hf


def gguf_config(meta: dict, shapes: dict[str, tuple[int, ...]], where: str = "gguf") -> ModelConfig:
    """kvlab config of a GGUF file (through the HF family its architecture maps to)."""
    from kvlab.hf import config_from_hf

    config = config_from_hf(hf_config(meta, shapes, where), where)
    config.name = str(meta.get("general.name") or config.name)
    return config


def kvlab_name(name: str, where: str = "gguf") -> str:
    """``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``; unknown names are refused."""
    stem, _, kind = name.rpartition(".")
    if stem in GLOBAL_NAMES and kind == "weight":
        return f"{GLOBAL_NAMES[stem]}.weight"
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in LAYER_NAMES:
        raise UnsupportedError(f"{where}: GGUF tensor {name!r} has no kvlab counterpart")
    return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.{match.group(3)}"


def unpermute_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the converter's per-head row order: ``[H * D, ...]`` with rows (0, D/2, 1, D/2+1, ...) of
    each head back to (0, 1, ..., D-1)."""
    rows = weight.shape[0]
    paired = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return paired.transpose(1, 2).reshape(weight.shape)  # [H, 2, D/2, ...] -> [H * D, ...]


def convert_tensor(name: str, tensor: torch.Tensor, meta: dict, where: str = "gguf") -> tuple[str, torch.Tensor]:
    """One GGUF tensor (torch order, dequantized) -> its kvlab name and value."""
    arch = architecture(meta, where)
    kv_name = kvlab_name(name, where)
    if ARCHITECTURES[arch][1] and (".attn_q." in name or ".attn_k." in name):
        heads = meta[f"{arch}.attention.head_count"]
        if ".attn_k." in name:
            heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        tensor = unpermute_rows(tensor, int(heads[0] if isinstance(heads, list) else heads))
    return kv_name, tensor
