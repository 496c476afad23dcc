"""DeepSeek V4 (``model_type: deepseek_v4``): CSA / HCA / sliding layers with mHC. Plannable; not
loadable as a whole model because every V4 layer's MLP is a mixture of experts (out of scope).

Reads both transformers' fields (``layer_types``, ``compress_rates``, nested ``rope_parameters``
``{"main", "compress"}``) and the legacy fields of released checkpoints (``compress_ratios`` per layer,
``compress_rate_csa``/``_hca``, ``qk_rope_head_dim``, top-level ``rope_scaling``).
"""

from __future__ import annotations

import dataclasses

from kvlab.config import ModelConfig, RopeConfig
from kvlab.errors import ConfigError
from kvlab.hf import hf_flag, hf_get, register_family

TYPES = {"sliding_attention": "v4_sliding", "compressed_sparse_attention": "csa",
         "heavily_compressed_attention": "hca"}
DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


def _layer_types(hf: dict, rates: dict) -> list[str]:
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        types = list(hf["layer_types"])[:n]
    elif hf.get("compress_ratios") is not None:
        by_rate = {0: "sliding_attention", rates["compressed_sparse_attention"]: "compressed_sparse_attention",
                   rates["heavily_compressed_attention"]: "heavily_compressed_attention"}
        try:
            types = [by_rate[int(r)] for r in hf["compress_ratios"][:n]]
        except KeyError as exc:
            raise ConfigError(f"compress_ratios: unknown ratio {exc.args[0]} (expected 0, "
                              f"{rates['compressed_sparse_attention']} or {rates['heavily_compressed_attention']})"
                              ) from None
    else:  # transformers' default: 2 x HCA, then HCA/CSA alternating
        types = (["heavily_compressed_attention"] * min(n, 2)
                 + ["compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
                    for i in range(max(n - 2, 0))])
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise ConfigError(f"layer_types: {bad[0]!r} is not a DeepSeek V4 layer type ({', '.join(TYPES)})")
    if len(types) != n:
        raise ConfigError(f"layer_types: {len(types)} entries for {n} layers")
    return types


def _ropes(hf: dict, partial: float) -> tuple[RopeConfig, RopeConfig]:
    """(main, compress) RoPE: interleaved pairs on the trailing slice; YaRN (attention factor 1) only
    on the compress set."""
    params = hf.get("rope_parameters") or {}
    max_pos = hf.get("max_position_embeddings")
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main_p, comp_p = dict(params["main"]), dict(params["compress"])
    else:
        scaling = {k: v for k, v in (params or hf.get("rope_scaling") or {}).items() if k not in ("main", "compress")}
        main_p = {"rope_theta": hf.get("rope_theta", 10000.0)}
        comp_p = {**scaling, "rope_theta": hf.get("compress_rope_theta", 160000.0)}

    def rope(p: dict, yarn_ok: bool) -> RopeConfig:
        p = dict(p)
        theta = float(p.pop("rope_theta", 10000.0))
        p.pop("partial_rotary_factor", None)
        kind = p.get("rope_type", p.get("type", "default"))
        scaling = None
        if yarn_ok and kind not in (None, "default"):
            scaling = {"rope_type": kind, **{k: v for k, v in p.items() if k not in ("rope_type", "type")}}
            if kind == "yarn":
                scaling.setdefault("attention_factor", 1.0)  # V4 does not scale cos/sin by YaRN's mscale
        return RopeConfig(theta=theta, partial=partial, interleaved=True, scaling=scaling, max_position=max_pos)

    return rope(main_p, False), rope(comp_p, True)


@register_family("deepseek_v4")
def deepseek_v4_config(hf: dict) -> ModelConfig:
    n_heads = hf["num_attention_heads"]
    head_dim = hf_get(hf, "head_dim", default=512)
    if hf.get("partial_rotary_factor") is not None:
        partial = float(hf["partial_rotary_factor"])
    elif hf.get("qk_rope_head_dim") is not None:
        partial = hf["qk_rope_head_dim"] / head_dim
    else:
        partial = 64 / 512
    rates = dict(DEFAULT_RATES)
    rates.update(hf.get("compress_rates") or {})
    if hf.get("compress_rate_csa") is not None:
        rates["compressed_sparse_attention"] = hf["compress_rate_csa"]
    if hf.get("compress_rate_hca") is not None:
        rates["heavily_compressed_attention"] = hf["compress_rate_hca"]
    main_rope, comp_rope = _ropes(hf, partial)
    base = {"n_heads": n_heads, "head_dim": head_dim, "q_lora_rank": hf_get(hf, "q_lora_rank", default=1024),
            "window": hf_get(hf, "sliding_window", default=128), "o_groups": hf_get(hf, "o_groups", default=8),
            "o_lora_rank": hf_get(hf, "o_lora_rank", default=1024)}
    layers = []
    for layer_type in _layer_types(hf, rates):
        spec = {"type": TYPES[layer_type], **base}
        if layer_type == "sliding_attention":
            spec["rope"] = dataclasses.asdict(main_rope)
        else:
            spec["rope"] = dataclasses.asdict(comp_rope)
            spec["compress_rate"] = rates[layer_type]
        if layer_type == "compressed_sparse_attention":
            spec.update(index_n_heads=hf_get(hf, "index_n_heads", default=64),
                        index_head_dim=hf_get(hf, "index_head_dim", default=128),
                        index_topk=hf_get(hf, "index_topk", default=512))
        layers.append(spec)
    extra = {}
    if any(f.name == "hyper_connections" for f in dataclasses.fields(ModelConfig)):
        streams = hf_get(hf, "hc_mult", default=4)
        if streams and streams > 1:
            extra["hyper_connections"] = {"streams": streams,
                                          "sinkhorn_iters": hf_get(hf, "hc_sinkhorn_iters", default=20),
                                          "eps": hf_get(hf, "hc_eps", default=1e-6)}
    return ModelConfig.from_dict({
        "name": "deepseek_v4",
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "n_layers": hf["num_hidden_layers"],
        # every V4 MLP is a mixture of experts: planned as one expert's width (the cache does not depend on it)
        "mlp_hidden": hf_get(hf, "moe_intermediate_size", "intermediate_size", default=2048),
        "norm_eps": hf_get(hf, "rms_norm_eps", default=1e-6),
        "rope": dataclasses.asdict(main_rope),
        "tie_embeddings": hf_flag(hf, "tie_word_embeddings", False),
        "max_seq_len": hf_get(hf, "max_position_embeddings", default=1048576),
        "layers": layers,
        **extra,
    })
