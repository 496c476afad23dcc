"""Decode speed with a quantized KV cache (int8 / int4, KIVI) against the fp32 cache, SmolLM2-135M's shape.

Models: random-init kvlab configs of SmolLM2-135M's shape (30 GQA-3 layers, d 576; weights do not change
speed), one per cache: fp32, int8, int4, and int8 / int4 on the reference read path (``append``'s full-size
dequantized copy, the pre-issue-17 behaviour; forced by marking each layer as having a ``kv_from``
consumer). "int8" / "int4" read the codes through the compiled kernel (``kernels/__init__.py``:
dequantized in registers); "int8 / int4 torch ops" through the torch-ops read (codes converted to float
block by block in a workspace, ``KVLAB_QUANT_KERNEL=0``), the read before the kernel. With ``--batch``
above 1, "int8 / int4 2048-token blocks" time the torch-ops read with the block size fixed at 2048 tokens,
as before the workspace bound (``quantized.block_tokens``): the same-run before/after of that bound.

Each cache is filled to the context through the layers' own ``append`` (random K/V: values do not change
speed; the quantized layers quantize them as a prefill would), then one-token steps are timed, the
variants interleaved round by round in one process. Times are process CPU time with one thread by default
(``--clock wall`` for wall time): on a shared machine the time another process holds the core is not
counted. Rows give the step time ratio against fp32 measured in the same rounds.

    python benchmarks/kv_quant_decode.py            # contexts 2048 and 8192
    python benchmarks/kv_quant_decode.py --quick    # 512, 2 layers (validation)
    python benchmarks/kv_quant_decode.py --batch 16 --contexts 4096 --threads 2 --clock wall \
        --variants int8 "int8 torch ops" int4 "int4 torch ops"      # nine 30-layer batch-16 caches need >24 GB
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import kvlab.cache.quantized as quantized
from kvlab.kernels import QUANTIZED

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_results  # noqa: E402
from _smollm2 import shaped_config, timed_steps, timing_args  # noqa: E402

from kvlab import Model, ModelConfig  # noqa: E402

VARIANTS = {"fp32": {}, "int8": {"kv_quant": "int8"}, "int8 torch ops": {"kv_quant": "int8"},
            "int8 reference": {"kv_quant": "int8"}, "int4": {"kv_quant": "int4"},
            "int4 torch ops": {"kv_quant": "int4"}, "int4 reference": {"kv_quant": "int4"}}
FIXED = {"int8 2048-token blocks": {"kv_quant": "int8"}, "int4 2048-token blocks": {"kv_quant": "int4"}}


def build(layer: dict, n_layers: int, reference: bool) -> Model:
    torch.manual_seed(0)
    model = Model(ModelConfig.from_dict(shaped_config(layer, n_layers))).eval()
    if reference:
        for block in model.layers:
            block.self_attn.has_consumers = True  # -> append's dequantized copy (the reference read path)
    return model


@torch.inference_mode()
def filled_cache(model: Model, context: int, batch: int = 1, chunk: int = 1024):
    """A cache holding ``context`` random tokens in every layer, written through the layers' ``append``."""
    cache = model.new_cache(batch, max_length=context + 256)
    gen = torch.Generator().manual_seed(context)
    for layer in cache.layers:
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            k, v = (torch.randn(batch, 3, n, 64, generator=gen) for _ in range(2))
            layer.append(k, v)
    cache.step = context
    return cache


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    parser.add_argument("--variants", nargs="*", help="only these caches (fp32 always runs: the baseline)")
    timing_args(parser, rounds=5, steps=4)
    args = parser.parse_args(argv)
    name = "kv_quant_decode" + (f"_batch{args.batch}" if args.batch > 1 else "") + \
        (f"_{args.threads}threads" if args.threads > 1 and args.batch == 1 else "")
    if args.quick:
        args.contexts, args.layers, args.rounds, args.steps, name = [512], 2, 2, 2, name + "_quick"
    torch.set_num_threads(args.threads)
    if QUANTIZED.module() is None:
        sys.exit("the quantized-KV decode kernel did not build here: 'int8' / 'int4' would time the torch ops")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = VARIANTS | (FIXED if args.batch > 1 else {})
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {v: layer for v, layer in variants.items() if v == "fp32" or v in args.variants}
    models = {v: build(layer, args.layers, v.endswith("reference")) for v, layer in variants.items()}
    rows = []
    for context in args.contexts:
        caches = {v: filled_cache(m, context, args.batch) for v, m in models.items()}
        held = {v: c.nbytes for v, c in caches.items()}
        samples = {v: [] for v in models}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for v in order:
                bound = quantized.WORKSPACE_BYTES
                if v in FIXED:  # the block size before the workspace bound: always BLOCK tokens
                    quantized.WORKSPACE_BYTES = 1 << 62
                os.environ["KVLAB_QUANT_KERNEL"] = "0" if v in FIXED or v.endswith("torch ops") else "1"
                try:
                    t = timed_steps(models[v], caches[v], args.steps, clock)
                finally:
                    quantized.WORKSPACE_BYTES = bound
                if r:
                    samples[v] += t
        base = statistics.median(samples["fp32"])
        for v in models:
            step = statistics.median(samples[v])
            rows.append({"context": context, "variant": v, "step_ms": step * 1e3, "ratio_vs_fp32": step / base,
                         "cache_bytes": held[v], "cache_ratio_vs_fp32": held[v] / held["fp32"]})
            print(rows[-1], flush=True)
        del caches
    lines = [f"# Quantized KV decode vs fp32 KV (SmolLM2-135M shape, {args.layers} layers, batch {args.batch}, "
             f"{args.threads} thread(s), {args.clock} clock)", "",
             "| context | cache | step ms | step time / fp32 | cache bytes / fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {r['context']} | {r['variant']} | {r['step_ms']:.1f} | {r['ratio_vs_fp32']:.2f} | "
              f"{r['cache_ratio_vs_fp32']:.3f} |" for r in rows]
    lines += ["", f"Medians of {args.rounds} interleaved rounds x {args.steps} steps. 'reference': the "
              "full-size dequantized copy per step (before issue 17); 'torch ops': the codes read as torch ops over "
              "float blocks (before the kernel). Command: " + command_line("kv_quant_decode.py", argv)]
    print("\n".join(lines))
    write_results(name, {"layers": args.layers, "batch": args.batch, "threads": args.threads, "clock": args.clock,
                         "rows": rows},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
