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
            "output_gate": draw(st.sampled_from([None, "head", "element"]))}


# name -> strategy producing one layer-spec dict (a layer may only reference earlier layers via
# kv_from; strategies that need that get the list of earlier layers as ``previous``).
LAYER_STRATEGIES = {
    "full": lambda previous: full_layer(),
    "cca": lambda previous: cca_layer(),
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
