"""Batch-1 decode on the real model (SmolLM2-135M) as a fraction of this machine's read bandwidth.

Each decode step has to read every weight once (the tied LM head reads the whole 49K x 576 embedding)
and the whole KV cache held, so ``bytes per step / step time`` cannot exceed the memory read bandwidth.
That bandwidth is measured in the same run, interleaved with the decode rounds: ``torch.sum`` over a
1 GiB fp32 tensor with the same thread count. Bytes per step are read from the tensors (unique
parameters minus the embedding rows a lookup skips, plus ``cache.nbytes``), never typed in.

Workers (one per tree: this one and, with ``--old``, a checkout of an older commit) load the model and
time ``model(token, cache)`` + argmax steps at each context; the cache is filled by a real prefill, and
the parent alternates bandwidth probe / new / old round by round, one process busy at a time.

    python benchmarks/decode_bandwidth.py                      # contexts 512, 2048, 8192
    python benchmarks/decode_bandwidth.py --old /tmp/perf_old  # also the old tree, interleaved
    python benchmarks/decode_bandwidth.py --quick              # 128, 512; few steps (validation)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from kvlab.machine import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[1])
from _smollm2 import load_model
model = load_model(sys.argv[2], dtype=sys.argv[4]).eval()
if hasattr(model, "pack_linears_"):  # oneDNN-packed linears where measured faster (opt-in, kvlab.linear_layout)
    model.pack_linears_()
params = {id(p): p for p in model.parameters()}
weight_bytes = sum(p.nbytes for p in params.values())
if model.lm_head.weight is not model.embed_tokens.weight:  # untied: the lookup reads one row, not the table
    weight_bytes -= model.embed_tokens.weight.nbytes
caches = {}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    ctx, steps = map(int, line.split())
    with torch.inference_mode():
        if ctx not in caches:
            prompt = torch.randint(1, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx))
            cache = model.new_cache(1, max_length=ctx + 4096)
            logits = model(prompt, cache=cache, last_only=True)[:, -1]
            caches[ctx] = (cache, logits.argmax(-1))
        cache, token = caches[ctx]
        held = cache.nbytes
        times, cpu, tokens = [], [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            tokens.append(int(token))
        caches[ctx] = (cache, token)
    try:  # which linear kernel this tree's layout measured faster (kvlab.linear_layout; absent in old trees)
        from kvlab.linear_layout import _PACKED_PAYS
        fields = ("threads", "rows", "", "")  # the key: (threads, rows bucket[, dtype, weight shape])
        layout = {", ".join(f"{f} {x}".strip() for f, x in zip(fields, key)): "oneDNN packed" if v else "MKL"
                  for key, v in _PACKED_PAYS.items()}
        from kvlab.linear_layout import _GEMV_PAYS  # (threads, rows, dtype, shape, against oneDNN): kvlab's kernel
        layout.update({", ".join(f"{f} {x}".strip() for f, x in zip(fields, key)): "kvlab GEMV"
                       for key, v in _GEMV_PAYS.items() if v})
    except ImportError:
        layout = None
    print(json.dumps({"times": times, "cpu": cpu, "bytes": weight_bytes + held, "weights": weight_bytes, "cache": held,
                      "tokens": tokens, "layout": layout}), flush=True)
"""


def cpu_flags() -> list[str]:
    """The SIMD flags that decide fp32/bf16 speed (from /proc/cpuinfo)."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def read_seconds(buffer: torch.Tensor) -> tuple[float, float]:
    """Wall and CPU seconds of one ``torch.sum`` over ``buffer``."""
    t0, c0 = time.perf_counter(), time.process_time()
    buffer.sum()
    return time.perf_counter() - t0, time.process_time() - c0


class Worker:
    def __init__(self, tree: Path, model: str, threads: int, dtype: str):
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        bench = str(ROOT / "benchmarks")  # this tree's model loader, whichever kvlab is imported
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, bench, model, str(threads), dtype], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask(None)

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("decode_bandwidth: a worker died (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--old", type=Path, help="checkout of an older commit to run interleaved")
    parser.add_argument("--contexts", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the weights' and cache's dtype (bytes per step are read from the tensors)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time of steps and of the probe (1 thread on a shared machine: "
                             "time another process holds the core is not counted)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="decode_bandwidth")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.rounds, args.steps, args.name = [128, 512], 2, 3, args.name + "_quick"
    torch.set_num_threads(args.threads)
    buffer = torch.ones(2**28)  # 1 GiB fp32
    workers = {"new": Worker(ROOT, args.model, args.threads, args.dtype)}
    if args.old:
        workers["old"] = Worker(args.old.resolve(), args.model, args.threads, args.dtype)
    rows = []
    for ctx in args.contexts:
        samples = {name: {"wall": [], "cpu": []} for name in workers}
        tokens = {name: [] for name in workers}
        bandwidth, info = [], {}
        for name, worker in workers.items():  # warm-up round: prefill and first steps
            info[name] = worker.ask(f"{ctx} 2")
        for r in range(args.rounds):
            bandwidth.append(read_seconds(buffer))
            order = list(workers) if r % 2 == 0 else list(reversed(workers))
            for name in order:
                info[name] = workers[name].ask(f"{ctx} {args.steps}")
                samples[name]["wall"] += info[name]["times"]
                samples[name]["cpu"] += info[name]["cpu"]
                tokens[name] += info[name]["tokens"]
        clock = 1 if args.clock == "cpu" else 0
        bw = buffer.nbytes / statistics.median(b[clock] for b in bandwidth)
        row = {"context": ctx, "clock": args.clock, "read_bandwidth_GBps": bw / 1e9,
               "wall_read_bandwidth_GBps": buffer.nbytes / statistics.median(b[0] for b in bandwidth) / 1e9}
        for name in workers:
            step = statistics.median(samples[name][args.clock])
            wall = statistics.median(samples[name]["wall"])
            row[name] = {"tok_s": 1 / step, "step_ms": step * 1e3, "wall_step_ms": wall * 1e3,
                         "bytes_per_step": info[name]["bytes"],
                         "weights_bytes": info[name]["weights"], "cache_bytes": info[name]["cache"],
                         "effective_GBps": info[name]["bytes"] / step / 1e9,
                         "fraction_of_bandwidth": info[name]["bytes"] / step / bw, "linears": info[name]["layout"]}
        if "old" in workers:
            row["speedup_new_vs_old"] = row["old"]["step_ms"] / row["new"]["step_ms"]
            row["wall_speedup_new_vs_old"] = row["old"]["wall_step_ms"] / row["new"]["wall_step_ms"]
            row["same_greedy_tokens"] = tokens["new"] == tokens["old"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    for worker in workers.values():
        worker.close()
    machine = {**machine_info(), "cpu_flags": cpu_flags()}
    header = "| context | read GB/s | tok/s | MB read per step | effective GB/s | fraction |"
    lines = [f"# Decode at batch 1 against read bandwidth ({args.model}, {args.dtype}, {args.threads} threads, {args.clock} clock)", "",
             f"CPU: {machine['cpu']}; flags: {' '.join(machine['cpu_flags'])}; load average {machine['load_avg']}",
             "", header + (" old tok/s | old fraction | new/old | same tokens |" if args.old else ""),
             "|---" * (6 + (4 if args.old else 0)) + "|"]
    for row in rows:
        new = row["new"]
        line = (f"| {row['context']} | {row['read_bandwidth_GBps']:.1f} | {new['tok_s']:.1f} | "
                f"{new['bytes_per_step'] / 1e6:.0f} | {new['effective_GBps']:.1f} | {new['fraction_of_bandwidth']:.2f} |")
        if args.old:
            old = row["old"]
            line += f" {old['tok_s']:.1f} | {old['fraction_of_bandwidth']:.2f} | {row['speedup_new_vs_old']:.2f} | {row['same_greedy_tokens']} |"
        lines.append(line)
    lines += ["", f"This tree's linears (``linear_layout.packed_pays`` / ``gemv_pays``, measured in the worker): {rows[-1]['new']['linears']}.",
              "", f"Medians over {args.rounds} rounds x {args.steps} steps; bandwidth: torch.sum over 1 GiB fp32 "
              "between rounds. Command: `python benchmarks/decode_bandwidth.py "
              + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    print("\n".join(lines))
    write_results(args.name, {"model": args.model, "threads": args.threads, "cpu_flags": machine["cpu_flags"],
                              "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
