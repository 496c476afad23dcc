"""Batched serving at a fixed KV memory budget: how many sequences of a context fit, and the aggregate
decode tokens/s at that batch, for SmolLM2-135M's shape with each attention variant.

Variants are random-init kvlab configs of SmolLM2-135M's shape (30 layers, d 576, MLP 1536, vocab 49152;
weights do not change speed) whose layers use the variant's attention: GQA-3 (the source), MQA, int8 and
int4 KV (KIVI), sliding windows, MLA. Sequences that fit = KV budget // the planner's bytes per sequence
(``kvlab.plan``), checked against the live cache (``cache.nbytes`` of the filled cache at the measured
batch == the plan at that batch). The measured batch is capped (``--max-batch``: CPU time); rows say so.
Caches are filled to the context through each layer's own write path with random K/V (values do not
change speed), then one-token steps of the whole batch are timed, all variants interleaved round by round,
as process CPU time on one thread by default (another process holding the core is not counted). The
compute-bound point: the batch from which aggregate tok/s stops rising (the source is also timed at
batches 1, 2, 4, ... up to the cap).

    python benchmarks/serving_budget.py                         # 2 GiB, context 4096, batch cap 16
    python benchmarks/serving_budget.py --budget-gib 1 --context 2048 --max-batch 4
    python benchmarks/serving_budget.py --quick                 # 2 layers, context 256 (validation)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from _smollm2 import shaped_config, timed_steps, timing_args  # noqa: E402

import kvlab  # noqa: E402
from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.attention.full import KVCacheLayer  # noqa: E402
from kvlab.attention.mla import LatentCacheLayer  # noqa: E402
from kvlab.attention.sliding import WindowKVCacheLayer  # noqa: E402
from kvlab.cache.quantized import QuantizedKVCacheLayer  # noqa: E402

MLA = {"type": "mla", "n_heads": 9, "kv_lora_rank": 128, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64,
       "v_head_dim": 64}
VARIANTS = {"GQA-3 (source)": {}, "MQA": {"n_kv_heads": 1}, "int8 KV": {"kv_quant": "int8"},
            "int4 KV": {"kv_quant": "int4"}, "sliding W=4096": {"type": "sliding", "window": 4096},
            "sliding W=1024": {"type": "sliding", "window": 1024},
            "sliding W=1024 + 4 sinks": {"type": "sliding", "window": 1024, "sinks": 4}, "MLA r=128+32": MLA}


def fill(cache, context: int, chunk: int = 1024) -> None:
    """Write ``context`` random tokens into every layer of ``cache`` through its own write path."""
    gen = torch.Generator().manual_seed(context)
    for layer in cache.layers:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            if isinstance(layer, (KVCacheLayer, QuantizedKVCacheLayer)):
                k = layer.k.recent if isinstance(layer, QuantizedKVCacheLayer) else layer.buffers["k"]
                shape = list(k._shape)
                shape[2] = n
                layer.append(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
            elif isinstance(layer, WindowKVCacheLayer):
                shape = list(layer.ring_k.shape)
                shape[2] = n
                layer.write(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), start, None)
            elif isinstance(layer, LatentCacheLayer):
                buf = next(iter(layer.buffers.values()))
                shape = list(buf._shape)
                shape[2] = n
                layer.append(torch.randn(shape, generator=gen))
            else:
                raise SystemExit(f"serving_budget: no fill for {type(layer).__name__}")
    cache.step = context


def share_weights(model: Model, runs: dict) -> Model:
    """Give ``model`` the first built model's embeddings, norms and MLPs (only attention differs between
    variants): one copy of those weights in memory; each step still reads them all."""
    if not runs:
        return model
    first = next(iter(runs.values()))[0]
    model.embed_tokens, model.lm_head, model.norm = first.embed_tokens, first.lm_head, first.norm
    for mine, theirs in zip(model.layers, first.layers):
        mine.mlp, mine.post_attention_layernorm = theirs.mlp, theirs.post_attention_layernorm
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-gib", type=float, default=2.0, help="KV cache budget (weights not included)")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--max-batch", type=int, default=16, help="cap on the measured batch (CPU time)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8], help="source batches timed")
    parser.add_argument("--packed", action="store_true", help="oneDNN-packed linears where measured faster "
                        "(Model.pack_linears_, as kvlab compare's serving columns run)")
    timing_args(parser, rounds=3, steps=2)
    args = parser.parse_args(argv)
    name = "serving_budget"
    if args.quick:
        args.layers, args.context, args.max_batch, args.rounds, args.steps = 2, 256, 2, 1, 1
        args.budget_gib, name = 0.01, name + "_quick"
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    budget = int(args.budget_gib * 2**30)
    runs, rows = {}, []
    for variant, layer in VARIANTS.items():
        config = shaped_config(layer, args.layers)
        per_seq = kvlab.plan(config, context=args.context).total_bytes
        fit = budget // per_seq
        batch = max(min(fit, args.max_batch), 1)
        torch.manual_seed(0)
        model = share_weights(Model(ModelConfig.from_dict(config)).eval(), runs).pack_linears_(args.packed)
        cache = model.new_cache(batch, max_length=args.context + args.steps * (args.rounds + 1) * 4)
        fill(cache, args.context)
        planned = kvlab.plan(config, context=args.context, batch=batch).total_bytes
        rows.append({"variant": variant, "bytes_per_sequence": per_seq, "sequences_fit": fit,
                     "sequences_per_GiB": 2**30 / per_seq, "measured_batch": batch, "capped": fit > batch,
                     "live_cache_bytes": cache.nbytes, "planned_cache_bytes": planned,
                     "live_equals_plan": cache.nbytes == planned})
        runs[variant] = (model, cache)
    # the source at growing batches: where aggregate tok/s stops rising (compute-bound)
    sweep = [b for b in args.sweep if b <= args.max_batch]
    for b in sweep:
        model = runs["GQA-3 (source)"][0]
        cache = model.new_cache(b, max_length=args.context + args.steps * (args.rounds + 1) * 4)
        fill(cache, args.context)
        runs[f"source batch {b}"] = (model, cache)
    samples = {key: [] for key in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in order:
            t = timed_steps(*runs[key], args.steps, clock)
            if r:
                samples[key] += t
    base_fit = rows[0]["sequences_fit"]
    for row in rows:
        step = statistics.median(samples[row["variant"]])
        row.update(step_ms=step * 1e3, aggregate_tok_s=row["measured_batch"] / step,
                   cache_reduction_k=rows[0]["bytes_per_sequence"] / row["bytes_per_sequence"],
                   fit_ratio=row["sequences_fit"] / base_fit if base_fit else None)
        row["fit_ratio_over_k"] = row["fit_ratio"] / row["cache_reduction_k"] if row["fit_ratio"] else None
        print(row, flush=True)
    curve = []
    for b in sweep:
        step = statistics.median(samples[f"source batch {b}"])
        curve.append({"batch": b, "step_ms": step * 1e3, "aggregate_tok_s": b / step})
    for prev, point in zip(curve, curve[1:]):
        point["gain_vs_previous"] = point["aggregate_tok_s"] / prev["aggregate_tok_s"]
    bound = next((p["batch"] for p in curve[1:] if p["gain_vs_previous"] < 1.15), None)
    lines = [f"# Serving at a {args.budget_gib:g} GiB KV budget, context {args.context} "
             f"(SmolLM2-135M shape, {args.layers} layers, fp32, {args.threads} thread(s), {args.clock} clock"
             + (", packed linears" if args.packed else "") + ")", "",
             "| variant | KV per sequence | sequences fit | per GiB | k (cache smaller) | fit / (k x source fit) | "
             "measured batch | aggregate tok/s | live == plan |", "|---" * 9 + "|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['bytes_per_sequence'] / 2**20:.1f} MiB | {row['sequences_fit']} | "
                     f"{row['sequences_per_GiB']:.1f} | {row['cache_reduction_k']:.2f} | "
                     f"{row['fit_ratio_over_k']:.2f} | {row['measured_batch']}{' (capped)' if row['capped'] else ''} | "
                     f"{row['aggregate_tok_s']:.1f} | {row['live_equals_plan']} |")
    lines += ["", "Source model, aggregate tok/s against batch (same rounds):", "",
              "| batch | step ms | aggregate tok/s | gain vs previous batch |", "|---|---|---|---|"]
    lines += [f"| {p['batch']} | {p['step_ms']:.1f} | {p['aggregate_tok_s']:.1f} | "
              f"{p.get('gain_vs_previous', float('nan')):.2f} |" for p in curve]
    lines += ["", f"Compute-bound from batch: {bound if bound else f'not reached up to {sweep[-1]}'} "
              "(first batch whose aggregate tok/s gains < 15% over the previous one).",
              f"Batches capped at {args.max_batch} for CPU time. Command: `python benchmarks/serving_budget.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results(name, {"budget_bytes": budget, "context": args.context, "layers": args.layers,
                         "max_batch": args.max_batch, "threads": args.threads, "clock": args.clock,
                         "packed": args.packed,
                         "rows": rows, "source_curve": curve, "compute_bound_from_batch": bound},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
