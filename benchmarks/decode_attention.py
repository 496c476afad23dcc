"""Decode attention alone: kvlab's one-pass kernel (``kernels/csrc/float_attention.cpp``, what
``grouped_sdpa`` runs for one query per row on CPU) against SDPA on the same cache views, at SmolLM2-135M's
layer shape (3 KV heads x GQA 3, head dim 64).

Each timed pass attends once over 30 distinct layers' caches (so they come from memory, as in a model's
step), each a slice of a buffer longer than the tokens held (the cache's strided rows). Read speed = K/V
bytes / time; a ``torch.sum`` over 1 GiB probes the read bandwidth in the same run. Kernel and SDPA
alternate round by round; the outputs are checked equal first.

    python benchmarks/decode_attention.py            # fp32 and bf16, batch 1 at 512 / 2K / 8K, batch 16 at 1K / 4K
    python benchmarks/decode_attention.py --quick    # two small cases (validation)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_results  # noqa: E402
from decode_bandwidth import cpu_flags, read_seconds  # noqa: E402

from kvlab.attention._common import decode_attention, decode_kernel_applies  # noqa: E402
from kvlab.kernels import FLOAT  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, LAYERS = 3, 3, 64, 30
SDPA = torch.nn.functional.scaled_dot_product_attention
CASES = [(1, 512), (1, 2048), (1, 8192), (16, 1024), (16, 4096)]


def caches(batch: int, tokens: int, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: k, v ``[B, 3, T, 64]`` views of buffers 256 tokens longer."""
    def buffer():
        return torch.randn(batch, KV_HEADS, tokens + 256, HEAD_DIM, generator=gen).to(dtype)[:, :, :tokens]
    return [(buffer(), buffer()) for _ in range(LAYERS)]


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if FLOAT.module() is None:
        sys.exit("the float decode-attention kernel did not build here")
    torch.set_num_threads(args.threads)
    cases, rounds = ([(1, 256), (4, 512)], 3) if args.quick else (CASES, args.rounds)
    gen = torch.Generator().manual_seed(0)
    probe = torch.ones(2**28)  # 1 GiB fp32
    rows, data = [], []
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for batch, tokens in cases:
            kv = caches(batch, tokens, dtype, gen)
            q = torch.randn(batch, KV_HEADS * GROUP, 1, HEAD_DIM, generator=gen).to(dtype)
            assert decode_kernel_applies(q, *kv[0], None)
            folded = q.view(batch, KV_HEADS, GROUP, HEAD_DIM)  # what grouped_sdpa runs without the kernel
            run = {"kernel": lambda q=q, kv=kv: [decode_attention(q, k, v, None, None) for k, v in kv],
                   "sdpa": lambda q=folded, kv=kv: [SDPA(q, k, v) for k, v in kv]}
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(run["kernel"]()[0].view(folded.shape).float(), run["sdpa"]()[0].float(),
                                       atol=tol, rtol=tol)
            times = {name: [] for name in run}
            probes = []
            for _ in range(rounds):
                probes.append(read_seconds(probe)[0])
                for name, fn in run.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
            seconds = {name: statistics.median(t) for name, t in times.items()}
            nbytes = sum(k.nbytes + v.nbytes for k, v in kv) * (tokens / (tokens + 256))  # the held tokens only
            bandwidth = probe.nbytes / statistics.median(probes) / 1e9
            result = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "tokens": tokens,
                      "read_GBps": bandwidth, "kv_bytes": nbytes,
                      **{f"{n}_ms": s * 1e3 for n, s in seconds.items()},
                      **{f"{n}_GBps": nbytes / s / 1e9 for n, s in seconds.items()},
                      "speedup": seconds["sdpa"] / seconds["kernel"]}
            data.append(result)
            rows.append(f"| {result['dtype']} | {batch} | {tokens} | {bandwidth:.1f} | "
                        f"{result['sdpa_ms']:.2f} ({result['sdpa_GBps']:.1f}) | "
                        f"{result['kernel_ms']:.2f} ({result['kernel_GBps']:.1f}) | "
                        f"{result['kernel_GBps'] / bandwidth:.2f} | **{result['speedup']:.2f}x** |")
            print(rows[-1], flush=True)
    lines = [f"# Decode attention: kvlab's one-pass kernel vs SDPA (SmolLM2 layer shape, {args.threads} threads)", "",
             f"CPU flags: {' '.join(cpu_flags())}", "",
             "| dtype | batch | tokens | probe read GB/s | SDPA ms (GB/s) | kernel ms (GB/s) | kernel / probe "
             "| **speed-up** |", "|---" * 8 + "|", *rows, "",
             f"ms per pass over {LAYERS} layers' caches (3 KV heads x GQA 3, head dim 64; rows strided by a buffer "
             f"256 tokens longer); GB/s = K/V bytes held / time; medians of {rounds} alternating rounds; probe: "
             "torch.sum over 1 GiB between rounds. Command: " + command_line("decode_attention.py", argv)]
    print("\n".join(lines))
    write_results("decode_attention" + ("_quick" if args.quick else ""), {"results": data}, "\n".join(lines))


if __name__ == "__main__":
    main()
