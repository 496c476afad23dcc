"""Prefill cost against length for DeepSeek V4's compressed layers (HCA, CSA) next to full GQA attention:
issue 17's item 4. The layers attend in query blocks (window band + visible / top-k entries); their naive
dense path (one mask over window + entries, ``dense_reference_forward``, what they ran before) is timed
beside them up to ``--dense-max`` tokens.

One layer of SmolLM2-135M's width (d 576, 9 heads of dim 64; V4: q rank 128, 3 output groups of rank 128,
window 128; HCA compress rate 128; CSA rate 4 with a 4-head, dim-32 indexer and top-512), random weights,
fp32, batch 1, a full forward without a cache, process CPU time on one thread (the least of ``--repeats``),
fitted exponent of log(time) on log(length) over all lengths and over the last three, and the marginal cost
per query between the last two lengths (flat: linear growth; doubling: quadratic). CSA also runs with its
top-k selection as torch ops (``KVLAB_TOPK_KERNEL=0``; the kernel is ``kernels/csrc/topk_select.cpp``).

    python benchmarks/v4_prefill.py                                  # 512 .. 2048
    python benchmarks/v4_prefill.py --lengths 512 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from prefill_exponents import fit_exponent, layer  # noqa: E402

from kvlab.attention._common import ForwardContext  # noqa: E402
from kvlab.attention.compressed import dense_reference_forward  # noqa: E402

V4 = {"n_heads": 9, "head_dim": 64, "q_lora_rank": 128, "o_groups": 3, "o_lora_rank": 128, "window": 128,
      "rope": {"theta": 10000.0, "partial": 0.5, "interleaved": True}}
SPECS = {"HCA m=128": {"type": "hca", **V4, "compress_rate": 128},
         "CSA m=4 top-512": {"type": "csa", **V4, "compress_rate": 4, "index_n_heads": 4, "index_head_dim": 32,
                             "index_topk": 512},
         "full GQA-3": {"type": "full", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}}
DENSE = ("HCA m=128", "CSA m=4 top-512")  # also timed on their dense reference path


def torch_ops_select(module, x, ctx, cache):
    """The layer's forward with CSA's top-k selection as torch ops (``Indexer.select_reference``)."""
    before = os.environ.get("KVLAB_TOPK_KERNEL")
    os.environ["KVLAB_TOPK_KERNEL"] = "0"
    try:
        return module(x, ctx, cache)
    finally:
        os.environ.pop("KVLAB_TOPK_KERNEL") if before is None else os.environ.__setitem__("KVLAB_TOPK_KERNEL", before)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--dense-max", type=int, default=2048, help="longest length for the dense reference path")
    parser.add_argument("--repeats", type=int, default=3, help="forwards per length and layer (the least counts)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modules = {name: layer(spec) for name, spec in SPECS.items()}
    contenders = dict(modules)
    contenders["CSA m=4 top-512 (top-k as torch ops)"] = partial(torch_ops_select, modules["CSA m=4 top-512"])
    contenders.update({f"{name} (dense reference)": partial(dense_reference_forward, modules[name]) for name in DENSE})
    seconds: dict[str, dict[int, float]] = {name: {} for name in contenders}
    for n in args.lengths:
        x = torch.randn(1, n, 576, generator=torch.Generator().manual_seed(n))
        for name, forward in contenders.items():
            if name.endswith("(dense reference)") and n > args.dense_max:
                continue
            times = []
            for _ in range(1 if name.endswith("(dense reference)") else args.repeats):
                t0 = time.process_time()
                forward(x, ForwardContext(1, n, 0, None, x.device), None)
                times.append(time.process_time() - t0)
            seconds[name][n] = min(times)
        print(n, {name: round(s[n], 3) for name, s in seconds.items() if n in s}, flush=True)
    lengths = args.lengths
    lines = ["# V4 compressed-attention prefill against length (one layer, fp32, batch 1, 1 thread, CPU clock)", "",
             "| layer | " + " | ".join(f"{n} s" for n in lengths)
             + " | exponent (all) | exponent (last 3) | µs per query added (last two lengths) | time / full at the longest |",
             "|---" * (len(lengths) + 5) + "|"]
    full = seconds["full GQA-3"]
    rows = []
    for name, by_len in seconds.items():
        done = sorted(by_len)
        times = [by_len[n] for n in done]
        rows.append({"layer": name, "seconds": {str(n): by_len[n] for n in done},
                     "exponent": fit_exponent(done, times) if len(done) > 1 else None,
                     "exponent_last3": fit_exponent(done[-3:], times[-3:]) if len(done) > 2 else None})
        e, e3 = rows[-1]["exponent"], rows[-1]["exponent_last3"]
        marginal = (times[-1] - times[-2]) / (done[-1] - done[-2]) * 1e6 if len(done) > 1 else None
        rows[-1]["marginal_us_per_query"] = marginal
        cells = [f"{by_len[n]:.3f}" if n in by_len else "-" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {e:.2f}" if e is not None else " | -")
                     + (f" | {e3:.2f}" if e3 is not None else " | -")
                     + (f" | {marginal:.0f}" if marginal is not None else " | -") + f" | {times[-1] / full[done[-1]]:.1f} |")
    lines += ["", "Time / full compares with full attention at the row's longest length.",
              "", "Command: `python benchmarks/v4_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results("v4_prefill", {"rows": rows, "lengths": lengths, "dense_max": args.dense_max}, "\n".join(lines))


if __name__ == "__main__":
    main()
