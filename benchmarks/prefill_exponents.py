"""Prefill cost against length for one attention layer, with the fitted exponent of each curve: MLA (whose
expanded prefill has unequal q/k and v head dims) before and after issue 17's fix, and full GQA attention.

One layer of SmolLM2-135M's width (d 576, 9 query heads; GQA-3 of dim 64; MLA rank 128 + RoPE 32, nope 64,
v 64), random weights, fp32, batch 1, a full forward without a cache. "MLA (old path)" runs the same module
with SDPA called on the unequal head dims, as before issue 17 (PyTorch then falls back to its math kernel,
which builds the S x S score matrix). Times are process CPU time on one thread (another process holding the
core is not counted), contenders interleaved at each length; the exponent is a least-squares fit of
log(time) on log(length).

    python benchmarks/prefill_exponents.py                # 1K .. 16K (old MLA path up to 4K)
    python benchmarks/prefill_exponents.py --quick        # 256 .. 1K
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import kvlab.attention.mla as mla  # noqa: E402
from kvlab import Model, ModelConfig  # noqa: E402
from kvlab.attention._common import ForwardContext  # noqa: E402

LAYERS = {"full GQA-3": {"type": "full", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64},
          "MLA": {"type": "mla", "n_heads": 9, "kv_lora_rank": 128, "qk_rope_head_dim": 32,
                  "qk_nope_head_dim": 64, "v_head_dim": 64}}


def old_sdpa(q, k, v, mask, causal, scale):
    """Before issue 17, for MLA's equal head counts: SDPA straight on the unequal head dims."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          is_causal=causal and mask is None and q.shape[2] > 1)


def layer(spec: dict):
    config = {"vocab_size": 256, "d_model": 576, "n_layers": 1, "mlp_hidden": 64, "layers": [spec]}
    torch.manual_seed(0)
    return Model(ModelConfig.from_dict(config)).layers[0].self_attn.eval()


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@torch.inference_mode()
def prefill(module, seq: int, old: bool) -> float:
    x = torch.randn(1, seq, 576, generator=torch.Generator().manual_seed(seq))
    ctx = ForwardContext(1, seq, 0, None, x.device)
    saved = mla.grouped_sdpa
    if old:
        mla.grouped_sdpa = old_sdpa
    try:
        t0 = time.process_time()
        module(x, ctx, None)
        return time.process_time() - t0
    finally:
        mla.grouped_sdpa = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--old-max", type=int, default=4096, help="longest length for the old MLA path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    name = "prefill_exponents"
    if args.quick:
        args.lengths, args.old_max, args.repeats, name = [256, 512, 1024], 1024, 1, name + "_quick"
    torch.set_num_threads(1)
    modules = {label: layer(spec) for label, spec in LAYERS.items()}
    contenders = {"full GQA-3": (modules["full GQA-3"], False), "MLA": (modules["MLA"], False),
                  "MLA (old path)": (modules["MLA"], True)}
    times: dict[str, dict[int, float]] = {c: {} for c in contenders}
    for seq in args.lengths:
        samples = {c: [] for c in contenders if c != "MLA (old path)" or seq <= args.old_max}
        for r in range(args.repeats):
            order = list(samples) if r % 2 == 0 else list(reversed(samples))
            for c in order:
                module, old = contenders[c]
                samples[c].append(prefill(module, seq, old))
        for c, s in samples.items():
            times[c][seq] = statistics.median(s)
        print(seq, {c: round(times[c][seq], 3) for c in samples}, flush=True)
    rows = []
    for c, by_len in times.items():
        lengths = sorted(by_len)
        rows.append({"layer": c, "seconds": {str(n): by_len[n] for n in lengths},
                     "exponent": fit_exponent(lengths, [by_len[n] for n in lengths]) if len(lengths) > 1 else None,
                     "exponent_upper_half": fit_exponent(lengths[-3:], [by_len[n] for n in lengths[-3:]])
                     if len(lengths) > 2 else None})
    lengths = args.lengths
    lines = ["# Prefill of one attention layer against length (fp32, batch 1, 1 thread, CPU clock)", "",
             "| layer | " + " | ".join(f"{n} s" for n in lengths) + " | exponent (all) | exponent (last 3) |",
             "|---" * (len(lengths) + 3) + "|"]
    for row in rows:
        cells = [f"{row['seconds'][str(n)]:.3f}" if str(n) in row["seconds"] else "-" for n in lengths]
        e, e3 = row["exponent"], row["exponent_upper_half"]
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + f" | {e:.2f} | " + (f"{e3:.2f} |" if e3 else "- |"))
    mla_new, mla_old = times["MLA"], times["MLA (old path)"]
    common = [n for n in lengths if n in mla_old]
    lines += ["", "MLA old / new at the same length: " + ", ".join(f"{n}: {mla_old[n] / mla_new[n]:.1f}x"
                                                                   for n in common),
              "", "Command: `python benchmarks/prefill_exponents.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results(name, {"rows": rows, "lengths": lengths}, "\n".join(lines))


if __name__ == "__main__":
    main()
