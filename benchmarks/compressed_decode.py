"""Decode time per token vs context: a DeepSeek-V4-style CSA/HCA model against a full-attention model
of the same width (d_model, heads, head_dim, layers, MLP), measured in one run, interleaved.

The caches are filled to each context length directly (random entries of the right shapes, the
state a real prefill would leave) rather than by prefilling, so 64K contexts are measurable on a
CPU; decode cost depends on the shapes, not the values. Each timed call decodes one token.

    python benchmarks/compressed_decode.py            # 1K .. 64K
    python benchmarks/compressed_decode.py --quick    # 1K, 4K, small model, few repeats (validation)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, median_spread, write_results  # noqa: E402

from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.attention.compressed import V4CacheLayer  # noqa: E402


def configs(quick: bool) -> dict[str, ModelConfig]:
    d_model, heads, head_dim, n_layers = (128, 4, 32, 2) if quick else (512, 8, 64, 4)
    v4 = {"n_heads": heads, "head_dim": head_dim, "window": 128, "q_lora_rank": d_model // 2, "o_groups": 2,
          "o_lora_rank": d_model // 4, "rope": {"partial": 0.25, "interleaved": True}}
    csa = {"type": "csa", **v4, "compress_rate": 4, "index_n_heads": 8, "index_head_dim": 32, "index_topk": 512}
    hca = {"type": "hca", **v4, "compress_rate": 128}
    base = {"vocab_size": 1000, "d_model": d_model, "n_layers": n_layers, "mlp_hidden": 2 * d_model}
    return {"csa_hca": ModelConfig.from_dict({**base, "layers": [csa, hca] * (n_layers // 2)}),
            "full": ModelConfig.from_dict({**base, "layers": [{"type": "full", "n_heads": heads,
                                                              "head_dim": head_dim}] * n_layers})}


@torch.no_grad()
def filled_cache(model: Model, tokens: int):
    """A batch-1 cache holding ``tokens`` steps of random state of the shapes a prefill leaves."""
    cache = model.new_cache(1, max_length=tokens + 64)
    for layer in cache.layers:
        if isinstance(layer, V4CacheLayer):
            keep = min(tokens, layer.window - 1)
            layer.state["window"] = torch.randn(1, keep, layer.head_dim)
            for name, comp in layer.compressors.items():
                layer.buffers[name].append(torch.randn(1, tokens // comp.rate, comp.dim) * 0.1)
            layer.length = tokens
        else:
            k = torch.randn(1, layer.buffers["k"]._shape[1], tokens, layer.buffers["k"]._shape[3])
            layer.append(k, torch.randn_like(k))
    cache.step = tokens
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 1K and 4K only (validation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    repeats = 5 if args.quick else 15
    models = {name: Model(cfg).eval() for name, cfg in configs(args.quick).items()}
    rows = []
    for context in contexts:
        caches = {name: filled_cache(model, context) for name, model in models.items()}
        token = torch.tensor([[7]])
        steps = {name: (lambda m=model, c=caches[name], t=token: m(t, cache=c)) for name, model in models.items()}
        with torch.no_grad():
            times = interleaved(steps, repeats=repeats, warmup=2)
        stats = {name: median_spread(t) for name, t in times.items()}
        rows.append({"context": context, **{name: s for name, s in stats.items()},
                     "ratio_full_over_csa_hca": stats["full"]["median"] / stats["csa_hca"]["median"],
                     "cache_bytes": {name: c.nbytes for name, c in caches.items()}})
        print(f"{context:>6} tokens: csa/hca {stats['csa_hca']['median'] * 1e3:7.2f} ms  "
              f"full {stats['full']['median'] * 1e3:7.2f} ms  full/csa-hca {rows[-1]['ratio_full_over_csa_hca']:.2f}x",
              flush=True)
    crossover = next((r["context"] for r in rows if r["ratio_full_over_csa_hca"] > 1.0), None)
    last = rows[-1]
    lines = ["# Decode time per token: CSA/HCA vs full attention (same width)", "",
             f"Models: {', '.join(f'{n}: {m.config.n_layers} layers, d_model {m.config.d_model}' for n, m in models.items())}; "
             f"batch 1, fp32, {args.threads} thread(s), {repeats} interleaved repeats, median [q1, q3].", "",
             "| context | CSA/HCA ms | full ms | full / CSA-HCA | CSA/HCA cache | full cache |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, f = r["csa_hca"], r["full"]
        lines.append(f"| {r['context']:,} | {a['median'] * 1e3:.2f} [{a['q1'] * 1e3:.2f}, {a['q3'] * 1e3:.2f}] | "
                     f"{f['median'] * 1e3:.2f} [{f['q1'] * 1e3:.2f}, {f['q3'] * 1e3:.2f}] | "
                     f"{r['ratio_full_over_csa_hca']:.2f}x | {r['cache_bytes']['csa_hca'] / 2**20:.1f} MiB | "
                     f"{r['cache_bytes']['full'] / 2**20:.1f} MiB |")
    lines += ["", f"Crossover (first context where CSA/HCA decodes faster): "
              f"{f'{crossover:,} tokens' if crossover else 'none in range'}; "
              f"at {last['context']:,} tokens full attention takes {last['ratio_full_over_csa_hca']:.2f}x "
              f"the CSA/HCA time."]
    data = {"quick": args.quick, "threads": args.threads, "repeats": repeats,
            "configs": {n: m.config.to_dict() for n, m in models.items()}, "rows": rows,
            "crossover_tokens": crossover, "ratio_at_max_context": last["ratio_full_over_csa_hca"]}
    paths = write_results("compressed_decode_quick" if args.quick else "compressed_decode", data, "\n".join(lines))
    print("\n".join(lines[-1:]))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
