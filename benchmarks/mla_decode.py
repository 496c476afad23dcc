"""MLA decode speed: kvlab's absorbed decode against transformers' DeepseekV3 (which re-expands the whole
cached latent into per-head K/V every step) on the same random weights, and decode tokens/s of MHA vs
GQA-4 vs MLA vs CLA-2 at equal d_model. One run, interleaved, medians with [q1, q3].

The caches are filled to each context directly with random entries of the right shapes (the same latent
tensors in both libraries' caches: RoPE in rotate-half layout, so HF's and kvlab's stored RoPE keys
coincide), not by prefilling, so 32K contexts fit; decode cost depends on shapes, not values. A decode step
on the filled caches is checked to give the same logits in both libraries before timing.

    python benchmarks/mla_decode.py            # 2K, 8K, 32K; equal-width comparison at 8K
    python benchmarks/mla_decode.py --quick    # small model, 512 and 2K (validation)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median_spread, write_results  # noqa: E402

import kvlab  # noqa: E402
from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.attention.mla import LatentCacheLayer  # noqa: E402
from kvlab.cache.base import SharedCacheLayer  # noqa: E402


def hf_config(quick: bool):
    import transformers

    hidden, heads, rank, rope, nope = (128, 4, 32, 16, 32) if quick else (512, 16, 128, 32, 64)
    return transformers.DeepseekV3Config(
        vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads, kv_lora_rank=rank, q_lora_rank=hidden // 2,
        qk_rope_head_dim=rope, qk_nope_head_dim=nope, v_head_dim=nope, first_k_dense_replace=2,
        max_position_embeddings=65536, rope_interleave=False, attn_implementation="sdpa")


@torch.no_grad()
def filled_pair(reference, model: Model, tokens: int):
    """HF DynamicCache and kvlab cache holding the same random latent + RoPE key for ``tokens`` steps."""
    import transformers

    hf_cache = transformers.DynamicCache(config=reference.config)
    cache = model.new_cache(1, max_length=tokens + 64)
    spec = model.config.layer(0)
    for i, layer in enumerate(cache.layers):
        latent = torch.randn(1, 1, tokens, spec.kv_lora_rank)
        k_rope = torch.randn(1, 1, tokens, spec.qk_rope_head_dim)
        layer.append(torch.cat([latent, k_rope], dim=-1))
        hf_cache.update(latent.clone(), k_rope.clone(), i)
    cache.step = tokens
    return hf_cache, cache


@torch.no_grad()
def versus_transformers(quick: bool, contexts: list[int], repeats: int) -> tuple[list[dict], dict]:
    import transformers

    torch.manual_seed(0)
    reference = transformers.DeepseekV3ForCausalLM(hf_config(quick)).eval()
    for p in reference.parameters():  # larger than HF's init so the logit check below is meaningful
        if p.dim() >= 2:
            p.mul_(5.0)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        model = kvlab.load(tmp).eval()
    token = torch.tensor([[7]])
    rows = []
    for context in contexts:
        hf_cache, cache = filled_pair(reference, model, context)
        expected = reference(token, past_key_values=hf_cache, use_cache=True).logits
        drift = (expected - model(token, cache=cache)).abs() / expected.abs().max()
        steps = {"transformers": lambda c=hf_cache: reference(token, past_key_values=c, use_cache=True),
                 "kvlab": lambda c=cache: model(token, cache=c)}
        stats = {name: median_spread(t) for name, t in interleaved(steps, repeats=repeats, warmup=1).items()}
        rows.append({"context": context, **stats, "max_rel_logit_diff": drift.max().item(),
                     "speedup": stats["transformers"]["median"] / stats["kvlab"]["median"],
                     "kvlab_cache_bytes": cache.nbytes})
        print(f"{context:>6} tokens: transformers {stats['transformers']['median'] * 1e3:8.2f} ms  kvlab "
              f"{stats['kvlab']['median'] * 1e3:7.2f} ms  speedup {rows[-1]['speedup']:.2f}x  "
              f"(relative logit diff {rows[-1]['max_rel_logit_diff']:.1e})", flush=True)
        del hf_cache, cache
    return rows, reference.config.to_dict()


def equal_width_configs(quick: bool) -> dict[str, ModelConfig]:
    d_model, heads, head_dim, n_layers = (128, 4, 32, 4) if quick else (512, 8, 64, 4)
    mha = {"type": "full", "n_heads": heads, "head_dim": head_dim}
    mla = {"type": "mla", "n_heads": heads, "kv_lora_rank": 2 * head_dim, "qk_rope_head_dim": head_dim // 2,
           "qk_nope_head_dim": head_dim, "v_head_dim": head_dim}
    layers = {"MHA": [mha] * n_layers, "GQA-4": [{**mha, "n_kv_heads": heads // 4}] * n_layers,
              "MLA": [mla] * n_layers,
              "CLA-2": [mha if i % 2 == 0 else {**mha, "kv_from": i - 1} for i in range(n_layers)]}
    base = {"vocab_size": 1000, "d_model": d_model, "n_layers": n_layers, "mlp_hidden": 2 * d_model}
    return {name: ModelConfig.from_dict({**base, "layers": spec}) for name, spec in layers.items()}


@torch.no_grad()
def filled_cache(model: Model, tokens: int):
    cache = model.new_cache(1, max_length=tokens + 64)
    for layer in cache.layers:
        if isinstance(layer, SharedCacheLayer):
            continue
        if isinstance(layer, LatentCacheLayer):
            layer.append(torch.randn(1, 1, tokens, layer.buffers["latent"]._shape[3]))
        else:
            k = torch.randn(1, layer.buffers["k"]._shape[1], tokens, layer.buffers["k"]._shape[3])
            layer.append(k, torch.randn_like(k))
    cache.step = tokens
    return cache


def read_bytes(model: Model, cache) -> int:
    """Cache bytes one decode step reads: a CLA consumer re-reads its producer's K/V; absorbed MLA reads
    the latent + RoPE key for the scores and the latent again for the values."""
    total = 0
    for block, layer in zip(model.layers, cache.layers):
        if isinstance(layer, SharedCacheLayer):
            total += layer.producer.nbytes
        elif isinstance(layer, LatentCacheLayer):
            spec = block.self_attn.spec
            total += layer.nbytes * (2 * spec.kv_lora_rank + spec.qk_rope_head_dim) // spec.latent_width
        else:
            total += layer.nbytes
    return total


@torch.no_grad()
def equal_width(quick: bool, context: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    models = {name: Model(cfg).eval() for name, cfg in equal_width_configs(quick).items()}
    caches = {name: filled_cache(model, context) for name, model in models.items()}
    per_token = {name: cache.nbytes / context for name, cache in caches.items()}  # before decoding grows them
    read = {name: read_bytes(models[name], cache) / context for name, cache in caches.items()}
    token = torch.tensor([[7]])
    steps = {name: (lambda m=model, c=caches[name]: m(token, cache=c)) for name, model in models.items()}
    stats = {name: median_spread(t) for name, t in interleaved(steps, repeats=repeats, warmup=1).items()}
    rows = []
    for name, s in stats.items():
        rows.append({"model": name, **s, "tokens_per_s": 1 / s["median"],
                     "cache_bytes_per_token": per_token[name],
                     "cache_bytes_read_per_context_token": read[name],
                     "weights": models[name].num_parameters()})
        print(f"{name:>6}: {rows[-1]['tokens_per_s']:8.1f} tok/s  cache {rows[-1]['cache_bytes_per_token']:8.0f} "
              f"B/token, read per step {read[name]:8.0f} B/token", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 512 and 2K tokens (validation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    contexts = [512, 2048] if args.quick else [2048, 8192, 32768]
    repeats = 5 if args.quick else 15
    width_context = 2048 if args.quick else 8192
    rows, hf_cfg = versus_transformers(args.quick, contexts, repeats)
    width = equal_width(args.quick, width_context, repeats)
    lines = ["# MLA decode: kvlab (absorbed) vs transformers DeepseekV3 (re-expands the latent)", "",
             f"Same random weights; {hf_cfg['num_hidden_layers']} layers, hidden {hf_cfg['hidden_size']}, "
             f"{hf_cfg['num_attention_heads']} heads, latent {hf_cfg['kv_lora_rank']} + RoPE "
             f"{hf_cfg['qk_rope_head_dim']}, nope {hf_cfg['qk_nope_head_dim']}, v {hf_cfg['v_head_dim']}; "
             f"batch 1, fp32, {args.threads} thread(s), HF attn sdpa, {repeats} interleaved repeats, "
             "median [q1, q3] per decoded token.", "",
             "| context | transformers ms | kvlab ms | speedup | max logit diff / max logit |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, k = r["transformers"], r["kvlab"]
        lines.append(f"| {r['context']:,} | {t['median'] * 1e3:.2f} [{t['q1'] * 1e3:.2f}, {t['q3'] * 1e3:.2f}] | "
                     f"{k['median'] * 1e3:.2f} [{k['q1'] * 1e3:.2f}, {k['q3'] * 1e3:.2f}] | "
                     f"{r['speedup']:.2f}x | {r['max_rel_logit_diff']:.1e} |")
    lines += ["", f"## Decode at {width_context:,} tokens, equal d_model", "",
              "| model | tokens/s | ms/token [q1, q3] | cache B/token | cache B read per step / context | parameters |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in width:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:.1f} | {r['median'] * 1e3:.2f} [{r['q1'] * 1e3:.2f}, "
                     f"{r['q3'] * 1e3:.2f}] | {r['cache_bytes_per_token']:,.0f} | "
                     f"{r['cache_bytes_read_per_context_token']:,.0f} | {r['weights']:,} |")
    data = {"quick": args.quick, "threads": args.threads, "repeats": repeats, "hf_config": hf_cfg,
            "versus_transformers": rows, "equal_width_context": width_context, "equal_width": width,
            "equal_width_configs": {n: c.to_dict() for n, c in equal_width_configs(args.quick).items()}}
    paths = write_results("mla_decode_quick" if args.quick else "mla_decode", data, "\n".join(lines))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
