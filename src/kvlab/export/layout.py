"""Which stock architecture represents a kvlab model exactly, or a one-line refusal naming what stock
engines lack. Shared by the HF and GGUF writers (they differ only in which families they can write).

Families: ``llama`` (full attention, MHA/GQA/MQA, all four projections biased or none), ``qwen2`` (q/k/v
biased, o not; or mixed full/sliding layers through ``layer_types``), ``mistral`` (one sliding window on
every layer, no biases), ``deepseek_v3`` (MLA on every layer, dense MLPs, any biases: zeros fill the rest
of its one ``attention_bias``), ``gemma4_text`` (a Gemma 4 model, including last-n KV sharing through
``num_kv_shared_layers``; ``gemma4.py``). Anything else is refused, cross-layer sharing on any model that is
not exactly Gemma 4 included.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.config import LayerSpec, ModelConfig
from kvlab.errors import UnsupportedError
from kvlab.export.gemma4 import MODEL_TYPE, gemma4_mismatch

STOCK = "stock transformers/vLLM/llama.cpp"


@dataclass
class Layout:
    family: str  # llama | mistral | qwen2 | deepseek_v3 | gemma4_text
    spec: LayerSpec  # layer 0, resolved (every layer shares its shapes)
    windows: list[int | None]  # per layer: sliding window or None (full)


def refuse(config: ModelConfig, what: str, lack: str) -> UnsupportedError:
    """The one-line refusal: what the model has, what stock engines lack, where to go instead."""
    return UnsupportedError(f"cannot export {config.name}: {what}; {STOCK} have no {lack} "
                            "(serve the kvlab checkpoint itself, e.g. `kvlab generate CKPT`)")


def _model_features(config: ModelConfig) -> None:
    checks = [
        (config.hyper_connections is not None, "hyper-connections (mHC)", "multi-stream residuals"),
        (config.per_layer_embeddings is not None, "per-layer embeddings", "per-layer embeddings in Llama-family models"),
        (config.norm_unit_offset, "unit-offset norms", "unit-offset norms in Llama-family models"),
        (config.embed_scale is not None, "an embedding scale", "embedding scale in Llama-family models"),
        (config.logit_softcap is not None, "a final logit soft-cap", "logit soft-cap in Llama-family models"),
        (config.layer_scalar, "per-layer output scalars", "per-layer output scalars"),
        (bool(config.extras), f"model extras {sorted(config.extras)}", "equivalent"),
        (config.mlp_act != "silu", f"a {config.mlp_act} MLP", "non-SwiGLU MLP in these families"),
    ]
    for bad, what, lack in checks:
        if bad:
            raise refuse(config, what, lack)


def _layer_features(config: ModelConfig, i: int, spec: LayerSpec) -> None:
    where = f"layer {i}"
    checks = [
        (bool(spec.kv_quant), f"{where} has a {spec.kv_quant} KV cache", f"{spec.kv_quant} KV-cache format (vLLM: fp8 only)"),
        (spec.output_gate is not None, f"{where} has an output gate", "attention output gates"),
        (spec.v_norm or spec.k_eq_v, f"{where} has Gemma 4 value options", "value norm / K=V in these families"),
        (spec.qk_norm, f"{where} has q/k norms", "q/k norms in Llama/Mistral/Qwen2"),
        (spec.softmax_scale is not None, f"{where} sets a softmax scale", "custom attention scale"),
        (spec.mlp_hidden != config.mlp_hidden, f"{where} has its own MLP width", "per-layer MLP width"),
        (getattr(spec, "sinks", 0) or getattr(spec, "sink_logits", False), f"{where} has attention sinks",
         "StreamingLLM sink tokens or learned sink logits in these families"),
    ]
    for bad, what, lack in checks:
        if bad:
            raise refuse(config, what, lack)


def classify(config: ModelConfig) -> Layout:
    """The stock family that represents ``config`` exactly; ``UnsupportedError`` (one line) otherwise."""
    specs = [config.layer(i) for i in range(config.n_layers)]
    not_gemma4 = gemma4_mismatch(config)
    if not_gemma4 is None:
        return Layout(MODEL_TYPE, specs[0], [getattr(s, "window", None) for s in specs])
    consumer = next((i for i, s in enumerate(specs) if s.kv_from is not None), None)
    if consumer is not None or config.sandwich_norms:
        what = (f"layer {consumer} reuses layer {specs[consumer].kv_from}'s KV cache (cross-layer sharing)"
                if consumer is not None else "a Gemma-style decoder (sandwich norms)")
        raise refuse(config, f"{what} and the model is not Gemma 4 ({not_gemma4})", "cross-layer KV sharing or "
                     "Gemma-style decoders except Gemma 4 exactly (its last-n rule, num_kv_shared_layers, with its "
                     "sandwich and q/k/v norms, scaled embeddings, GeGLU, layer scalars and full last layer)")
    _model_features(config)
    types = sorted({s.type for s in specs})
    if types == ["mla"]:
        return _mla_layout(config, specs)
    other = [t for t in types if t not in ("full", "sliding", "mla")]
    if other:
        raise refuse(config, f"'{other[0]}' attention layers", f"'{other[0]}' attention")
    if "mla" in types:
        raise refuse(config, "'mla' layers mixed with full/sliding ones", "per-layer choice between MLA and GQA")
    first = specs[0]
    for i, spec in enumerate(specs):
        _layer_features(config, i, spec)
        shape = (spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.qkv_bias, spec.o_bias, spec.rope)
        if shape != (first.n_heads, first.n_kv_heads, first.head_dim, first.qkv_bias, first.o_bias, first.rope):
            raise refuse(config, f"layer {i} differs from layer 0 in heads, head size, bias or RoPE",
                         "per-layer attention shapes in Llama-family models")
    rope = first.rope
    if rope.interleaved or rope.partial != 1.0:
        raise refuse(config, "interleaved or partial RoPE on full/sliding layers",
                     "such RoPE in Llama/Mistral/Qwen2 (rotate-half over the whole head)")
    windows = [getattr(s, "window", None) for s in specs]
    sliding = {w for w in windows if w is not None}
    if len(sliding) > 1:
        raise refuse(config, f"several window sizes {sorted(sliding)}", "per-layer window sizes (one sliding_window)")
    if first.o_bias and not first.qkv_bias:
        raise refuse(config, "a biased o_proj with unbiased q/k/v", "such bias pattern")
    if not sliding:
        family = "qwen2" if first.qkv_bias and not first.o_bias else "llama"
    elif all(w is not None for w in windows) and not first.qkv_bias:
        family = "mistral"
    elif first.o_bias:
        raise refuse(config, "sliding windows with a biased o_proj", "such bias pattern with sliding windows")
    else:
        family = "qwen2"  # layer_types carries the full/sliding schedule; q/k/v biases (zero if kvlab has none)
    return Layout(family, first, windows)


def _mla_layout(config: ModelConfig, specs: list) -> Layout:
    first = specs[0]
    for i, spec in enumerate(specs):
        _layer_features(config, i, spec)
        if spec != first:
            raise refuse(config, f"layer {i}'s MLA differs from layer 0's", "per-layer MLA shapes")
    if first.rope.partial != 1.0:
        raise refuse(config, "partial RoPE on the MLA RoPE key", "partial RoPE in DeepSeek V3")
    return Layout("deepseek_v3", first, [None] * config.n_layers)
