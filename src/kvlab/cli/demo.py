"""``kvlab demo``: what `make demo` runs until the comparison job lands -- the planner over the
released-model presets, then small kvlab models of each runnable technique whose measured cache is
checked against the planner, with a short generation from each."""

from __future__ import annotations

from kvlab.cli._args import int_range

DEMO_LAYERS = {  # technique label -> one layer spec at d_model 256 (8 query heads of dim 32)
    "MHA": {"type": "full", "n_heads": 8},
    "GQA-4": {"type": "full", "n_heads": 8, "n_kv_heads": 2},
    "MQA": {"type": "full", "n_heads": 8, "n_kv_heads": 1},
    "GQA-4 + int8 KV": {"type": "full", "n_heads": 8, "n_kv_heads": 2, "kv_quant": "int8"},
    "MLA (r=64)": {"type": "mla", "n_heads": 8, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
                   "qk_nope_head_dim": 32, "v_head_dim": 32},
    "sliding W=256 + 4 sinks": {"type": "sliding", "n_heads": 8, "n_kv_heads": 2, "window": 256, "sinks": 4},
}


def add_parser(sub):
    p = sub.add_parser("demo", help="a quick tour: plan released models, measure kvlab caches, generate")
    p.add_argument("--context", type=int_range(64, 8192), default=2048,
                   help="tokens held by the small models, 64..8192 (default 2048)")
    return p


def _plan_presets() -> None:
    from kvlab.planner import human_bytes, plan, preset_names

    print("KV cache of released models at 128K tokens, bf16, one sequence (kvlab plan --preset NAME):")
    print(f"{'preset':>20} {'KV cache':>12} {'bytes/token':>12} {'MHA-equiv':>12} {'saving':>8}")
    for name in preset_names():
        try:
            r = plan(name, context=131072, dtype="bfloat16")
        except Exception as exc:  # a preset whose family cannot be planned is reported, not hidden
            print(f"{name:>20} unavailable: {exc}")
            continue
        print(f"{name:>20} {human_bytes(r.total_bytes):>12} {r.bytes_per_token:>12,.0f} "
              f"{human_bytes(r.mha_bytes):>12} {r.mha_bytes / r.total_bytes:>7.1f}x")


def _measure_techniques(context: int) -> None:
    import torch

    from kvlab import Model, ModelConfig, plan
    from kvlab.errors import KvlabError
    from kvlab.planner import human_bytes

    print(f"\nSmall kvlab models (4 layers, d_model 256, random weights): cache after {context:,} tokens, "
          "measured vs planned, and greedy decode speed:")
    print(f"{'technique':>24} {'measured':>12} {'planned':>12} {'equal':>6} {'vs MHA':>7} {'decode tok/s':>13}")
    mha = None
    for label, layer in DEMO_LAYERS.items():
        try:
            config = ModelConfig.from_dict({"vocab_size": 512, "d_model": 256, "n_layers": 4, "mlp_hidden": 512,
                                            "max_seq_len": max(4096, context + 1),
                                            "layers": [dict(layer) for _ in range(4)]})
            torch.manual_seed(0)
            model = Model(config).eval()
        except KvlabError as exc:
            print(f"{label:>24} not available: {exc}")
            continue
        prompt = torch.randint(0, 512, (1, context - 32))
        model.generate(prompt[:, :64], max_new_tokens=4)  # warm-up
        result = model.generate(prompt, max_new_tokens=33)
        measured = result.stats.peak_cache_bytes
        planned = plan(config, context=context).total_bytes
        mha = mha or planned
        print(f"{label:>24} {human_bytes(measured):>12} {human_bytes(planned):>12} "
              f"{'yes' if measured == planned else 'NO':>6} {mha / planned:>6.1f}x "
              f"{result.stats.decode_tokens_per_s:>13.1f}")


def run(args) -> int:
    _plan_presets()
    _measure_techniques(args.context)
    print("\nNext: kvlab plan --help, kvlab generate --help; see README.md for the Python API.")
    return 0
