"""Prefill cost against length for DeepSeek V4's compressed layers (HCA, CSA) next to full GQA attention:
the measurement issue 17's item 4 starts from (their long-chunk path is a dense mask over window + entries).

One layer of SmolLM2-135M's width (d 576, 9 heads of dim 64; V4: q rank 128, 3 output groups of rank 128,
window 128; HCA compress rate 128; CSA rate 4 with a 4-head, dim-32 indexer and top-512), random weights,
fp32, batch 1, a full forward without a cache, process CPU time on one thread, fitted exponent of
log(time) on log(length).

    python benchmarks/v4_prefill.py                  # 512 .. 2048
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from prefill_exponents import fit_exponent, layer  # noqa: E402

from kvlab.attention._common import ForwardContext  # noqa: E402

V4 = {"n_heads": 9, "head_dim": 64, "q_lora_rank": 128, "o_groups": 3, "o_lora_rank": 128, "window": 128,
      "rope": {"theta": 10000.0, "partial": 0.5, "interleaved": True}}
SPECS = {"HCA m=128": {"type": "hca", **V4, "compress_rate": 128},
         "CSA m=4 top-512": {"type": "csa", **V4, "compress_rate": 4, "index_n_heads": 4, "index_head_dim": 32,
                             "index_topk": 512},
         "full GQA-3": {"type": "full", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64}}


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modules = {name: layer(spec) for name, spec in SPECS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in modules}
    for n in args.lengths:
        x = torch.randn(1, n, 576, generator=torch.Generator().manual_seed(n))
        for name, module in modules.items():
            t0 = time.process_time()
            module(x, ForwardContext(1, n, 0, None, x.device), None)
            seconds[name].append(time.process_time() - t0)
        print(n, {name: round(s[-1], 3) for name, s in seconds.items()}, flush=True)
    lines = ["# V4 compressed-attention prefill against length (one layer, fp32, batch 1, 1 thread, CPU clock)", "",
             "| layer | " + " | ".join(f"{n} s" for n in args.lengths) + " | exponent | time / full at the longest |",
             "|---" * (len(args.lengths) + 3) + "|"]
    full = seconds["full GQA-3"][-1]
    rows = []
    for name, s in seconds.items():
        rows.append({"layer": name, "seconds": dict(zip(map(str, args.lengths), s)),
                     "exponent": fit_exponent(args.lengths, s)})
        lines.append(f"| {name} | " + " | ".join(f"{t:.3f}" for t in s) + f" | {rows[-1]['exponent']:.2f} | {s[-1] / full:.1f} |")
    lines += ["", "Command: `python benchmarks/v4_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results("v4_prefill", {"rows": rows, "lengths": args.lengths}, "\n".join(lines))


if __name__ == "__main__":
    main()
