"""kvlab's decode weight layout against plain linears at SmolLM2-135M's shapes (``kvlab.linear_layout``).

Per layer a decode step runs q/k/v (576 -> 576 + 192 + 192), o (576 -> 576), gate/up (576 -> 1,536 + 1,536)
and down (1,536 -> 576); then the LM head (576 -> 49,152). Variants, each over distinct weights (30 layers'
worth; 2 copies of the head) so the caches do not serve them, as in the real model:
- ``separate``: one column-major ``F.linear`` per member (MKL), what kvlab ran before fused groups;
- ``fused``: one column-major ``F.linear`` over the group's concatenated weight, split (MKL);
- ``packed``: the same through oneDNN on a weight reordered once (``torch.ops.mkldnn``), kvlab's CPU path
  where ``packed_pays`` measures it faster;
- ``gemv``: kvlab's kernel (``kernels/csrc/gemv.cpp``) on the fused column-major weight, for up to
  ``GEMV_MAX_ROWS`` rows (a GEMV up to 4 rows, register tiles past them), where ``gemv_pays`` measures it
  faster (the last column says which one kvlab runs).
At batch 1 (GEMV) and 16 (decode of 16 sequences: compute-bound, so GFLOP/s are reported too). Variants alternate round by round in one process; a
``torch.sum`` over 1 GiB probes read bandwidth in the same run, and each read speed is weight bytes / time.

    python benchmarks/fused_linears.py            # batch 1 and 16, 2 threads
    python benchmarks/fused_linears.py --quick    # few rounds (validation)
    python benchmarks/fused_linears.py --dtype bfloat16   # bf16 weights; fp32's packed path timed beside
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from decode_bandwidth import cpu_flags, read_seconds  # noqa: E402

from kvlab.linear_layout import gemv, gemv_applies, gemv_pays, packed_linear, packed_pays, packed_weight  # noqa: E402

GROUPS = {"q/k/v": (576, (576, 192, 192), 30), "o": (576, (576,), 30), "gate/up": (576, (1536, 1536), 30),
          "down": (1536, (576,), 30), "LM head": (576, (49152,), 2)}  # input width, outputs, distinct copies


def column_major(out: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(d_in, out, generator=gen).t()  # [out, in] stored in-major, as the model does


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def time_rounds(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and inputs; bfloat16 also times fp32's packed path in the same rounds")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    probe = torch.ones(2**28)  # 1 GiB fp32
    rows, data = [], []
    for name, (d_in, outs, copies) in GROUPS.items():
        separate = [[column_major(out, d_in, gen).to(dtype) for out in outs] for _ in range(copies)]
        fused = [torch.cat(ws).t().contiguous().t() for ws in separate]  # what fuse_ builds
        packed = [packed_weight(w) for w in fused]
        reference = [packed_weight(w.float()) for w in fused] if dtype != torch.float32 else []  # fp32, same run
        nbytes = sum(w.nbytes for w in fused)
        for batch in args.batches:
            x = torch.randn(batch, d_in, generator=gen).to(dtype)
            run = {"separate": lambda x=x, separate=separate: [F.linear(x, w) for ws in separate for w in ws],
                   "fused": lambda x=x, fused=fused, outs=outs: [F.linear(x, w).split(outs, -1) for w in fused]}
            if packed[0] is not None:
                run["packed"] = lambda x=x, packed=packed, outs=outs: [
                    packed_linear(x, w).split(outs, -1) for w in packed]
                torch.testing.assert_close(packed_linear(x, packed[0]),
                                           F.linear(x, fused[0]), **tol)
            if gemv_applies(x, fused[0]):
                run["gemv"] = lambda x=x, fused=fused, outs=outs: [gemv(x, w).split(outs, -1) for w in fused]
                torch.testing.assert_close(gemv(x, fused[0]), F.linear(x, fused[0]), **tol)
            if reference:
                run["fp32 packed"] = lambda x=x.float(), reference=reference, outs=outs: [
                    packed_linear(x, w).split(outs, -1) for w in reference]
            for ws_ref, w in zip(separate[:1], fused[:1]):  # same numbers, up to rounding
                torch.testing.assert_close(torch.cat([F.linear(x, wi) for wi in ws_ref], -1), F.linear(x, w), **tol)
            times = {k: [] for k in run}
            probes = []
            for _ in range(rounds):
                probes.append(read_seconds(probe)[0])
                for variant, fn in run.items():
                    times[variant].append(time_rounds(fn, 3))
            seconds = {k: statistics.median(v) for k, v in times.items()}
            bandwidth = probe.nbytes / statistics.median(probes) / 1e9
            result = {"group": name, "batch": batch, "read_GBps": bandwidth, "weight_bytes": nbytes,
                      "copies": copies, **{f"{k}_ms": s / copies * 1e3 for k, s in seconds.items()},
                      **{f"{k}_GBps": nbytes / s / 1e9 for k, s in seconds.items()},
                      **{f"{k}_GFLOPs": 2 * batch * nbytes / dtype.itemsize / s / 1e9 for k, s in seconds.items()},
                      **{f"{k}_speedup": seconds["separate"] / s for k, s in seconds.items()}}
            data.append(result)
            pays = packed[0] is not None and packed_pays(fused[0], batch)
            result["kvlab_runs"] = ("gemv" if "gemv" in run and gemv_pays(fused[0], batch, pays)
                                    else "packed" if pays else "fused")
            unit, key = ("GB/s", "GBps") if batch == 1 else ("GFLOP/s", "GFLOPs")  # one row reads; 16 compute
            cells = [f"{result[f'{k}_ms']:.3f} ({result[f'{k}_{key}']:.1f} {unit}, "
                     f"{result[f'{k}_speedup']:.2f}x)" if k in seconds else "-"
                     for k in ("separate", "fused", "packed", "gemv")]
            if reference:  # fp32's packed path in the same rounds: its ms and this dtype's packed speed-up over it
                result["packed_vs_fp32_packed"] = seconds["fp32 packed"] / seconds["packed"] if "packed" in seconds else None
                cells.append(f"{result['fp32 packed_ms']:.3f} ({fmt_ratio(result['packed_vs_fp32_packed'])})")
            rows.append(f"| {name} | {batch} | {bandwidth:.1f} | " + " | ".join(cells) + f" | {result['kvlab_runs']} |")
            print(rows[-1], flush=True)
    extra = " fp32 fused + packed, same run: ms (bf16 packed speed-up) |" if dtype != torch.float32 else ""
    lines = [f"# Decode weight layout vs plain linears (SmolLM2-135M shapes, {args.dtype}, {args.threads} threads)",
             "", f"CPU flags: {' '.join(cpu_flags())}", "",
             "| linears | batch | probe read GB/s | separate: ms (read GB/s or GFLOP/s, x) | fused | fused + packed "
             "| kvlab kernel |"
             + extra + " kvlab runs |", "|---" * (8 + bool(extra)) + "|", *rows, "",
             "Milliseconds per layer (per copy of the head); x = speed-up over separate. kvlab runs: what "
             "`linear_layout.packed_pays` / `gemv_pays` chose in this process (measured once per thread count, rows "
             f"bucket, dtype and weight shape). Medians of {rounds} "
             "alternating rounds (each 3 passes over the distinct weights); GB/s = weight bytes / time (batch 1), "
             "GFLOP/s = 2 x batch x weights / time (larger batches); probe: "
             "torch.sum over 1 GiB between rounds. Command: `python benchmarks/fused_linears.py "
             + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    name = "fused_linears" + ("" if dtype == torch.float32 else "_bf16") + ("_quick" if args.quick else "")
    write_results(name, {"dtype": args.dtype, "results": data}, "\n".join(lines))


if __name__ == "__main__":
    main()
