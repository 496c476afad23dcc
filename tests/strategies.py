"""Hypothesis strategies for random layer specs, one entry per technique. A new technique adds its
strategy to ``LAYER_STRATEGIES``; the property tests then mix it with every other technique."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def full_layer(draw, n_heads=None):
    n_heads = n_heads or draw(st.sampled_from([2, 4, 6]))
    n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    return {"type": "full", "n_heads": n_heads, "n_kv_heads": n_kv,
            "head_dim": draw(st.sampled_from([8, 16])), "qk_norm": draw(st.booleans())}


@st.composite
def cca_layer(draw):
    """ZAYA1 compressed convolutional attention: random head layout, conv kernels, bias and output gate."""
    n_heads = draw(st.sampled_from([2, 4]))
    return {"type": "cca", "n_heads": n_heads,
            "n_kv_heads": draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])),
            "head_dim": draw(st.sampled_from([8, 16])), "conv_depthwise": draw(st.integers(1, 3)),
            "conv_grouped": draw(st.integers(1, 3)), "qkv_bias": draw(st.booleans()),
            "output_gate": draw(st.sampled_from([None, "head", "element"])),
            "window": draw(st.sampled_from([None, 3, 8]))}


@st.composite
def v4_layer(draw, kind):
    """DeepSeek V4 layers ("csa", "hca", "v4_sliding"): window, compression rate, indexer and RoPE slice."""
    n_heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    partial = draw(st.sampled_from([0.5, 1.0]))
    layer = {"type": kind, "n_heads": n_heads, "head_dim": head_dim, "window": draw(st.integers(1, 9)),
             "q_lora_rank": draw(st.sampled_from([8, 16])), "o_groups": draw(st.sampled_from([1, 2])),
             "o_lora_rank": 8, "rope": {"partial": partial, "interleaved": draw(st.booleans())}}
    if kind != "v4_sliding":
        layer["compress_rate"] = draw(st.integers(1, 9))
    if kind == "csa":
        layer.update(index_n_heads=draw(st.integers(1, 3)), index_head_dim=draw(st.sampled_from([d for d in (8, 16) if d >= head_dim * partial])),
                     index_topk=draw(st.integers(1, 6)))
    return layer


def kv_quant_fields(draw) -> dict:
    """Random KIVI quantization settings (int8/int4, group, full-precision residual)."""
    return {"kv_quant": draw(st.sampled_from(["int8", "int4"])), "kv_quant_group": draw(st.sampled_from([4, 8, 32])),
            "kv_quant_residual": draw(st.sampled_from([0, 3, 8]))}


@st.composite
def full_quant_layer(draw):
    """MHA/GQA/MQA with a quantized K/V cache."""
    return {**draw(full_layer()), **kv_quant_fields(draw)}


@st.composite
def mla_layer(draw, previous=(), quant=None):
    """Multi-head latent attention: latent rank, RoPE/nope/value dims, optional low-rank query, quantized
    latent (``quant``: None = random, False = never), or a consumer of an earlier MLA layer's latent."""
    producers = [i for i, p in enumerate(previous) if p["type"] == "mla" and p.get("kv_from") is None]
    if producers and draw(st.booleans()):
        src = draw(st.sampled_from(producers))
        shape = {k: previous[src][k] for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim")}
        return {"type": "mla", "n_heads": draw(st.sampled_from([2, 4])), **shape, "kv_from": src,
                "v_head_dim": draw(st.sampled_from([4, 8])), "q_lora_rank": draw(st.sampled_from([None, 8]))}
    layer = {"type": "mla", "n_heads": draw(st.sampled_from([2, 4])), "kv_lora_rank": draw(st.sampled_from([8, 16])),
             "qk_rope_head_dim": draw(st.sampled_from([4, 8])), "qk_nope_head_dim": draw(st.sampled_from([4, 8])),
             "v_head_dim": draw(st.sampled_from([4, 8, 12])), "q_lora_rank": draw(st.sampled_from([None, 8]))}
    if quant is None and draw(st.booleans()):
        layer.update(kv_quant_fields(draw))
    return layer



@st.composite
def block_sparse_layer(draw):
    """Longformer / BigBird: random block size, local/global/random block counts and seed."""
    return {**draw(full_layer()), "type": "block_sparse", "block": draw(st.integers(1, 6)),
            "local_blocks": draw(st.integers(1, 3)), "global_blocks": draw(st.integers(0, 2)),
            "random_blocks": draw(st.sampled_from([0, 0, 1, 2])), "seed": draw(st.integers(0, 5))}


@st.composite
def gated_deltanet_layer(draw):
    """Gated DeltaNet: key/value head layout, value head dim, conv kernel and chunk length."""
    n_heads = draw(st.sampled_from([2, 4]))
    return {"type": "gated_deltanet", "n_heads": n_heads,
            "n_kv_heads": draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])),
            "head_dim": draw(st.sampled_from([4, 8])), "value_head_dim": draw(st.sampled_from([None, 6])),
            "conv_kernel": draw(st.integers(1, 4)), "chunk": draw(st.sampled_from([3, 8, 64]))}


@st.composite
def sliding_layer(draw, previous=()):
    """Sliding window (+ sinks, + sink logits); sometimes a consumer of an earlier full/sliding layer."""
    layer = {**draw(full_layer()), "type": "sliding", "window": draw(st.integers(1, 12)),
             "sinks": draw(st.sampled_from([0, 0, 2])), "sink_logits": draw(st.booleans())}
    producers = [i for i, p in enumerate(previous) if p["type"] == "sliding" and p.get("kv_from") is None]
    if producers and draw(st.booleans()):
        src = draw(st.sampled_from(producers))
        layer.update(kv_from=src, n_kv_heads=previous[src]["n_kv_heads"], head_dim=previous[src]["head_dim"],
                     window=previous[src]["window"])
        layer["n_heads"] = layer["n_kv_heads"] * draw(st.integers(1, 2))
    return layer


@st.composite
def shared_layer(draw, previous=()):
    """Cross-layer sharing: a full layer reading an earlier (unquantized) full or sliding producer's K/V,
    with its own query-head count and q/k norm; a plain full layer when there is no producer yet."""
    producers = [i for i, p in enumerate(previous) if p["type"] in ("full", "sliding")
                 and p.get("kv_from") is None and not p.get("kv_quant")]
    if not producers:
        return draw(full_layer())
    src = draw(st.sampled_from(producers))
    n_kv = previous[src]["n_kv_heads"]
    return {"type": "full", "kv_from": src, "n_kv_heads": n_kv, "head_dim": previous[src]["head_dim"],
            "n_heads": n_kv * draw(st.integers(1, 3)), "qk_norm": draw(st.booleans())}


# name -> strategy producing one layer-spec dict (a layer may only reference earlier layers via
# kv_from; strategies that need that get the list of earlier layers as ``previous``).
LAYER_STRATEGIES = {
    "full": lambda previous: full_layer(),
    "sliding": lambda previous: sliding_layer(previous),
    "shared": lambda previous: shared_layer(previous),
    "full_quant": lambda previous: full_quant_layer(),
    "mla": lambda previous: mla_layer(previous),
    "cca": lambda previous: cca_layer(),
    "csa": lambda previous: v4_layer("csa"),
    "hca": lambda previous: v4_layer("hca"),
    "v4_sliding": lambda previous: v4_layer("v4_sliding"),
    "block_sparse": lambda previous: block_sparse_layer(),
    "gated_deltanet": lambda previous: gated_deltanet_layer(),
}


@st.composite
def model_config(draw, techniques=None, max_layers=4):
    names = sorted(techniques or LAYER_STRATEGIES)
    n_layers = draw(st.integers(1, max_layers))
    layers: list[dict] = []
    for _ in range(n_layers):
        name = draw(st.sampled_from(names))
        layers.append(draw(LAYER_STRATEGIES[name](list(layers))))
    return {"vocab_size": 61, "d_model": 32, "n_layers": n_layers, "mlp_hidden": 48, "layers": layers}
