"""Sliding-window prefill against length at a fixed window: the block-banded path (``WindowBand``) against
the dense-mask reference it replaced and full attention, with fitted exponents and a block-size sweep.

One layer of SmolLM2-135M's width (d 576, 9 query heads, GQA-3 of dim 64), random weights, fp32, batch 1,
a full forward without a cache. Times are process CPU time on one thread, contenders interleaved at each
length; the exponent is a least-squares fit of log(time) on log(length). "max |banded - dense|" checks
that both paths give the same outputs at every length both ran.

    python benchmarks/sliding_prefill.py             # W 1024, 1K .. 16K (dense reference up to 8K)
    python benchmarks/sliding_prefill.py --quick     # W 128, 256 .. 1K
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
from prefill_exponents import fit_exponent, layer  # noqa: E402

import kvlab.attention.sliding as sliding  # noqa: E402
from kvlab.attention._common import ForwardContext  # noqa: E402

DENSE = 10**12  # BAND_MIN that makes every forward take the dense reference


@torch.inference_mode()
def prefill(module, seq: int, band_min: int | None = None, block: int | None = None):
    """(process seconds, output) of one full forward of ``seq`` tokens."""
    x = torch.randn(1, seq, 576, generator=torch.Generator().manual_seed(seq))
    saved = sliding.BAND_MIN, sliding.band_block
    if band_min is not None:
        sliding.BAND_MIN = band_min
    if block is not None:
        sliding.band_block = lambda window: block
    try:
        t0 = time.process_time()
        out = module(x, ForwardContext(1, seq, 0, None, x.device), None)
        return time.process_time() - t0, out
    finally:
        sliding.BAND_MIN, sliding.band_block = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dense-max", type=int, default=8192, help="longest length for the dense reference")
    parser.add_argument("--blocks", type=int, nargs="*", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    name = "sliding_prefill"
    if args.quick:
        args.window, args.lengths, args.dense_max, args.blocks, args.repeats, name = \
            128, [256, 512, 1024], 1024, [64, 128], 1, name + "_quick"
    torch.set_num_threads(1)
    spec = {"type": "sliding", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "window": args.window}
    window_layer = layer(spec)
    full_layer = layer({"type": "full", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64})
    contenders = {"banded": (window_layer, None), "dense reference": (window_layer, DENSE), "full GQA-3": (full_layer, None)}
    times: dict[str, dict[int, float]] = {c: {} for c in contenders}
    diffs: dict[int, float] = {}
    for seq in args.lengths:
        run = [c for c in contenders if c != "dense reference" or seq <= args.dense_max]
        samples: dict[str, list[float]] = {c: [] for c in run}
        outs = {}
        for r in range(args.repeats):
            for c in (run if r % 2 == 0 else run[::-1]):
                module, band_min = contenders[c]
                seconds, outs[c] = prefill(module, seq, band_min)
                samples[c].append(seconds)
        for c, s in samples.items():
            times[c][seq] = statistics.median(s)
        if "dense reference" in outs:
            diffs[seq] = float((outs["banded"] - outs["dense reference"]).abs().max())
        print(seq, {c: round(times[c][seq], 3) for c in samples}, diffs.get(seq), flush=True)
    sweep_len = max(n for n in args.lengths if n <= args.dense_max)
    sweep = {}
    for block in args.blocks:
        sweep[block] = min(prefill(window_layer, sweep_len, block=block)[0] for _ in range(args.repeats))
    rows = []
    for c, by_len in times.items():
        lengths = sorted(by_len)
        rows.append({"layer": c, "seconds": {str(n): by_len[n] for n in lengths},
                     "exponent": fit_exponent(lengths, [by_len[n] for n in lengths]),
                     "exponent_last3": fit_exponent(lengths[-3:], [by_len[n] for n in lengths[-3:]])})
    lengths = args.lengths
    lines = [f"# Sliding-window prefill (W {args.window}) against length: one layer, fp32, batch 1, 1 thread, CPU clock",
             "", "| layer | " + " | ".join(f"{n} s" for n in lengths) + " | exponent (all) | exponent (last 3) |",
             "|---" * (len(lengths) + 3) + "|"]
    for row in rows:
        cells = [f"{row['seconds'][str(n)]:.3f}" if str(n) in row["seconds"] else "-" for n in lengths]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + f" | {row['exponent']:.2f} | {row['exponent_last3']:.2f} |")
    dense, banded = times["dense reference"], times["banded"]
    lines += ["", "dense / banded at the same length: " + ", ".join(f"{n}: {dense[n] / banded[n]:.2f}x" for n in dense),
              "", "max |banded - dense| of the outputs: " + ", ".join(f"{n}: {d:.1e}" for n, d in diffs.items()),
              "", f"Block-size sweep at {sweep_len} tokens (default block {sliding.band_block(args.window)}): "
              + ", ".join(f"{b}: {t:.3f} s" for b, t in sweep.items()),
              "", "Command: `python benchmarks/sliding_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results(name, {"window": args.window, "rows": rows, "lengths": lengths, "max_abs_diff": diffs,
                         "block_sweep": {"length": sweep_len, "seconds": sweep}}, "\n".join(lines))


if __name__ == "__main__":
    main()
